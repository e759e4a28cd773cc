"""mergekit configs in and out: translate a mergekit YAML into recipe data, and a recipe back.

mergekit users arrive with YAML; this is the bridge. The translation keeps mergekit's meaning
(``../shared/notes/mergekit-language.md`` is the reference), including where its conventions and
mergetui's differ:

- **The base in ``models``.** mergekit lists the base among the models (slerp needs it there;
  task-vector methods ignore its parameters) or appends ``base_model`` as one more input. For
  methods that merge against a base, mergetui keeps the base apart (``merge.base``); for ``linear``,
  where mergekit averages the base like any model, it becomes a ``[[models]]`` entry too.
- **Parameters** map one to one: a list of numbers is a gradient, a list of ``{filter, value}`` is
  a filtered value (an entry without a filter becomes ``default``).
- **dtype.** mergekit computes in ``dtype`` and saves in ``out_dtype``; mergetui always computes in
  float32 and saves in ``merge.dtype``, which takes ``out_dtype``, else ``dtype``.

Anything mergetui cannot express yet is an error naming the YAML key and its line, never dropped;
so is every key mergekit would silently ignore. Validation problems of the translated recipe are
reported with the YAML line they came from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.errors import RecipeError
from mergetui.methods.registry import METHODS, get_method
from mergetui.recipe.params import DEFAULT_FILTER, Filtered, Gradient, value_data
from mergetui.recipe.schema import (
    CHAT_TEMPLATE_NAMES,
    MERGEKIT_ONLY_TEMPLATES,
    Recipe,
    looks_like_template,
)
from mergetui.recipe.vocab import model_index

TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "modules",
    "name",
    "residual_weight",
)
#: Keys mergekit parses but never reads: accepted, with a note that they change nothing.
_UNUSED_KEYS = ("residual_weight", "name")
_DTYPE_NAMES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_YAML_SUFFIXES = (".yaml", ".yml")
log = logging.getLogger(__name__)


def is_mergekit_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in _YAML_SUFFIXES


@dataclass
class Translation:
    """A mergekit config as recipe data, with where each recipe key came from in the YAML and the
    notes worth telling the user (parts mergekit ignores, conventions that moved)."""

    data: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Lines:
    """YAML data with the line of every key, from PyYAML's node tree."""

    def __init__(self, text: str, source: str | None) -> None:
        import yaml

        self.source = source
        self.lines: dict[tuple[Any, ...], int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise RecipeError([f"not valid YAML: {exc}"], source) from exc
        self.data = {} if node is None else self._convert(node, ())

    def _convert(self, node: Any, path: tuple[Any, ...]) -> Any:
        import yaml

        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                key = key_node.value
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                result[key] = self._convert(value_node, path + (key,))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(item, path + (i,)) for i, item in enumerate(node.value)]
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_object(node)
        finally:
            loader.dispose()

    def where(self, path: tuple[Any, ...]) -> str:
        """``models[0].parameters.weight (line 7)``."""
        line = self.lines.get(path)
        return f"{_dotted(path)} (line {line})" if line else _dotted(path)


def _dotted(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class _Translator:
    def __init__(self, lines: _Lines, base_dir: Path, target_dir: Path) -> None:
        self.lines = lines
        self.base_dir = base_dir
        self.target_dir = target_dir
        self.problems: list[str] = []
        self.origins: dict[str, str] = {}
        self.notes: list[str] = []

    def problem(self, path: tuple[Any, ...], text: str) -> None:
        self.problems.append(f"{self.lines.where(path)}: {text}")

    def origin(self, recipe_key: str, path: tuple[Any, ...]) -> None:
        self.origins[recipe_key] = self.lines.where(path)

    # -- references -----------------------------------------------------------------------------
    def reference(self, value: Any, path: tuple[Any, ...]) -> tuple[str, str | None] | None:
        """``model[@rev][+lora[@rev]]`` → (model, lora), local paths made relative to the recipe."""
        if isinstance(value, dict) and "model" in value:  # mergekit's long form
            value = value.get("model")
        if not isinstance(value, str) or not value.strip():
            self.problem(path, f"must be a model path or Hub id, not {value!r}")
            return None
        parts = value.strip().split("+")
        if len(parts) > 2:
            self.problem(path, f"{value!r} has more than one `+`; write model+lora")
            return None
        for part in parts:
            if part.count("@") > 1:
                self.problem(path, f"{part!r} has more than one `@`; write name@revision")
                return None
        model = self.local(parts[0])
        lora = self.local(parts[1]) if len(parts) == 2 else None
        return model, lora

    def local(self, text: str) -> str:
        """A local path as the recipe will see it: mergekit reads relative paths from the current
        folder, a recipe from its own folder."""
        path = Path(text).expanduser()
        if path.is_absolute() or not (self.base_dir / path).exists():
            return text
        moved = os.path.relpath(self.base_dir / path, self.target_dir)
        return moved if moved.startswith(".") else f"./{moved}"

    # -- parameters -----------------------------------------------------------------------------
    def parameters(self, raw: Any, path: tuple[Any, ...], recipe_where: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problem(path, "must be a mapping of parameter names to values")
            return {}
        params: dict[str, Any] = {}
        for name, value in raw.items():
            if name == "int8_mask":
                self.notes.append(
                    f"{self.lines.where(path + (name,))}: int8_mask only makes mergekit store its "
                    "masks in int8 (same result); mergetui's masks never take a tensor's size, "
                    "so it is left out"
                )
                continue
            converted = self.value(value, path + (name,))
            if converted is not None:
                params[name] = converted
                self.origin(f"{recipe_where}{name}", path + (name,))
        return params

    def value(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            table: dict[str, Any] = {}
            for index, entry in enumerate(value):
                at = path + (index,)
                if "pattern" in entry:
                    self.problem(
                        at + ("pattern",),
                        "mergekit 0.1.5 has no `pattern` key and ignores it, so there this entry "
                        "matches every tensor and hides the entries after it; write "
                        "`filter:` for a per-tensor value (or drop the key for a default)",
                    )
                    continue
                unknown = [k for k in entry if k not in ("filter", "value")]
                if unknown or "value" not in entry:
                    self.problem(
                        at,
                        "a conditional entry is {filter: NAME-PART, value: VALUE} (no filter: "
                        f"every tensor); got keys {sorted(entry)}",
                    )
                    continue
                pattern = entry.get("filter")
                pattern = DEFAULT_FILTER if pattern in (None, "*") else str(pattern)
                if pattern in table:
                    self.problem(
                        at,
                        f"filter {pattern!r} appears twice; only the first would ever match — "
                        "remove one",
                    )
                    continue
                table[pattern] = entry["value"]
            return table
        if isinstance(value, dict):
            self.problem(
                path,
                "a bare {filter, value} mapping is not a value (mergekit rejects it when it "
                "merges); make it a list: [{filter: ..., value: ...}, {value: ...}]",
            )
            return None
        return value

    # -- whole config ---------------------------------------------------------------------------
    def translate(self) -> dict[str, Any]:
        data = self.lines.data
        if not isinstance(data, dict):
            self.problem(
                (), "a mergekit config is a mapping with merge_method and models or slices"
            )
            return {}
        for key in data:
            if key not in TOP_KEYS:
                self.problem(
                    (key,),
                    "not a mergekit config key (mergekit would ignore it silently); remove it "
                    f"or fix its name; keys: {', '.join(TOP_KEYS[:-2])}",
                )
        for key in _UNUSED_KEYS:
            if key in data:
                self.notes.append(
                    f"{self.lines.where((key,))}: mergekit ignores this key; so does mergetui"
                )
        if "modules" in data:
            self.problem(
                ("modules",),
                "per-module configs (multimodal models) are not supported yet; merge the "
                "language model's slices or models at the top level",
            )
        method = data.get("merge_method")
        spec = get_method(method) if isinstance(method, str) else None
        if spec is None:
            self.problem(
                ("merge_method",),
                f"{method!r} is not a mergetui method yet; mergetui has {', '.join(METHODS)}"
                if method
                else "missing; mergekit configs name merge_method",
            )
        merge: dict[str, Any] = {"method": method}
        self.origin("merge.method", ("merge_method",))
        base_pair = None
        if data.get("base_model") is not None:
            base_pair = self.reference(data["base_model"], ("base_model",))
            if base_pair and base_pair[1]:
                self.problem(
                    ("base_model",),
                    "a LoRA folded into the base model is not supported; fold it first "
                    "(a passthrough merge of model+lora) and use that as base_model",
                )
            if base_pair:
                merge["base"] = base_pair[0]
                self.origin("merge.base", ("base_model",))
        self.dtype(data, merge)
        self.tokenizer(data, merge)
        if "chat_template" in data:
            self.chat_template(data["chat_template"], merge)
        params = self.parameters(data.get("parameters"), ("parameters",), "merge.parameters.")
        if params:
            merge["parameters"] = params
        recipe: dict[str, Any] = {"version": 2, "merge": merge}
        if "slices" in data and "models" in data:
            self.problem(("slices",), "give models or slices, not both (mergekit refuses both)")
        if "slices" in data:
            recipe["slices"] = self.slices(data["slices"])
        elif "models" in data:
            recipe["models"] = self.models(data["models"], spec, base_pair)
        elif "modules" not in data:
            self.problem((), "missing models or slices; list the models to merge")
        recipe["output"] = {"path": "./merged"}
        return recipe

    def chat_template(self, value: Any, merge: dict[str, Any]) -> None:
        """mergekit's names and literal templates; it never reads a path, so neither does this."""
        path = ("chat_template",)
        if not isinstance(value, str) or not value.strip():
            self.problem(path, f"must be auto, a template name or Jinja text, not {value!r}")
        elif value in MERGEKIT_ONLY_TEMPLATES:
            self.problem(
                path,
                f"mergekit's built-in {value!r} template is not shipped with mergetui; paste its "
                "Jinja text here, or use auto (the models' own) or chatml",
            )
        elif value in CHAT_TEMPLATE_NAMES or looks_like_template(value):
            merge["chat_template"] = value
            self.origin("merge.chat_template", path)
        else:
            self.problem(
                path,
                f"{value!r} is neither a template name (auto, chatml) nor Jinja text (mergekit "
                "wants at least 20 characters with a `{`)",
            )

    def dtype(self, data: dict[str, Any], merge: dict[str, Any]) -> None:
        for key in ("out_dtype", "dtype"):
            value = data.get(key)
            if value is None:
                continue
            name = str(value).removeprefix("torch.")
            if name not in _DTYPE_NAMES:
                self.problem(
                    (key,),
                    f"{value!r} is not an output dtype mergetui writes; use float32, "
                    "float16 or bfloat16",
                )
                return
            merge["dtype"] = _DTYPE_NAMES[name]
            self.origin("merge.dtype", (key,))
            if key == "dtype" and name != "float32":
                self.notes.append(
                    f"{self.lines.where((key,))}: mergekit computes in {name}; mergetui computes "
                    f"in float32 and saves {name}, so results differ by {name} rounding"
                )
            return

    def tokenizer(self, data: dict[str, Any], merge: dict[str, Any]) -> None:
        """``tokenizer_source`` or ``tokenizer: {source, tokens, pad_to_multiple_of}`` →
        ``merge.tokenizer`` (``base``, ``union`` or the model), ``[merge.tokens]`` and
        ``merge.pad_to_multiple_of``. mergekit's default source in the block form is union."""
        if "tokenizer" in data and "tokenizer_source" in data:
            self.problem(("tokenizer",), "give tokenizer or tokenizer_source, not both")
            return
        path: tuple[Any, ...] = ("tokenizer_source",)
        source = data.get("tokenizer_source")
        config = data.get("tokenizer")
        if isinstance(config, dict):
            path = ("tokenizer", "source")
            for key in config:
                if key not in ("source", "tokens", "pad_to_multiple_of"):
                    self.problem(
                        ("tokenizer", key),
                        "unknown key (mergekit ignores it silently); allowed: source, tokens, "
                        "pad_to_multiple_of",
                    )
            source = config.get("source", "union")
            pad = config.get("pad_to_multiple_of")
            if pad is not None:
                merge["pad_to_multiple_of"] = pad
                self.origin("merge.pad_to_multiple_of", ("tokenizer", "pad_to_multiple_of"))
            if config.get("tokens") is not None:
                tokens = self.tokens(config["tokens"], data)
                if tokens:
                    merge["tokens"] = tokens
                    self.origin("merge.tokens", ("tokenizer", "tokens"))
        elif config is not None:
            self.problem(("tokenizer",), "must be a mapping with source (and tokens)")
            return
        if source is None:
            return
        if source in ("base", "union"):
            merge["tokenizer"] = source
            self.origin("merge.tokenizer", path)
            return
        name = self.model_name(source, path, data)
        if name:
            merge["tokenizer"] = name
            self.origin("merge.tokenizer", path)

    def model_name(self, value: Any, path: tuple[Any, ...], data: dict[str, Any]) -> str | None:
        """A model reference as the recipe names it: ``base`` for the base model, else its
        ``model`` value (a LoRA-folded model keeps its ``+lora`` for mergetui to match)."""
        pair = self.reference(value, path)
        if pair is None:
            return None
        base = data.get("base_model")
        base_pair = self.reference(base, ("base_model",)) if base else None
        if base_pair is not None and pair == base_pair:
            return "base"
        return pair[0]  # mergetui names the model; a LoRA folded into it comes along

    def tokens(self, raw: Any, data: dict[str, Any]) -> dict[str, Any]:
        """mergekit's ``tokenizer.tokens`` → ``[merge.tokens]``: a source model, ``{kind: zero}``
        or ``{kind: model_token, model, token | token_id}``, and ``force``."""
        if not isinstance(raw, dict):
            self.problem(("tokenizer", "tokens"), "must be a mapping of token: {source, force}")
            return {}
        tokens: dict[str, Any] = {}
        for token, entry in raw.items():
            path = ("tokenizer", "tokens", token)
            if not isinstance(entry, dict):
                self.problem(path, "must be a mapping with source (and force)")
                continue
            source = entry.get("source")
            row: dict[str, Any] = {}
            if isinstance(source, dict) and source.get("kind") == "zero":
                row["source"] = "zero"
            elif isinstance(source, dict) and source.get("kind") == "model_token":
                name = self.model_name(source.get("model"), (*path, "source", "model"), data)
                if name is None:
                    continue
                row["source"] = name
                if source.get("token") is not None:
                    row["token"] = source["token"]
                if source.get("token_id") is not None:
                    row["token_id"] = source["token_id"]
            elif source is None:
                self.problem(
                    path,
                    "no source (mergekit fails on it mid-merge); say where the row comes from: "
                    "source: a model, {kind: zero} or {kind: model_token, model, token}",
                )
                continue
            else:
                name = self.model_name(source, (*path, "source"), data)
                if name is None:
                    continue
                row["source"] = name
            if entry.get("force"):
                row["force"] = True
            tokens[str(token)] = row
        return tokens

    def models(
        self, raw: Any, spec: Any, base_pair: tuple[str, str | None] | None
    ) -> list[dict[str, Any]]:
        if not isinstance(raw, list) or not raw:
            self.problem(("models",), "must be a non-empty list of {model, parameters}")
            return []
        base = base_pair[0] if base_pair else None
        entries: list[dict[str, Any]] = []
        base_listed = False
        for index, item in enumerate(raw):
            at = ("models", index)
            if isinstance(item, str):
                item = {"model": item}
            if not isinstance(item, dict) or "model" not in item:
                self.problem(at, "must be a mapping with model (and parameters)")
                continue
            unknown = [k for k in item if k not in ("model", "parameters")]
            if unknown:
                self.problem(at + (unknown[0],), "not a model key; use model and parameters")
            pair = self.reference(item["model"], at + ("model",))
            if pair is None:
                continue
            model, lora = pair
            is_base = model == base and lora is None
            base_listed = base_listed or is_base
            if is_base and spec is not None and spec.uses_base:
                if item.get("parameters"):
                    self.notes.append(
                        f"{self.lines.where(at + ('parameters',))}: the base model's parameters "
                        f"are unused by {spec.name} (in mergekit too); left out"
                    )
                continue
            where = f"models[{len(entries)}]."
            entry: dict[str, Any] = {"model": model}
            if lora:
                entry["lora"] = lora
            entry.update(self.parameters(item.get("parameters"), at + ("parameters",), where))
            self.origin(f"models[{len(entries)}]", at)
            entries.append(entry)
        if spec is not None and _base_is_an_input(spec) and base and not base_listed:
            # mergekit appends base_model as one more input of a method that has no base role
            entries.append({"model": base})
            self.notes.append(
                f"{self.lines.where(('base_model',))}: mergekit merges base_model into a "
                f"{spec.name} merge as one more model; it is listed under [[models]]"
            )
        return entries

    def slices(self, raw: Any) -> list[dict[str, Any]]:
        if not isinstance(raw, list) or not raw:
            self.problem(("slices",), "must be a non-empty list of {sources: [...]}")
            return []
        result = []
        for index, item in enumerate(raw):
            at = ("slices", index)
            if not isinstance(item, dict):
                self.problem(at, "must be a mapping with sources")
                continue
            for key in item:
                if key not in ("sources", "base_model", "parameters"):
                    self.problem(
                        at + (key,),
                        "not a slice key (mergekit ignores it: a slice takes the top-level "
                        "merge_method); use sources, base_model and parameters",
                    )
            table: dict[str, Any] = {}
            self.origin(f"slices[{index}]", at)
            if item.get("base_model") is not None:
                pair = self.reference(item["base_model"], at + ("base_model",))
                if pair:
                    table["base"] = pair[0]
            params = self.parameters(
                item.get("parameters"), at + ("parameters",), f"slices[{index}].parameters."
            )
            if params:
                table["parameters"] = params
            sources = []
            for number, source in enumerate(item.get("sources") or []):
                sat = at + ("sources", number)
                if not isinstance(source, dict) or "model" not in source:
                    self.problem(sat, "must be a mapping with model and layer_range")
                    continue
                unknown = [k for k in source if k not in ("model", "layer_range", "parameters")]
                if unknown:
                    self.problem(sat + (unknown[0],), "not a source key; use model, layer_range")
                pair = self.reference(source["model"], sat + ("model",))
                if pair is None:
                    continue
                row: dict[str, Any] = {"model": pair[0]}
                if pair[1]:
                    row["lora"] = pair[1]
                row["layer_range"] = source.get("layer_range")
                where = f"slices[{index}].sources[{number}]."
                self.origin(f"{where}layer_range", sat + ("layer_range",))
                self.origin(f"{where}model", sat + ("model",))
                row.update(self.parameters(source.get("parameters"), sat + ("parameters",), where))
                sources.append(row)
            table["sources"] = sources
            result.append(table)
        return result


def _base_is_an_input(spec: Any) -> bool:
    """mergekit appends ``base_model`` to ``models`` as one more input; for a method without a
    base role (linear, karcher) that makes it one more averaged model, where mergetui only takes
    config and tokenizer from its base."""
    return not spec.uses_base and spec.name != "passthrough"


def translate_mergekit(
    text: str,
    *,
    source_file: str | None = None,
    base_dir: Path | None = None,
    target_dir: Path | None = None,
) -> Translation:
    """Recipe data for a mergekit config. ``base_dir``: where its relative paths are read from
    (mergekit: the current folder); ``target_dir``: the folder of the recipe being written, which
    relative local paths are rewritten against. Raises :class:`RecipeError` for anything that
    cannot be expressed, each problem naming the YAML key and line."""
    here = base_dir or Path.cwd()
    translator = _Translator(_Lines(text, source_file), here, target_dir or here)
    data = translator.translate()
    if translator.problems:
        raise RecipeError(translator.problems, source_file)
    return Translation(data, translator.origins, translator.notes)


def recipe_from_mergekit(
    text: str, *, source_file: str | None = None, base_dir: Path | None = None
) -> Recipe:
    """A validated recipe from a mergekit config (``mergetui run config.yaml``); validation problems
    name the YAML line they came from."""
    from mergetui.recipe.validate import validate_recipe_data

    here = base_dir or Path.cwd()
    translation = translate_mergekit(text, source_file=source_file, base_dir=here)
    for note in translation.notes:
        log.info("%s: %s", source_file or "mergekit config", note)
    try:
        return validate_recipe_data(translation.data, base_dir=here, source_file=source_file)
    except RecipeError as exc:
        raise RecipeError(
            [with_origin(p, translation.origins) for p in exc.problems], source_file
        ) from None


def mergekit_to_toml(
    text: str, *, source_file: str | None, base_dir: Path, target_dir: Path
) -> tuple[str, list[str]]:
    """``mergetui import``: the recipe TOML for a mergekit config (validated as it will be read
    from ``target_dir``, problems pointing back at the YAML), and the notes for the user."""
    from mergetui.recipe.toml_io import data_to_toml, parse_recipe

    translation = translate_mergekit(
        text, source_file=source_file, base_dir=base_dir, target_dir=target_dir
    )
    toml_text = data_to_toml(translation.data)
    try:
        parse_recipe(toml_text, base_dir=target_dir, source_file=source_file)
    except RecipeError as exc:
        raise RecipeError(
            [with_origin(p, translation.origins) for p in exc.problems], source_file
        ) from None
    header = f"# Imported by mergetui from the mergekit config {source_file or '(text)'}.\n"
    return header + toml_text, translation.notes


def with_origin(problem: str, origins: dict[str, str]) -> str:
    """A recipe problem (``models[0].weight: ...``) with the YAML key and line it came from."""
    key = problem.split(": ", 1)[0]
    best = ""
    for candidate in origins:
        if (key == candidate or key.startswith((candidate + ".", candidate + "["))) and len(
            candidate
        ) > len(best):
            best = candidate
    if not best:
        return problem
    return f"{problem} [from {origins[best]}]"


# --- export ----------------------------------------------------------------------------------------


def recipe_to_mergekit(recipe: Recipe, *, target_dir: Path | None = None) -> str:
    """The recipe as a mergekit config, for people who share mergekit YAML.

    Local paths are written relative to ``target_dir`` (where mergekit will be run; default: the
    current folder). mergekit computes in ``dtype``: the export asks for float32 so that mergekit's
    arithmetic matches mergetui's, and saves in the recipe's dtype.
    """
    import yaml

    here = target_dir or Path.cwd()

    def ref(text: str, lora: str | None = None) -> str:
        def one(part: str) -> str:
            path = recipe.resolve_path(part)
            if Path(part).expanduser().is_absolute() or not path.exists():
                return part  # absolute paths and Hub ids as they are written
            relative = os.path.relpath(path, here)
            return relative if relative.startswith(".") else f"./{relative}"

        return one(text) + (f"+{one(lora)}" if lora else "")

    config: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base:
        listed = [e.model for e in recipe.models if e.lora is None]
        spec = get_method(recipe.method)
        appended = spec is not None and _base_is_an_input(spec)
        if not appended or recipe.base in listed or recipe.slices:
            config["base_model"] = ref(recipe.base)
    config["dtype"] = "float32"
    if recipe.dtype:
        config["out_dtype"] = recipe.dtype
    config.update(_mergekit_tokenizer(recipe, ref))
    if recipe.chat_template is not None:
        template = recipe.chat_template
        if template.endswith(".jinja"):  # mergekit takes the text, not a path
            template = recipe.resolve_path(template).read_text(encoding="utf-8")
        config["chat_template"] = template
    if recipe.parameters:
        config["parameters"] = _mergekit_params(recipe.parameters)
    if recipe.slices:
        slices = []
        for piece in recipe.slices:
            item: dict[str, Any] = {"sources": []}
            for source in piece.sources:
                row: dict[str, Any] = {
                    "model": ref(source.model, source.lora),
                    "layer_range": list(source.layer_range),
                }
                if source.parameters:
                    row["parameters"] = _mergekit_params(source.parameters)
                item["sources"].append(row)
            if piece.base:
                item["base_model"] = ref(piece.base)
            if piece.parameters:
                item["parameters"] = _mergekit_params(piece.parameters)
            slices.append(item)
        config["slices"] = slices
    else:
        models = []
        for entry in recipe.models:
            row = {"model": ref(entry.model, entry.lora)}
            if entry.parameters:
                row["parameters"] = _mergekit_params(entry.parameters)
            models.append(row)
        config["models"] = models
    header = (
        f"# Exported by mergetui from {recipe.source_file or 'a recipe'}.\n"
        "# mergetui computes in float32, so this config asks mergekit to (dtype: float32).\n"
    )
    spec = get_method(recipe.method)
    if spec is not None and spec.needs_base:
        for index, piece in enumerate(recipe.slices):
            base = piece.base or recipe.base
            if len(piece.sources) == 1 and piece.sources[0].model != base:
                header += (
                    f"# slices[{index}] has one source and no base: mergetui copies its layers, "
                    f"but mergekit's {recipe.method} refuses a slice without its base_model.\n"
                )
    if spec is not None and spec.randomized:
        header += (
            f"# mergetui's seed {recipe.seed} draws each tensor's mask from the seed and the "
            "tensor name;\n# mergekit draws from one global generator (--random-seed), so its "
            "masks differ.\n"
        )
    if recipe.lora_rank is not None:
        lora_dir = recipe.lora_dir
        header += (
            f"# output.lora_rank = {recipe.lora_rank} has no mergekit key: after the merge, run\n"
            f"#   mergekit-extract-lora --model OUTPUT --base {ref(recipe.base or '')} "
            f"--out-path {lora_dir.name if lora_dir else 'ADAPTER'} --max-rank {recipe.lora_rank}\n"
        )
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)


def _mergekit_params(params: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, Filtered):
            entries = []
            for pattern, item in value.entries:
                data = item.to_data() if isinstance(item, Gradient) else item
                entries.append(
                    {"value": data}
                    if pattern == DEFAULT_FILTER
                    else {"filter": pattern, "value": data}
                )
            result[name] = entries
        else:
            result[name] = value_data(value)
    return result


def _mergekit_tokenizer(recipe: Recipe, ref: Callable[..., str]) -> dict[str, Any]:
    """``tokenizer_source`` or, with token overrides or padding, the ``tokenizer`` block. ``base``
    alone is left implicit: mergekit then merges rows by index, as mergetui does when the models
    share the base's vocabulary (when they do not, mergekit wants ``tokenizer_source: base``)."""

    def model(text: str) -> str:
        if text == "base":
            return ref(recipe.base) if recipe.base else ref(recipe.models[0].model)
        index = model_index(text)
        if index is not None:
            entry = recipe.models[index]
            return ref(entry.model, entry.lora)
        return ref(text)

    source = recipe.tokenizer
    source_text = source if source in ("base", "union") else model(source)
    if not recipe.tokens and recipe.pad_to_multiple_of is None:
        return {} if source == "base" else {"tokenizer_source": source_text}
    block: dict[str, Any] = {"source": source_text}
    if recipe.pad_to_multiple_of is not None:
        block["pad_to_multiple_of"] = recipe.pad_to_multiple_of
    if recipe.tokens:
        tokens: dict[str, Any] = {}
        for override in recipe.tokens:
            entry: dict[str, Any]
            if override.source == "zero":
                entry = {"source": {"kind": "zero"}}
            elif override.from_token is not None or override.from_id is not None:
                inner: dict[str, Any] = {"kind": "model_token", "model": model(override.source)}
                if override.from_token is not None:
                    inner["token"] = override.from_token
                else:
                    inner["token_id"] = override.from_id
                entry = {"source": inner}
            else:
                entry = {"source": model(override.source)}
            if override.force:
                entry["force"] = True
            tokens[override.token] = entry
        block["tokens"] = tokens
    return {"tokenizer": block}
