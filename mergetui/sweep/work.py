"""What one trial does, wherever it runs: merge the trial's recipe, score the merge.

Everything here takes and returns plain, picklable values (the validated :class:`Sweep`, a
:class:`TrialJob`, a :class:`TrialOutcome`), so the same functions run in this process, in a local
worker process, or as a Ray task on another machine (:mod:`mergetui.sweep.executors`). The
objective is not computed here: it needs every parent's score, which the sweep's driver holds.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.errors import MergeCancelled, MergeTuiError
from mergetui.pauses import pause_point
from mergetui.sweep.spec import Sweep
from mergetui.sweep.trial import trial_recipe

#: what a trial (None: the parents' scoring) is doing now and how far (0-1, None when unknown)
Report = Callable[["int | None", str, "float | None"], None]
STOPPED = "sweep stopped; its finished trials are kept: run the same command again to go on"


@dataclass(frozen=True)
class TrialJob:
    """One trial to run: its number, its swept values (recipe key → value), and the folder it
    merges into (in memory or on disk: the driver decides, :func:`scratch_folder`)."""

    number: int
    values: dict[str, Any]
    folder: Path


@dataclass
class TrialOutcome:
    """What a trial gave: the score per task (empty when it failed, ``message`` saying why) and
    the seconds its merge and its scoring took."""

    number: int
    values: dict[str, Any]
    scores: dict[str, float] = field(default_factory=dict)
    merge_s: float = 0.0
    eval_s: float = 0.0
    message: str = ""


def kept_folder(sweep: Sweep, number: int) -> Path:
    """Where trial ``number``'s merge stays while it is among the best ``keep`` (on disk)."""
    return sweep.output / "trials" / f"{number:04d}"


@dataclass(frozen=True)
class TrialSizes:
    """What one trial needs, from the plan of the starting recipe (headers only): the merged
    model's bytes on disk, the merge's peak memory, and the merge loaded for scoring."""

    output_bytes: int
    merge_peak_bytes: int
    scoring_bytes: int


def trial_sizes(sweep: Sweep, device: str) -> TrialSizes:
    """Scoring loads the merge in float32 on the CPU, in its own dtype on a GPU."""
    from mergetui.engine.plan import build_plan, estimate

    plan = build_plan(sweep.recipe, device="cpu", fetch=False)
    try:
        figures = estimate(plan)
        numel = sum(tensor.numel for tensor in plan.tensors)
    finally:
        plan.close()
    scoring = figures.output_bytes if device.startswith("cuda") else 4 * numel
    return TrialSizes(figures.output_bytes, figures.peak_ram_bytes, scoring)


#: tmpfs, where a trial's merge is written to memory and read back from it
MEMORY_ROOT = Path("/dev/shm")


def scratch_folder(sweep: Sweep, sizes: TrialSizes, workers: int, ray: str | None) -> Path:
    """Where trials merge. ``memory``: a folder of this sweep in ``/dev/shm``, so a trial's
    merge never touches the disk (a 7B sweep of 40 trials would write 600 GB) and is scored from
    memory; kept trials are moved to the output folder. ``auto`` takes it when the trials in
    flight fit twice over in /dev/shm and in the memory available besides their merge and
    scoring; ``disk`` (and any Ray sweep: its outputs must be on shared storage) merge into the
    output folder's ``trials/``."""
    import psutil

    from mergetui.errors import RecipeError

    disk = sweep.output / "trials"
    if sweep.scratch == "disk":
        return disk
    if ray:
        if sweep.scratch == "memory":
            raise RecipeError(
                [
                    'sweep.scratch: "memory" cannot be used on a Ray cluster (each trial\'s '
                    'merge must land on the shared output folder); use "auto" or "disk"'
                ],
                str(sweep.source),
            )
        return disk
    need = workers * sizes.output_bytes
    try:
        free = shutil.disk_usage(MEMORY_ROOT).free
    except OSError:
        free = 0
    available = psutil.virtual_memory().available
    fits = free > 2 * need and available > need + workers * (
        sizes.merge_peak_bytes + sizes.scoring_bytes
    )
    if not fits:
        if sweep.scratch == "memory":
            raise RecipeError(
                [
                    f'sweep.scratch: "memory", but {workers} trial(s) of '
                    f"{sizes.output_bytes / 2**30:.1f} GiB do not fit in {MEMORY_ROOT} "
                    f"({free / 2**30:.1f} GiB free, {available / 2**30:.1f} GiB of memory "
                    'available); use "auto" or "disk", or fewer workers'
                ],
                str(sweep.source),
            )
        return disk
    return memory_folder(sweep)


def memory_folder(sweep: Sweep) -> Path:
    """This sweep's folder in /dev/shm, named after its output folder (a resumed run finds and
    clears what a killed one left)."""
    tag = hashlib.sha256(str(sweep.output.resolve()).encode()).hexdigest()[:12]
    return MEMORY_ROOT / f"mergetui-sweep-{tag}"


def load_tasks(sweep: Sweep) -> list[Any]:
    """The objective's tasks (reads the task files; imports no torch)."""
    from mergetui.evaluate.tasks import load_answer_task, load_text_task

    return [
        load_answer_task(name, path) if path.suffix == ".jsonl" else load_text_task(name, path)
        for name, path in sweep.objective.tasks.items()
    ]


def parent_names(sweep: Sweep) -> tuple[list[str], list[Path]]:
    """The parents the objective compares a merge with, and their folders."""
    from mergetui.evaluate.lineup import recipe_lineup

    lineup = recipe_lineup(sweep.recipe, include_merged=False)
    names = list(lineup.parents)
    return names, [lineup.paths[lineup.names.index(n)] for n in names]


def _score(
    sweep: Sweep,
    names: list[str],
    paths: list[Path],
    device: str,
    report: Report | None,
    trial: int | None,
    what: str,
) -> dict[str, dict[str, float]]:
    from transformers.utils import logging as transformers_logging

    from mergetui.evaluate.evaluation import evaluate

    transformers_logging.disable_progress_bar()  # a bar per model load, every trial
    tasks = load_tasks(sweep)

    def progress(model: str, task: str, done: int, total: int) -> None:
        if report is not None:
            report(trial, f"{what} {model} on {task}", done / total if total else None)

    table = evaluate(
        names,
        paths,
        tasks,
        device=device,
        limit=sweep.objective.limit,
        on_progress=progress,
    )
    return {name: {task.name: table.value(name, task.name) for task in tasks} for name in names}


def score_parents(
    sweep: Sweep, device: str, report: Report | None = None
) -> dict[str, dict[str, float]]:
    """Every parent's score per task (the driver caches it in ``parents.json``)."""
    from mergetui.engine.plan import resolve_device

    names, paths = parent_names(sweep)
    return _score(sweep, names, paths, resolve_device(device), report, None, "scoring the parents")


def run_trial(
    sweep: Sweep,
    job: TrialJob,
    device: str,
    cancel: threading.Event | None = None,
    report: Report | None = None,
) -> TrialOutcome:
    """Merge the trial into its folder and score it. A trial that cannot be merged (a recipe
    its values make invalid, a plan error) is an outcome with its message, and the sweep goes
    on; a stop raises :class:`MergeCancelled`."""
    from mergetui.engine.executor import run_merge
    from mergetui.engine.plan import build_plan, resolve_device
    from mergetui.events import Event, TensorEvent

    cancel = cancel or threading.Event()
    number = job.number

    def merging(event: Event) -> None:
        if report is not None and isinstance(event, TensorEvent) and event.tensors_total:
            report(number, f"trial {number}: merging", event.tensors_done / event.tensors_total)

    out = job.folder
    shutil.rmtree(out, ignore_errors=True)  # a half-finished trial of a killed run
    started = time.perf_counter()
    device = resolve_device(device)
    try:
        recipe = trial_recipe(sweep.recipe, job.values, out)
        plan = build_plan(recipe, device=device)
        try:
            run_merge(plan, force=True, cancel=cancel, on_event=merging)
        finally:
            plan.close()
        pause_point("trial-merged", cancel, number + 1)
        if cancel.is_set():  # stopped once merged: not worth scoring, it runs again on resume
            raise MergeCancelled(STOPPED)
    except MergeTuiError as exc:
        if cancel.is_set():  # the merge's own "partial output removed" is the sweep's stop
            raise MergeCancelled(STOPPED) from exc
        return TrialOutcome(
            number, job.values, merge_s=time.perf_counter() - started, message=str(exc)
        )
    merge_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = _score(sweep, ["merged"], [out], device, report, number, f"trial {number}: scoring")
    return TrialOutcome(
        number, job.values, scores["merged"], merge_s, time.perf_counter() - started
    )


def objective(
    sweep: Sweep,
    tasks: list[Any],
    parents: dict[str, dict[str, float]],
    scores: dict[str, float],
) -> float:
    """The number the sweep maximises: the mean share of the best parent's score kept
    (``mean_retained``), the mean accuracy, or one task's score (perplexity negated)."""
    wanted = sweep.objective.score
    by_name = {task.name: task for task in tasks}
    if wanted in by_name:
        task = by_name[wanted]
        return scores[wanted] if task.higher_is_better else -scores[wanted]
    if wanted == "mean_accuracy":
        return sum(scores.values()) / len(scores)
    shares = []
    for task in tasks:
        values = [parents[p][task.name] for p in parents]
        merged = scores[task.name]
        if task.higher_is_better:
            best = max(values)
            shares.append(merged / best if best > 0 else 0.0)
        else:
            best = min(values)
            shares.append(best / merged if merged > 0 else 0.0)
    return sum(shares) / len(shares)
