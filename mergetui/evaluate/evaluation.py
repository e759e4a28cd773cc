"""Score several models on several tasks, and how much of each specialist's score a merge kept."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.evaluate.models import loaded_in_turn
from mergetui.evaluate.scoring import ProgressCallback, Score, score_task
from mergetui.evaluate.tasks import Task


@dataclass
class EvalTable:
    """Rows are models, columns tasks. ``merged`` (when known) is compared with ``parents``."""

    models: list[str]
    tasks: list[Task]
    scores: dict[tuple[str, str], Score] = field(default_factory=dict)
    merged: str | None = None
    parents: list[str] = field(default_factory=list)

    def value(self, model: str, task: str) -> float:
        return self.scores[(model, task)].value

    def retained(self, task: Task) -> float | None:
        """Merged score ÷ best parent score (accuracy), or best parent ÷ merged (perplexity):
        1.0 means the merge kept all of the best specialist's score on this task."""
        if self.merged is None or not self.parents:
            return None
        merged = self.value(self.merged, task.name)
        parents = [self.value(p, task.name) for p in self.parents]
        if task.higher_is_better:
            best = max(parents)
            return merged / best if best > 0 else None
        best = min(parents)
        return best / merged if merged > 0 else None

    def average_retained(self) -> float | None:
        shares = [r for r in (self.retained(t) for t in self.tasks) if r is not None]
        return sum(shares) / len(shares) if shares else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": self.models,
            "tasks": [
                {"name": t.name, "metric": t.metric, "file": str(t.path)} for t in self.tasks
            ],
            "scores": {m: {t.name: self.value(m, t.name) for t in self.tasks} for m in self.models},
            "merged": self.merged,
            "parents": self.parents,
            "retained": {t.name: self.retained(t) for t in self.tasks} if self.merged else None,
            "average_retained": self.average_retained(),
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["model", *[f"{t.name} ({t.metric})" for t in self.tasks]])
        for model in self.models:
            writer.writerow([model, *[f"{self.value(model, t.name):.6g}" for t in self.tasks]])
        if self.merged:
            shares = [self.retained(t) for t in self.tasks]
            writer.writerow(["retained", *["" if s is None else f"{s:.4f}" for s in shares]])
        return out.getvalue()


def evaluate(
    names: list[str],
    paths: list[Path],
    tasks: list[Task],
    *,
    device: str,
    merged: str | None = None,
    parents: list[str] | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    chat_template: bool = True,
    on_progress: ProgressCallback | None = None,
) -> EvalTable:
    """Score every model on every task (models loaded together when they fit, else in turn)."""
    table = EvalTable(list(names), tasks, merged=merged, parents=list(parents or []))
    with loaded_in_turn(names, paths, device) as models:
        for loaded in models:
            for task in tasks:
                table.scores[(loaded.name, task.name)] = score_task(
                    loaded,
                    task,
                    batch_size=batch_size,
                    limit=limit,
                    chat_template=chat_template,
                    on_progress=on_progress,
                )
    return table
