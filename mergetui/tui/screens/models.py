"""Step 1: the base model and the models to merge (paths or Hub ids), and the HF cache."""

from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, ListItem, ListView

from mergetui.tui.state import ModelDraft


class ModelsScreen(Screen[None]):
    """Type a folder or an ``org/name[@rev]`` Hub id; models in the HF cache are listed to pick."""

    BINDINGS = [Binding("ctrl+n", "next", "Check", show=True)]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="models-step"):
            yield Label("1 · Models: the base, then each model to merge (folder or org/name@rev)")
            with Horizontal(classes="row"):
                yield Input(placeholder="base model (optional for linear)", id="base")
            with Horizontal(classes="row"):
                yield Input(placeholder="model to merge", id="model")
                yield Button("Add", id="add", variant="primary")
                yield Button("Remove last", id="remove")
            yield ListView(id="chosen")
            yield Label("in the HF cache (Enter adds one):", classes="subtitle")
            yield DataTable(id="cached", cursor_type="row")
            yield Button("Next: check compatibility", id="next", variant="success")
        yield Footer()

    def on_mount(self) -> None:
        draft = self.app.draft  # type: ignore[attr-defined]
        self.query_one("#base", Input).value = draft.base
        for entry in draft.models:
            self._show(entry.model)
        table = self.query_one("#cached", DataTable)
        table.add_columns("model", "revision", "size", "offline")
        self.load_cache()

    @work(thread=True, exclusive=True, group="cache", exit_on_error=False)
    def load_cache(self) -> None:
        from mergetui.sources.hub import cached_models
        from mergetui.units import format_bytes

        rows = [
            (
                m.repo_id,
                r.commit[:12],
                format_bytes(r.size_bytes),
                "usable" if r.usable_offline else "incomplete",
            )
            for m in cached_models()
            for r in m.revisions[:1]
        ]
        self.app.call_from_thread(self._fill_cache, rows)

    def _fill_cache(self, rows: list[tuple[str, str, str, str]]) -> None:
        table = self.query_one("#cached", DataTable)
        for row in rows:
            table.add_row(*row, key=row[0])

    def _show(self, model: str) -> None:
        self.query_one("#chosen", ListView).append(ListItem(Label(model)))

    def _add(self, model: str) -> None:
        model = model.strip()
        if not model:
            self.notify("type a folder or a Hub id first", severity="warning")
            return
        self.app.draft.models.append(ModelDraft(model))  # type: ignore[attr-defined]
        self._show(model)

    @on(Button.Pressed, "#add")
    @on(Input.Submitted, "#model")
    def add_model(self) -> None:
        field = self.query_one("#model", Input)
        self._add(field.value)
        field.value = ""

    @on(Button.Pressed, "#remove")
    def remove_model(self) -> None:
        draft = self.app.draft  # type: ignore[attr-defined]
        if draft.models:
            draft.models.pop()
            chosen = self.query_one("#chosen", ListView)
            chosen.children[-1].remove()

    @on(DataTable.RowSelected, "#cached")
    def add_cached(self, event: DataTable.RowSelected) -> None:
        self._add(str(event.row_key.value))

    @on(Input.Changed, "#base")
    def base_changed(self, event: Input.Changed) -> None:
        self.app.draft.base = event.value.strip()  # type: ignore[attr-defined]

    @on(Button.Pressed, "#next")
    def action_next(self) -> None:
        self.app.action_check()  # type: ignore[attr-defined]
