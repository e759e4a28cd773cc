"""Small modal screens: help, error detail, and the questions the app asks (quit, restore)."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Static

from mergetui.tui.widgets.paths import PathSuggester


class HelpScreen(ModalScreen[None]):
    """F1: what the current step is for and its keys (each screen's ``HELP`` text)."""

    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        from textual.widgets import Markdown  # markdown-it loads only when help is asked for

        with VerticalScroll(classes="dialog"):
            yield Markdown(self.text)
            yield Button("Close (Esc)", id="close")

    @on(Button.Pressed, "#close")
    def close(self) -> None:
        self.dismiss(None)


class ErrorScreen(ModalScreen[None]):
    """F2: the full detail of the last error (the traceback, and where the log is)."""

    BINDINGS = [Binding("escape,f2,q", "dismiss", "Close")]

    def __init__(self, summary: str, detail: str, log_path: str) -> None:
        super().__init__()
        self.summary, self.detail, self.log_path = summary, detail, log_path

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog"):
            yield Label(f"[b red]{self.summary}[/]", markup=True)
            yield Static(self.detail, id="error-detail", markup=False)
            yield Label(f"the log has this and more: {self.log_path}", classes="param-help")
            yield Button("Close (Esc)", id="close")

    @on(Button.Pressed, "#close")
    def close(self) -> None:
        self.dismiss(None)


class ChoiceScreen(ModalScreen[str]):
    """A question with a few answers, one button each; Escape picks the last (the safe one)."""

    BINDINGS = [Binding("escape", "safe", "Cancel")]

    def __init__(self, question: str, choices: list[tuple[str, str]]) -> None:
        super().__init__()
        self.question, self.choices = question, choices

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, id="question")
            with Horizontal(classes="row"):
                for key, label in self.choices:
                    yield Button(label, id=f"choice-{key}")

    @on(Button.Pressed)
    def chosen(self, event: Button.Pressed) -> None:
        self.dismiss((event.button.id or "").removeprefix("choice-"))

    def action_safe(self) -> None:
        self.dismiss(self.choices[-1][0])


class BrowseScreen(ModalScreen[str | None]):
    """Browse the disk for a model or adapter folder (one with ``config.json`` or
    ``adapter_config.json``); the field at the top re-roots the tree (paths complete as typed)."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, start: Path) -> None:
        super().__init__()
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="browse-dialog"):
            yield Label("Pick a model folder (Enter on a folder with a config.json); Esc cancels")
            yield Input(str(self.start), id="browse-root", suggester=PathSuggester(self.start))
            yield DirectoryTree(self.start, id="browse-tree")

    @on(Input.Submitted, "#browse-root")
    def reroot(self, event: Input.Submitted) -> None:
        folder = Path(event.value).expanduser()
        if not folder.is_dir():
            self.app.notify(f"not a folder: {folder}", severity="warning")
            return
        self.query_one("#browse-tree", DirectoryTree).path = folder

    @on(DirectoryTree.DirectorySelected)
    def chosen(self, event: DirectoryTree.DirectorySelected) -> None:
        folder = Path(event.path)
        if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
            self.dismiss(str(folder))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
