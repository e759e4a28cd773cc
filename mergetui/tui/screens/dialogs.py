"""Small modal screens: help, error detail, and the questions the app asks (quit, restore)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


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
