"""Which models to compare or score, and what to call them: a merge, its base and its parents.

Both the CLI (``compare``/``eval --recipe``) and the TUI's compare step line models up the same
way, so the naming rules live here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.evaluate.models import model_path


@dataclass
class Lineup:
    """Display names and folders, in order; ``merged`` names the merge, ``parents`` its sources."""

    names: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    merged: str | None = None
    parents: list[str] = field(default_factory=list)

    def add(self, name: str, path: Path) -> str:
        """Append a model under ``name`` (numbered when the name is taken); returns the name used."""
        unique, count = name, 1
        while unique in self.names:
            count += 1
            unique = f"{name} #{count}"
        self.names.append(unique)
        self.paths.append(path)
        return unique


def short_name(reference: str, base_dir: Path | None = None) -> str:
    """A folder's last part, or a Hub id as written. A relative folder is looked for in
    ``base_dir`` (the recipe's folder, as the recipe takes it), else in the working folder."""
    path = Path(reference)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return (
        Path(reference).name
        if ("/" in reference and path.exists()) or reference.startswith((".", "/", "~"))
        else reference
    )


def recipe_lineup(recipe: Any, *, include_merged: bool = True) -> Lineup:
    """The merge (its output folder), its base and each of its models, for a loaded recipe."""
    lineup = Lineup()
    if include_merged:
        lineup.merged = lineup.add("merged", model_path(str(recipe.output_dir)))
    if recipe.base:
        short = short_name(recipe.base, recipe.base_dir)
        lineup.add(
            "base" if short == "base" else f"base ({short})",
            model_path(recipe.base, recipe.base_dir),
        )
    parents = [entry.model for entry in recipe.models]
    parents += [s.model for piece in recipe.slices for s in piece.sources]  # a merge of slices
    for model in dict.fromkeys(parents):
        if model == recipe.base:
            continue
        lineup.parents.append(
            lineup.add(short_name(model, recipe.base_dir), model_path(model, recipe.base_dir))
        )
    return lineup
