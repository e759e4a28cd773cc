"""The recipe data model: a plain, validated description of one merge.

A :class:`Recipe` is built only by :func:`mergetui.recipe.validate.validate_recipe_data`, so code that
holds one may assume it is valid: the method exists, parameters are typed and in range, defaults are
filled in, and model counts fit the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPE_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_SHARD_SIZE = 2 * 1000**3


@dataclass(frozen=True)
class ModelEntry:
    """One ``[[models]]`` entry: a model reference, an optional LoRA adapter and its parameters."""

    model: str
    lora: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """A validated merge recipe.

    ``parameters`` holds every global parameter of the method with defaults filled in; each
    ``ModelEntry.parameters`` holds every per-model parameter, defaults filled in.
    ``base_dir`` is the directory relative model paths are resolved against (the recipe's folder).
    """

    method: str
    models: tuple[ModelEntry, ...]
    output_path: str
    base: str | None = None
    dtype: str | None = None
    seed: int = 0
    device: str = "auto"
    tokenizer: str = "base"
    parameters: dict[str, Any] = field(default_factory=dict)
    shard_size: int = DEFAULT_SHARD_SIZE
    version: int = RECIPE_VERSION
    base_dir: Path = field(default_factory=Path.cwd)
    source_file: str | None = None

    def resolve_path(self, text: str) -> Path:
        """A recipe-relative path made absolute (``~`` expanded)."""
        path = Path(text).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def output_dir(self) -> Path:
        return self.resolve_path(self.output_path)

    def references(self) -> list[str]:
        """Every model reference in the recipe, base first, without duplicates."""
        refs = ([self.base] if self.base else []) + [entry.model for entry in self.models]
        return list(dict.fromkeys(refs))
