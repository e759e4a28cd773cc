"""One module per step of the guided merge."""
