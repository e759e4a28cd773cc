"""Run a sweep: merge and score trials (a batch of ``workers`` at once, here or on a Ray
cluster: :mod:`mergetui.sweep.executors`), keep the best, resume after a kill.

The output folder holds:

- ``sweep.json``: which sweep file (a hash of it and its recipe) the folder belongs to; another
  sweep file is refused unless restarted, so trials of two searches never mix;
- ``trials.jsonl`` / ``trials.csv``: one line per finished trial (values, scores per task, the
  objective, merge and eval seconds);
- ``parents.json``: the parents' scores, computed once;
- ``study.db``: Optuna's storage (random and TPE), which is what makes a resumed search go on
  from the trials it has seen rather than start over;
- ``best/`` and ``best.toml``: the best merge so far and a recipe that replays it bit for bit;
  ``trials/NNNN/``: the next best outputs, up to ``keep`` in all; a trial in progress merges into
  ``trials/NNNN`` too, and is deleted unless it is among the best;
- ``plots/``: the objective over trials and against each swept value, as PNG (with matplotlib).

Resuming: finished trials (in ``trials.jsonl``) are not repeated; a trial that was running when
the sweep was killed is run again with the same values.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.errors import MergeCancelled, RecipeError
from mergetui.events import Event, TrialEvent
from mergetui.sweep.executors import InlineExecutor, ProcessExecutor, RayExecutor
from mergetui.sweep.plots import PLOTS_DIR, write_pngs
from mergetui.sweep.spec import Choice, Range, Sweep
from mergetui.sweep.trial import applicable, grid_values, trial_recipe
from mergetui.sweep.work import (
    STOPPED,
    Report,
    TrialJob,
    TrialOutcome,
    TrialSizes,
    kept_folder,
    load_tasks,
    objective,
    scratch_folder,
    trial_sizes,
)

EventCallback = Callable[[Event], None]
STATE_FILE = "sweep.json"
TRIALS_FILE = "trials.jsonl"
PARENTS_FILE = "parents.json"
STUDY_FILE = "study.db"


@dataclass
class TrialResult:
    number: int
    values: dict[str, Any]
    scores: dict[str, float]
    objective: float | None
    merge_s: float
    eval_s: float
    message: str = ""

    @classmethod
    def of(
        cls,
        outcome: TrialOutcome,
        sweep: Sweep,
        tasks: list[Any],
        parents: dict[str, dict[str, float]],
    ) -> TrialResult:
        """A finished trial with its objective (None when it failed)."""
        value = objective(sweep, tasks, parents, outcome.scores) if outcome.scores else None
        return cls(
            outcome.number,
            outcome.values,
            outcome.scores,
            value,
            outcome.merge_s,
            outcome.eval_s,
            outcome.message,
        )

    def event(self, total: int, best: list[TrialResult]) -> TrialEvent:
        """This trial as the ``trial`` event, with the best trial so far."""
        return TrialEvent(
            **{k: v for k, v in self.to_dict().items() if k != "number"},
            number=self.number,
            trials_total=total,
            best=best[0].number if best else None,
            best_objective=best[0].objective if best else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "values": self.values,
            "scores": self.scores,
            "objective": self.objective,
            "merge_s": round(self.merge_s, 3),
            "eval_s": round(self.eval_s, 3),
            "message": self.message,
        }


@dataclass
class SweepState:
    """What the output folder says so far."""

    trials: list[TrialResult] = field(default_factory=list)
    #: where this run's trials merge: "disk", or "memory (/dev/shm/...)"
    scratch: str = "disk"

    def best(self, count: int = 1) -> list[TrialResult]:
        scored = [t for t in self.trials if t.objective is not None]
        return sorted(scored, key=lambda t: (-(t.objective or 0.0), t.number))[:count]


def output_conflict(sweep: Sweep) -> tuple[str, bool] | None:
    """Why the output folder cannot take this sweep's trials as it is, and whether starting over
    (``--restart``) would settle it: a folder holding another sweep's trials (yes), or a folder
    that is not a sweep's at all (no). None when it can (new, empty, or this sweep's own)."""
    out = sweep.output
    state_file = out / STATE_FILE
    if state_file.is_file():
        saved = json.loads(state_file.read_text(encoding="utf-8"))
        if saved.get("hash") == sweep.text_hash:
            return None
        return (
            f"sweep.output: {out} holds the trials of another version of this sweep "
            f"({saved.get('source')}); its file or its recipe changed",
            True,
        )
    if out.exists() and any(out.iterdir()):
        return (
            f"sweep.output: {out} exists and is not a sweep's folder; choose another output",
            False,
        )
    return None


def prepare_output(sweep: Sweep, restart: bool) -> SweepState:
    """Create or reopen the output folder; a folder of another sweep file is refused."""
    out = sweep.output
    state_file = out / STATE_FILE
    conflict = output_conflict(sweep)
    if conflict is not None and not (restart and conflict[1]):
        advice = (
            ". Run again with --restart to delete those trials and start over, or set another "
            "output"
            if conflict[1]
            else ""
        )
        raise RecipeError([conflict[0] + advice], str(sweep.source))
    if state_file.is_file() and restart:
        for name in (TRIALS_FILE, "trials.csv", STUDY_FILE, "best.toml", PARENTS_FILE):
            (out / name).unlink(missing_ok=True)
        for name in ("best", "trials", PLOTS_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    state_file.write_text(
        json.dumps({"hash": sweep.text_hash, "source": str(sweep.source)}, indent=2) + "\n",
        encoding="utf-8",
    )
    state = SweepState()
    trials = out / TRIALS_FILE
    if trials.is_file():
        for line in trials.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                state.trials.append(
                    TrialResult(
                        row["number"],
                        row["values"],
                        row["scores"],
                        row["objective"],
                        row["merge_s"],
                        row["eval_s"],
                        row.get("message", ""),
                    )
                )
    return state


class _Sampler:
    """Where the next trial's values come from: a plain product for grid, Optuna otherwise."""

    def __init__(self, sweep: Sweep, state: SweepState) -> None:
        self.sweep = sweep
        self.study: Any = None
        self.grid: list[dict[str, Any]] = []
        if sweep.strategy == "grid":
            keys = [d.key for d in sweep.dimensions]
            combos = itertools.product(*[grid_values(d) for d in sweep.dimensions])
            seen: set[str] = set()
            for combo in combos:
                values = _relevant(dict(zip(keys, combo, strict=True)))
                marker = json.dumps(values, sort_keys=True)
                if marker not in seen:  # values a method ignores make no new trial
                    seen.add(marker)
                    self.grid.append(values)
        else:
            self.study = _open_study(sweep, state)

    @property
    def total(self) -> int:
        return len(self.grid) if self.sweep.strategy == "grid" else self.sweep.trials

    def ask(self) -> tuple[Any, dict[str, Any]]:
        """Optuna's next trial and its values (random and TPE; a grid is indexed instead)."""
        trial = self.study.ask()
        values: dict[str, Any] = {}
        for dimension in self.sweep.dimensions:
            method = values.get("merge.method", self.sweep.recipe.method)
            if not applicable(dimension.key, method):
                continue
            values[dimension.key] = _suggest(trial, dimension.key, dimension.domain)
        return trial, values

    def tell(self, trial: Any, objective: float | None) -> None:
        if self.study is None:
            return
        import optuna

        if objective is None:
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, objective)


def _relevant(values: dict[str, Any]) -> dict[str, Any]:
    method = values.get("merge.method")
    if method is None:
        return values
    return {k: v for k, v in values.items() if applicable(k, str(method))}


def _suggest(trial: Any, key: str, domain: Choice | Range) -> Any:
    if isinstance(domain, Choice):
        return trial.suggest_categorical(key, list(domain.values))
    if domain.integer:
        step = int(domain.step) if domain.step else 1
        return trial.suggest_int(key, int(domain.low), int(domain.high), step=step, log=domain.log)
    return trial.suggest_float(key, domain.low, domain.high, step=domain.step, log=domain.log)


def _open_study(sweep: Sweep, state: SweepState) -> Any:
    """Optuna's study in ``study.db``: a resumed sweep goes on from every trial it has seen. A
    trial left running by a kill is marked failed and its values queued, so it runs again."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (
        optuna.samplers.TPESampler(seed=sweep.seed)
        if sweep.strategy == "tpe"
        else optuna.samplers.RandomSampler(seed=sweep.seed)
    )
    storage = f"sqlite:///{(sweep.output / STUDY_FILE).resolve()}"
    study = optuna.create_study(
        study_name="mergetui-sweep",
        storage=storage,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )
    recorded = {t.number: t for t in state.trials}
    for trial in study.get_trials(deepcopy=False):
        if trial.state != optuna.trial.TrialState.RUNNING:
            continue
        done = recorded.get(trial.number)
        if done is not None:  # killed between writing its line and telling Optuna
            study.tell(
                trial.number,
                done.objective,
                state=None if done.objective is not None else optuna.trial.TrialState.FAIL,
            )
        else:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params)
    return study


def run_sweep(
    sweep: Sweep,
    *,
    restart: bool = False,
    device: str | None = None,
    workers: int | None = None,
    ray: str | None = None,
    on_event: EventCallback | None = None,
    cancel: threading.Event | None = None,
    on_activity: Report | None = None,
) -> SweepState:
    """Run the sweep's remaining trials; return every trial (resumed ones included).

    ``workers`` trials run at once (the sweep file's ``workers`` unless given), in this process,
    in local worker processes, or as tasks on the Ray cluster at ``ray`` (the file's ``ray``
    unless given). Trials are asked for a batch at a time and their results told in trial order,
    so the trials depend on the seed and ``workers``, never on which worker finished first.
    """
    emit = on_event or (lambda event: None)
    cancel = cancel or threading.Event()
    workers = workers or sweep.workers
    ray = ray or sweep.ray
    state = prepare_output(sweep, restart)
    device = device or sweep.recipe.device
    sizes = trial_sizes(sweep, device)
    scratch = scratch_folder(sweep, sizes, workers, ray)
    in_memory = scratch != sweep.output / "trials"
    state.scratch = f"memory ({scratch})" if in_memory else "disk"
    if in_memory:
        shutil.rmtree(scratch, ignore_errors=True)  # a killed run's trials
    executor = _executor(sweep, device, cancel, on_activity, workers, ray, sizes)
    try:
        parents = _parents(sweep, executor)
        tasks = load_tasks(sweep)
        sampler = _Sampler(sweep, state)
        total = sampler.total
        while len(state.trials) < total and not cancel.is_set():
            batch = _ask(sampler, state, min(workers, total - len(state.trials)), scratch)
            running = {job.number for job, _ in batch}
            asked = {job.number: trial for job, trial in batch}
            finished: dict[int, TrialOutcome] = {}
            for outcome in executor.run([job for job, _ in batch]):
                finished[outcome.number] = outcome
                while running and min(running) in finished:  # told in trial order
                    done = finished.pop(min(running))
                    running.discard(done.number)
                    result = TrialResult.of(done, sweep, tasks, parents)
                    state.trials.append(result)
                    _record(sweep, state, result)
                    sampler.tell(asked[done.number], result.objective)
                    if in_memory:
                        _settle(sweep, state, scratch / f"{done.number:04d}", done.number)
                    _keep_best(sweep, state, running)
                    emit(result.event(total, state.best()))
    finally:
        executor.close()
        if in_memory:
            shutil.rmtree(scratch, ignore_errors=True)
    write_pngs(state.trials, sweep.output)  # a stopped sweep gets its plots too
    if cancel.is_set():
        raise MergeCancelled(STOPPED)
    return state


def _executor(
    sweep: Sweep,
    device: str,
    cancel: threading.Event,
    report: Report | None,
    workers: int,
    ray: str | None,
    sizes: TrialSizes,
) -> InlineExecutor | ProcessExecutor | RayExecutor:
    if ray:
        return RayExecutor(sweep, device, cancel, report, workers, ray, sizes)
    if workers > 1:
        return ProcessExecutor(sweep, device, cancel, report, workers)
    return InlineExecutor(sweep, device, cancel, report)


def _parents(
    sweep: Sweep, executor: InlineExecutor | ProcessExecutor | RayExecutor
) -> dict[str, dict[str, float]]:
    """The parents' scores: from ``parents.json`` when a run before this one computed them."""
    cache = sweep.output / PARENTS_FILE
    if cache.is_file():
        scores: dict[str, dict[str, float]] = json.loads(cache.read_text(encoding="utf-8"))[
            "scores"
        ]
        return scores
    scores = executor.parents()
    cache.write_text(json.dumps({"scores": scores}, indent=2) + "\n", encoding="utf-8")
    return scores


def _ask(
    sampler: _Sampler, state: SweepState, count: int, scratch: Path
) -> list[tuple[TrialJob, Any]]:
    """The next ``count`` trials (grid combinations not run yet, or Optuna's next asks), each to
    merge into its folder under ``scratch``."""
    batch: list[tuple[TrialJob, Any]] = []
    if sampler.study is None:
        finished = {t.number for t in state.trials}
        numbers = [i for i in range(sampler.total) if i not in finished][:count]
        return [(TrialJob(n, sampler.grid[n], scratch / f"{n:04d}"), None) for n in numbers]
    for _ in range(count):
        trial, values = sampler.ask()
        batch.append((TrialJob(trial.number, values, scratch / f"{trial.number:04d}"), trial))
    return batch


def _settle(sweep: Sweep, state: SweepState, merged: Path, number: int) -> None:
    """A trial merged in memory: moved to the output folder when it is among the best ``keep``
    (the only copy that reaches the disk), else deleted."""
    if merged.is_dir() and number in {t.number for t in state.best(sweep.keep)}:
        target = kept_folder(sweep, number)
        partial = target.with_name(target.name + ".partial")  # never looks like a trial's merge
        for folder in (target, partial):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(merged, partial)  # /dev/shm is another file system: a copy
        partial.rename(target)
    shutil.rmtree(merged, ignore_errors=True)


def _record(sweep: Sweep, state: SweepState, result: TrialResult) -> None:
    """Append the trial's line (flushed before anything else happens) and rewrite the CSV."""
    with (sweep.output / TRIALS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(result.to_dict()) + "\n")
    keys = list(dict.fromkeys(k for t in state.trials for k in t.values))
    tasks = list(dict.fromkeys(k for t in state.trials for k in t.scores))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", *keys, *tasks, "objective", "merge_s", "eval_s", "message"])
    for trial in state.trials:
        writer.writerow(
            [
                trial.number,
                *[trial.values.get(k, "") for k in keys],
                *[trial.scores.get(t, "") for t in tasks],
                "" if trial.objective is None else trial.objective,
                round(trial.merge_s, 3),
                round(trial.eval_s, 3),
                trial.message,
            ]
        )
    (sweep.output / "trials.csv").write_text(out.getvalue(), encoding="utf-8")


def _keep_best(sweep: Sweep, state: SweepState, running: set[int]) -> None:
    """``best/`` holds the best trial's merge and ``best.toml`` its recipe; the next best stay in
    ``trials/NNNN`` up to ``keep`` in all; every other output is deleted, but for the trials
    still ``running`` (in the same batch)."""
    from mergetui.recipe.toml_io import dump_recipe

    kept = state.best(sweep.keep)
    kept_numbers = {t.number for t in kept}
    best = kept[0] if kept else None
    best_dir = sweep.output / "best"
    marker = best_dir / ".mergetui-trial"
    current = int(marker.read_text()) if marker.is_file() else None
    trials_dir = sweep.output / "trials"
    if best is not None and current != best.number:
        if current is not None and best_dir.is_dir():
            if current in kept_numbers:
                best_dir.rename(trials_dir / f"{current:04d}")
                (trials_dir / f"{current:04d}" / ".mergetui-trial").unlink(missing_ok=True)
            else:
                shutil.rmtree(best_dir)
        source = trials_dir / f"{best.number:04d}"
        if source.is_dir():
            source.rename(best_dir)
            marker.write_text(str(best.number))
        recipe = trial_recipe(sweep.recipe, best.values, best_dir)
        dump_recipe(recipe, sweep.output / "best.toml", absolute_paths=True)
    for folder in trials_dir.glob("[0-9][0-9][0-9][0-9]") if trials_dir.is_dir() else []:
        number = int(folder.name)
        if number in running:
            continue
        if number not in kept_numbers or (best and number == best.number):
            shutil.rmtree(folder, ignore_errors=True)
    if sweep.keep == 0 and best_dir.is_dir():
        shutil.rmtree(best_dir)
