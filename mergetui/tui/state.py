"""The recipe being built, shared by every screen (a plain object, not scattered across widgets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelDraft:
    """One ``[[models]]`` entry. ``weight`` starts at 1 (every weighted method needs one; the
    method step edits it), so a draft can be checked before a method is tuned."""

    model: str
    lora: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"weight": 1.0})


@dataclass
class RecipeDraft:
    base: str = ""
    models: list[ModelDraft] = field(default_factory=list)
    method: str = "ties"
    parameters: dict[str, Any] = field(default_factory=dict)
    output: str = "./merged"
    dtype: str | None = None
    device: str = "auto"
    seed: int = 0
    base_dir: Path = field(default_factory=Path.cwd)

    def to_data(self) -> dict[str, Any]:
        """The draft as recipe data (the TOML's structure), for validation and saving."""
        merge: dict[str, Any] = {"method": self.method, "device": self.device, "seed": self.seed}
        if self.base:
            merge["base"] = self.base
        if self.dtype:
            merge["dtype"] = self.dtype
        if self.parameters:
            merge["parameters"] = dict(self.parameters)
        models = []
        for entry in self.models:
            row: dict[str, Any] = {"model": entry.model, **entry.parameters}
            if entry.lora:
                row["lora"] = entry.lora
            models.append(row)
        return {"version": 1, "merge": merge, "models": models, "output": {"path": self.output}}

    @classmethod
    def from_recipe(cls, recipe: Any) -> RecipeDraft:
        """A draft holding a loaded recipe (``mergetui open``), paths as the recipe wrote them."""
        return cls(
            base=recipe.base or "",
            models=[ModelDraft(e.model, e.lora or "", dict(e.parameters)) for e in recipe.models],
            method=recipe.method,
            parameters=dict(recipe.parameters),
            output=recipe.output_path,
            dtype=recipe.dtype,
            device=recipe.device,
            seed=recipe.seed,
            base_dir=recipe.base_dir,
        )

    def save(self, path: Path) -> Path:
        """Validate and write the recipe TOML to ``path`` (relative paths stay relative to the
        draft's folder, so write it there or give absolute model paths)."""
        from mergetui.recipe import dump_recipe

        target = path if path.is_absolute() else self.base_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        dump_recipe(self.to_recipe(), target)
        return target

    def to_recipe(self) -> Any:
        """Validate the draft into a :class:`~mergetui.recipe.Recipe` (raises RecipeError)."""
        from mergetui.recipe.validate import validate_recipe_data

        return validate_recipe_data(self.to_data(), base_dir=self.base_dir, source_file="(draft)")
