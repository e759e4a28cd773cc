"""The recipe being built, shared by every screen (a plain object, not scattered across widgets)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.logs import log_dir

#: The recipe being built is written here as it changes, and offered back at the next start.
AUTOSAVE_NAME = "draft.json"
PROMPTS_NAME = "prompts.json"


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
    #: an int once valid; the text as typed until then, so validation can say what is wrong
    seed: int | str = 0
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
    def from_data(cls, data: dict[str, Any], base_dir: Path) -> RecipeDraft:
        """A draft from recipe data that may not validate yet (an autosave of work in progress)."""
        merge = data.get("merge", {})
        models = []
        for row in data.get("models", []):
            row = dict(row)
            model, lora = str(row.pop("model", "")), str(row.pop("lora", ""))
            models.append(ModelDraft(model, lora, row))
        return cls(
            base=str(merge.get("base", "")),
            models=models,
            method=str(merge.get("method", "ties")),
            parameters=dict(merge.get("parameters", {})),
            output=str(data.get("output", {}).get("path", "./merged")),
            dtype=merge.get("dtype"),
            device=str(merge.get("device", "auto")),
            seed=merge.get("seed", 0),
            base_dir=base_dir,
        )

    @property
    def is_empty(self) -> bool:
        return not self.base and not self.models

    def autosave(self) -> None:
        """Write the draft, valid or not, where the next start finds it."""
        path = log_dir() / AUTOSAVE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        payload = {"base_dir": str(self.base_dir), "recipe": self.to_data()}
        temporary.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
        temporary.replace(path)

    @classmethod
    def load_autosave(cls) -> RecipeDraft | None:
        """The draft autosaved by an earlier session, if there is one worth offering back."""
        path = log_dir() / AUTOSAVE_NAME
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            draft = cls.from_data(payload["recipe"], Path(payload["base_dir"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return None if draft.is_empty else draft

    @staticmethod
    def discard_autosave() -> None:
        (log_dir() / AUTOSAVE_NAME).unlink(missing_ok=True)

    @classmethod
    def from_recipe(cls, recipe: Any) -> RecipeDraft:
        """A draft holding a loaded recipe (``mergetui open``), paths as the recipe wrote them."""
        from mergetui.recipe.toml_io import recipe_to_data

        return cls.from_data(recipe_to_data(recipe), recipe.base_dir)

    def save(self, path: Path) -> Path:
        """Validate and write the recipe TOML to ``path`` (relative to the draft's folder).

        Saved in the draft's folder, paths stay as typed (relative ones keep working if the folder
        moves); saved anywhere else, local paths are written absolute so the file replays from
        where it lies."""
        from mergetui.recipe import dump_recipe

        target = path if path.is_absolute() else self.base_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        elsewhere = target.parent.resolve() != self.base_dir.resolve()
        dump_recipe(self.to_recipe(), target, absolute_paths=elsewhere)
        return target

    def default_save_path(self) -> str:
        """Next to the output: ``OUTPUT.toml`` beside the output folder."""
        output = self.output.rstrip("/") or "merged"
        return f"{output}.toml"

    def to_recipe(self) -> Any:
        """Validate the draft into a :class:`~mergetui.recipe.Recipe` (raises RecipeError)."""
        from mergetui.recipe.validate import validate_recipe_data

        return validate_recipe_data(self.to_data(), base_dir=self.base_dir, source_file="(draft)")


#: Offered in the compare step before the user has saved any of their own.
DEFAULT_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is 17 * 23? Answer with the number.",
    "Explain in two sentences what merging two fine-tuned models does.",
]


@dataclass
class PromptHistory:
    """Prompts the user has tried, newest first, kept between sessions."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    limit: int = 20

    @classmethod
    def load(cls) -> PromptHistory:
        try:
            saved = json.loads((log_dir() / PROMPTS_NAME).read_text(encoding="utf-8"))
            prompts = [str(p) for p in saved if str(p).strip()]
        except (OSError, ValueError, TypeError):
            return cls()
        return cls(prompts or list(DEFAULT_PROMPTS))

    def remember(self, prompt: str) -> None:
        self.prompts = [prompt, *[p for p in self.prompts if p != prompt]][: self.limit]
        path = log_dir() / PROMPTS_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.prompts, indent=2), encoding="utf-8")
        except OSError as exc:  # a read-only state folder costs the history, not the comparison
            logging.getLogger("mergetui.tui").warning("cannot save the prompt history: %s", exc)
