"""Command-line interface: thin commands over the engine; rendering lives in :mod:`.render`.

``mergetui`` with no arguments opens the TUI without importing the command-line app at all
(typer and the commands' modules cost ~0.15 s), so the first screen comes up sooner. The typer
app is ``mergetui.cli.app.app``.
"""

from __future__ import annotations

import sys

from mergetui.openmp import tune_openmp_waits

__all__ = ["main"]


def main() -> None:
    """Console-script entry point."""
    tune_openmp_waits()  # before anything imports torch
    if len(sys.argv) == 1:
        from mergetui.tui.app import create_app

        create_app().run()
        return
    from mergetui.cli.app import main as run_cli

    run_cli()
