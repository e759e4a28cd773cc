"""Command-line interface: thin commands over the engine; rendering lives in :mod:`.render`."""

from mergetui.cli.app import app, main

__all__ = ["app", "main"]
