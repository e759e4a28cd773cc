"""Turn raw recipe data (parsed TOML) into a validated :class:`Recipe`, or say everything wrong with it.

All problems are collected and reported together, each naming its key (``models[1].density``) and the
fix. Nothing here touches the disk beyond what the caller passes in: validation happens before any model
is resolved, let alone any weight read.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from mergetui.errors import RecipeError
from mergetui.methods.registry import METHODS, MethodSpec, ParamSpec, get_method
from mergetui.recipe.adapters import mixed_recipe_problem
from mergetui.recipe.params import ParamValue, is_varying, parse_value
from mergetui.recipe.schema import (
    CHAT_TEMPLATE_NAMES,
    DEFAULT_SHARD_SIZE,
    DTYPES,
    MERGEKIT_ONLY_TEMPLATES,
    READABLE_VERSIONS,
    RECIPE_VERSION,
    ModelEntry,
    Recipe,
    Slice,
    SliceSource,
    looks_like_template,
)
from mergetui.recipe.vocab import model_index, validate_vocabulary
from mergetui.units import parse_size

TOP_KEYS = ("version", "merge", "models", "slices", "output")
SLICE_KEYS = ("sources", "base", "parameters")
SOURCE_KEYS = ("model", "lora", "layer_range")
MERGE_KEYS = (
    "method",
    "base",
    "dtype",
    "seed",
    "device",
    "tokenizer",
    "chat_template",
    "missing_tokens",
    "pad_to_multiple_of",
    "tie_word_embeddings",
    "tokens",
    "parameters",
    "max_memory",
)
MODEL_KEYS = ("model", "lora")
OUTPUT_KEYS = ("path", "shard_size", "lora_rank", "lora_path")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean `x`?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _unknown_key(where: str, key: str, allowed: list[str] | tuple[str, ...]) -> str:
    hint = did_you_mean(key, allowed)
    listing = ", ".join(f"`{k}`" for k in allowed)
    return f"{where}{key}: unknown key{hint}; allowed here: {listing}"


def _other_methods_with(param: str, current: str) -> list[str]:
    return [name for name, spec in METHODS.items() if name != current and spec.param(param)]


class _Collector:
    """Collects problems so that the user sees all of them at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, text: str) -> None:
        self.problems.append(text)

    def table(self, data: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.add(f"{where}{key}: must be a table ([{where}{key}]), not {type(value).__name__}")
            return None
        return value

    def string(self, data: dict[str, Any], key: str, where: str) -> str | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.add(f"{where}{key}: must be a non-empty string, not {value!r}")
            return None
        return value.strip()


def validate_recipe_data(
    data: dict[str, Any], *, base_dir: Path | None = None, source_file: str | None = None
) -> Recipe:
    """Validate parsed recipe data against the schema and the method registry.

    Raises :class:`RecipeError` listing every problem found; returns a :class:`Recipe` with all
    defaults filled in otherwise.
    """
    out = _Collector()
    if "adapters" in data and not any(k in data for k in ("merge", "models", "slices")):
        # an adapter merge (mergetui.recipe.adapters), read by a caller that takes model merges
        # only (the TUI, sweep, eval, export)
        raise RecipeError(
            [
                "adapters: this is an adapter-merge recipe ([adapters]); `mergetui run` and "
                "`mergetui check` take it, this command takes model merges ([merge])"
            ],
            source_file,
        )
    for key in data:
        if key == "adapters":
            out.add(mixed_recipe_problem())
        elif key not in TOP_KEYS:
            out.add(_unknown_key("", key, TOP_KEYS))

    version = data.get("version", 1)
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        out.add(
            f"version: this mergetui reads recipe versions 1 and 2, not {version!r}; "
            f"set version = {RECIPE_VERSION}"
        )
        version = RECIPE_VERSION

    merge = out.table(data, "merge", "")
    if merge is None:
        if "merge" not in data:
            out.add('merge: missing; add a [merge] table with at least method = "linear"')
        merge = {}
    for key in merge:
        if key not in MERGE_KEYS:
            out.add(_unknown_key("merge.", key, MERGE_KEYS))

    method_name = out.string(merge, "method", "merge.")
    spec: MethodSpec | None = None
    if method_name is None and "method" not in merge and "merge" in data:
        out.add(f"merge.method: missing; choose one of {', '.join(METHODS)}")
    elif method_name is not None:
        spec = get_method(method_name)
        if spec is None:
            out.add(
                f"merge.method: unknown method {method_name!r}{did_you_mean(method_name, list(METHODS))}"
                f"; choose one of {', '.join(METHODS)}"
            )

    base = out.string(merge, "base", "merge.")
    if spec is not None and spec.needs_base and base is None and "base" not in merge:
        out.add(
            f"merge.base: the {spec.name} method needs a base model (task vectors are model - base);"
            ' set merge.base = "path/or/org-name" to the model the fine-tunes were trained from'
        )

    dtype = out.string(merge, "dtype", "merge.")
    if dtype is not None and dtype not in DTYPES:
        out.add(
            f"merge.dtype: {dtype!r} is not supported{did_you_mean(dtype, DTYPES)}; use one of "
            f"{', '.join(DTYPES)} (or leave it out to keep the base's dtype)"
        )

    seed = merge.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        out.add(f"merge.seed: must be a whole number >= 0, not {seed!r}")
        seed = 0

    max_memory = None
    if "max_memory" in merge:
        try:
            max_memory = parse_size(merge["max_memory"])
        except ValueError as exc:
            out.add(f'merge.max_memory: {exc}; e.g. max_memory = "4GiB"')

    device = out.string(merge, "device", "merge.") or "auto"
    if not _DEVICE_RE.match(device):
        out.add(f"merge.device: {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")

    chat_template = _chat_template(out, merge)

    global_raw = out.table(merge, "parameters", "merge.") or {}
    in_slices = "slices" in data
    global_params, model_level = _validate_global_params(
        out, spec, global_raw, required_here=not in_slices
    )

    models: list[ModelEntry] | None = []
    slices: list[Slice] = []
    if "slices" in data:
        if "models" in data:
            out.add(
                "slices: a recipe lists either [[models]] (whole models) or [[slices]] (layer "
                "ranges), not both; move the models into the slices' sources"
            )
        slices = _validate_slices(out, spec, data["slices"], base, global_params)
        global_params.update(model_level)  # kept as a level of its own: slices may override it
    else:
        models = _validate_models(out, spec, data, model_level, base)
    if spec is not None and models:  # an empty list was already reported
        _check_model_count(out, spec, len(models))
        _check_weight_sum(out, spec, global_params, models)
        _check_rules(out, spec, global_params, models)
    vocabulary = validate_vocabulary(
        merge,
        models=[m.model for m in models or []],
        slice_models=list(dict.fromkeys(s.model for piece in slices for s in piece.sources)),
        has_base=base is not None,
        add=out.add,
    )
    if chat_template is not None and model_index(chat_template) is not None:
        index = model_index(chat_template)
        if not models or index is None or index >= len(models):
            out.add(
                f"merge.chat_template: {chat_template!r} does not exist; name a model of this "
                "recipe (models[0] ...), base, or a template"
            )
    if chat_template == "base" and base is None:
        out.add('merge.chat_template: "base" but the recipe has no merge.base')
    recipe_values: list[Any] = list(global_params.values())
    for entry in models or []:
        recipe_values += entry.parameters.values()
    if version < 2 and (slices or any(is_varying(v) for v in recipe_values)):
        out.add("version: gradients, filters and slices need recipe version 2; set version = 2")
    if version < 2 and vocabulary.needs_v2:
        out.add(
            "version: tokenizer union or models[i], missing_tokens, pad_to_multiple_of, "
            "tie_word_embeddings and [merge.tokens] need recipe version 2; set version = 2"
        )

    output = out.table(data, "output", "")
    output_path = None
    shard_size = DEFAULT_SHARD_SIZE
    lora_rank: int | None = None
    lora_path: str | None = None
    if output is None:
        if "output" not in data:
            out.add('output: missing; add an [output] table with path = "./merged"')
    else:
        for key in output:
            if key not in OUTPUT_KEYS:
                out.add(_unknown_key("output.", key, OUTPUT_KEYS))
        output_path = out.string(output, "path", "output.")
        if output_path is None and "path" not in output:
            out.add('output.path: missing; say where the merged model goes, e.g. path = "./merged"')
        if "shard_size" in output:
            try:
                shard_size = parse_size(output["shard_size"])
            except ValueError as exc:
                out.add(f'output.shard_size: {exc}; e.g. shard_size = "2GB"')
        lora_rank, lora_path = _lora_output(out, output, base)

    if out.problems:
        raise RecipeError(out.problems, source_file)
    assert spec is not None and models is not None and output_path is not None
    return Recipe(
        method=spec.name,
        models=tuple(models),
        output_path=output_path,
        base=base,
        dtype=dtype,
        seed=seed,
        device=device,
        tokenizer=vocabulary.tokenizer,
        chat_template=chat_template,
        missing_tokens=vocabulary.missing_tokens,
        pad_to_multiple_of=vocabulary.pad_to_multiple_of,
        tie_word_embeddings=vocabulary.tie_word_embeddings,
        tokens=vocabulary.tokens,
        parameters=global_params,
        shard_size=shard_size,
        max_memory=max_memory,
        version=version,
        slices=tuple(slices),
        lora_rank=lora_rank,
        lora_path=lora_path,
        base_dir=base_dir or Path.cwd(),
        source_file=source_file,
    )


def _lora_output(
    out: _Collector, output: dict[str, Any], base: str | None
) -> tuple[int | None, str | None]:
    """``output.lora_rank`` and ``output.lora_path``: extracting an adapter of (merged − base)
    after the merge needs a whole-number rank and a base to subtract. Any recipe version takes
    them: a release without them refuses the unknown key by name, so nothing replays wrongly,
    and the TUI, which keeps [output] keys it does not edit, may save them under version 1."""
    rank = output.get("lora_rank")
    path = out.string(output, "lora_path", "output.")
    if rank is None:
        if "lora_path" in output:
            out.add(
                "output.lora_path: names where the extracted adapter goes, but no adapter is "
                "extracted without output.lora_rank; add lora_rank = 16 (say) or drop lora_path"
            )
        return None, None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        out.add(
            f"output.lora_rank: must be a positive whole number (the extracted adapter's rank, "
            f"e.g. lora_rank = 16), not {rank!r}"
        )
        return None, path
    if base is None:
        out.add(
            "output.lora_rank: extracts an adapter of (merged − base), but the recipe has no "
            'merge.base; set merge.base = "path/to/base" (the model the adapter will be loaded '
            "on) or drop lora_rank"
        )
    return rank, path


def _chat_template(out: _Collector, merge: dict[str, Any]) -> str | None:
    value = merge.get("chat_template")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        out.add(f"merge.chat_template: must be a non-empty string, not {value!r}")
        return None
    if (
        value in CHAT_TEMPLATE_NAMES
        or value == "base"
        or model_index(value) is not None
        or value.endswith(".jinja")
        or looks_like_template(value)
    ):
        return value
    if value in MERGEKIT_ONLY_TEMPLATES:
        out.add(
            f"merge.chat_template: mergekit's built-in {value!r} template is not shipped with "
            "mergetui; give its Jinja text, or a .jinja file, or use auto (the models' own), "
            "base, models[i], chatml or llama3"
        )
    else:
        out.add(
            f"merge.chat_template: {value!r} is neither auto, base, models[i], chatml, llama3, a "
            ".jinja file nor a Jinja "
            "template (at least 20 characters, with {{ }} or {% %})"
        )
    return None


def _param_problem(where: str, spec: MethodSpec, name: str) -> str:
    """Explain why ``name`` is not a parameter of ``spec`` in the most useful way."""
    owners = _other_methods_with(name, spec.name)
    names = [p.name for p in spec.params]
    if owners:
        return (
            f"{where}{name}: the {spec.name} method takes no `{name}` (it belongs to "
            f"{', '.join(owners)}); {spec.name} takes: {', '.join(names) or 'no parameters'}"
        )
    return (
        f"{where}{name}: unknown parameter{did_you_mean(name, names)}; {spec.name} takes: "
        f"{', '.join(names) or 'no parameters'}"
    )


def _coerce(out: _Collector, where: str, param: ParamSpec, value: Any) -> ParamValue | None:
    """A scalar, a gradient (a list, for parameters that take fractional numbers) or a filtered
    table, each value converted and range-checked; problems name the key and the range."""
    converted, problems = parse_value(
        value, numeric=param.kind is float, check=param.coerce, where=f"{where}{param.name}"
    )
    for problem in problems:
        out.add(f"{problem} ({param.help})")
    return converted


def _validate_global_params(
    out: _Collector,
    spec: MethodSpec | None,
    raw: dict[str, Any],
    *,
    where: str = "merge.parameters.",
    required_here: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The method-wide parameters (defaults filled in when ``required_here``) and, apart, the
    per-model parameters given at this level as the default for every model."""
    if spec is None:
        return {}, {}
    params: dict[str, Any] = {}
    model_level: dict[str, Any] = {}
    for key, value in raw.items():
        param = spec.param(key)
        if param is None:
            out.add(_param_problem(where, spec, key))
            continue
        converted = _coerce(out, where, param, value)
        # an invalid value is already reported; kept as None so it is not also called missing
        (params if param.scope == "global" else model_level)[key] = converted
    for param in spec.global_params:
        if param.name in params or not required_here:
            continue
        if param.required:
            in_range = f" (in {param.range_text()})" if param.range_text() else ""
            out.add(
                f"merge.parameters.{param.name}: required by {spec.name} ({param.help}); add "
                f"{param.name} = ...{in_range} under [merge.parameters]"
            )
        else:
            params[param.name] = param.default
    return params, model_level


def _validate_models(
    out: _Collector,
    spec: MethodSpec | None,
    data: dict[str, Any],
    model_level: dict[str, Any],
    base: str | None,
) -> list[ModelEntry] | None:
    raw_models = data.get("models")
    if raw_models is None:
        out.add(
            'models: missing; add one [[models]] table per model, with model = "path/or/org-name"'
        )
        return None
    if not isinstance(raw_models, list) or not all(isinstance(m, dict) for m in raw_models):
        out.add("models: must be an array of tables ([[models]] entries)")
        return None
    entries: list[ModelEntry] = []
    for index, raw in enumerate(raw_models):
        where = f"models[{index}]."
        model = out.string(raw, "model", where)
        if model is None and "model" not in raw:
            out.add(f'{where}model: missing; give a local path or Hub id, e.g. model = "org/name"')
        lora = out.string(raw, "lora", where)
        params: dict[str, Any] = {}
        params = _model_params(out, spec, raw, where, MODEL_KEYS, "[merge.parameters]")
        if spec is not None:
            for param in spec.model_params:
                if param.name in params:
                    continue
                if param.name in model_level:
                    params[param.name] = model_level[param.name]
                elif param.required:
                    out.add(
                        f"{where}{param.name}: required by {spec.name} ({param.help}); add "
                        f"{param.name} = ... to this model or to [merge.parameters]"
                    )
                else:
                    params[param.name] = param.default
            if spec.uses_base and base is not None and model == base and lora is None:
                out.add(
                    f"{where}model: this is the base model itself, whose task vector is zero; "
                    "remove it from [[models]] (the base is set by merge.base)"
                )
        if model is not None:
            entries.append(ModelEntry(model=model, lora=lora, parameters=params))
    if not raw_models:
        out.add('models: empty; add at least one [[models]] entry with model = "path/or/org-name"')
    return entries


def _model_params(
    out: _Collector,
    spec: MethodSpec | None,
    raw: dict[str, Any],
    where: str,
    own_keys: tuple[str, ...],
    method_wide_home: str,
) -> dict[str, Any]:
    """The per-model parameters of one entry (``[[models]]`` or a slice source): only those given
    (an invalid one, already reported, as None so it is not also called missing)."""
    params: dict[str, Any] = {}
    if spec is None:
        return params
    for key, value in raw.items():
        if key in own_keys:
            continue
        param = spec.param(key)
        if param is None:
            allowed = list(own_keys) + [p.name for p in spec.model_params]
            if _other_methods_with(key, spec.name):
                out.add(_param_problem(where, spec, key))
            else:
                out.add(_unknown_key(where, key, allowed))
        elif param.scope == "global":
            out.add(
                f"{where}{key}: `{key}` is method-wide, not per model; move it to "
                f"{method_wide_home}"
            )
        else:
            params[key] = _coerce(out, where, param, value)
    return params


def _layer_range(out: _Collector, raw: Any, where: str) -> tuple[int, int] | None:
    if raw is None:
        out.add(
            f"{where}layer_range: missing; give the source's layers as a half-open range, "
            "e.g. layer_range = [0, 24] for layers 0 to 23"
        )
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    ):
        out.add(
            f"{where}layer_range: must be two whole numbers [start, end) such as [0, 24], "
            f"not {raw!r}"
        )
        return None
    start, end = raw
    if start < 0 or end <= start:
        what = "is empty" if end == start else "runs backwards" if end < start else "is negative"
        out.add(
            f"{where}layer_range: [{start}, {end}] {what}; give [start, end) with "
            "0 <= start < end (end is excluded, as in mergekit)"
        )
        return None
    return (start, end)


def _validate_slices(
    out: _Collector,
    spec: MethodSpec | None,
    raw_slices: Any,
    base: str | None,
    global_params: dict[str, Any],
) -> list[Slice]:
    """``[[slices]]``: each a list of sources with same-length layer ranges, its own optional base
    and parameters; the method's source count and base rules hold per slice."""
    if not isinstance(raw_slices, list) or not all(isinstance(s, dict) for s in raw_slices):
        out.add("slices: must be an array of tables ([[slices]] entries)")
        return []
    if not raw_slices:
        out.add("slices: empty; add [[slices]] entries, each with [[slices.sources]]")
        return []
    slices: list[Slice] = []
    for index, raw in enumerate(raw_slices):
        where = f"slices[{index}]."
        for key in raw:
            if key not in SLICE_KEYS:
                out.add(_unknown_key(where, key, SLICE_KEYS))
        slice_base = out.string(raw, "base", where)
        raw_params = out.table(raw, "parameters", where) or {}
        params, model_level = _validate_global_params(
            out, spec, raw_params, where=f"{where}parameters.", required_here=False
        )
        params.update(model_level)
        raw_sources = raw.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            out.add(
                f"{where}sources: missing or empty; add [[slices.sources]] entries with "
                'model = "..." and layer_range = [start, end]'
            )
            continue
        sources: list[SliceSource] = []
        for number, item in enumerate(raw_sources):
            at = f"{where}sources[{number}]."
            if not isinstance(item, dict):
                out.add(f"{at[:-1]}: must be a table with model and layer_range")
                continue
            model = out.string(item, "model", at)
            if model is None and "model" not in item:
                out.add(f'{at}model: missing; give a local path or Hub id, e.g. model = "org/name"')
            lora = out.string(item, "lora", at)
            layers = _layer_range(out, item.get("layer_range"), at)
            own = _model_params(
                out, spec, item, at, SOURCE_KEYS, "the slice's parameters or [merge.parameters]"
            )
            if model is not None and layers is not None:
                sources.append(SliceSource(model, layers, lora, own))
        if len(sources) != len(raw_sources):
            continue
        lengths = {source.layer_count for source in sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in sources)
            out.add(
                f"{where}sources: the layer ranges differ in length ({ranges}); the sources of "
                "one slice are merged layer by layer, so give them ranges of the same length"
            )
        keys = [(s.model, s.lora) for s in sources]
        for number, key in enumerate(keys):
            if key in keys[:number]:
                out.add(
                    f"{where}sources[{number}].model: {key[0]} is listed twice in this slice; "
                    "remove one (mergekit would silently count it once)"
                )
        piece = Slice(tuple(sources), slice_base, params)
        if spec is not None:
            _check_slice(out, spec, piece, where, base, global_params)
        slices.append(piece)
    return slices


def _check_slice(
    out: _Collector,
    spec: MethodSpec,
    piece: Slice,
    where: str,
    base: str | None,
    global_params: dict[str, Any],
) -> None:
    """The method's rules for one slice: a single source is taken as it is; several are merged,
    with the base among them when the method needs one, and every required parameter set."""
    if len(piece.sources) == 1:
        return
    slice_base = piece.base or base
    models = [s.model for s in piece.sources]
    others = len(models)
    if spec.needs_base:
        if slice_base is None or slice_base not in models:
            named = f"the base ({slice_base})" if slice_base else "a base"
            out.add(
                f"{where}sources: the {spec.name} method merges task vectors against {named}, "
                "which must be one of this slice's sources; add it as a source with the same "
                "layer_range, or set this slice's base to one of its sources"
            )
            return
        others -= 1
    elif spec.optional_base and slice_base is not None and slice_base in models:
        others -= 1
    too_few = others < spec.min_models
    too_many = spec.max_models is not None and others > spec.max_models
    if too_few or too_many:
        besides = " besides the base" if spec.uses_base else ""
        out.add(
            f"{where}sources: {spec.name} merges {spec.model_count_text()} source(s){besides}, "
            f"got {others}; a slice with one source is copied as it is"
        )
    for param in spec.global_params:
        if (
            param.required
            and param.name not in global_params
            and param.name not in piece.parameters
        ):
            out.add(
                f"{where}parameters.{param.name}: required by {spec.name} ({param.help}); set it "
                "in this slice's parameters or in [merge.parameters]"
            )


def _check_model_count(out: _Collector, spec: MethodSpec, count: int) -> None:
    too_few = count < spec.min_models
    too_many = spec.max_models is not None and count > spec.max_models
    if too_few or too_many:
        besides = " besides merge.base" if spec.uses_base else ""
        fix = "remove the extra entries" if too_many else "add [[models]] entries"
        out.add(
            f"models: {spec.name} takes {spec.model_count_text()} [[models]] "
            f"entr{'y' if spec.max_models == 1 else 'ies'}{besides}, got {count}; {fix}"
        )


def _check_rules(
    out: _Collector, spec: MethodSpec, params: dict[str, Any], models: list[ModelEntry]
) -> None:
    """The method's per-tensor rules on the values that are plain numbers (gradients and filters
    are checked per tensor by the planner, where their values are known)."""

    def plain(values: dict[str, Any]) -> dict[str, Any]:
        return {
            k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in values.items()
            if not is_varying(v)
        }

    model_params = tuple(plain(m.parameters) for m in models)
    for rule in spec.tensor_rules:
        for index, problem in rule(plain(params), model_params):
            out.add(f"{'merge.parameters' if index is None else f'models[{index}]'}: {problem}")


def _check_weight_sum(
    out: _Collector, spec: MethodSpec, params: dict[str, Any], models: list[ModelEntry]
) -> None:
    switch = spec.normalize_switch
    if switch is None or not params.get(switch):
        return
    weights = [m.parameters.get("weight") for m in models]
    if any(is_varying(w) for w in weights):
        return  # checked per tensor by the planner, where the values are known
    numbers = [float(w) for w in weights if w is not None]
    if len(numbers) < len(weights):
        return
    if abs(sum(numbers)) < 1e-8:
        out.add(
            f"models: the weights sum to 0 and {switch} is on, which would divide by zero; "
            f"change a weight or set {switch} = false under [merge.parameters] "
            f"(weights: {', '.join(str(w) for w in weights)})"
        )
