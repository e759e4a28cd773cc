"""The parts the two form screens of step 3 share (model methods and adapter combinations): the
row that saves the recipe, and the side panel with its problems and TOML preview."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Label, Static

from mergetui.errors import MergeTuiError


def save_row(save_path: str) -> ComposeResult:
    """Where to save the recipe, the Save button, and the headless command that replays it."""
    yield Label("save the recipe as", classes="model-title")
    with Horizontal(classes="row"):
        yield Input(save_path, id="save-path")
        yield Button("Save (ctrl+s)", id="save", variant="success")
    yield Static(
        f"headless, once saved: mergetui run {save_path}", id="headless", classes="param-help"
    )


def recipe_side() -> ComposeResult:
    """The recipe's problems and its live TOML preview, beside the form."""
    with Vertical(id="method-side"):
        yield Static("", id="problems")
        yield Static("", id="preview", markup=False)


def save_recipe(screen: Any) -> None:
    """Save the screen's draft where its save field says (the recipe layer's writer validates),
    and say how to replay it headless; a refusal is a notification naming the problem."""
    draft = screen.draft
    field = screen.query_one("#save-path", Input).value.strip()
    path = Path(field or draft.default_save_path()).expanduser()
    try:
        saved = draft.save(path)
    except MergeTuiError as exc:
        screen.app.notify(str(exc).splitlines()[0], severity="error", title="not saved")
        return
    screen.merge_app.mark_saved()
    screen.query_one("#headless", Static).update(f"headless: mergetui run {saved}")
    screen.app.notify(f"replay headless with: mergetui run {saved}", title=f"saved {saved}")
