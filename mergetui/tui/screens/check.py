"""Step 2: the compatibility report, read from config.json and safetensors headers only.

For an adapter merge, the adapter-merge planner's check instead (the one ``mergetui check`` and
``mergetui run`` make): each adapter's rank, alpha, target modules and base from its config and
tensor headers, checked against each other and against the base's headers when one is given. A
problem it finds is shown as an error here (not as a failed check): the draft is what to fix."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, DataTable, Footer, Header, Label, Static
from textual.worker import Worker

from mergetui.tui.screens.base import StepScreen, error_text

if TYPE_CHECKING:
    from mergetui.tui.state import RecipeDraft

#: the rows of an adapter merge's table: label, key of the report's adapter entries
ADAPTER_ROWS = (
    ("weight", "weight"),
    ("rank (r)", "r"),
    ("lora_alpha", "lora_alpha"),
    ("target modules", "target_modules"),
    ("trained on", "base_model"),
)


def _cell(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in sorted(value))
    return str(value)


def adapter_check(draft: RecipeDraft) -> dict[str, Any]:
    """The adapter-merge planner's report for the draft (see
    :func:`mergetui.engine.lora_steps.adapter_report`), each adapter with its target modules and
    base from its config too. A problem with the recipe (every one the validator finds) or with
    the adapters (the planner stops at the first) becomes an error of a report that is not ok;
    anything else is a bug and raises."""
    from mergetui.engine.lora_steps import adapter_report, plan_adapter_recipe
    from mergetui.errors import MergeTuiError, RecipeError

    def failed(messages: list[str]) -> dict[str, Any]:
        return {
            "kind": "adapters",
            "adapters": [{"lora": a.lora, "weight": a.weight} for a in draft.adapters],
            "problems": [{"severity": "error", "message": m} for m in messages],
            "ok": False,
        }

    try:
        recipe = draft.to_recipe()
    except RecipeError as exc:
        return failed(list(exc.problems))
    try:
        plan = plan_adapter_recipe(recipe, force=True)  # an existing output is the run's concern
    except MergeTuiError as exc:
        return failed([str(exc)])
    try:
        report = adapter_report(plan)
        sources = zip(report["adapters"], plan.adapters, draft.adapters, strict=True)
        for entry, adapter, typed in sources:
            targets = adapter.config.get("target_modules")
            entry["target_modules"] = [targets] if isinstance(targets, str) else targets
            entry["base_model"] = adapter.base_model_name
            entry["lora"] = typed.lora  # as the recipe names it, like the models' references
    finally:
        plan.close()
    # the base and output as the recipe names them too (the report's are resolved)
    report["base"] = draft.base or None
    report["output"] = draft.output
    return report


class CheckScreen(StepScreen):
    """Runs the same check as ``mergetui check`` in a worker, then shows the table and problems.
    Errors block the next step; warnings must be acknowledged first."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+n", "next", "Method", show=True),
    ]
    HELP = """\
## 2 · Check

The same check as `mergetui check`, from each model's `config.json` and safetensors headers:
no weight is read. One column per model: architecture, layers, hidden size, vocabulary, dtype,
parameters and size on disk (a value that differs from the first model's where it must match is
red). **← →** highlight a model: its full path or Hub id shows under the table. For a recipe
made of `[[slices]]`, the output's layers and which model's layers each run comes from.

**Vocabulary**: the rows *tokens*, *lacks/drops* (how many output tokens a model lacks, how many
of its own the output drops), *special* and *chat template*, and under the table what the
vocabulary setting of step 3 (`tokenizer`, `missing_tokens`, `pad_to_multiple_of`) will do: the
output's tokens and rows, the tokens added to its tokenizer, how rows are aligned. Below:
every problem, and the estimates of the output's size, the free disk and the peak memory of the
merge.

**Errors** (red) block the next step: each says what to change (go back with Escape).
**Warnings** (yellow) can be acknowledged with the checkbox, then Ctrl+N goes on.
"""

    def __init__(self) -> None:
        super().__init__()
        self.report: dict[str, Any] | None = None
        self.references: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="check-step"):
            yield Label(
                "2 · Check: architectures, shapes, vocabulary, disk and memory", id="check-title"
            )
            yield Static("checking… (headers only, no weights are read)", id="check-status")
            yield DataTable(id="check-table", cursor_type="column")
            yield Static("", id="check-path", classes="param-help")
            yield Static("", id="check-layers")
            yield Static("", id="check-vocabulary")
            yield Static("", id="check-problems")
            yield Static("", id="check-estimates")
            yield Checkbox("I have read the warnings; merge anyway", id="ack", disabled=True)
            with Horizontal(classes="row"):
                yield Button("Next: method (ctrl+n)", id="next", variant="success", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        if self.draft.is_adapter_merge:
            self.query_one("#check-title", Label).update(
                "2 · Check: the adapters' ranks, modules and base, from configs and headers"
            )
            self.query_one("#check-status", Static).update(
                "checking… (configs and headers only, no weights are read)"
            )
        self.run_check()

    @work(
        thread=True,
        exclusive=True,
        group="check",
        exit_on_error=False,
        description="the compatibility check",
    )
    def run_check(self) -> None:
        """Any error (a model not found, or a bug) ends the worker: the app reports it and
        :meth:`worker_failed` shows it in place of "checking…"."""
        if self.draft.is_adapter_merge:
            report = adapter_check(self.draft)
            self.app.call_from_thread(self._show_adapter_report, report)
            return
        from mergetui.engine.plan import build_plan
        from mergetui.engine.report import plan_report

        plan = build_plan(self.draft.to_recipe(), fetch=False)
        try:
            report = plan_report(plan)
        finally:
            plan.close()
        self.app.call_from_thread(self._show_report, report)

    def worker_failed(self, worker: Worker[Any], error: BaseException) -> None:
        """The whole message in place of "checking…": it says what to change."""
        self.query_one("#check-status", Static).update(
            Text.assemble(
                ("cannot check: ", "bold red"), error_text(error, first_line=False), " (F2: detail)"
            )
        )

    @property
    def warnings(self) -> list[str]:
        problems = (self.report or {}).get("problems", [])
        return [p["message"] for p in problems if p["severity"] != "error"]

    def _update_next(self) -> None:
        ok = bool(self.report and self.report["ok"])
        acknowledged = not self.warnings or self.query_one("#ack", Checkbox).value
        self.query_one("#next", Button).disabled = not (ok and acknowledged)

    @on(Checkbox.Changed, "#ack")
    def acknowledged(self) -> None:
        self._update_next()

    @on(Button.Pressed, "#next")
    def action_next(self) -> None:
        """On to the method step, unless errors remain or warnings are not yet acknowledged."""
        if self.report is None:
            self.app.notify("the check has not finished", severity="warning")
        elif not self.report["ok"]:
            self.app.notify(
                "fix the errors first (Escape goes back to the models)", severity="error"
            )
        elif self.warnings and not self.query_one("#ack", Checkbox).value:
            self.app.notify(
                "read the warnings and tick the box to go on anyway", severity="warning"
            )
        else:
            self.merge_app.action_method()

    def _show_report(self, report: dict[str, Any]) -> None:
        from mergetui.engine.report import (
            estimate_lines,
            full_reference,
            layer_lines,
            report_rows,
            vocabulary_lines,
        )

        table = self.query_one("#check-table", DataTable)
        rows = report["models"]
        # Short names in the cells keep every model's column on screen; the highlighted
        # column's full reference shows under the table (see column_highlighted).
        table.add_columns("", *[r["role"] for r in rows])
        for row in report_rows(report):
            cells = [
                Text(c, "bold red") if d else c for c, d in zip(row.cells, row.differs, strict=True)
            ]
            table.add_row(row.label, *cells)
        self.references = [f"{r['role']}: {full_reference(r)}" for r in rows]
        if rows:
            table.move_cursor(column=1)
        self._show_reference(table.cursor_column)
        problems = report["problems"]
        lines = [
            f"[b {'red' if p['severity'] == 'error' else 'yellow'}]{p['severity']}:[/] "
            f"{escape(p['message'])}"
            for p in problems
        ]
        self.report = report
        verdict = "[b green]compatible[/]" if report["ok"] else "[b red]not compatible[/]"
        self.query_one("#check-status", Static).update(verdict)
        self.query_one("#check-problems", Static).update("\n".join(lines) or "no problems found")
        self.query_one("#check-estimates", Static).update(Text("\n".join(estimate_lines(report))))
        layers = self.query_one("#check-layers", Static)
        lines = layer_lines(report)
        layers.display = bool(lines)
        layers.update(
            Text("\n").join(
                [Text("output layers (from [[slices]]):", "bold")] + [Text(line) for line in lines]
            )
        )
        vocabulary = self.query_one("#check-vocabulary", Static)
        lines = vocabulary_lines(report)
        vocabulary.display = bool(lines)
        vocabulary.update(
            Text("\n").join([Text("vocabulary:", "bold")] + [Text(line) for line in lines])
        )
        ack = self.query_one("#ack", Checkbox)
        ack.display = bool(self.warnings)
        ack.disabled = not (report["ok"] and self.warnings)
        self._update_next()

    def _show_adapter_report(self, report: dict[str, Any]) -> None:
        """One column per adapter (weight, rank, alpha, target modules, base), the problems and
        what the merge will make."""
        table = self.query_one("#check-table", DataTable)
        adapters = report.get("adapters", [])
        table.add_columns("", *[f"adapters[{i}]" for i in range(len(adapters))])
        for label, key in ADAPTER_ROWS:
            table.add_row(label, *[_cell(adapter.get(key)) for adapter in adapters])
        self.references = [f"adapters[{i}]: {a['lora']}" for i, a in enumerate(adapters)]
        if adapters:
            table.move_cursor(column=1)
        self._show_reference(table.cursor_column)
        problems = report["problems"]
        self.report = report
        verdict = "[b green]compatible[/]" if report["ok"] else "[b red]not compatible[/]"
        self.query_one("#check-status", Static).update(verdict)
        self.query_one("#check-problems", Static).update(
            Text("\n").join(
                Text.assemble((f"{p['severity']}: ", "bold red"), p["message"]) for p in problems
            )
            if problems
            else "no problems found"
        )
        lines = []
        if report["ok"]:
            from mergetui.units import format_bytes

            lines.append(
                f"combination {report['combination']}: {report['summary']}\n"
                f"output: {report['output']} (rank {report['rank']}, {report['modules']} "
                f"modules; reads {format_bytes(report['bytes_to_read'])} on {report['device']})"
            )
            lines.append(
                f"checked against the base's headers: {report['base']}"
                if report["base"]
                else "no base given: the adapters are checked against each other only"
            )
        self.query_one("#check-estimates", Static).update(Text("\n".join(lines)))
        self._update_next()

    @on(DataTable.ColumnHighlighted, "#check-table")
    def column_highlighted(self, event: DataTable.ColumnHighlighted) -> None:
        self._show_reference(event.cursor_column)

    def _show_reference(self, column: int) -> None:
        """The full path or id of the highlighted model (column 0 holds the labels)."""
        line = self.query_one("#check-path", Static)
        if 1 <= column <= len(self.references):
            line.update(Text(self.references[column - 1]))
        else:
            line.update("← → highlight a model to see its full path")
