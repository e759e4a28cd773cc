"""Step 5: the merged model against its base and parents, the same prompt through each, answers
streaming in side by side; and the quick eval table on task files.

Models load and generate in a thread worker (torch is imported there, not at startup); tokens
arrive from that thread into a buffer the screen redraws at 10 Hz, so a fast model cannot flood
the UI. The headless equivalents are ``mergetui compare`` and ``mergetui eval --recipe``.
"""

from __future__ import annotations

import threading
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Select, Static
from textual.worker import Worker

from mergetui.tui.screens.base import StepScreen, error_text
from mergetui.tui.state import PromptHistory


class CompareScreen(StepScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+g", "generate", "Generate", show=True),
        Binding("ctrl+n", "app.sweep", "Sweep", show=True),
    ]
    REDRAW_S = 0.1
    HELP = """\
## 5 · Compare

Type a prompt (or pick a saved one) and press Enter: the merge, its base and each of its models
answer it in turn, side by side, greedy decoding, tokens appearing as they are produced. Models
load one at a time when they do not fit together. Prompts you use are saved for next time.

**Quick eval**: give task files as `NAME=FILE.jsonl` (rows of `prompt` and `answer`) and press
Score: each model's accuracy, and the share of the best parent's score the merge kept.
Headless: `mergetui compare --recipe OUT/mergetui.toml -p PROMPT` and `mergetui eval --recipe …`.

**Ctrl+N** goes on to step 6, **Sweep**: many variants of this recipe merged and scored on task
files, the best kept.
"""

    def __init__(self) -> None:
        super().__init__()
        self.history = PromptHistory.load()
        self.names: list[str] = []
        self.paths: list[Any] = []
        self.merged: str | None = None
        self.parents: list[str] = []
        self.texts: dict[str, str] = {}
        self.texts_lock = threading.Lock()
        self.busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="compare-step"):
            yield Label("5 · Compare: one prompt through the merge, its base and its parents")
            with Horizontal(classes="row"):
                yield Input(placeholder="a prompt (Enter generates)", id="prompt")
                yield Button("Generate", id="generate", variant="primary")
            with Horizontal(classes="row"):
                yield Select(
                    [(p, p) for p in self.history.prompts],
                    prompt="or pick a saved prompt",
                    id="saved",
                )
                yield Label(" max new tokens ", classes="field-label")
                yield Input("64", id="max-tokens", classes="narrow")
            yield Static("finding the models…", id="compare-status")
            yield Horizontal(id="answers")
            yield Label(
                "quick eval: task files as NAME=FILE.jsonl (prompt/answer rows), space-separated",
                classes="param-help",
            )
            with Horizontal(classes="row"):
                yield Input(id="tasks", placeholder="math=tasks/math.jsonl code=tasks/code.jsonl")
                yield Button("Score", id="score")
            yield DataTable(id="eval-table", cursor_type="none")
        yield Footer()

    def on_mount(self) -> None:
        self.line_up()
        self.set_interval(self.REDRAW_S, self.redraw, name="compare-redraw")

    @work(
        thread=True,
        exclusive=True,
        group="lineup",
        exit_on_error=False,
        description="finding the models to compare",
    )
    def line_up(self) -> None:
        """The merge (when its output exists), the base and the sources, named as the CLI does.
        Errors (an invalid recipe, a model not found) are reported by the app; see
        :meth:`worker_failed`."""
        from mergetui.evaluate.lineup import recipe_lineup

        recipe = self.draft.to_recipe()
        has_merge = (recipe.output_dir / "config.json").is_file()
        lineup = recipe_lineup(recipe, include_merged=has_merge)
        self.app.call_from_thread(self._show_lineup, lineup, has_merge)

    def _show_lineup(self, lineup: Any, has_merge: bool) -> None:
        self.names, self.paths = lineup.names, lineup.paths
        self.merged, self.parents = lineup.merged, lineup.parents
        answers = self.query_one("#answers", Horizontal)
        answers.remove_children()
        panes = []
        for index, name in enumerate(self.names):
            pane = VerticalScroll(
                Static(f"[b]{name}[/]", classes="answer-title"),
                Static("", id=f"answer-{index}", classes="answer"),
                classes="answer-pane",
            )
            panes.append(pane)
        answers.mount_all(panes)
        note = "" if has_merge else " (no merged model yet: run the merge to add it)"
        self.query_one("#compare-status", Static).update(
            f"{len(self.names)} model(s): {', '.join(self.names)}{note}"
        )

    def redraw(self) -> None:
        with self.texts_lock:
            texts = dict(self.texts)
        for index, name in enumerate(self.names):
            if name in texts:
                self.query_one(f"#answer-{index}", Static).update(texts[name])

    @on(Select.Changed, "#saved")
    def pick_saved(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL:
            self.query_one("#prompt", Input).value = str(event.value)

    @on(Input.Submitted, "#prompt")
    @on(Button.Pressed, "#generate")
    def action_generate(self) -> None:
        prompt = self.query_one("#prompt", Input).value.strip()
        if not prompt:
            self.app.notify("type a prompt first", severity="warning")
            return
        if not self.names:
            self.app.notify("no models to compare yet", severity="warning")
            return
        if self.busy:
            self.app.notify("still generating; wait for the answers", severity="warning")
            return
        text = self.query_one("#max-tokens", Input).value.strip()
        if not text.isdigit() or int(text) < 1:
            self.app.notify(
                f"max new tokens must be a whole number ≥ 1, not {text!r}", severity="error"
            )
            return
        self.history.remember(prompt)
        with self.texts_lock:
            self.texts = {name: "" for name in self.names}
        self.busy = True
        self.query_one("#compare-status", Static).update(
            f"generating with {len(self.names)} model(s)…"
        )
        self.generate(prompt, int(text))

    @work(
        thread=True, exclusive=True, group="generate", exit_on_error=False, description="generation"
    )
    def generate(self, prompt: str, max_new_tokens: int) -> None:
        from mergetui.engine.plan import resolve_device
        from mergetui.evaluate.compare import compare
        from mergetui.evaluate.generation import GenerationSettings
        from mergetui.evaluate.models import leave_a_core_for_the_ui

        def stream(name: str, index: int, piece: str) -> None:
            with self.texts_lock:
                self.texts[name] = self.texts.get(name, "") + piece

        with leave_a_core_for_the_ui():  # else torch's threads starve this UI, and so itself
            result = compare(
                self.names,
                self.paths,
                [prompt],
                GenerationSettings(max_new_tokens=max_new_tokens),
                device=resolve_device(self.draft.device),
                on_text=stream,
            )
        self.app.call_from_thread(self._done_generating, result)

    def _done_generating(self, result: Any) -> None:
        self.busy = False
        # the final texts, in case the last pieces arrived after the last redraw
        with self.texts_lock:
            self.texts = {name: result.answers[(name, 0)].text for name in self.names}
        self.redraw()
        speeds = ", ".join(
            f"{name} {result.answers[(name, 0)].tokens_per_s:.0f} tok/s" for name in self.names
        )
        self.query_one("#compare-status", Static).update(f"done: {speeds}")

    @on(Input.Submitted, "#tasks")
    @on(Button.Pressed, "#score")
    def score(self) -> None:
        from mergetui.errors import MergeTuiError
        from mergetui.evaluate.tasks import parse_task_option

        options = self.query_one("#tasks", Input).value.replace(",", " ").split()
        if not options:
            self.app.notify("name at least one task file, NAME=FILE.jsonl", severity="warning")
            return
        try:
            tasks = [
                parse_task_option(option, "answers", self.draft.base_dir) for option in options
            ]
        except MergeTuiError as exc:
            self.merge_app.report_error("cannot read the task files", exc)
            return
        self.query_one("#compare-status", Static).update(
            f"scoring {len(self.names)} model(s) on {len(tasks)} task(s)…"
        )
        self.run_eval(tasks)

    @work(thread=True, exclusive=True, group="eval", exit_on_error=False, description="scoring")
    def run_eval(self, tasks: list[Any]) -> None:
        from mergetui.engine.plan import resolve_device
        from mergetui.evaluate.evaluation import evaluate
        from mergetui.evaluate.models import leave_a_core_for_the_ui

        with leave_a_core_for_the_ui():
            table = evaluate(
                self.names,
                self.paths,
                tasks,
                device=resolve_device(self.draft.device),
                merged=self.merged,
                parents=self.parents,
            )
        self.app.call_from_thread(self._show_eval, table)

    def worker_failed(self, worker: Worker[Any], error: BaseException) -> None:
        """Say what failed where "finding the models…", "generating…" or "scoring…" was (the
        app has reported it); Generate works again after a failed generation."""
        what = {
            "lineup": "cannot line up the models",
            "generate": "generation failed",
            "eval": "scoring failed",
        }.get(worker.group)
        if what is None:
            return
        if worker.group == "generate":
            self.busy = False
        self.query_one("#compare-status", Static).update(
            Text.assemble((f"{what}: ", "bold red"), error_text(error), " (F2: detail)")
        )

    def _show_eval(self, table: Any) -> None:
        """The scores (rows from :func:`score_rows`, as ``mergetui eval`` prints them)."""
        from rich.text import Text

        from mergetui.evaluate.rows import retained_summary, score_rows

        grid = self.query_one("#eval-table", DataTable)
        grid.clear(columns=True)
        grid.add_columns("model", *[f"{t.name} ({t.metric})" for t in table.tasks])
        styles = {"model": "", "merged": "bold", "retained": "italic"}
        for row in score_rows(table):
            grid.add_row(Text(row.label, styles[row.kind]), *row.cells)
        summary = retained_summary(table)
        self.query_one("#compare-status", Static).update(
            "scored" + ("" if summary is None else f": {summary}")
        )
