"""The Textual app, built by a factory the tests reuse. Imports no torch: screens import the
engine inside their workers, so the first screen is up before any heavy module loads."""

from __future__ import annotations

from pathlib import Path

from textual.app import App

from mergetui.tui.screens.check import CheckScreen
from mergetui.tui.screens.method import MethodScreen
from mergetui.tui.screens.models import ModelsScreen
from mergetui.tui.screens.run import RunScreen
from mergetui.tui.state import RecipeDraft


class MergeTuiApp(App[None]):
    CSS_PATH = "mergetui.tcss"
    TITLE = "mergetui"
    SUB_TITLE = "guided model merging"

    def __init__(self, draft: RecipeDraft | None = None) -> None:
        super().__init__()
        self.draft = draft or RecipeDraft()

    def on_mount(self) -> None:
        self.push_screen(ModelsScreen())

    def action_check(self) -> None:
        """A fresh check of the current draft (the draft may have changed since the last one)."""
        self.push_screen(CheckScreen())

    def action_method(self) -> None:
        self.push_screen(MethodScreen())

    def action_run(self) -> None:
        self.push_screen(RunScreen())


def create_app(base_dir: Path | None = None, draft: RecipeDraft | None = None) -> MergeTuiApp:
    """The app with ``draft`` (``mergetui open``) or an empty one whose relative paths resolve
    against ``base_dir``."""
    return MergeTuiApp(draft or RecipeDraft(base_dir=base_dir or Path.cwd()))
