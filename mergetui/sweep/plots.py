"""The sweep's plots: the objective over trials and against each swept value.

In the terminal with plotext (plain text, no colour codes, so it prints the same in a log file or a
TUI widget); as PNG files in the output folder's ``plots/`` with matplotlib, when it is installed
(``pip install 'mergetui[plots]'``): a sweep must not need a plotting stack to run.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

PLOTS_DIR = "plots"


class Scored(Protocol):
    """A finished trial as the plots need it, read-only (a runner's
    :class:`~mergetui.sweep.runner.TrialResult` or a ``trial`` event)."""

    @property
    def number(self) -> int: ...

    @property
    def values(self) -> dict[str, Any]: ...

    @property
    def objective(self) -> float | None: ...


def best_so_far(trials: Sequence[Scored]) -> tuple[list[int], list[float], list[float]]:
    """Trial numbers, objectives and the running best, over the trials that have an objective."""
    numbers: list[int] = []
    values: list[float] = []
    best: list[float] = []
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.objective is None:
            continue
        numbers.append(trial.number)
        values.append(trial.objective)
        best.append(max(best[-1], trial.objective) if best else trial.objective)
    return numbers, values, best


def _positions(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numbers stay numbers; anything else (a method, true/false) is placed at 0, 1, 2... with
    its text as the tick label."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = list(dict.fromkeys(str(v) for v in values))
    return [float(labels.index(str(v))) for v in values], labels


def swept_keys(trials: Sequence[Scored]) -> list[str]:
    return list(dict.fromkeys(key for trial in trials for key in trial.values))


def objective_text(trials: Sequence[Scored], width: int = 72, height: int = 16) -> str:
    """The objective of every trial and the best so far, as text ('' before any score)."""
    import plotext as plt

    numbers, values, best = best_so_far(trials)
    if not numbers:
        return ""
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    plt.scatter(numbers, values, marker="dot", label="trial")
    steps_x = [x for n in numbers for x in (n, n)][1:]  # a step: flat until a better trial
    steps_y = [y for b in best for y in (b, b)][:-1]
    plt.plot(steps_x, steps_y, label="best so far")
    ticks = sorted({numbers[0], numbers[-1], *numbers[:: max(1, len(numbers) // 6)]})
    plt.xticks(ticks, [str(t) for t in ticks])
    plt.title("objective")
    plt.xlabel("trial")
    text: str = plt.uncolorize(plt.build())
    return text


def parameter_text(trials: Sequence[Scored], key: str, width: int = 72, height: int = 14) -> str:
    """The objective against one swept value ('' when no scored trial has it)."""
    import plotext as plt

    scored = [t for t in trials if t.objective is not None and key in t.values]
    if not scored:
        return ""
    xs, labels = _positions([t.values[key] for t in scored])
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    plt.scatter(xs, [t.objective for t in scored], marker="dot")
    if labels is not None:
        plt.xticks(list(range(len(labels))), labels)
    plt.title(f"objective by {key}")
    text: str = plt.uncolorize(plt.build())
    return text


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") + ".png"


def write_pngs(trials: Sequence[Scored], folder: Path) -> list[Path]:
    """``plots/objective.png`` and one ``plots/<key>.png`` per swept value, when matplotlib is
    installed (else nothing, and an empty list)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")  # files only: no window, no display needed
    from matplotlib import pyplot as plt

    numbers, values, best = best_so_far(trials)
    if not numbers:
        return []
    out = folder / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.scatter(numbers, values, s=14, label="trial")
    axes.step(numbers, best, where="post", color="tab:orange", label="best so far")
    axes.set(xlabel="trial", ylabel="objective", title="objective over trials")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "objective.png", dpi=110)
    plt.close(figure)
    written.append(out / "objective.png")
    for key in swept_keys(trials):
        scored = [t for t in trials if t.objective is not None and key in t.values]
        if not scored:
            continue
        xs, labels = _positions([t.values[key] for t in scored])
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.scatter(xs, [t.objective for t in scored], s=14)
        if labels is not None:
            axes.set_xticks(range(len(labels)), labels)
        axes.set(xlabel=key, ylabel="objective", title=f"objective by {key}")
        figure.tight_layout()
        path = out / _file_name(key)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
