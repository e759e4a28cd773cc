"""Step 1: the base model and the models to merge (folders or Hub ids), each with an optional
LoRA adapter; models in the HF cache to pick from; a Hub search with each model's details before
anything is downloaded, and downloads in the background.

Or, switched to *Merge LoRA adapters* (the one-line choice at the top), the same rows hold PEFT
adapter folders with their weights, combined into one adapter (an ``[adapters]`` recipe): the
base is optional there (the adapters are only checked against its headers), and the HF cache and
Hub panels are hidden, because an adapter merge reads local adapter folders only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    Select,
    Static,
    TabbedContent,
    TabPane,
)
from textual.worker import Worker

from mergetui.tui.screens.base import StepScreen, error_text
from mergetui.tui.state import ADAPTERS, MODELS, AdapterDraft, ModelDraft
from mergetui.tui.widgets.paths import PathSuggester
from mergetui.units import format_bytes, format_count


class ModelsScreen(StepScreen):
    """Type a folder (→ accepts the suggested completion) or an ``org/name[@rev]`` Hub id."""

    BINDINGS = [
        Binding("ctrl+n", "next", "Check", show=True),
        Binding("alt+up", "move(-1)", "Move up"),
        Binding("alt+down", "move(1)", "Move down"),
    ]
    HELP = """\
## 1 · Models

The **base** is the model the others were fine-tuned from (task vectors are taken against it;
linear and SLERP can do without). Then each **model to merge**: a folder (→ accepts the
suggested completion; **Browse…** picks one on disk), or a Hub id `org/name` (optionally
`@revision`), with an optional
**LoRA adapter** (a folder or Hub id) folded into that model first.

The chosen models are listed in merge order: **Alt+↑ / Alt+↓** (or Up/Down) move the selected
one, **Remove** drops it. Below, **In the HF cache** lists models already downloaded (Enter adds
one), and **Search the Hub** finds models by name: the highlighted one's size, architecture and
files show before anything is downloaded; **Download** fetches it in the background.

Ctrl+N checks compatibility, before any weight is read.

**Merge LoRA adapters** (the choice at the top): combine PEFT LoRA adapters trained on one base
into one adapter, as PEFT's `add_weighted_adapter` does (`mergetui lora merge`). Each row is an
adapter folder (with `adapter_config.json`) and its weight (default 1; negative subtracts it).
The base is optional: given, the adapters are checked against its tensor headers (no weight is
read). Step 3 then offers PEFT's combination types instead of the merge methods.
"""
    #: the title line after the kind choice, per kind
    TITLES = {
        MODELS: "the base, then each model",
        ADAPTERS: "PEFT adapters of one base",
    }
    #: the fields' placeholders per kind: base, row, and the field beside the row
    PLACEHOLDERS = {
        MODELS: ("base model (optional for linear)", "model to merge"),
        ADAPTERS: (
            "base model (optional: the adapters are checked against its headers)",
            "LoRA adapter folder (adapter_config.json)",
        ),
    }

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def compose(self) -> ComposeResult:
        base_dir = self.draft.base_dir
        yield Header()
        kind = self.draft.kind
        with VerticalScroll(id="models-step"):
            with Horizontal(id="kind-row"):
                yield Label("1 · Models: ")
                yield Select(
                    [("Merge models", MODELS), ("Merge LoRA adapters", ADAPTERS)],
                    value=kind,
                    allow_blank=False,
                    compact=True,
                    id="kind",
                )
                yield Label(f" — {self.TITLES[kind]}", id="kind-title")
            yield Input(
                placeholder=self.PLACEHOLDERS[kind][0],
                id="base",
                suggester=PathSuggester(base_dir),
            )
            with Horizontal(classes="row"):
                yield Input(
                    placeholder=self.PLACEHOLDERS[kind][1],
                    id="model",
                    suggester=PathSuggester(base_dir),
                )
                yield Input(
                    placeholder="LoRA (optional)",
                    id="lora",
                    classes="third",
                    suggester=PathSuggester(base_dir),
                )
                yield Input(placeholder="weight (1)", id="weight", classes="weight")
                yield Button("Add", id="add", variant="primary")
                yield Button("Browse…", id="browse")
            yield DataTable(id="chosen", cursor_type="row")
            yield Static("", id="slices-note", classes="param-help")
            yield Static(
                "An adapter merge reads local PEFT folders only (Browse… picks one); step 3 "
                "offers the combination types.",
                id="adapters-note",
                classes="param-help",
            )
            with Horizontal(classes="row"):
                yield Button("Up", id="up")
                yield Button("Down", id="down")
                yield Button("Remove", id="remove")
                yield Button("Next: check (ctrl+n)", id="next", variant="success")
            with TabbedContent(id="sources"):
                with TabPane("In the HF cache", id="cache-tab"):
                    yield DataTable(id="cached", cursor_type="row")
                with TabPane("Search the Hub", id="hub-tab"):
                    with Horizontal(classes="row"):
                        yield Input(placeholder="search model ids", id="hub-query")
                        yield Button("Search", id="hub-search")
                    yield DataTable(id="hub-results", cursor_type="row")
                    yield Static("", id="hub-info")
                    with Horizontal(classes="row"):
                        yield Button("Add", id="hub-add", disabled=True)
                        yield Button("Download", id="hub-download", disabled=True)
                    yield Static("", id="download-status")
                    yield ProgressBar(id="download-progress", show_eta=False)
        yield Footer()

    def on_mount(self) -> None:
        self.show_draft()
        self.query_one("#cached", DataTable).add_columns("model", "revision", "size", "offline")
        self.query_one("#hub-results", DataTable).add_columns(
            "model", "task", "parameters", "downloads"
        )
        self.query_one("#base", Input).focus()
        self.load_cache()

    def show_draft(self) -> None:
        """Fill the fields from the app's draft (on mount, and when a saved draft is restored)."""
        draft = self.draft
        self.query_one("#kind", Select).value = draft.kind
        self._show_kind()
        self.query_one("#base", Input).value = draft.base
        self._refresh_chosen()
        note = self.query_one("#slices-note", Static)
        note.display = bool(draft.slices) and not draft.is_adapter_merge
        if draft.slices:  # models added above could not join them: say where they are edited
            note.update(
                Text(
                    "This recipe is made of [[slices]] (layer ranges), edited in its TOML; the "
                    "method step shows them:\n" + "\n".join(draft.slice_lines())
                )
            )

    # -- the kind of merge -------------------------------------------------------------------------
    @on(Select.Changed, "#kind")
    def kind_changed(self, event: Select.Changed) -> None:
        if event.value == self.draft.kind or event.value is Select.NULL:
            return
        self.draft.switch_kind(str(event.value))
        self._show_kind()
        self._refresh_chosen()
        self.query_one("#slices-note").display = (
            bool(self.draft.slices) and not self.draft.is_adapter_merge
        )

    def _show_kind(self) -> None:
        """The fields, table columns and panels of the draft's kind (models or adapters)."""
        kind = self.draft.kind
        adapters = kind == ADAPTERS
        self.query_one("#kind-title", Label).update(f" — {self.TITLES[kind]}")
        base_text, row_text = self.PLACEHOLDERS[kind]
        self.query_one("#base", Input).placeholder = base_text
        self.query_one("#model", Input).placeholder = row_text
        self.query_one("#lora").display = not adapters
        self.query_one("#weight").display = adapters
        self.query_one("#sources").display = not adapters
        self.query_one("#adapters-note").display = adapters
        chosen = self.query_one("#chosen", DataTable)
        chosen.clear(columns=True)
        chosen.add_columns(*(("#", "adapter", "weight") if adapters else ("#", "model", "LoRA")))

    @property
    def _rows(self) -> list[Any]:
        """The draft's entries this step lists: its models, or its adapters."""
        draft = self.draft
        return draft.adapters if draft.is_adapter_merge else draft.models

    # -- the chosen models -------------------------------------------------------------------------
    def _refresh_chosen(self, select: int | None = None) -> None:
        draft = self.draft
        chosen = self.query_one("#chosen", DataTable)
        chosen.clear()
        if draft.is_adapter_merge:
            for index, adapter in enumerate(draft.adapters):
                chosen.add_row(str(index), adapter.lora, str(adapter.weight))
        else:
            for index, entry in enumerate(draft.models):
                chosen.add_row(str(index), entry.model, entry.lora or "")
        rows = self._rows
        if select is not None and rows:
            chosen.move_cursor(row=max(0, min(select, len(rows) - 1)))

    def _add(self, model: str, lora: str = "") -> None:
        model = model.strip()
        if not model:
            self.app.notify("type a folder or a Hub id first", severity="warning")
            return
        draft = self.draft
        draft.models.append(ModelDraft(model, lora.strip()))
        self._refresh_chosen(select=len(draft.models) - 1)

    def _add_adapter(self, folder: str, weight_text: str) -> None:
        """An adapter row; its weight as typed when it is not a number (step 3 and the check
        show the validator's reason, and step 3 edits it)."""
        folder = folder.strip()
        if not folder:
            self.app.notify("type an adapter folder first", severity="warning")
            return
        text = weight_text.strip()
        weight: float | str = 1.0
        if text:
            try:
                weight = float(text)
            except ValueError:
                weight = text
        self.draft.adapters.append(AdapterDraft(folder, weight))
        self._refresh_chosen(select=len(self.draft.adapters) - 1)

    @on(Button.Pressed, "#add")
    @on(Input.Submitted, "#model, #lora, #weight")
    def add_model(self) -> None:
        field, lora = self.query_one("#model", Input), self.query_one("#lora", Input)
        weight = self.query_one("#weight", Input)
        if self.draft.is_adapter_merge:
            self._add_adapter(field.value, weight.value)
        else:
            self._add(field.value, lora.value)
        if field.value.strip():
            field.value = lora.value = weight.value = ""
            field.focus()

    @on(Button.Pressed, "#browse")
    def browse(self) -> None:
        """Pick a folder on disk: an adapter folder fills the LoRA field, a model the model's."""
        from mergetui.tui.screens.dialogs import BrowseScreen

        def picked(folder: str | None) -> None:
            if folder is None:
                return
            is_adapter = (Path(folder) / "adapter_config.json").is_file()
            as_lora = is_adapter and not self.draft.is_adapter_merge
            self.query_one("#lora" if as_lora else "#model", Input).value = folder

        self.app.push_screen(BrowseScreen(self.draft.base_dir), picked)

    @on(Button.Pressed, "#remove")
    def remove_model(self) -> None:
        """Remove the selected row (the last one when none is selected)."""
        rows = self._rows
        if not rows:
            return
        row = self.query_one("#chosen", DataTable).cursor_row
        index = row if 0 <= row < len(rows) else len(rows) - 1
        rows.pop(index)
        self._refresh_chosen(select=index)

    @on(Button.Pressed, "#up")
    def move_up(self) -> None:
        self.action_move(-1)

    @on(Button.Pressed, "#down")
    def move_down(self) -> None:
        self.action_move(1)

    def action_move(self, step: int) -> None:
        """Move the selected row up or down the merge order."""
        rows = self._rows
        index = self.query_one("#chosen", DataTable).cursor_row
        target = index + step
        if not (0 <= index < len(rows) and 0 <= target < len(rows)):
            return
        rows[index], rows[target] = rows[target], rows[index]
        self._refresh_chosen(select=target)

    @on(Input.Changed, "#base")
    def base_changed(self, event: Input.Changed) -> None:
        self.draft.base = event.value.strip()

    @on(Button.Pressed, "#next")
    def action_next(self) -> None:
        self.merge_app.action_check()

    # -- the HF cache ------------------------------------------------------------------------------
    @work(
        thread=True,
        exclusive=True,
        group="cache",
        exit_on_error=False,
        description="reading the HF cache",
    )
    def load_cache(self) -> None:
        from mergetui.sources.hub import cached_models

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
        table.clear()
        for row in rows:
            table.add_row(*row, key=row[0])

    @on(DataTable.RowSelected, "#cached")
    def add_cached(self, event: DataTable.RowSelected) -> None:
        if not self.draft.is_adapter_merge:
            self._add(str(event.row_key.value))

    # -- the Hub -----------------------------------------------------------------------------------
    @on(Input.Submitted, "#hub-query")
    @on(Button.Pressed, "#hub-search")
    def start_search(self) -> None:
        query = self.query_one("#hub-query", Input).value.strip()
        if not query:
            self.app.notify("type part of a model id to search for", severity="warning")
            return
        self.query_one("#hub-info", Static).update(f"searching for {query!r}…")
        self.search_hub(query)

    @work(
        thread=True,
        exclusive=True,
        group="hub-search",
        exit_on_error=False,
        description="the Hub search",
    )
    def search_hub(self, query: str) -> None:
        """Any error (offline, unreachable, or a bug) is reported by the app; see
        :meth:`worker_failed`."""
        from mergetui.sources import hub

        hits = hub.search(query, limit=30)
        self.app.call_from_thread(self._show_hits, query, hits)

    def _show_hits(self, query: str, hits: list[Any]) -> None:
        table = self.query_one("#hub-results", DataTable)
        table.clear()
        self.hits = [hit.repo_id for hit in hits]
        for hit in hits:
            table.add_row(
                hit.repo_id,
                hit.pipeline_tag or "",
                format_count(hit.parameters) if hit.parameters else "?",
                format_count(hit.downloads) if hit.downloads is not None else "?",
                key=hit.repo_id,
            )
        self.query_one("#hub-info", Static).update(
            f"{len(hits)} model(s) match {query!r}" if hits else f"no models match {query!r}"
        )
        if hits:
            table.focus()

    @property
    def highlighted_hit(self) -> str | None:
        row = self.query_one("#hub-results", DataTable).cursor_row
        return self.hits[row] if 0 <= row < len(self.hits) else None

    @on(DataTable.RowHighlighted, "#hub-results")
    def hit_highlighted(self) -> None:
        repo_id = self.highlighted_hit
        if repo_id is not None:
            self.query_one("#hub-info", Static).update(f"{repo_id}: reading its details…")
            self.show_info(repo_id)

    @work(
        thread=True,
        exclusive=True,
        group="hub-info",
        exit_on_error=False,
        description="reading a Hub model's details",
    )
    def show_info(self, repo_id: str) -> None:
        """Size, architecture and files of a Hub model, from its metadata and config only."""
        from mergetui.errors import MergeTuiError
        from mergetui.sources import hub

        ref = _hub_ref(repo_id)
        try:
            info = hub.repo_info(ref)
        except MergeTuiError as exc:
            self.app.call_from_thread(self._info_failed, repo_id, exc)
            return
        self.app.call_from_thread(self._show_info, repo_id, info)

    def _info_failed(self, repo_id: str, exc: Exception) -> None:
        self.query_one("#hub-info", Static).update(f"[b red]{repo_id}:[/] {exc}")
        self.query_one("#hub-add", Button).disabled = True
        self.query_one("#hub-download", Button).disabled = True

    def _show_info(self, repo_id: str, info: Any) -> None:
        if repo_id != self.highlighted_hit:
            return  # the user moved on while it loaded
        from rich.text import Text

        from mergetui.sources.hub_summary import info_rows

        lines = [  # the same lines as `mergetui hub info`
            Text.assemble((f"{row.label}: ", "bold"), (row.text, "yellow" if row.warning else ""))
            for row in info_rows(info)
        ]
        self.query_one("#hub-info", Static).update(Text("\n").join(lines))
        self.query_one("#hub-add", Button).disabled = False
        self.query_one("#hub-download", Button).disabled = info.weight_format is None

    @on(Button.Pressed, "#hub-add")
    def add_hit(self) -> None:
        repo_id = self.highlighted_hit
        if repo_id is not None:
            self._add(repo_id)

    @on(Button.Pressed, "#hub-download")
    def download_hit(self) -> None:
        repo_id = self.highlighted_hit
        if repo_id is not None:
            self.query_one("#download-status", Static).update(f"downloading {repo_id}…")
            # downloads run side by side: the description names the model if this one fails
            self.download(repo_id).description = f"downloading {repo_id}"

    @work(thread=True, group="download", exit_on_error=False, description="a download")
    def download(self, repo_id: str) -> None:
        """Fetch what a merge needs into the HF cache; the UI stays usable meanwhile. An error
        is reported by the app; see :meth:`worker_failed`."""
        from mergetui.sources import hub

        ref = _hub_ref(repo_id)

        shown = [0.0]

        def progress(event: Any) -> None:  # at most 10 redraws a second, and the last one
            now = time.monotonic()
            if now - shown[0] >= 0.1 or event.bytes_done >= event.bytes_total:
                shown[0] = now
                self.app.call_from_thread(self._show_download, event)

        folder = hub.download(ref, progress)
        self.app.call_from_thread(self._downloaded, repo_id, str(folder))

    def _show_download(self, event: Any) -> None:
        self.query_one("#download-progress", ProgressBar).update(
            total=max(event.bytes_total, 1), progress=event.bytes_done
        )
        self.query_one("#download-status", Static).update(
            f"downloading {event.repo_id}: {format_bytes(event.bytes_done)} of "
            f"{format_bytes(event.bytes_total)}"
        )

    def _downloaded(self, repo_id: str, folder: str) -> None:
        self.query_one("#download-status", Static).update(f"[green]{repo_id} is in the cache[/]")
        self.app.notify(f"{repo_id} downloaded to {folder}", title="download done")
        self.load_cache()

    def worker_failed(self, worker: Worker[Any], error: BaseException) -> None:
        """Replace "searching…", "reading its details…" or "downloading…" with what failed (the
        cache table has no busy state: it stays as it was)."""
        failed = Text.assemble(("failed: ", "bold red"), error_text(error), " (F2: detail)")
        if worker.group == "hub-search":
            self.query_one("#hub-info", Static).update(Text("search ") + failed)
        elif worker.group == "hub-info":
            self.query_one("#hub-info", Static).update(Text(f"{self.highlighted_hit}: ") + failed)
            self.query_one("#hub-add", Button).disabled = True
            self.query_one("#hub-download", Button).disabled = True
        elif worker.group == "download":
            self.query_one("#download-status", Static).update(
                Text(f"{worker.description} ") + failed
            )


def _hub_ref(repo_id: str) -> Any:
    """The Hub reference of a search hit (always a well-formed ``org/name``)."""
    from mergetui.sources.refs import parse_hub_id

    ref = parse_hub_id(repo_id)
    assert ref is not None, repo_id
    return ref
