"""The TUI's sixth step, Sweep, driven with Pilot on real tiny models: the form's defaults and its
problems shown at their fields (worded by the sweep file's own loader), a real grid sweep started
from the step that runs as a background job to the end, its trials and best in the monitor, the
best recipe loaded back into the draft, and a sweep found again by a new session (running, then
cancelled; and a recorded one whose trials run several at once)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import MergeGate
from textual.widgets import Button, Checkbox, DataTable, Input, Select, Static

from mergetui.events import (
    StartEvent,
    SweptEvent,
    TrialEvent,
    TrialProgressEvent,
)
from mergetui.jobs import CANCELLED, DONE, RUNNING, SWEEP, Job, jobs_dir, list_jobs
from mergetui.tui.app import create_app
from mergetui.tui.screens.sweep import DimensionRow, SweepScreen, TaskRow
from mergetui.tui.screens.sweep_monitor import SweepMonitorScreen
from mergetui.tui.state import ModelDraft, RecipeDraft

#: a sum and a reversal: the tiny random models get some right by chance, so a score exists
TASK_ROWS = [
    {"prompt": "1+1=", "answer": "2"},
    {"prompt": "2+2=", "answer": "4"},
    {"prompt": "r:ab=", "answer": "ba"},
]
HANG_S = 300  # hang detectors only: every wait ends as soon as its condition holds


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with a task file, where the draft's relative paths resolve."""
    (tmp_path / "tasks.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in TASK_ROWS), encoding="utf-8"
    )
    return tmp_path


def ties_draft(folder: Path, models: dict[str, Path]) -> RecipeDraft:
    """TIES of two fine-tunes onto the base, on the CPU in float32, as the sweep tests' recipe."""
    return RecipeDraft(
        base=str(models["base"]),
        models=[
            ModelDraft(str(models["ft_a"]), parameters={"weight": 1.0, "density": 0.5}),
            ModelDraft(str(models["ft_c"]), parameters={"weight": 1.0, "density": 0.5}),
        ],
        method="ties",
        parameters={"normalize": True},
        output="merged",
        dtype="float32",
        device="cpu",
        base_dir=folder,
    )


async def wait_until(pilot: Any, condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + HANG_S
    while not condition():
        if not pilot.app.is_running:  # it stopped on an error: say so rather than wait
            raise AssertionError(f"the app stopped while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def text_of(screen: Any, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


def rows(screen: SweepScreen) -> list[DimensionRow]:
    return list(screen.query(DimensionRow))


async def open_sweep_from_compare(pilot: Any, app: Any) -> SweepScreen:
    """Step 5, then Ctrl+N: the sweep step's form."""
    app.action_compare()
    await pilot.pause()
    await pilot.press("ctrl+n")
    await wait_until(pilot, lambda: isinstance(app.screen, SweepScreen), "the sweep step")
    await pilot.pause()
    screen = app.screen
    assert isinstance(screen, SweepScreen)
    return screen


async def fill_grid_of_two(pilot: Any, screen: SweepScreen, output: str) -> None:
    """A grid of the first model's weight at 0.5 and 1 (two trials) scored on tasks.jsonl."""
    screen.query_one("#sweep-strategy", Select).value = "grid"
    screen.query_one("#sweep-output", Input).value = output
    screen.query_one("#sweep-limit", Input).value = "3"
    task = screen.query_one(TaskRow)
    task.query_one(".task-name", Input).value = "add"
    task.query_one(".task-path", Input).value = "tasks.jsonl"
    weight, density = rows(screen)
    density.query_one(".remove-row", Button).press()
    await pilot.pause()
    weight.query_one(".dim-key", Select).value = "models[0].weight"
    await pilot.pause()
    weight.query_one(".dim-kind", Select).value = "choices"
    weight.query_one(".dim-values", Input).value = "0.5, 1.0"
    await pilot.pause()
    await pilot.pause()
    assert not screen.found, screen.found
    assert not screen.query_one("#start", Button).disabled


# -- the form --------------------------------------------------------------------------------------
def test_the_form_starts_from_the_method_and_shows_each_problem_at_its_field(
    project: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_form_flow(project, models))


async def _form_flow(project: Path, models: dict[str, Path]) -> None:
    app = create_app(draft=ties_draft(project, models))
    async with app.run_test(size=(120, 44)) as pilot:
        screen = await open_sweep_from_compare(pilot, app)
        # defaults: a TPE search beside the draft's output, every model's weight and density
        assert screen.query_one("#sweep-strategy", Select).value == "tpe"
        values = {n: screen.query_one(f"#sweep-{n}", Input).value for n in ("trials", "seed")}
        assert values == {"trials": "20", "seed": "0"}
        assert screen.query_one("#sweep-workers", Input).value == "1"
        assert screen.query_one("#sweep-keep", Input).value == "1"
        assert screen.query_one("#sweep-output", Input).value == "merged-sweep"
        assert screen.query_one("#sweep-score", Select).value == "mean_retained"
        weight, density = (row.read() for row in rows(screen))
        assert (weight.key, weight.kind, weight.low, weight.high) == (
            "models[*].weight",
            "range",
            "0.2",
            "1.2",
        )
        assert (density.key, density.kind, density.low, density.high) == (
            "models[*].density",
            "range",
            "0.1",
            "1",
        )
        assert "fraction of this model's task vector" in text_of(rows(screen)[1], ".dim-help")
        # no task file yet: said under the tasks, and nothing can start
        assert "sweep.objective.tasks: give the task files" in text_of(screen, "#note-tasks")
        start = screen.query_one("#start", Button)
        assert start.disabled
        # a task file that is not there: named under its row, the path field marked
        task = screen.query_one(TaskRow)
        task.query_one(".task-path", Input).value = "missing.jsonl"
        await pilot.pause()
        note = text_of(task, ".task-note")
        assert "sweep.objective.tasks.missing: file not found" in note, note
        assert task.query_one(".task-path", Input).has_class("-invalid")
        assert not screen.query_one("#note-tasks").display
        task.query_one(".task-path", Input).value = "tasks.jsonl"
        await pilot.pause()
        assert not task.query_one(".task-note").display
        assert screen.query_one("#sweep-score", Select).value == "mean_retained"
        assert "✓ ready: tpe over 2 dimension(s)" in text_of(screen, "#sweep-summary")
        assert not start.disabled
        # a range upside down, and one past the parameter's own: each under its row
        weight_row, density_row = rows(screen)
        weight_row.query_one(".dim-low", Input).value = "1.5"
        weight_row.query_one(".dim-high", Input).value = "0.5"
        density_row.query_one(".dim-high", Input).value = "2"
        await pilot.pause()
        note = text_of(weight_row, ".dim-note")
        assert "sweep.space.'models[*].weight': the range is empty" in note, note
        assert weight_row.query_one(".dim-low", Input).has_class("-invalid")
        assert "outside density's range (0, 1]" in text_of(density_row, ".dim-note")
        assert start.disabled
        assert "2 problem(s)" in text_of(screen, "#sweep-summary")
        weight_row.query_one(".dim-low", Input).value = "0.2"
        weight_row.query_one(".dim-high", Input).value = "1.2"
        density_row.query_one(".dim-high", Input).value = "1"
        await pilot.pause()
        assert not screen.found and not start.disabled
        # a grid needs steps: said per model by the loader, shown under the [*] row
        screen.query_one("#sweep-strategy", Select).value = "grid"
        await pilot.pause()
        assert "a grid needs a list of values or a range with a step" in text_of(
            weight_row, ".dim-note"
        )
        weight_row.query_one(".dim-step", Input).value = "0.5"
        density_row.query_one(".dim-step", Input).value = "0.45"
        await pilot.pause()
        assert not screen.found, screen.found
        # a whole number typed as text: the loader's words, under the field
        screen.query_one("#sweep-trials", Input).value = "many"
        await pilot.pause()
        assert "sweep.trials: a whole number >= 1, not 'many'" in text_of(screen, "#note-trials")
        assert screen.query_one("#sweep-trials", Input).has_class("-invalid")
        screen.query_one("#sweep-trials", Input).value = "4"
        # a new dimension takes the first key no row has (the method), with choices offered
        screen.query_one("#add-dimension", Button).press()
        await pilot.pause()
        method_row = rows(screen)[-1].read()
        assert (method_row.key, method_row.kind) == ("merge.method", "choices")
        assert method_row.choices == "ties, task_arithmetic"
        # another key: its own domain replaces the old one's
        rows(screen)[-1].query_one(".dim-key", Select).value = "merge.parameters.normalize"
        await pilot.pause()
        switch = rows(screen)[-1].read()
        assert (switch.kind, switch.choices) == ("choices", "true, false")
        await pilot.pause()
        assert not screen.found, screen.found
        # the score may be a task's own; the form is kept for the next visit
        screen.query_one("#sweep-score", Select).value = "tasks"
        await pilot.pause()
        assert screen.query_one("#sweep-score", Select).value == "tasks"
        await pilot.press("escape")
        await pilot.pause()
        assert app.sweep_form is not None and app.sweep_form.trials == "4"
        app.action_sweep()
        await pilot.pause()
        again = app.screen
        assert isinstance(again, SweepScreen) and again is not screen
        assert again.query_one("#sweep-trials", Input).value == "4"
        assert len(rows(again)) == 3


# -- a real sweep, from the form to the best recipe in the draft --------------------------------
async def wait_finished(pilot: Any, monitor: SweepMonitorScreen) -> str:
    await wait_until(pilot, lambda: monitor.outcome != "running", "the sweep to end")
    return monitor.outcome


def test_a_grid_sweep_runs_in_the_background_to_the_end_and_its_best_is_loaded(
    project: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_sweep_flow(project, models))


async def _sweep_flow(project: Path, models: dict[str, Path]) -> None:
    from mergetui.recipe import load_recipe
    from mergetui.tui.screens.method import MethodScreen

    app = create_app(draft=ties_draft(project, models))
    async with app.run_test(size=(120, 44)) as pilot:
        form = await open_sweep_from_compare(pilot, app)
        await fill_grid_of_two(pilot, form, "sweep-out")
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: isinstance(app.screen, SweepMonitorScreen), "the monitor")
        monitor = app.screen
        assert isinstance(monitor, SweepMonitorScreen) and app.watched_sweep == monitor.job
        job = monitor.job
        assert job.kind == SWEEP and json.loads((job.folder / "job.json").read_text())["kind"]
        assert job.output == str(project / "sweep-out")
        assert await wait_finished(pilot, monitor) == DONE, (
            text_of(monitor, "#sweep-status"),
            job.stderr_text(),
        )
        # every trial in the table, the best marked, and its recipe offered
        table = monitor.query_one("#sweep-table", DataTable)
        assert table.row_count == 2
        assert {monitor.trials[n].values["models[0].weight"] for n in (0, 1)} == {0.5, 1.0}
        assert all(t.objective is not None and "add" in t.scores for t in monitor.trials.values())
        assert monitor.best in (0, 1)
        best = monitor.trials[monitor.best]
        assert str(table.get_cell(str(best.number), "trial")) == f"★ {best.number}"
        shown = text_of(monitor, "#sweep-best")
        assert f"best: trial {best.number}, objective {best.objective:.4f}" in shown
        assert str(project / "sweep-out" / "best.toml") in shown
        assert monitor.best_recipe == project / "sweep-out" / "best.toml"
        assert "done" in text_of(monitor, "#sweep-status")
        assert not monitor.query_one("#cancel-sweep", Button).display
        assert job.seen  # shown once: not offered again at the next start
        load = monitor.query_one("#load-best", Button)
        assert not load.disabled
        # focus moves by a message once the button is enabled: wait for it, not for a frame
        await wait_until(pilot, lambda: load.has_focus, "Load best to take the focus")
        load.press()
        await wait_until(pilot, lambda: isinstance(app.screen, MethodScreen), "step 3")
        # the draft is the best trial's recipe, writing where the draft did
        best_recipe = load_recipe(project / "sweep-out" / "best.toml")
        draft = app.draft
        assert draft.models[0].parameters["weight"] == best.values["models[0].weight"]
        assert draft.models[0].parameters["weight"] == best_recipe.models[0].parameters["weight"]
        assert draft.output == "merged" and draft.base_dir == project
        assert draft.to_recipe().output_dir == project / "merged"
        # the sweep changed, into the same output: refused at the output field until "start over"
        form = await open_sweep_from_compare(pilot, app)
        [weight] = rows(form)
        weight.query_one(".dim-values", Input).value = "0.25, 0.75"
        await wait_until(pilot, lambda: form.found, "the output's problem")
        note = text_of(form, "#note-output")
        assert "holds the trials of another version of this sweep" in note and "start over" in note
        assert form.query_one("#start", Button).disabled
        form.query_one("#sweep-restart", Checkbox).value = True
        await wait_until(pilot, lambda: not form.found, "no problem once starting over")
        await pilot.press("ctrl+r")
        await wait_until(
            pilot,
            lambda: isinstance(app.screen, SweepMonitorScreen) and app.screen.job != job,
            "the second sweep's monitor",
        )
        again = app.screen
        assert isinstance(again, SweepMonitorScreen)
        assert (again.job.folder / "restart").is_file()
        assert await wait_finished(pilot, again) == DONE, again.job.stderr_text()
        assert {t.values["models[0].weight"] for t in again.trials.values()} == {0.25, 0.75}
        trials = (project / "sweep-out" / "trials.jsonl").read_text().splitlines()
        assert len(trials) == 2  # the first sweep's trials were deleted, not mixed in
    listed = subprocess.run(
        [sys.executable, "-m", "mergetui", "jobs", "--json"], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    assert [(row["kind"], row["state"], row["progress"]) for row in json.loads(listed.stdout)] == [
        ("sweep", DONE, "2/2 trials")
    ] * 2


# -- found again: a running sweep, after the UI was closed ----------------------------------------
def test_a_new_session_reattaches_to_a_running_sweep_and_cancels_it_after_asking(
    project: Path, models: dict[str, Path], merge_gate: MergeGate
) -> None:
    merge_gate.hold()  # each trial's merge waits after its first tensor: the sweep runs on
    asyncio.run(_reattach_flow(project, models))


async def _reattach_flow(project: Path, models: dict[str, Path]) -> None:
    from mergetui.tui.screens.dialogs import ChoiceScreen

    app = create_app(draft=ties_draft(project, models))
    async with app.run_test(size=(120, 44)) as pilot:
        form = await open_sweep_from_compare(pilot, app)
        await fill_grid_of_two(pilot, form, "sweep-out")
        form.query_one("#start", Button).press()
        await wait_until(pilot, lambda: app.screen.query("#sweep-table"), "the monitor")
        await pilot.pause()
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: isinstance(app.screen, ChoiceScreen), "the question")
        assert "A sweep is running" in text_of(app.screen, "#question")
        app.screen.query_one("#choice-detach", Button).press()
        await pilot.pause()
    [job] = list_jobs()
    assert job.kind == SWEEP and job.outcome().state == RUNNING and not job.seen
    again = create_app(project)  # a new session (the SSH connection came back)
    async with again.run_test(size=(120, 44)) as pilot:
        await wait_until(pilot, lambda: isinstance(again.screen, SweepMonitorScreen), "reattach")
        monitor = again.screen
        assert isinstance(monitor, SweepMonitorScreen) and monitor.job == job
        assert monitor.outcome == "running" and again.watched_sweep == job
        assert [m.model for m in again.draft.models] == [str(models["ft_a"]), str(models["ft_c"])]
        assert "reattached to the sweep" in "\n".join(
            str(line) for line in monitor.query_one("#sweep-log").lines
        )
        # the Sweep step shows the running sweep rather than a second form
        await pilot.press("escape")
        await pilot.pause()
        again.action_sweep()
        await pilot.pause()
        await wait_until(pilot, lambda: again.screen.query("#cancel-sweep"), "the monitor again")
        assert again.screen is not monitor
        monitor = again.screen
        assert isinstance(monitor, SweepMonitorScreen)
        monitor.query_one("#cancel-sweep", Button).press()
        await wait_until(pilot, lambda: isinstance(again.screen, ChoiceScreen), "the question")
        await pilot.press("escape")  # the safe answer: keep it running
        await pilot.pause()
        assert job.outcome().state == RUNNING and monitor.outcome == "running"
        monitor.query_one("#cancel-sweep", Button).press()
        await wait_until(pilot, lambda: isinstance(again.screen, ChoiceScreen), "the question")
        again.screen.query_one("#choice-stop", Button).press()
        assert await wait_finished(pilot, monitor) == CANCELLED, job.stderr_text()
        assert "sweep stopped" in text_of(monitor, "#sweep-status")
        assert monitor.query_one("#load-best", Button).disabled  # no trial had finished
    third = create_app(project)  # seen once: not offered again
    async with third.run_test(size=(120, 44)) as pilot:
        await pilot.pause()
        assert not isinstance(third.screen, SweepMonitorScreen)


# -- several trials at once, from a recorded job --------------------------------------------------
@pytest.fixture
def supervisor_stand_in() -> Iterator[int]:
    """A live process to stand for a job's supervisor: the job reads as running while it lives."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def _append(job: Job, *events: Any) -> None:
    with job.events_file.open("a", encoding="utf-8") as stream:
        stream.writelines(event.to_json() + "\n" for event in events)


def _trial(number: int, objective: float | None, best: int, weight: float) -> TrialEvent:
    return TrialEvent(
        number=number,
        trials_total=3,
        values={"merge.method": "ties", "models[0].weight": weight},
        scores={} if objective is None else {"add": objective},
        objective=objective,
        merge_s=0.1,
        eval_s=0.2,
        best=best,
        best_objective=0.5,
        message="" if objective is not None else "a NaN in model.layers.0.mlp.up_proj.weight",
    )


def test_the_monitor_shows_each_trial_in_flight_and_failed_ones_with_their_message(
    project: Path, models: dict[str, Path], supervisor_stand_in: int
) -> None:
    folder = jobs_dir() / "20261129-120000"
    folder.mkdir(parents=True)
    draft = ties_draft(project, models)
    from mergetui.recipe import recipe_to_toml

    (folder / "recipe.toml").write_text(recipe_to_toml(draft.to_recipe(), absolute_paths=True))
    (folder / "sweep.toml").write_text('version = 1\nrecipe = "recipe.toml"\n')
    info = {
        "pid": supervisor_stand_in,
        "pid_created": psutil.Process(supervisor_stand_in).create_time(),
        "started": time.time(),
        "output": str(project / "sweep-out"),
        "kind": SWEEP,
    }
    (folder / "job.json").write_text(json.dumps(info))
    job = Job(folder)
    _append(
        job,
        StartEvent(version="0", command="sweep"),
        TrialProgressEvent(trial=None, what="scoring the parents ft_a on add", fraction=0.5),
    )
    asyncio.run(_in_flight_flow(project, job))


async def _in_flight_flow(project: Path, job: Job) -> None:
    app = create_app(project)
    async with app.run_test(size=(120, 40)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, SweepMonitorScreen), "reattach")
        monitor = app.screen
        assert isinstance(monitor, SweepMonitorScreen)
        now = monitor.query_one("#sweep-now", Static)
        await wait_until(pilot, lambda: "parents" in str(now.render()), "the parents' line")
        assert "parents: scoring the parents ft_a on add 50%" in str(now.render())
        # two workers: two trials in flight, a line each
        _append(
            job,
            TrialProgressEvent(trial=0, what="merging: 10/21 tensors", fraction=10 / 21),
            TrialProgressEvent(trial=1, what="scoring merged on add", fraction=None),
        )
        await wait_until(pilot, lambda: "trial 1" in str(now.render()), "two trials in flight")
        lines = str(now.render()).splitlines()
        assert lines == [
            "parents: scoring the parents ft_a on add 50%",
            "trial 0: merging: 10/21 tensors 48%",
            "trial 1: scoring merged on add",
        ]
        # trial 1 ends first and fails; trial 0 runs on, and trial 2 starts
        _append(
            job,
            _trial(1, None, best=-1, weight=1.0),
            TrialProgressEvent(trial=2, what="merging: 1/21 tensors", fraction=1 / 21),
        )
        await wait_until(pilot, lambda: 1 in monitor.trials, "trial 1's row")
        assert str(now.render()).splitlines() == [
            "trial 0: merging: 10/21 tensors 48%",
            "trial 2: merging: 1/21 tensors 5%",
        ]
        table = monitor.query_one("#sweep-table", DataTable)
        row = [str(cell) for cell in table.get_row("1")]
        assert row[:4] == ["1", "ties", "1", "failed"] and "a NaN in model.layers" in row[-1]
        assert "best so far: no trial scored yet" in text_of(monitor, "#sweep-best")
        assert "running: 1 of 3 trials" in text_of(monitor, "#sweep-status")
        _append(job, _trial(0, 0.5, best=0, weight=0.5), _trial(2, 0.25, best=0, weight=0.8))
        await wait_until(pilot, lambda: len(monitor.trials) == 3, "every row")
        assert not monitor.query_one("#sweep-now").display
        assert table.row_count == 3 and str(table.get_cell("0", "trial")) == "★ 0"
        best = text_of(monitor, "#sweep-best")
        assert "best so far: trial 0, objective 0.5000 · merge.method = ties, models" in best
        assert monitor.outcome == "running"
        # it ends: the outcome and the best recipe
        (project / "sweep-out").mkdir()
        best_recipe = project / "sweep-out" / "best.toml"
        best_recipe.write_text(job.recipe_file.read_text())
        _append(
            job,
            SweptEvent(
                trials_done=3,
                best=0,
                best_objective=0.5,
                best_recipe=str(best_recipe),
                output=str(project / "sweep-out"),
            ),
        )
        (job.folder / "exit.json").write_text(json.dumps({"exit_code": 0, "ended": 1}))
        await wait_until(pilot, lambda: monitor.outcome != "running", "the end")
        assert monitor.outcome == DONE
        status = text_of(monitor, "#sweep-status")
        assert "swept 3 trial(s): the best is trial 0 (objective 0.5000)" in status
        assert f"its recipe: {best_recipe}" in text_of(monitor, "#sweep-best")
        assert not monitor.query_one("#load-best", Button).disabled
