"""Reusable widgets and widget helpers of the TUI."""
