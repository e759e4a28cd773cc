"""Read and write recipes as TOML (stdlib ``tomllib`` in, ``tomli_w`` out)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from mergetui.errors import RecipeError
from mergetui.recipe.adapters import (
    AdapterRecipe,
    adapter_recipe_to_data,
    validate_adapter_recipe_data,
)
from mergetui.recipe.params import value_data
from mergetui.recipe.schema import DEFAULT_SHARD_SIZE, Recipe
from mergetui.recipe.validate import validate_recipe_data
from mergetui.recipe.vocab import TOKENIZER_CHOICES, model_index, vocabulary_data
from mergetui.units import format_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def parse_recipe(
    text: str, *, base_dir: Path | None = None, source_file: str | None = None
) -> Recipe:
    """Parse and validate recipe TOML text."""
    data = _toml_data(text, source_file)
    return validate_recipe_data(data, base_dir=base_dir, source_file=source_file)


def _toml_data(text: str, source_file: str | None) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(
            [f"not valid TOML: {exc}; fix the syntax at that line"], source_file
        ) from exc


def parse_any_recipe(
    text: str, *, base_dir: Path | None = None, source_file: str | None = None
) -> Recipe | AdapterRecipe:
    """Parse and validate recipe TOML text: a model merge, or an adapter merge (``[adapters]``)."""
    data = _toml_data(text, source_file)
    if "adapters" in data:  # a recipe with both is refused there, by key
        return validate_adapter_recipe_data(data, base_dir=base_dir, source_file=source_file)
    return validate_recipe_data(data, base_dir=base_dir, source_file=source_file)


def load_any_recipe(path: str | Path) -> Recipe | AdapterRecipe:
    """:func:`load_recipe` for the commands that also run adapter merges (``run``, ``check``)."""
    file = Path(path).expanduser()
    if file.suffix.lower() in (".yaml", ".yml") or not file.is_file():
        return load_recipe(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"cannot read the recipe: {exc}"], str(path)) from exc
    return parse_any_recipe(text, base_dir=file.resolve().parent, source_file=str(path))


def load_recipe(path: str | Path) -> Recipe:
    """Load a recipe file. Relative model and output paths resolve against the file's folder.

    A mergekit config (``.yaml``/``.yml``) is translated in memory; its relative paths resolve
    against the current folder, as mergekit reads them.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise RecipeError([f"recipe file not found ({file.resolve()}); check the path"], str(path))
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"cannot read the recipe: {exc}"], str(path)) from exc
    from mergetui.recipe.mergekit_yaml import is_mergekit_file, recipe_from_mergekit

    if is_mergekit_file(file):
        return recipe_from_mergekit(text, source_file=str(path), base_dir=Path.cwd())
    return parse_recipe(text, base_dir=file.resolve().parent, source_file=str(path))


def recipe_to_data(
    recipe: Recipe | AdapterRecipe, *, absolute_paths: bool = False
) -> dict[str, Any]:
    """The recipe as plain TOML-ready data, every parameter explicit.

    With ``absolute_paths`` local paths are written absolute, so the copy saved next to a merged model
    replays from anywhere; Hub ids are left as they are.
    """
    if isinstance(recipe, AdapterRecipe):
        return adapter_recipe_to_data(recipe, absolute_paths=absolute_paths)

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
    if recipe.max_memory is not None:
        merge["max_memory"] = format_size(recipe.max_memory)
    keeps_name = recipe.tokenizer in TOKENIZER_CHOICES or model_index(recipe.tokenizer) is not None
    merge["tokenizer"] = recipe.tokenizer if keeps_name else ref(recipe.tokenizer)
    merge.update(vocabulary_data(recipe.vocabulary))
    if recipe.chat_template is not None:
        template = recipe.chat_template
        merge["chat_template"] = ref(template) if template.endswith(".jinja") else template
    if recipe.parameters:
        merge["parameters"] = _params_data(recipe.parameters)
    models = []
    for entry in recipe.models:
        item: dict[str, Any] = {"model": ref(entry.model)}
        if entry.lora:
            item["lora"] = ref(entry.lora)
        item.update(_params_data(entry.parameters))
        models.append(item)
    slices = []
    for piece in recipe.slices:
        table: dict[str, Any] = {}
        if piece.base:
            table["base"] = ref(piece.base)
        if piece.parameters:
            table["parameters"] = _params_data(piece.parameters)
        table["sources"] = []
        for source in piece.sources:
            row: dict[str, Any] = {"model": ref(source.model)}
            if source.lora:
                row["lora"] = ref(source.lora)
            row["layer_range"] = list(source.layer_range)
            row.update(_params_data(source.parameters))
            table["sources"].append(row)
        slices.append(table)
    output: dict[str, Any] = {
        "path": str(recipe.output_dir.resolve()) if absolute_paths else recipe.output_path
    }
    if recipe.shard_size != DEFAULT_SHARD_SIZE:
        output["shard_size"] = recipe.shard_size
    if recipe.lora_rank is not None:
        output["lora_rank"] = recipe.lora_rank
    if recipe.lora_path is not None:
        lora_dir = recipe.lora_dir
        assert lora_dir is not None
        output["lora_path"] = str(lora_dir.resolve()) if absolute_paths else recipe.lora_path
    # Version 1 whenever it suffices, so a recipe without the new features still replays on an
    # older mergetui.
    data: dict[str, Any] = {"version": 2 if recipe.uses_v2 else 1, "merge": merge}
    if recipe.slices:
        data["slices"] = slices
    else:
        data["models"] = models
    data["output"] = output
    return data


def _params_data(params: dict[str, Any]) -> dict[str, Any]:
    return {key: value_data(value) for key, value in params.items()}


def recipe_to_toml(recipe: Recipe | AdapterRecipe, *, absolute_paths: bool = False) -> str:
    """The recipe as TOML text that :func:`parse_recipe` reads back to an equal recipe."""
    return data_to_toml(recipe_to_data(recipe, absolute_paths=absolute_paths))


def data_to_toml(data: dict[str, Any]) -> str:
    """Recipe data (valid or not yet: the TUI previews drafts) as TOML in the documented layout."""
    import tomli_w

    # Written section by section so the file reads top-down like the documented layout, with one
    # [[models]] (or [[slices]]) table per entry rather than an inline array.
    parts = [tomli_w.dumps({"version": data.get("version", 1)})]
    if "adapters" in data:  # an adapter merge: [adapters] then its [[adapters.sources]]
        parts += _blocks("adapters", data["adapters"], array=False)
    if "merge" in data or "adapters" not in data:
        parts += _blocks("merge", data.get("merge", {}), array=False)
    for key in ("models", "slices"):
        for item in data.get(key, []):
            parts += _blocks(key, item, array=True)
    parts += _blocks("output", data.get("output", {}), array=False)
    return "\n".join(_one_line_numbers(part).strip("\n") + "\n" for part in parts)


def _blocks(path: str, table: dict[str, Any], *, array: bool) -> list[str]:
    """One table as TOML blocks: its plain values under its header, then each sub-table
    (filtered parameters) and array of tables (slice sources) under a header of its own, never
    inline, so every value sits on a line that can be edited and diffed alone."""
    import tomli_w

    def is_tables(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)

    if path == "merge.tokens":  # one line per token: `"<|im_end|>" = { source = "models[1]" }`
        lines = [f"{_key(k)} = {_inline(v)}" for k, v in table.items()]
        return [f"[{path}]\n" + "\n".join(lines) + "\n"]
    plain = {k: v for k, v in table.items() if not isinstance(v, dict) and not is_tables(v)}
    header = f"[[{path}]]" if array else f"[{path}]"
    blocks = [header + "\n" + tomli_w.dumps(plain)]
    for key, value in table.items():
        if isinstance(value, dict):
            blocks += _blocks(f"{path}.{_key(key)}", value, array=False)
        elif is_tables(value):
            for item in value:
                blocks += _blocks(f"{path}.{key}", item, array=True)
    return blocks


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    """A TOML key part: bare when it can be, else a quoted string (tokens such as ``<|im_end|>``)."""
    import tomli_w

    return key if _BARE_KEY.match(key) else tomli_w.dumps({"k": key})[4:].strip()


def _inline(value: Any) -> str:
    """A value on one line: a string, or an inline table of plain values."""
    import tomli_w

    if not isinstance(value, dict):
        return tomli_w.dumps({"k": value})[4:].strip()
    return "{ " + ", ".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items()) + " }"


_NUMBER_ARRAY = re.compile(r"\[\n((?:[ \t]+[-+0-9.eEinf]+,\n)+)[ \t]*\]")


def _one_line_numbers(text: str) -> str:
    """Arrays of numbers (gradients, layer ranges) on one line: ``t = [0, 0.5, 1]``, as people
    write them (tomli_w puts every array item on a line of its own)."""
    return _NUMBER_ARRAY.sub(
        lambda m: "[" + ", ".join(v.strip().rstrip(",") for v in m.group(1).splitlines()) + "]",
        text,
    )


def dump_recipe(
    recipe: Recipe | AdapterRecipe, path: str | Path, *, absolute_paths: bool = False
) -> None:
    """Write the recipe to ``path`` as TOML."""
    Path(path).write_text(recipe_to_toml(recipe, absolute_paths=absolute_paths), encoding="utf-8")
