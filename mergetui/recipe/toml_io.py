"""Read and write recipes as TOML (stdlib ``tomllib`` in, ``tomli_w`` out)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mergetui.errors import RecipeError
from mergetui.recipe.schema import DEFAULT_SHARD_SIZE, Recipe
from mergetui.recipe.validate import validate_recipe_data

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def parse_recipe(
    text: str, *, base_dir: Path | None = None, source_file: str | None = None
) -> Recipe:
    """Parse and validate recipe TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(
            [f"not valid TOML: {exc}; fix the syntax at that line"], source_file
        ) from exc
    return validate_recipe_data(data, base_dir=base_dir, source_file=source_file)


def load_recipe(path: str | Path) -> Recipe:
    """Load a recipe file. Relative model and output paths resolve against the file's folder."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise RecipeError([f"recipe file not found ({file.resolve()}); check the path"], str(path))
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"cannot read the recipe: {exc}"], str(path)) from exc
    return parse_recipe(text, base_dir=file.resolve().parent, source_file=str(path))


def recipe_to_data(recipe: Recipe, *, absolute_paths: bool = False) -> dict[str, Any]:
    """The recipe as plain TOML-ready data, every parameter explicit.

    With ``absolute_paths`` local paths are written absolute, so the copy saved next to a merged model
    replays from anywhere; Hub ids are left as they are.
    """

    def ref(text: str | None) -> str | None:
        if text is None or not absolute_paths:
            return text
        path = recipe.resolve_path(text)
        return str(path.resolve()) if path.exists() else text

    merge: dict[str, Any] = {"method": recipe.method}
    if recipe.base:
        merge["base"] = ref(recipe.base)
    if recipe.dtype:
        merge["dtype"] = recipe.dtype
    merge["seed"] = recipe.seed
    merge["device"] = recipe.device
    merge["tokenizer"] = recipe.tokenizer if recipe.tokenizer == "base" else ref(recipe.tokenizer)
    if recipe.parameters:
        merge["parameters"] = dict(recipe.parameters)
    models = []
    for entry in recipe.models:
        item: dict[str, Any] = {"model": ref(entry.model)}
        if entry.lora:
            item["lora"] = ref(entry.lora)
        item.update(entry.parameters)
        models.append(item)
    output: dict[str, Any] = {
        "path": str(recipe.output_dir.resolve()) if absolute_paths else recipe.output_path
    }
    if recipe.shard_size != DEFAULT_SHARD_SIZE:
        output["shard_size"] = recipe.shard_size
    return {"version": recipe.version, "merge": merge, "models": models, "output": output}


def recipe_to_toml(recipe: Recipe, *, absolute_paths: bool = False) -> str:
    """The recipe as TOML text that :func:`parse_recipe` reads back to an equal recipe."""
    return data_to_toml(recipe_to_data(recipe, absolute_paths=absolute_paths))


def data_to_toml(data: dict[str, Any]) -> str:
    """Recipe data (valid or not yet: the TUI previews drafts) as TOML in the documented layout."""
    import tomli_w

    # Written section by section so the file reads top-down like the documented layout, with one
    # [[models]] table per model rather than an inline array.
    parts = [tomli_w.dumps({"version": data.get("version", 1)})]
    parts.append(tomli_w.dumps({"merge": data.get("merge", {})}))
    parts += ["[[models]]\n" + tomli_w.dumps(item) for item in data.get("models", [])]
    parts.append(tomli_w.dumps({"output": data.get("output", {})}))
    return "\n".join(part.strip("\n") + "\n" for part in parts)


def dump_recipe(recipe: Recipe, path: str | Path, *, absolute_paths: bool = False) -> None:
    """Write the recipe to ``path`` as TOML."""
    Path(path).write_text(recipe_to_toml(recipe, absolute_paths=absolute_paths), encoding="utf-8")
