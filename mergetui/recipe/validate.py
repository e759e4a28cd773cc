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
from mergetui.recipe.schema import DEFAULT_SHARD_SIZE, DTYPES, RECIPE_VERSION, ModelEntry, Recipe
from mergetui.units import parse_size

TOP_KEYS = ("version", "merge", "models", "output")
MERGE_KEYS = ("method", "base", "dtype", "seed", "device", "tokenizer", "parameters")
MODEL_KEYS = ("model", "lora")
OUTPUT_KEYS = ("path", "shard_size")
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
    for key in data:
        if key not in TOP_KEYS:
            out.add(_unknown_key("", key, TOP_KEYS))

    version = data.get("version", RECIPE_VERSION)
    if isinstance(version, bool) or version != RECIPE_VERSION:
        out.add(
            f"version: this mergetui reads recipe version {RECIPE_VERSION}, not {version!r}; "
            f"set version = {RECIPE_VERSION}"
        )

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

    device = out.string(merge, "device", "merge.") or "auto"
    if not _DEVICE_RE.match(device):
        out.add(f"merge.device: {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")

    tokenizer = out.string(merge, "tokenizer", "merge.") or "base"

    global_raw = out.table(merge, "parameters", "merge.") or {}
    global_params = _validate_global_params(out, spec, global_raw)

    models = _validate_models(out, spec, data, global_raw, base)
    if spec is not None and models:  # an empty list was already reported
        _check_model_count(out, spec, len(models))
        _check_weight_sum(out, spec, global_params, models)
    if tokenizer != "base" and models is not None and tokenizer not in [m.model for m in models]:
        choices = ["base"] + [m.model for m in models]
        out.add(
            f'merge.tokenizer: {tokenizer!r} is neither "base" nor a model of this recipe'
            f'{did_you_mean(tokenizer, choices)}; use "base" or one of the [[models]] `model` values'
        )

    output = out.table(data, "output", "")
    output_path = None
    shard_size = DEFAULT_SHARD_SIZE
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
        tokenizer=tokenizer,
        parameters=global_params,
        shard_size=shard_size,
        version=RECIPE_VERSION,
        base_dir=base_dir or Path.cwd(),
        source_file=source_file,
    )


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


def _coerce(out: _Collector, where: str, param: ParamSpec, value: Any) -> Any:
    converted, problem = param.coerce(value)
    if problem:
        range_hint = f" ({param.help})"
        out.add(f"{where}{param.name}: {problem}{range_hint}")
    return converted


def _validate_global_params(
    out: _Collector, spec: MethodSpec | None, raw: dict[str, Any]
) -> dict[str, Any]:
    if spec is None:
        return {}
    params: dict[str, Any] = {}
    for key, value in raw.items():
        param = spec.param(key)
        if param is None:
            out.add(_param_problem("merge.parameters.", spec, key))
            continue
        converted = _coerce(out, "merge.parameters.", param, value)
        if param.scope == "global":
            params[key] = converted
    for param in spec.global_params:
        if param.name in params:
            continue
        if param.required:
            in_range = f" (in {param.range_text()})" if param.range_text() else ""
            out.add(
                f"merge.parameters.{param.name}: required by {spec.name} ({param.help}); add "
                f"{param.name} = ...{in_range} under [merge.parameters]"
            )
        else:
            params[param.name] = param.default
    return params


def _validate_models(
    out: _Collector,
    spec: MethodSpec | None,
    data: dict[str, Any],
    global_raw: dict[str, Any],
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
    model_param_names = [p.name for p in spec.model_params] if spec else []
    for index, raw in enumerate(raw_models):
        where = f"models[{index}]."
        model = out.string(raw, "model", where)
        if model is None and "model" not in raw:
            out.add(f'{where}model: missing; give a local path or Hub id, e.g. model = "org/name"')
        lora = out.string(raw, "lora", where)
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if key in MODEL_KEYS:
                continue
            param = spec.param(key) if spec else None
            if spec is None:
                continue
            if param is None:
                allowed = list(MODEL_KEYS) + model_param_names
                if _other_methods_with(key, spec.name):
                    out.add(_param_problem(where, spec, key))
                else:
                    out.add(_unknown_key(where, key, allowed))
            elif param.scope == "global":
                out.add(
                    f"{where}{key}: `{key}` is method-wide, not per model; move it to "
                    "[merge.parameters]"
                )
            else:
                params[key] = _coerce(out, where, param, value)
        if spec is not None:
            for param in spec.model_params:
                if param.name in params:
                    continue
                if param.name in global_raw:
                    converted, problem = param.coerce(global_raw[param.name])
                    params[param.name] = converted if problem is None else None
                elif param.required:
                    out.add(
                        f"{where}{param.name}: required by {spec.name} ({param.help}); add "
                        f"{param.name} = ... to this model or to [merge.parameters]"
                    )
                else:
                    params[param.name] = param.default
            if spec.needs_base and base is not None and model == base and lora is None:
                out.add(
                    f"{where}model: this is the base model itself, whose task vector is zero; "
                    "remove it from [[models]] (the base is set by merge.base)"
                )
        if model is not None:
            entries.append(ModelEntry(model=model, lora=lora, parameters=params))
    if not raw_models:
        out.add('models: empty; add at least one [[models]] entry with model = "path/or/org-name"')
    return entries


def _check_model_count(out: _Collector, spec: MethodSpec, count: int) -> None:
    too_few = count < spec.min_models
    too_many = spec.max_models is not None and count > spec.max_models
    if too_few or too_many:
        besides = " besides merge.base" if spec.needs_base else ""
        fix = "remove the extra entries" if too_many else "add [[models]] entries"
        out.add(
            f"models: {spec.name} takes {spec.model_count_text()} [[models]] "
            f"entr{'y' if spec.max_models == 1 else 'ies'}{besides}, got {count}; {fix}"
        )


def _check_weight_sum(
    out: _Collector, spec: MethodSpec, params: dict[str, Any], models: list[ModelEntry]
) -> None:
    if not params.get("normalize") or spec.param("weight") is None:
        return
    weights = [m.parameters.get("weight") for m in models]
    numbers = [float(w) for w in weights if w is not None]
    if len(numbers) < len(weights):
        return
    if abs(sum(numbers)) < 1e-8:
        out.add(
            f"models: the weights sum to 0 and normalize is on, which would divide by zero; "
            f"change a weight or set normalize = false under [merge.parameters] "
            f"(weights: {', '.join(str(w) for w in weights)})"
        )
