"""Step 6: a sweep of the current recipe, set up in a form and started as a background job.

The form is the sweep file's fields (strategy, trials, seed, workers, keep, output; the objective's
task files, score and row limit; the search space's rows of recipe key and domain). Every change
is checked by the sweep file's own loader (:func:`mergetui.tui.sweep_form.problems`), so what is
wrong shows under the field it is about, worded as ``mergetui sweep`` would word it, before
anything runs. The keys offered come from the method registry, and the space starts from the
draft's method (every model's weight and, when the method has one, density).

**Start** writes the recipe and the sweep file into a job folder and runs ``mergetui sweep
SWEEP.toml --json`` there in the background (:mod:`mergetui.jobs`), followed by
:class:`~mergetui.tui.screens.sweep_monitor.SweepMonitorScreen`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, Select, Static

from mergetui.errors import MergeTuiError
from mergetui.jobs import RUNNING, start_job
from mergetui.sweep.spec import SCORES, STRATEGIES
from mergetui.tui.screens.base import StepScreen
from mergetui.tui.screens.sweep_monitor import SweepMonitorScreen
from mergetui.tui.sweep_form import (
    CHOICES,
    OBJECTIVE_FIELDS,
    RANGE,
    SWEEP_FIELDS,
    DimensionFields,
    SweepForm,
    TaskFields,
    any_model,
    check,
    field_of,
    param_of,
    problems,
    space_keys,
    suggested_domain,
)
from mergetui.tui.widgets.paths import PathSuggester

#: the line above the search space's rows that says how to type a domain
SPACE_HELP = (
    "a recipe key and its values: choices (ties, task_arithmetic or 0.3, 0.5) or a range from "
    "low to high (a grid needs a step; log for a log scale)"
)
TASKS_HELP = (
    "task files, name = path: .jsonl rows of prompt and answer (accuracy), or plain text "
    "(perplexity); the name defaults to the file's"
)


def _problem_line(problem: str) -> Text:
    return Text.assemble(("✗ ", "bold red"), problem)


def _show_note(note: Static, found: list[str]) -> None:
    """Under a field: its problems, one a line (hidden when there is none)."""
    note.update(Text("\n").join(_problem_line(p) for p in found))
    note.display = bool(found)


class DimensionRow(Vertical):
    """One row of the search space: a key, the kind of domain and its values, the parameter's
    help from the registry, and the problems the sweep's loader finds with it."""

    def __init__(
        self,
        fields: DimensionFields,
        keys: list[str],
        describe: Callable[[str], str],
        suggest: Callable[[str], DimensionFields],
    ) -> None:
        super().__init__(classes="dimension")
        self.fields = fields
        self.keys = keys if fields.key in keys else [*keys, fields.key]
        self.describe, self.suggest = describe, suggest

    @property
    def key(self) -> str:
        return self.fields.key

    def compose(self) -> ComposeResult:
        fields = self.fields
        with Horizontal(classes="row"):
            yield Select(
                [(key, key) for key in self.keys],
                value=fields.key,
                allow_blank=False,
                classes="dim-key",
            )
            yield Select(
                [("range", RANGE), ("choices", CHOICES)],
                value=fields.kind,
                allow_blank=False,
                classes="dim-kind",
            )
            yield Button("Remove", classes="remove-row")
        with Horizontal(classes="row dim-range") as values:
            values.display = fields.kind == RANGE
            yield Label("low", classes="field-label")
            yield Input(fields.low, placeholder="low", classes="dim-low")
            yield Label("high", classes="field-label")
            yield Input(fields.high, placeholder="high", classes="dim-high")
            yield Label("step", classes="field-label")
            yield Input(fields.step, placeholder="none", classes="dim-step")
            yield Checkbox("log", fields.log, classes="dim-log")
        with Horizontal(classes="row dim-choices") as choices:
            choices.display = fields.kind == CHOICES
            yield Input(fields.choices, placeholder="a, b, c", classes="dim-values")
        yield Static(self.describe(fields.key), classes="param-help dim-help")
        yield Static("", classes="field-note dim-note")

    def read(self) -> DimensionFields:
        """The row as typed now."""
        kind = self.query_one(".dim-kind", Select).value
        return DimensionFields(
            key=self.fields.key,
            kind=str(kind),
            choices=self.query_one(".dim-values", Input).value,
            low=self.query_one(".dim-low", Input).value,
            high=self.query_one(".dim-high", Input).value,
            step=self.query_one(".dim-step", Input).value,
            log=self.query_one(".dim-log", Checkbox).value,
        )

    @on(Select.Changed, ".dim-key")
    def key_chosen(self, event: Select.Changed) -> None:
        """Another key: its suggested domain replaces the old key's values."""
        key = str(event.value)
        if key == self.fields.key:
            return  # (the Select saying its first value)
        self.fields = self.suggest(key)
        self.query_one(".dim-kind", Select).value = self.fields.kind
        for selector, text in (
            (".dim-values", self.fields.choices),
            (".dim-low", self.fields.low),
            (".dim-high", self.fields.high),
            (".dim-step", self.fields.step),
        ):
            self.query_one(selector, Input).value = text
        self.query_one(".dim-log", Checkbox).value = self.fields.log
        self.query_one(".dim-help", Static).update(self.describe(key))
        self._show_kind(self.fields.kind)

    @on(Select.Changed, ".dim-kind")
    def kind_chosen(self, event: Select.Changed) -> None:
        self._show_kind(str(event.value))

    def _show_kind(self, kind: str) -> None:
        self.query_one(".dim-range").display = kind == RANGE
        self.query_one(".dim-choices").display = kind == CHOICES

    def show_problems(self, found: list[str]) -> None:
        _show_note(self.query_one(".dim-note", Static), found)
        kind = self.query_one(".dim-kind", Select).value
        for selector in (".dim-low", ".dim-high", ".dim-step", ".dim-values"):
            shown = (selector == ".dim-values") == (kind == CHOICES)
            self.query_one(selector, Input).set_class(bool(found) and shown, "-invalid")


class TaskRow(Vertical):
    """One task file of the objective: ``name = path``, and the problems found with it."""

    def __init__(self, fields: TaskFields, base_dir: Path) -> None:
        super().__init__(classes="task")
        self.fields, self.base_dir = fields, base_dir

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Input(self.fields.name, placeholder="name", classes="task-name narrow")
            yield Label("=", classes="field-label")
            yield Input(
                self.fields.path,
                placeholder="tasks/math.jsonl",
                classes="task-path",
                suggester=PathSuggester(self.base_dir),
            )
            yield Button("Remove", classes="remove-row")
        yield Static("", classes="field-note task-note")

    def read(self) -> TaskFields:
        return TaskFields(
            self.query_one(".task-name", Input).value, self.query_one(".task-path", Input).value
        )

    def show_problems(self, found: list[str]) -> None:
        _show_note(self.query_one(".task-note", Static), found)
        self.query_one(".task-path", Input).set_class(bool(found), "-invalid")


class SweepScreen(StepScreen):
    """The sweep's form; the draft's recipe is what every trial starts from."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+r", "start", "Start sweep", show=True),
    ]
    HELP = """\
## 6 · Sweep

Merge and score many variants of the current recipe, and keep the best: the headless
`mergetui sweep SWEEP.toml`, run in the background.

**Search**: the strategy (`grid` runs every combination; `random` and `tpe`, Optuna's samplers,
run **trials** of them, `seed` fixing the draw), the **workers** (trials at once), a **Ray**
cluster's address to run them on (empty: this machine), how many merged outputs to **keep** (the
best k) and the **output** folder (`trials.jsonl`, `best/`, `best.toml`). Started again with the
same settings, a stopped sweep goes on where it was; a changed sweep into the same output asks
for **start over** (its earlier trials are deleted) or another folder.

**Objective**: one or more task files, `name = path` (`.jsonl` rows of `prompt` and `answer`, or
plain text for perplexity); the **score** maximised (`mean_retained`: the merge's score over the
best parent's, averaged over the tasks; `mean_accuracy`; or one task's) and the rows per task.

**Search space**: rows of a recipe key (`merge.method`, `models[*].weight` for every model,
`models[0].weight` for one, `merge.parameters.lambda`) and its values: **choices**
(`ties, task_arithmetic` or `0.3, 0.5`) or a **range** from low to high, with a step (a grid needs
one) or on a log scale.

Every change is checked as `mergetui sweep` checks the file; each problem shows under its field.
**Ctrl+R** (Start) runs the sweep as a background job; the next screen follows it.
"""

    def __init__(self) -> None:
        super().__init__()
        self.form = self.merge_app.sweep_form or SweepForm.for_draft(self.draft)
        self.keys = space_keys(self.draft)
        self.found: list[str] = []
        #: the score's choices shown (they follow the task names)
        self.score_names = [value for _, value in self._score_options(self.form)]
        #: a check is queued: a burst of changes (a key's domain filled in) is checked once
        self.check_queued = False

    def compose(self) -> ComposeResult:
        form = self.form
        draft = self.draft
        yield Header()
        with VerticalScroll(id="sweep-form"):
            yield Label("6 · Sweep: variants of this recipe, each merged and scored; the best kept")
            yield Static(self._recipe_line(), id="sweep-recipe", classes="param-help")
            yield Label("search", classes="model-title")
            with Horizontal(classes="row"):
                yield Label("strategy", classes="field-label")
                yield Select(
                    [(name, name) for name in STRATEGIES],
                    value=form.strategy,
                    allow_blank=False,
                    id="sweep-strategy",
                )
                yield Label("trials", classes="field-label")
                yield Input(form.trials, id="sweep-trials", classes="narrow")
                yield Label("seed", classes="field-label")
                yield Input(form.seed, id="sweep-seed", classes="narrow")
            with Horizontal(classes="row"):
                yield Label("workers", classes="field-label")
                yield Input(form.workers, id="sweep-workers", classes="narrow")
                yield Label("Ray", classes="field-label")
                yield Input(form.ray, placeholder="this machine", id="sweep-ray")
            with Horizontal(classes="row"):
                yield Label("keep", classes="field-label")
                yield Input(form.keep, id="sweep-keep", classes="narrow")
                yield Label("output", classes="field-label")
                yield Input(form.output, id="sweep-output", suggester=PathSuggester(draft.base_dir))
                yield Checkbox("start over", form.restart, id="sweep-restart")
            for name in SWEEP_FIELDS:
                yield Static("", id=f"note-{name}", classes="field-note")
            yield Label("objective", classes="model-title")
            yield Static(TASKS_HELP, classes="param-help")
            with Vertical(id="sweep-tasks"):
                for task in form.tasks:
                    yield TaskRow(task, draft.base_dir)
            yield Button("Add a task file", id="add-task")
            yield Static("", id="note-tasks", classes="field-note")
            with Horizontal(classes="row"):
                yield Label("score", classes="field-label")
                yield Select(self._score_options(form), value=form.score, id="sweep-score")
                yield Label("rows per task", classes="field-label")
                yield Input(form.limit, placeholder="all", id="sweep-limit", classes="narrow")
            for name in ("score", "limit"):
                yield Static("", id=f"note-{name}", classes="field-note")
            yield Label("search space", classes="model-title")
            yield Static(SPACE_HELP, classes="param-help")
            with Vertical(id="sweep-space"):
                for row in form.space:
                    yield self._dimension_row(row)
            yield Button("Add a dimension", id="add-dimension")
            yield Static("", id="note-space", classes="field-note")
            yield Static("", id="sweep-summary")
            with Horizontal(classes="row"):
                yield Button("Start sweep (ctrl+r)", id="start", variant="success")
        yield Footer()

    def on_mount(self) -> None:
        self.queue_check()

    # -- the form's pieces ---------------------------------------------------------------------
    def _recipe_line(self) -> str:
        draft = self.draft
        models = f"{len(draft.models)} model(s)" if not draft.slices else "slices"
        return (
            f"sweeping the recipe of step 3: {draft.method} of {models}"
            + (f" onto {draft.base}" if draft.base else "")
            + "; each trial starts from it"
        )

    def _describe(self, key: str) -> str:
        """A key's one-line help from the registry (its type, range and meaning)."""
        if key == "merge.method":
            return "the method: give the ones to try as choices"
        param = param_of(key, self.draft.method)
        if param is None:
            return "not a parameter of any method"
        limits = param.range_text()
        kind = param.kind.__name__ + (f" in {limits}" if limits else "")
        return f"{param.name} ({kind}): {param.help}"

    def _suggest(self, key: str) -> DimensionFields:
        return suggested_domain(key, self.draft)

    def _dimension_row(self, fields: DimensionFields) -> DimensionRow:
        return DimensionRow(fields, self.keys, self._describe, self._suggest)

    @staticmethod
    def _score_options(form: SweepForm) -> list[tuple[str, str]]:
        """The scores: the two means, each task's, and the form's own value if it is none of
        these (a task since removed: the loader says so)."""
        names = [*SCORES, *[t.task_name for t in form.task_files()]]
        if form.score and form.score not in names:
            names.append(form.score)
        return [(name, name) for name in dict.fromkeys(names)]

    def read_form(self) -> SweepForm:
        """The form as the fields hold it now."""

        def text(name: str) -> str:
            return self.query_one(f"#sweep-{name}", Input).value

        score = self.query_one("#sweep-score", Select).value
        return SweepForm(
            strategy=str(self.query_one("#sweep-strategy", Select).value),
            trials=text("trials"),
            seed=text("seed"),
            workers=text("workers"),
            ray=text("ray"),
            keep=text("keep"),
            output=text("output"),
            restart=self.query_one("#sweep-restart", Checkbox).value,
            tasks=[row.read() for row in self.query(TaskRow)],
            score="" if score is Select.NULL else str(score),
            limit=text("limit"),
            space=[row.read() for row in self.query(DimensionRow)],
        )

    # -- changes -------------------------------------------------------------------------------
    @on(Input.Changed)
    @on(Select.Changed)
    @on(Checkbox.Changed)
    def queue_check(self) -> None:
        """Check the form once the changes already queued are in (each field set by a new key's
        domain is a change of its own)."""
        if not self.check_queued:
            self.check_queued = True
            self.call_later(self.revalidate)

    @on(Button.Pressed, "#add-task")
    async def add_task(self) -> None:
        row = TaskRow(TaskFields(), self.draft.base_dir)
        await self.query_one("#sweep-tasks", Vertical).mount(row)
        row.query_one(".task-path", Input).focus()
        self.queue_check()

    @on(Button.Pressed, "#add-dimension")
    async def add_dimension(self) -> None:
        """A new row on the first key no row has yet."""
        used = {row.key for row in self.query(DimensionRow)}
        key = next((k for k in self.keys if k not in used), self.keys[0])
        row = self._dimension_row(self._suggest(key))
        await self.query_one("#sweep-space", Vertical).mount(row)
        row.query_one(".dim-key", Select).focus()
        self.queue_check()

    @on(Button.Pressed, ".remove-row")
    async def remove_row(self, event: Button.Pressed) -> None:
        row = next(a for a in event.button.ancestors if isinstance(a, (TaskRow, DimensionRow)))
        await row.remove()
        self.queue_check()

    def revalidate(self) -> None:
        """Check the form as the sweep's loader checks the file; each problem goes under its
        field (a row's under that row), the rest, and the verdict, above Start."""
        self.check_queued = False
        form = self.read_form()
        self.merge_app.sweep_form = form
        self._refresh_scores(form)
        self.found = problems(form, self.draft)
        placed: dict[str, list[str]] = {}
        for problem in self.found:
            placed.setdefault(field_of(problem), []).append(problem)
        for task in self.query(TaskRow):
            task.show_problems(placed.pop(f"task:{task.read().task_name}", []))
        for row in self.query(DimensionRow):
            mine = placed.pop(f"space:{row.key}", [])
            for where in [w for w in placed if w.startswith("space:")]:
                if any_model(where.removeprefix("space:")) == row.key:
                    mine += placed.pop(where)
            row.show_problems(mine)
        for name in (*SWEEP_FIELDS, *OBJECTIVE_FIELDS):
            mine = placed.pop(name, [])
            _show_note(self.query_one(f"#note-{name}", Static), mine)
            self.query_one(f"#sweep-{name}", Widget).set_class(bool(mine), "-invalid")
        for name in ("tasks", "space"):
            _show_note(self.query_one(f"#note-{name}", Static), placed.pop(name, []))
        elsewhere = [p for found in placed.values() for p in found]
        summary = self.query_one("#sweep-summary", Static)
        if self.found:
            head = Text(
                f"{len(self.found)} problem(s) to fix before the sweep can start"
                + (" (each under its field):" if not elsewhere else ":"),
                "bold red",
            )
            summary.update(Text("\n").join([head, *[_problem_line(p) for p in elsewhere]]))
        else:
            dimensions = len(form.space)
            summary.update(
                Text(
                    f"✓ ready: {form.strategy} over {dimensions} dimension(s), scored on "
                    f"{len(form.task_files())} task file(s)",
                    "bold green",
                )
            )
        self.query_one("#start", Button).disabled = bool(self.found)

    def _refresh_scores(self, form: SweepForm) -> None:
        """The score's choices follow the task names (only when they change: setting them
        resets the choice)."""
        options = self._score_options(form)
        names = [value for _, value in options]
        if names != self.score_names:
            self.score_names = names
            score = self.query_one("#sweep-score", Select)
            score.set_options(options)
            score.value = form.score or SCORES[0]

    # -- start -------------------------------------------------------------------------------------
    @on(Button.Pressed, "#start")
    def action_start(self) -> None:
        """Write the job folder (the recipe with absolute paths, the sweep file) and start it in
        the background; one sweep at a time (a running one is shown instead)."""
        from mergetui.recipe import recipe_to_toml

        running = self.merge_app.watched_sweep
        if running is not None and running.outcome().state == RUNNING:
            self.app.push_screen(SweepMonitorScreen(running))
            self.app.notify("a sweep is running: here it is (cancel it to start another)")
            return
        self.revalidate()
        if self.found:
            self.app.notify(
                self.found[0], title="fix it first", severity="error", markup=False, timeout=10
            )
            return
        form = self.read_form()
        base_dir = self.draft.base_dir
        try:
            recipe = self.draft.to_recipe()
            _, conflict = check(form, self.draft)  # start over only what would be refused
            job = start_job(
                recipe_to_toml(recipe, absolute_paths=True),
                form.to_data(base_dir)["sweep"]["output"],
                sweep_toml=form.to_toml(base_dir),
                restart=form.restart and conflict is not None and conflict[1],
            )
        except (MergeTuiError, OSError) as exc:  # a state folder that cannot be written
            self.merge_app.report_error("cannot start the sweep", exc)
            return
        self.app.push_screen(SweepMonitorScreen(job, started=True))
