"""Run a sweep: merge and score one trial after another, keep the best, resume after a kill.

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
  ``trials/NNNN`` too, and is deleted unless it is among the best.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.errors import MergeCancelled, MergeTuiError, RecipeError
from mergetui.events import Event, TrialEvent
from mergetui.pauses import pause_point
from mergetui.sweep.spec import Choice, Range, Sweep
from mergetui.sweep.trial import applicable, grid_values, trial_recipe

EventCallback = Callable[[Event], None]
#: what the sweep is doing now and how far (0-1, None when unknown), for a live display
ActivityCallback = Callable[[str, "float | None"], None]
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

    def best(self, count: int = 1) -> list[TrialResult]:
        scored = [t for t in self.trials if t.objective is not None]
        return sorted(scored, key=lambda t: (-(t.objective or 0.0), t.number))[:count]


def prepare_output(sweep: Sweep, restart: bool) -> SweepState:
    """Create or reopen the output folder; a folder of another sweep file is refused."""
    out = sweep.output
    state_file = out / STATE_FILE
    if state_file.is_file():
        saved = json.loads(state_file.read_text(encoding="utf-8"))
        if saved.get("hash") != sweep.text_hash and not restart:
            raise RecipeError(
                [
                    f"sweep.output: {out} holds the trials of another version of this sweep "
                    f"({saved.get('source')}); its file or its recipe changed. Run again with "
                    "--restart to delete those trials and start over, or set another output"
                ],
                str(sweep.source),
            )
        if restart:
            for name in (TRIALS_FILE, "trials.csv", STUDY_FILE, "best.toml", PARENTS_FILE):
                (out / name).unlink(missing_ok=True)
            for name in ("best", "trials"):
                shutil.rmtree(out / name, ignore_errors=True)
    elif out.exists() and any(out.iterdir()):
        raise RecipeError(
            [f"sweep.output: {out} exists and is not a sweep's folder; choose another output"],
            str(sweep.source),
        )
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


class Scorer:
    """Scores a merged model on the sweep's tasks; the parents are scored once (cached in
    ``parents.json``) and each trial only scores its merge."""

    def __init__(self, sweep: Sweep, device: str) -> None:
        from transformers.utils import logging as transformers_logging

        from mergetui.evaluate.lineup import recipe_lineup
        from mergetui.evaluate.tasks import load_answer_task, load_text_task

        transformers_logging.disable_progress_bar()  # a bar per model load, every trial

        self.sweep = sweep
        self.device = device
        self.tasks = [
            load_answer_task(name, path) if path.suffix == ".jsonl" else load_text_task(name, path)
            for name, path in sweep.objective.tasks.items()
        ]
        lineup = recipe_lineup(sweep.recipe, include_merged=False)
        self.parent_names = list(lineup.parents)
        self.parent_paths = [lineup.paths[lineup.names.index(n)] for n in self.parent_names]
        self.parents: dict[str, dict[str, float]] = {}

    def score_parents(
        self, folder: Path, activity: ActivityCallback | None = None
    ) -> dict[str, dict[str, float]]:
        cache = folder / PARENTS_FILE
        if cache.is_file():
            self.parents = json.loads(cache.read_text(encoding="utf-8"))["scores"]
            return self.parents
        from mergetui.evaluate.evaluation import evaluate

        table = evaluate(
            self.parent_names,
            self.parent_paths,
            self.tasks,
            device=self.device,
            limit=self.sweep.objective.limit,
            on_progress=_scoring("scoring the parents", activity),
        )
        self.parents = {
            name: {task.name: table.value(name, task.name) for task in self.tasks}
            for name in self.parent_names
        }
        cache.write_text(json.dumps({"scores": self.parents}, indent=2) + "\n", encoding="utf-8")
        return self.parents

    def score(
        self, merged: Path, activity: ActivityCallback | None = None, what: str = "scoring"
    ) -> dict[str, float]:
        from mergetui.evaluate.evaluation import evaluate

        table = evaluate(
            ["merged"],
            [merged],
            self.tasks,
            device=self.device,
            limit=self.sweep.objective.limit,
            on_progress=_scoring(what, activity),
        )
        return {task.name: table.value("merged", task.name) for task in self.tasks}

    def objective(self, scores: dict[str, float]) -> float:
        """The number the sweep maximises: the mean share of the best parent's score kept
        (``mean_retained``), the mean accuracy, or one task's score (perplexity negated)."""
        wanted = self.sweep.objective.score
        by_name = {task.name: task for task in self.tasks}
        if wanted in by_name:
            task = by_name[wanted]
            return scores[wanted] if task.higher_is_better else -scores[wanted]
        if wanted == "mean_accuracy":
            return sum(scores.values()) / len(scores)
        shares = []
        for task in self.tasks:
            parents = [self.parents[p][task.name] for p in self.parent_names]
            merged = scores[task.name]
            if task.higher_is_better:
                best = max(parents)
                shares.append(merged / best if best > 0 else 0.0)
            else:
                best = min(parents)
                shares.append(best / merged if merged > 0 else 0.0)
        return sum(shares) / len(shares)


def _scoring(what: str, activity: ActivityCallback | None) -> Any:
    """An evaluation progress callback that reports ``what: model task done/total``."""
    if activity is None:
        return None

    def report(model: str, task: str, done: int, total: int) -> None:
        activity(f"{what} {model} on {task}", done / total if total else None)

    return report


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

    def ask(self, number: int) -> tuple[Any, dict[str, Any]]:
        if self.study is None:
            return None, self.grid[number]
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
    on_event: EventCallback | None = None,
    cancel: threading.Event | None = None,
    on_activity: ActivityCallback | None = None,
) -> SweepState:
    """Run the sweep's remaining trials; return every trial (resumed ones included)."""
    from mergetui.engine.plan import build_plan, resolve_device

    emit = on_event or (lambda event: None)
    cancel = cancel or threading.Event()
    state = prepare_output(sweep, restart)
    device = device or resolve_device(sweep.recipe.device)
    scorer = Scorer(sweep, "cpu" if device == "cpu" else device)
    scorer.score_parents(sweep.output, on_activity)
    sampler = _Sampler(sweep, state)
    total = sampler.total
    finished = {t.number for t in state.trials}
    while len(state.trials) < total and not cancel.is_set():
        if sampler.study is None:  # grid: the first combination not run yet
            number = next(i for i in range(total) if i not in finished)
        trial, values = sampler.ask(number if sampler.study is None else -1)
        if trial is not None:
            number = trial.number
        result = _run_trial(sweep, scorer, number, values, device, build_plan, cancel, on_activity)
        state.trials.append(result)
        _record(sweep, state, result)
        sampler.tell(trial, result.objective)
        _keep_best(sweep, state, result)
        emit(result.event(total, state.best()))
        finished.add(number)
    if cancel.is_set():
        raise MergeCancelled(
            "sweep stopped; its finished trials are kept: run the same command again to go on"
        )
    return state


def _run_trial(
    sweep: Sweep,
    scorer: Scorer,
    number: int,
    values: dict[str, Any],
    device: str,
    build_plan: Callable[..., Any],
    cancel: threading.Event,
    activity: ActivityCallback | None = None,
) -> TrialResult:
    """Merge one trial into ``trials/NNNN`` and score it; a trial that cannot be merged is
    recorded as failed (its message kept), and the sweep goes on."""
    from mergetui.engine.executor import run_merge
    from mergetui.events import TensorEvent

    def merging(event: Event) -> None:
        if activity is not None and isinstance(event, TensorEvent) and event.tensors_total:
            activity(f"trial {number}: merging", event.tensors_done / event.tensors_total)

    out = sweep.output / "trials" / f"{number:04d}"
    shutil.rmtree(out, ignore_errors=True)  # a half-finished trial of a killed run
    started = time.perf_counter()
    try:
        recipe = trial_recipe(sweep.recipe, values, out)
        plan = build_plan(recipe, device=device)
        try:
            run_merge(plan, force=True, cancel=cancel, on_event=merging)
        finally:
            plan.close()
        pause_point("trial-merged", cancel, number + 1)
    except MergeTuiError as exc:
        if cancel.is_set():
            raise MergeCancelled(
                "sweep stopped; its finished trials are kept: run the same command again to go on"
            ) from exc
        return TrialResult(number, values, {}, None, time.perf_counter() - started, 0.0, str(exc))
    merged_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = scorer.score(out, activity, f"trial {number}: scoring")
    return TrialResult(
        number, values, scores, scorer.objective(scores), merged_s, time.perf_counter() - started
    )


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


def _keep_best(sweep: Sweep, state: SweepState, result: TrialResult) -> None:
    """``best/`` holds the best trial's merge and ``best.toml`` its recipe; the next best stay in
    ``trials/NNNN`` up to ``keep`` in all; every other output is deleted."""
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
        if int(folder.name) not in kept_numbers or (best and int(folder.name) == best.number):
            shutil.rmtree(folder, ignore_errors=True)
    if sweep.keep == 0 and best_dir.is_dir():
        shutil.rmtree(best_dir)
