"""Step 2: the compatibility report, read from config.json and safetensors headers only."""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, Static


class CheckScreen(Screen[None]):
    """Runs the same check as ``mergetui check`` in a worker, then shows the table and problems."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+n", "app.method", "Method", show=True),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="check-step"):
            yield Label(
                "2 · Check: architectures, shapes, vocabulary, disk and memory", id="check-title"
            )
            yield Static("checking… (headers only, no weights are read)", id="check-status")
            yield DataTable(id="check-table", cursor_type="none")
            yield Static("", id="check-problems")
        yield Footer()

    def on_mount(self) -> None:
        self.run_check()

    @work(thread=True, exclusive=True, group="check", exit_on_error=False)
    def run_check(self) -> None:
        from mergetui.errors import MergeTuiError

        draft = self.app.draft  # type: ignore[attr-defined]
        try:
            from mergetui.engine.plan import build_plan
            from mergetui.engine.report import plan_report

            plan = build_plan(draft.to_recipe(), fetch=False)
            try:
                report = plan_report(plan)
            finally:
                plan.close()
        except MergeTuiError as exc:
            self.app.call_from_thread(self._show_error, str(exc))
            return
        self.app.call_from_thread(self._show_report, report)

    def _show_error(self, message: str) -> None:
        self.query_one("#check-status", Static).update(f"[b red]cannot check:[/] {message}")
        self.app.notify(message.splitlines()[0], severity="error")

    def _show_report(self, report: dict[str, Any]) -> None:
        table = self.query_one("#check-table", DataTable)
        rows = report["models"]
        table.add_columns("", *[r["role"] for r in rows])
        for label, key in (
            ("model", "model"),
            ("architecture", "architecture"),
            ("layers", "layers"),
            ("hidden size", "hidden_size"),
            ("vocab size", "vocab_size"),
            ("dtype", "dtype"),
            ("parameters", "parameters"),
        ):
            table.add_row(label, *[str(r.get(key, "?")) for r in rows])
        problems = report["problems"]
        lines = [
            f"[b {'red' if p['severity'] == 'error' else 'yellow'}]{p['severity']}:[/] {p['message']}"
            for p in problems
        ]
        verdict = "[b green]compatible[/]" if report["ok"] else "[b red]not compatible[/]"
        self.query_one("#check-status", Static).update(verdict)
        self.query_one("#check-problems", Static).update("\n".join(lines) or "no problems found")
