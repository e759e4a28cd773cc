"""The eval table as rows of formatted cells, for ``mergetui eval`` and the TUI's compare step.

Both show the same scores, the same "retained by the merge" row and the same summary; the
formatting lives here once, as plain strings (no rich or Textual objects), and each UI only
styles the rows (the merge in bold, the retained row in italics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mergetui.units import format_score

if TYPE_CHECKING:
    from mergetui.evaluate.evaluation import EvalTable

RETAINED_LABEL = "retained by the merge"


@dataclass(frozen=True)
class ScoreRow:
    """One row: a model's scores (``kind`` "merged" for the merge) or the share of the best
    parent's score the merge kept on each task ("retained")."""

    label: str
    cells: list[str]
    kind: Literal["model", "merged", "retained"] = "model"


def score_rows(table: EvalTable) -> list[ScoreRow]:
    """Models × tasks (in ``table.tasks`` order), then the retained row when a merge is known."""
    rows = [
        ScoreRow(
            model,
            [format_score(t.metric, table.value(model, t.name)) for t in table.tasks],
            "merged" if model == table.merged else "model",
        )
        for model in table.models
    ]
    if table.merged:
        shares = [table.retained(t) for t in table.tasks]
        cells = ["?" if s is None else f"{s:.0%}" for s in shares]
        rows.append(ScoreRow(RETAINED_LABEL, cells, "retained"))
    return rows


def retained_summary(table: EvalTable) -> str | None:
    """The one-line verdict under the table, or None without a merge to judge."""
    average = table.average_retained()
    if average is None:
        return None
    return f"the merge kept {average:.0%} of the best specialist's score on average"
