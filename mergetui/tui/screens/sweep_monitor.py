"""Step 6, running: a sweep job followed from its events, found again after the UI was closed.

The sweep runs as ``mergetui sweep SWEEP.toml --json`` under the job supervisor
(:mod:`mergetui.jobs`), so it survives a dropped SSH session and a crash of a trial cannot take
the UI down. This screen only reads the job's ``events.jsonl`` (the events scripts get): a
``trial`` per finished trial (a row of the table, and the best so far), ``trial_progress`` for
what each trial in flight is doing (one line each: with several workers, several run at once),
then ``swept``, or ``cancelled`` / ``error``. Beside the table, where the terminal is wide
enough, the objective over the trials (:func:`mergetui.sweep.plots.objective_text`).

When it is over, **Load best** puts the best trial's recipe (``best.toml``) into the draft, with
the draft's own output folder, so the user goes on from the best recipe in step 3.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Label, Log, ProgressBar, Static

from mergetui.events import (
    CancelledEvent,
    ErrorEvent,
    SweptEvent,
    TrialEvent,
    TrialProgressEvent,
)
from mergetui.jobs import DONE, FAILED, RUNNING, Job
from mergetui.tui.screens.base import StepScreen
from mergetui.tui.screens.dialogs import ChoiceScreen

#: the table's columns around the swept values (one column per swept key, in between)
LEADING_COLUMNS = ("trial",)
TRAILING_COLUMNS = ("objective", "merge s", "eval s", "note")


def value_text(value: Any) -> str:
    """A swept value as the table shows it: four significant digits for a float."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def column_label(key: str) -> str:
    """``merge.parameters.lambda`` → ``lambda``, ``merge.method`` → ``method``: the table's
    columns are narrow; a model's key (``models[0].weight``) says which model and stays whole."""
    return key.removeprefix("merge.parameters.").removeprefix("merge.")


def values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{key} = {value_text(value)}" for key, value in values.items())


class ObjectivePlot(Static):
    """The objective of each trial and the best so far (:func:`objective_text`), drawn to the
    widget's size and again whenever that changes, so the picture always fits its box."""

    def __init__(self, *, id: str) -> None:
        super().__init__("", id=id)
        self.trials: list[TrialEvent] = []

    def show(self, trials: list[TrialEvent]) -> None:
        self.trials = trials
        self.redraw()

    def on_resize(self) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Nothing while hidden, too small to read, or before a trial is scored."""
        from mergetui.sweep.plots import objective_text

        width, height = self.content_size
        if not self.trials or width < 24 or height < 8:
            self.update("")
            return
        self.update(Text(objective_text(self.trials, width, height)))


class SweepMonitorScreen(StepScreen):
    """Follows one sweep job: polls its event file at 5 Hz (a flood of progress events never
    floods the UI) and shows the trials, the best so far and what runs now."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]
    #: below 100 columns the table takes the whole width (the plot is left out)
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    POLL_S = 0.2
    HELP = """\
## 6 · Sweep (running)

The sweep runs as `mergetui sweep SWEEP.toml --json` in a background process that outlives this
screen: if the SSH connection drops, or you quit with Ctrl+Q → Detach, it goes on, and the next
`mergetui` reattaches here. Its job folder (see `mergetui jobs`) holds the recipe and the sweep
file.

At the top: trials done of the total and the best so far (its number, objective and values); then
what runs now, a line per trial in flight (several with `workers` > 1), and a row per finished
trial (its values, objective, merge and eval seconds; a failed trial's message under *note*, the
best marked ★). In a terminal of 100 columns or more, a plot of the objective over the trials
and the best so far stands beside the table.

**Cancel sweep** asks first, then stops it at the next safe point: finished trials are kept, and
starting the same sweep again goes on from them. When it is over, **Load best** puts the best
trial's recipe (`best.toml`) in the draft (keeping your output folder) and opens step 3.
"""

    def __init__(self, job: Job, *, started: bool = False) -> None:
        super().__init__()
        self.job = job
        #: started from the form just now (else found again, or shown again)
        self.started = started
        self.outcome = "running"
        self.events_read_to = 0
        self.trials: dict[int, TrialEvent] = {}
        self.total: int | None = None
        self.best: int | None = None
        #: what each trial in flight does now (``None``: the parents being scored)
        self.in_flight: dict[int | None, TrialProgressEvent] = {}
        self.value_keys: list[str] = []
        self.swept: SweptEvent | None = None
        self.best_recipe: Path | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="sweep-monitor"):
            yield Label("6 · Sweep: trials run in their own process, and outlive this screen")
            yield Static("starting…", id="sweep-status")
            yield ProgressBar(id="sweep-progress", show_eta=False)
            yield Static("best so far: no trial finished yet", id="sweep-best")
            yield Static("", id="sweep-now")
            with Horizontal(id="sweep-results"):
                yield DataTable(id="sweep-table", cursor_type="row", zebra_stripes=True)
                yield ObjectivePlot(id="sweep-plot")
            with Horizontal(classes="row"):
                yield Button("Cancel sweep", id="cancel-sweep", variant="error")
                yield Button("Load best into the draft", id="load-best", disabled=True)
            yield Log(id="sweep-log", max_lines=200)
        yield Footer()

    def on_mount(self) -> None:
        job = self.job
        log = self.query_one("#sweep-log", Log)
        if self.started:
            log.write_line(f"$ mergetui sweep {job.sweep_file} --json   (job folder {job.folder})")
        elif job != self.merge_app.watched_sweep:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.started))
            log.write_line(f"reattached to the sweep started {started} (job {job.folder.name})")
        self.merge_app.watched_sweep = job
        self._rebuild_table()
        self.poll()
        self.set_interval(self.POLL_S, self.poll, name="sweep-poll")

    # -- events --------------------------------------------------------------------------------
    def poll(self) -> None:
        """Show the events written since the last poll; finish once the job has ended."""
        if self.outcome != "running":
            return
        outcome = self.job.outcome()  # read before the events, so none is missed at the end
        events, self.events_read_to = self.job.read_events(self.events_read_to)
        log = self.query_one("#sweep-log", Log)
        new_trials = []
        for event in events:
            if isinstance(event, TrialProgressEvent):
                self.in_flight[event.trial] = event
            elif isinstance(event, TrialEvent):
                self.in_flight.pop(event.number, None)
                self.in_flight.pop(None, None)  # a trial is scored: the parents were
                self.trials[event.number] = event
                self.total = event.trials_total
                self.best = event.best
                new_trials.append(event)
                if event.objective is None:
                    log.write_line(f"trial {event.number} failed: {event.message}")
            elif isinstance(event, SweptEvent):
                self.swept = event
                if event.best_recipe:
                    self.best_recipe = Path(event.best_recipe)
            elif isinstance(event, (CancelledEvent, ErrorEvent)):
                log.write_line(f"{event.kind}: {event.message}")
        if new_trials:
            self._show_trials(new_trials)
        elif not self.trials and outcome.state == RUNNING:
            self.query_one("#sweep-status", Static).update("running: no trial finished yet")
        self._show_now()
        if outcome.state != RUNNING:
            self.job.mark_seen()
            stderr = self.job.stderr_text().strip()
            if stderr and outcome.state == FAILED:
                log.write_line(stderr)
            self._finish(outcome.state, outcome.message)

    def _show_trials(self, new: list[TrialEvent]) -> None:
        """New rows (the whole table again when a trial brings a key no column has yet: a trial
        of another method varies other parameters), then the progress and the best."""
        keys = [k for event in new for k in event.values if k not in self.value_keys]
        if keys:
            self.value_keys += list(dict.fromkeys(keys))
            self._rebuild_table()
        else:
            table = self.query_one("#sweep-table", DataTable)
            for event in new:
                table.add_row(*self._cells(event), key=str(event.number))
            self._mark_best(table)
        done = len(self.trials)
        self.query_one("#sweep-progress", ProgressBar).update(total=self.total, progress=done)
        self.query_one("#sweep-status", Static).update(f"running: {done} of {self.total} trials")
        self._show_best()
        self.query_one("#sweep-plot", ObjectivePlot).show(list(self.trials.values()))

    def _rebuild_table(self) -> None:
        table = self.query_one("#sweep-table", DataTable)
        table.clear(columns=True)
        for label in LEADING_COLUMNS:
            table.add_column(label, key=label)
        for key in self.value_keys:
            table.add_column(column_label(key), key=key)
        for label in TRAILING_COLUMNS:
            table.add_column(label, key=label)
        for number in sorted(self.trials):
            table.add_row(*self._cells(self.trials[number]), key=str(number))
        self._mark_best(table)

    def _cells(self, event: TrialEvent) -> list[Any]:
        values = [value_text(event.values[k]) if k in event.values else "" for k in self.value_keys]
        if event.objective is None:
            objective: Any = Text("failed", "bold red")
            note = event.message.splitlines()[0] if event.message else ""
        else:
            objective = f"{event.objective:.4f}"
            note = ", ".join(f"{task} {score:.3f}" for task, score in event.scores.items())
        return [
            str(event.number),
            *values,
            objective,
            f"{event.merge_s:.1f}",
            f"{event.eval_s:.1f}",
            note,
        ]

    def _mark_best(self, table: DataTable[Any]) -> None:
        """★ on the best trial's number, and on no other."""
        for number in self.trials:
            star = number == self.best
            table.update_cell(str(number), "trial", Text(f"★ {number}" if star else str(number)))

    def _show_best(self) -> None:
        best = self.trials.get(self.best) if self.best is not None else None
        if best is None or best.objective is None:
            text = "best so far: no trial scored yet"
        else:
            text = (
                f"best so far: trial {best.number}, objective {best.objective:.4f} · "
                f"{values_text(best.values)}"
            )
        self.query_one("#sweep-best", Static).update(Text(text))

    def _show_now(self) -> None:
        """A line per trial in flight: what it does, and how far (when known)."""
        lines = []
        for trial, event in sorted(self.in_flight.items(), key=lambda item: item[0] or -1):
            who = "parents" if trial is None else f"trial {trial}"
            share = "" if event.fraction is None else f" {event.fraction:.0%}"
            lines.append(f"{who}: {event.what}{share}")
        self.query_one("#sweep-now", Static).update(Text("\n".join(lines)))
        self.query_one("#sweep-now").display = bool(lines)

    # -- the end -------------------------------------------------------------------------------
    def _finish(self, outcome: str, message: str) -> None:
        self.outcome = outcome
        self.in_flight.clear()
        self._show_now()
        colour = {DONE: "green", "cancelled": "yellow"}.get(outcome, "red")
        status = Text.assemble((outcome, f"bold {colour}"), ": ", message)
        self.query_one("#sweep-status", Static).update(status)
        self.query_one("#cancel-sweep", Button).display = False
        if self.best_recipe is None and self.trials:  # stopped early: the best so far is kept
            kept = Path(self.job.output) / "best.toml"
            self.best_recipe = kept if kept.is_file() else None
        best = self.trials.get(self.best) if self.best is not None else None
        if best is not None and best.objective is not None and self.best_recipe is not None:
            self.query_one("#sweep-best", Static).update(
                Text(
                    f"best: trial {best.number}, objective {best.objective:.4f} · "
                    f"{values_text(best.values)}\nits recipe: {self.best_recipe}"
                )
            )
            load = self.query_one("#load-best", Button)
            load.disabled = False
            load.variant = "success"
            load.focus()
        self.app.notify(
            message.splitlines()[0],
            title=f"sweep {outcome}",
            severity="information" if outcome == DONE else "warning",
            markup=False,
        )

    @on(Button.Pressed, "#cancel-sweep")
    def cancel(self) -> None:
        """Ask, then stop the sweep (SIGTERM through the supervisor)."""
        if self.outcome != "running":
            return

        def answer(choice: str | None) -> None:
            if choice == "stop" and self.outcome == "running":
                self.job.cancel()
                self.query_one("#sweep-log", Log).write_line("cancel requested (SIGTERM)")

        self.app.push_screen(
            ChoiceScreen(
                "Stop the sweep? Its finished trials are kept (start the same sweep again to go "
                "on from them); the trial in progress is dropped.",
                [("stop", "Stop sweep"), ("keep", "Keep running")],
            ),
            answer,
        )

    @on(Button.Pressed, "#load-best")
    def load_best(self) -> None:
        """The best trial's recipe becomes the draft (with the draft's own folder and output:
        ``best.toml`` writes into the sweep's ``best/``), and step 3 shows it."""
        from mergetui.errors import MergeTuiError
        from mergetui.recipe import load_recipe
        from mergetui.tui.state import RecipeDraft

        if self.best_recipe is None:
            return
        try:
            recipe = load_recipe(self.best_recipe)
        except MergeTuiError as exc:
            self.merge_app.report_error(f"cannot load {self.best_recipe}", exc)
            return
        current = self.draft
        best = RecipeDraft.from_recipe(recipe)
        best.output, best.base_dir = current.output, current.base_dir
        self.merge_app.draft = best
        self.app.notify(
            f"the draft is now the best trial's recipe ({self.best_recipe})",
            title="best loaded",
            markup=False,
        )
        self.merge_app.action_method()
