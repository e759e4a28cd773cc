"""Recipe validation and TOML I/O: every rejection names the file, the key and the fix.

Nothing here builds or reads a model: validation must happen before any weight is read, so all of these
tests run on made-up paths.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mergetui.errors import EXIT_INVALID, RecipeError
from mergetui.methods.registry import METHODS, MethodSpec, ParamSpec
from mergetui.recipe import ModelEntry, Recipe, load_recipe, parse_recipe, recipe_to_toml
from mergetui.recipe.schema import DEFAULT_SHARD_SIZE, DTYPES
from mergetui.recipe.toml_io import dump_recipe, recipe_to_data

FILE = "recipes/my-merge.toml"

TIES = """\
version = 1

[merge]
method = "ties"
base = "./models/base"
dtype = "bfloat16"
seed = 0
device = "auto"
tokenizer = "base"

[merge.parameters]
normalize = true

[[models]]
model = "./models/ft-code"
weight = 0.5
density = 0.5

[[models]]
model = "./models/ft-math"
weight = 0.5
density = 0.5

[output]
path = "./merged"
shard_size = "2GB"
"""

# A key path as the messages write it: `merge.dtype`, `models[1].density`, `output.shard_size`, ...
KEY_RE = re.compile(r"^(version|merge|models|output|[a-z_]+)(\[\d+\])?(\.[a-z_]+)*: \S")


# --- helpers -------------------------------------------------------------------------------------


def parse(source: str | dict[str, Any], **kwargs: Any) -> Recipe:
    text = source if isinstance(source, str) else tomli_w.dumps(source)
    return parse_recipe(text, source_file=FILE, **kwargs)


def reject(source: str | dict[str, Any]) -> RecipeError:
    """Parse a recipe that must be rejected; check the error names the file; return it."""
    with pytest.raises(RecipeError) as info:
        parse(source)
    error = info.value
    assert error.path == FILE
    assert str(error).startswith(f"{FILE}: ")
    assert error.exit_code == EXIT_INVALID
    assert error.problems, "a RecipeError must list its problems"
    return error


def only_problem(source: str | dict[str, Any]) -> str:
    error = reject(source)
    assert len(error.problems) == 1, error.problems
    return error.problems[0]


def problem_for(error: RecipeError, key: str) -> str:
    """The one problem whose key path is exactly ``key``."""
    found = [p for p in error.problems if p.startswith(f"{key}: ")]
    assert len(found) == 1, f"expected one problem for {key}, got {error.problems}"
    return found[0]


def edit(text: str, old: str, new: str, count: int = 1) -> str:
    assert text.count(old) >= count, f"{old!r} not in the template"
    return text.replace(old, new, count)


def sample_value(param: ParamSpec, *, alternative: bool = False) -> Any:
    """A valid value for ``param``; with ``alternative`` one that differs from the default."""
    if param.kind is bool:
        return not param.default if alternative and not param.required else True
    low = param.minimum if param.minimum is not None else 0.0
    high = param.maximum if param.maximum is not None else low + 2.0
    value = low + (high - low) * (0.3 if alternative else 0.5)
    value = param.kind(value)
    ok, problem = param.coerce(value)
    assert problem is None, (param, value, problem)
    if alternative and not param.required:
        assert value != param.default, param
    return value


def valid_data(spec: MethodSpec, *, every_param: bool = False) -> dict[str, Any]:
    """A valid recipe for ``spec`` generated from the registry.

    By default only required parameters are given; with ``every_param`` every parameter is set to a
    non-default value and the optional merge keys are set too.
    """
    count = spec.min_models if spec.max_models == spec.min_models else max(spec.min_models, 2)
    models = []
    for index in range(count):
        entry: dict[str, Any] = {"model": f"./models/ft-{index}"}
        for param in spec.model_params:
            if param.required or every_param:
                entry[param.name] = sample_value(param, alternative=every_param)
        if every_param and spec.tensor_rules and "epsilon" in entry:
            entry["epsilon"] = 0.1  # DELLA's rule across fields: density 0.3 ± epsilon in (0, 1)
        models.append(entry)
    merge: dict[str, Any] = {"method": spec.name}
    if spec.needs_base:
        merge["base"] = "./models/base"
    globals_ = {
        p.name: sample_value(p, alternative=every_param)
        for p in spec.global_params
        if p.required or every_param
    }
    if globals_:
        merge["parameters"] = globals_
    output: dict[str, Any] = {"path": "./merged"}
    if every_param:
        merge.update(dtype="float16", seed=1234, device="cuda:1", tokenizer="./models/ft-0")
        models[0]["lora"] = "./adapters/code-lora"
        output["shard_size"] = "500MiB"
    return {"version": 1, "merge": merge, "models": models, "output": output}


ALL_METHODS = pytest.mark.parametrize("spec", list(METHODS.values()), ids=list(METHODS))
BASE_METHODS = [spec for spec in METHODS.values() if spec.needs_base]
BASELESS_METHODS = [spec for spec in METHODS.values() if not spec.needs_base]
#: Methods that divide by the sum of the weights, and the switch that makes them.
NORMALIZED = [
    (spec, switch)
    for spec in METHODS.values()
    for switch in ("normalize", "normalize_weights")
    if spec.param("weight") is not None and spec.param(switch) is not None
]


# --- the happy path ------------------------------------------------------------------------------


def test_documented_example_parses_with_every_field() -> None:
    recipe = parse(TIES, base_dir=Path("/recipes"))
    assert recipe.method == "ties"
    assert recipe.base == "./models/base"
    assert recipe.dtype == "bfloat16"
    assert (recipe.seed, recipe.device, recipe.tokenizer) == (0, "auto", "base")
    assert recipe.parameters == {"normalize": True, "lambda": 1.0}
    assert recipe.models == (
        ModelEntry("./models/ft-code", None, {"weight": 0.5, "density": 0.5}),
        ModelEntry("./models/ft-math", None, {"weight": 0.5, "density": 0.5}),
    )
    assert recipe.output_path == "./merged"
    assert recipe.shard_size == 2 * 10**9
    assert recipe.source_file == FILE
    assert recipe.output_dir == Path("/recipes/merged")
    assert recipe.references() == ["./models/base", "./models/ft-code", "./models/ft-math"]


def test_shipped_demo_recipe_is_valid() -> None:
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "demo-ties.toml")
    assert recipe.method == "ties" and len(recipe.models) == 2


@ALL_METHODS
def test_registry_generated_recipe_is_valid(spec: MethodSpec) -> None:
    recipe = parse(valid_data(spec))
    assert recipe.method == spec.name
    assert set(recipe.parameters) == {p.name for p in spec.global_params}
    for entry in recipe.models:
        assert set(entry.parameters) == {p.name for p in spec.model_params}


def test_validation_reads_no_model_and_imports_no_torch(tmp_path: Path) -> None:
    """Paths that do not exist validate fine, and validating does not even import torch."""
    script = textwrap.dedent(
        f"""
        import sys
        from mergetui.recipe import parse_recipe
        recipe = parse_recipe({TIES!r})
        assert recipe.models[0].model == "./models/ft-code"
        heavy = [m for m in ("torch", "transformers", "safetensors", "peft") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    root = str(Path(__file__).parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- unknown keys and parameters, with suggestions -----------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key", "suggestion", "allowed"),
    [
        ('dtype = "bfloat16"', 'dtpye = "bfloat16"', "merge.dtpye", "dtype", "`tokenizer`"),
        ("seed = 0", "sede = 0", "merge.sede", "seed", "`device`"),
        ('shard_size = "2GB"', 'shardsize = "2GB"', "output.shardsize", "shard_size", "`path`"),
        ("[output]", "[outptu]", "outptu", "output", "`models`"),
        ("version = 1", "verison = 1", "verison", "version", "`merge`"),
    ],
)
def test_unknown_key_suggests_the_closest(
    old: str, new: str, key: str, suggestion: str, allowed: str
) -> None:
    error = reject(edit(TIES, old, new))
    message = problem_for(error, key)
    assert f"unknown key (did you mean `{suggestion}`?)" in message
    assert "allowed here:" in message and allowed in message


def test_unknown_key_in_a_model_names_its_index_and_suggests() -> None:
    text = edit(TIES, "density = 0.5", "densty = 0.5", count=2).replace("densty", "density", 1)
    message = only_problem(text)
    assert message.startswith("models[1].densty: unknown key (did you mean `density`?)")
    assert "allowed here: `model`, `lora`, `weight`, `density`" in message


def test_unknown_key_without_a_close_match_lists_what_is_allowed() -> None:
    message = only_problem(edit(TIES, 'device = "auto"', 'colour = "blue"'))
    assert message.startswith("merge.colour: unknown key; allowed here: ")
    assert "did you mean" not in message
    for key in ("method", "base", "dtype", "seed", "device", "tokenizer", "parameters"):
        assert f"`{key}`" in message


def test_unknown_parameter_suggests_the_closest() -> None:
    message = only_problem(edit(TIES, "normalize = true", "normalise = true"))
    assert message.startswith("merge.parameters.normalise: unknown parameter")
    assert "(did you mean `normalize`?)" in message
    assert "ties takes: weight, density, normalize, lambda" in message


def test_unknown_method_suggests_the_closest() -> None:
    message = only_problem(edit(TIES, 'method = "ties"', 'method = "tiez"'))
    assert message.startswith("merge.method: unknown method 'tiez' (did you mean `ties`?)")
    assert "choose one of " + ", ".join(METHODS) in message


def test_unknown_method_without_a_close_match_lists_the_methods() -> None:
    message = only_problem(edit(TIES, 'method = "ties"', 'method = "average-them"'))
    assert "did you mean" not in message
    assert message.endswith("choose one of " + ", ".join(METHODS))


def test_missing_or_non_string_method() -> None:
    message = only_problem(edit(TIES, 'method = "ties"\n', ""))
    assert message.startswith("merge.method: missing; choose one of linear, slerp")
    message = only_problem(edit(TIES, 'method = "ties"', "method = 3"))
    assert message == "merge.method: must be a non-empty string, not 3"


# --- parameters the method does not take, or that sit in the wrong place -------------------------


def test_parameter_of_another_method_on_a_model() -> None:
    text = edit(TIES, 'method = "ties"', 'method = "linear"')
    text = edit(text, 'base = "./models/base"\n', "")
    error = reject(text)
    assert len(error.problems) == 2
    message = problem_for(error, "models[1].density")
    assert (
        "the linear method takes no `density` (it belongs to ties, dare_ties, dare_linear, "
        "breadcrumbs, breadcrumbs_ties, della, della_linear)" in message
    )
    assert message.endswith("linear takes: weight, normalize")


def test_parameter_of_another_method_in_merge_parameters() -> None:
    message = only_problem(edit(TIES, "normalize = true", "t = 0.5"))
    assert message.startswith(
        "merge.parameters.t: the ties method takes no `t` (it belongs to slerp, nearswap)"
    )
    assert message.endswith("ties takes: weight, density, normalize, lambda")


def test_slerp_rejects_weights_and_lists_its_only_parameter() -> None:
    text = """\
        [merge]
        method = "slerp"
        base = "./base"
        [merge.parameters]
        t = 0.5
        lambda = 2.0
        [[models]]
        model = "./ft"
        weight = 1.0
        [output]
        path = "./out"
    """
    error = reject(textwrap.dedent(text))
    assert len(error.problems) == 2
    assert "slerp takes: t" in problem_for(error, "merge.parameters.lambda")
    assert "slerp method takes no `weight`" in problem_for(error, "models[0].weight")


@pytest.mark.parametrize(
    ("method", "param", "value"),
    [
        ("ties", "normalize", True),
        ("ties", "lambda", 0.5),
        ("dare_ties", "rescale", False),
        ("slerp", "t", 0.5),
    ],
)
def test_global_parameter_on_a_model_says_move_it(method: str, param: str, value: Any) -> None:
    data = valid_data(METHODS[method])
    data["models"][0][param] = value
    error = reject(data)
    message = problem_for(error, f"models[0].{param}")
    assert message == (
        f"models[0].{param}: `{param}` is method-wide, not per model; move it to [merge.parameters]"
    )


def test_per_model_parameter_in_merge_parameters_is_every_models_default() -> None:
    text = edit(TIES, "normalize = true", "normalize = true\nweight = 0.3\ndensity = 0.7")
    text = edit(text, "weight = 0.5\ndensity = 0.5\n", "", count=1)
    text = edit(text, "weight = 0.5\ndensity = 0.5\n", "density = 0.2\n")
    recipe = parse(text)
    assert recipe.models[0].parameters == {"weight": 0.3, "density": 0.7}
    assert recipe.models[1].parameters == {"weight": 0.3, "density": 0.2}  # its own value wins
    assert "weight" not in recipe.parameters and "density" not in recipe.parameters


def test_invalid_per_model_default_is_reported_once_under_merge_parameters() -> None:
    text = edit(TIES, "normalize = true", "density = 0")
    text = text.replace("density = 0.5\n", "")
    message = only_problem(text)
    assert message.startswith("merge.parameters.density: must be in (0, 1], not 0")


# --- defaults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("linear", {"normalize": True}),
        ("slerp", {"t": 0.5}),
        ("task_arithmetic", {"normalize": False, "lambda": 1.0}),
        ("ties", {"normalize": True, "lambda": 1.0}),
        ("dare_ties", {"normalize": False, "rescale": True, "lambda": 1.0}),
        ("dare_linear", {"normalize": False, "rescale": True, "lambda": 1.0}),
        ("passthrough", {}),
    ],
)
def test_global_defaults_are_filled_in(method: str, expected: dict[str, Any]) -> None:
    assert parse(valid_data(METHODS[method])).parameters == expected


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("linear", {"weight": 1.0}),
        ("ties", {"weight": 1.0, "density": 1.0}),
        ("dare_linear", {"weight": 1.0, "density": 1.0}),
        ("passthrough", {"scale": 1.0}),
    ],
)
def test_per_model_defaults_are_filled_in(method: str, expected: dict[str, Any]) -> None:
    recipe = parse(valid_data(METHODS[method]))
    assert all(entry.parameters == expected for entry in recipe.models)


def test_merge_defaults_when_omitted() -> None:
    text = """\
        [merge]
        method = "linear"
        [[models]]
        model = "org/model"
        weight = 1
        [output]
        path = "out"
    """
    recipe = parse(textwrap.dedent(text))
    assert recipe.base is None and recipe.dtype is None
    assert (recipe.seed, recipe.device, recipe.tokenizer) == (0, "auto", "base")
    assert recipe.shard_size == DEFAULT_SHARD_SIZE
    assert recipe.version == 1
    assert recipe.models[0].parameters["weight"] == 1.0
    assert isinstance(recipe.models[0].parameters["weight"], float)


# --- ranges and types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0.0", "must be in (0, 1], not 0.0"),
        ("0", "must be in (0, 1], not 0"),
        ("1.5", "must be in (0, 1], not 1.5"),
        ("-0.1", "must be in (0, 1], not -0.1"),
        ('"half"', "must be a number, not 'half'"),
        ("true", "must be a number, not True"),
        ("nan", "must be a finite number"),
    ],
)
def test_density_out_of_range_names_the_model(value: str, problem: str) -> None:
    text = TIES.replace("density = 0.5", f"density = {value}").replace(
        f"density = {value}", "density = 0.5", 1
    )
    message = only_problem(text)
    assert message.startswith(f"models[1].density: {problem}")
    assert "(fraction of this model's task vector to keep)" in message


@pytest.mark.parametrize("value", ["1", "1.0", "0.01"])
def test_density_range_is_open_at_zero_closed_at_one(value: str) -> None:
    assert parse(TIES.replace("density = 0.5", f"density = {value}")).models[0].parameters[
        "density"
    ] == float(value)


SLERP = """\
[merge]
method = "slerp"
base = "./base"
[merge.parameters]
t = {t}
[[models]]
model = "./ft"
[output]
path = "./out"
"""


@pytest.mark.parametrize("t", ["0", "0.0", "0.25", "1", "1.0"])
def test_slerp_t_accepts_the_closed_unit_interval(t: str) -> None:
    assert parse(SLERP.format(t=t)).parameters == {"t": float(t)}


@pytest.mark.parametrize(
    ("t", "problem"),
    [
        ("1.01", "must be in [0, 1], not 1.01"),
        ("-0.5", "must be in [0, 1], not -0.5"),
        ("inf", "must be a finite number, not inf"),
        ('"0.5"', "must be a number, not '0.5'"),
    ],
)
def test_slerp_t_out_of_range(t: str, problem: str) -> None:
    message = only_problem(SLERP.format(t=t))
    assert message == (
        f"merge.parameters.t: {problem} (interpolation factor: 0 gives the base, "
        "1 gives the other model)"
    )


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (
            TIES.replace("normalize = true", 'normalize = "yes"'),
            "merge.parameters.normalize",
            "must be true or false, not 'yes'",
        ),
        (
            TIES.replace("normalize = true", "normalize = 1"),
            "merge.parameters.normalize",
            "must be true or false, not 1",
        ),
        (
            TIES.replace("normalize = true", "lambda = inf"),
            "merge.parameters.lambda",
            "must be a finite number, not inf",
        ),
        (
            TIES.replace("weight = 0.5", 'weight = "big"'),
            "models[0].weight",
            "must be a number, not 'big'",
        ),
    ],
)
def test_parameter_type_errors(text: str, key: str, problem: str) -> None:
    error = reject(text)
    assert problem_for(error, key).startswith(f"{key}: {problem} (")


# --- weights that sum to zero --------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "switch"), NORMALIZED, ids=[s.name for s, _ in NORMALIZED])
def test_weights_summing_to_zero_under_normalize(spec: MethodSpec, switch: str) -> None:
    data = valid_data(spec)
    data["merge"].setdefault("parameters", {})[switch] = True
    data["models"][0]["weight"] = 0.5
    data["models"][1]["weight"] = -0.5
    message = only_problem(data)
    assert message.startswith(f"models: the weights sum to 0 and {switch} is on")
    assert f"set {switch} = false under [merge.parameters]" in message
    assert "(weights: 0.5, -0.5)" in message
    data["merge"]["parameters"][switch] = False  # a difference of task vectors is fine
    assert parse(data).models[1].parameters["weight"] == -0.5


def test_zero_weights_are_fine_without_normalize_by_default() -> None:
    """task_arithmetic does not normalize by default, so subtracting a model is allowed."""
    data = valid_data(METHODS["task_arithmetic"])
    data["models"][0]["weight"] = 1.0
    data["models"][1]["weight"] = -1.0
    assert parse(data).parameters["normalize"] is False


def test_zero_weight_sum_with_ties_default_normalize() -> None:
    text = TIES.replace("normalize = true", "").replace("weight = 0.5", "weight = 0", 2)
    assert "weights sum to 0" in only_problem(text)


# --- missing values ------------------------------------------------------------------------------


def test_missing_per_model_weight() -> None:
    text = TIES.replace("weight = 0.5\n", "", 2).replace(
        'model = "./models/ft-code"', 'model = "./models/ft-code"\nweight = 1.0'
    )
    message = only_problem(text)
    assert message == (
        "models[1].weight: required by ties (how much this model contributes "
        "(relative when normalize is on)); add weight = ... to this model or to "
        "[merge.parameters]"
    )


def test_missing_slerp_t() -> None:
    message = only_problem(SLERP.replace("t = {t}\n", ""))
    assert message == (
        "merge.parameters.t: required by slerp (interpolation factor: 0 gives the "
        "base, 1 gives the other model); add t = ... (in [0, 1]) under "
        "[merge.parameters]"
    )


@pytest.mark.parametrize("spec", BASE_METHODS, ids=[s.name for s in BASE_METHODS])
def test_method_that_needs_a_base_without_one(spec: MethodSpec) -> None:
    data = valid_data(spec)
    del data["merge"]["base"]
    message = only_problem(data)
    assert message.startswith(f"merge.base: the {spec.name} method needs a base model")
    assert 'set merge.base = "path/or/org-name"' in message


@pytest.mark.parametrize("spec", BASELESS_METHODS, ids=[s.name for s in BASELESS_METHODS])
def test_methods_without_a_base_accept_one_or_none(spec: MethodSpec) -> None:
    data = valid_data(spec)
    assert parse(data).base is None
    data["merge"]["base"] = "org/base"
    assert parse(data).base == "org/base"


def test_missing_tables() -> None:
    error = reject("version = 1\n")
    assert error.problems == [
        'merge: missing; add a [merge] table with at least method = "linear"',
        'models: missing; add one [[models]] table per model, with model = "path/or/org-name"',
        'output: missing; add an [output] table with path = "./merged"',
    ]
    assert str(error).startswith(f"{FILE}: 3 problems in the recipe:\n  - merge: missing")


def test_missing_model_and_output_path() -> None:
    text = TIES.replace('model = "./models/ft-math"', 'lora = "./adapters/x"').replace(
        'path = "./merged"\n', ""
    )
    error = reject(text)
    assert problem_for(error, "models[1].model").startswith(
        'models[1].model: missing; give a local path or Hub id, e.g. model = "org/name"'
    )
    assert problem_for(error, "output.path").startswith(
        'output.path: missing; say where the merged model goes, e.g. path = "./merged"'
    )
    assert len(error.problems) == 2


def test_empty_models_is_one_problem() -> None:
    data = valid_data(METHODS["ties"])
    data["models"] = []
    assert only_problem(data) == (
        'models: empty; add at least one [[models]] entry with model = "path/or/org-name"'
    )


@pytest.mark.parametrize(
    ("source", "key", "problem"),
    [
        (
            'merge = "ties"\n[[models]]\nmodel = "a"\n[output]\npath = "o"\n',
            "merge",
            "must be a table ([merge]), not str",
        ),
        (
            TIES.replace("[merge.parameters]\nnormalize = true", "").replace(
                'tokenizer = "base"', 'tokenizer = "base"\nparameters = 3'
            ),
            "merge.parameters",
            "must be a table ([merge.parameters]), not int",
        ),
        (
            'models = "a"\n[merge]\nmethod = "linear"\n[output]\npath = "o"\n',
            "models",
            "must be an array of tables ([[models]] entries)",
        ),
        (
            TIES.replace('path = "./merged"', 'path = ""'),
            "output.path",
            "must be a non-empty string, not ''",
        ),
        (
            TIES.replace('base = "./models/base"', "base = 7"),
            "merge.base",
            "must be a non-empty string, not 7",
        ),
    ],
)
def test_wrong_shapes(source: str, key: str, problem: str) -> None:
    assert problem_for(reject(source), key) == f"{key}: {problem}"


# --- model counts --------------------------------------------------------------------------------


def test_slerp_takes_the_base_plus_exactly_one_model() -> None:
    text = SLERP.format(t=0.5) + '[[models]]\nmodel = "./ft2"\n'
    message = only_problem(text)
    assert message == (
        "models: slerp takes exactly 1 [[models]] entry besides merge.base, got 2; "
        "remove the extra entries"
    )


def test_passthrough_takes_exactly_one_model() -> None:
    data = valid_data(METHODS["passthrough"])
    data["models"].append({"model": "./other"})
    assert only_problem(data) == (
        "models: passthrough takes exactly 1 [[models]] entry, got 2; remove the extra entries"
    )


@pytest.mark.parametrize(
    "spec",
    [s for s in METHODS.values() if s.max_models is None],
    ids=[s.name for s in METHODS.values() if s.max_models is None],
)
def test_open_ended_methods_take_many_models(spec: MethodSpec) -> None:
    data = valid_data(spec)
    template = data["models"][0]
    data["models"] = [{**template, "model": f"./ft-{i}"} for i in range(5)]
    assert len(parse(data).models) == 5


@pytest.mark.parametrize("spec", BASE_METHODS, ids=[s.name for s in BASE_METHODS])
def test_base_listed_as_a_model_is_rejected(spec: MethodSpec) -> None:
    data = valid_data(spec)
    data["models"][-1]["model"] = data["merge"]["base"]
    index = len(data["models"]) - 1
    error = reject(data)
    message = problem_for(error, f"models[{index}].model")
    assert "this is the base model itself, whose task vector is zero" in message
    assert "remove it from [[models]] (the base is set by merge.base)" in message


def test_base_with_a_lora_is_a_real_model() -> None:
    data = valid_data(METHODS["ties"])
    data["models"][1].update(model=data["merge"]["base"], lora="./adapters/math")
    recipe = parse(data)
    assert recipe.models[1] == ModelEntry(
        "./models/base", "./adapters/math", recipe.models[1].parameters
    )


def test_linear_may_list_its_base_to_average_it() -> None:
    data = valid_data(METHODS["linear"])
    data["merge"]["base"] = data["models"][0]["model"]
    assert parse(data).references() == ["./models/ft-0", "./models/ft-1"]


# --- tokenizer, dtype, device, seed, version -----------------------------------------------------


def test_tokenizer_may_be_base_or_a_model() -> None:
    assert parse(TIES).tokenizer == "base"
    text = TIES.replace('tokenizer = "base"', 'tokenizer = "./models/ft-math"')
    assert parse(text).tokenizer == "./models/ft-math"


def test_tokenizer_must_be_base_or_a_model() -> None:
    message = only_problem(TIES.replace('tokenizer = "base"', 'tokenizer = "./models/ft-mth"'))
    assert message.startswith(
        'merge.tokenizer: \'./models/ft-mth\' is neither "base", "union" nor a model'
    )
    assert "(did you mean `./models/ft-math`?)" in message
    assert 'use "base", "union", "models[i]" or a model\'s `model` value' in message
    message = only_problem(TIES.replace('tokenizer = "base"', 'tokenizer = "unoin"'))
    assert "(did you mean `union`?)" in message
    # the base path itself is not a model of the recipe: "base" is how to name it
    message = only_problem(TIES.replace('tokenizer = "base"', 'tokenizer = "./models/base"'))
    assert message.startswith("merge.tokenizer: './models/base' is neither")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_supported_dtype(dtype: str) -> None:
    assert parse(TIES.replace('"bfloat16"', f'"{dtype}"')).dtype == dtype


@pytest.mark.parametrize(
    ("dtype", "suggestion"),
    [
        ('"float64"', " (did you mean `float16`?)"),
        ('"bfloat"', " (did you mean `bfloat16`?)"),
        ('"int8"', ""),
    ],
)
def test_bad_dtype(dtype: str, suggestion: str) -> None:
    message = only_problem(TIES.replace('"bfloat16"', dtype))
    assert message == (
        f"merge.dtype: {dtype.replace(chr(34), chr(39))} is not supported"
        f"{suggestion}; use one of float32, float16, bfloat16 (or leave it out to keep "
        "the base's dtype)"
    )


def test_dtype_must_be_a_string() -> None:
    assert only_problem(TIES.replace('"bfloat16"', "16")) == (
        "merge.dtype: must be a non-empty string, not 16"
    )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_good_devices(device: str) -> None:
    assert parse(TIES.replace('device = "auto"', f'device = "{device}"')).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "tpu"])
def test_bad_device(device: str) -> None:
    message = only_problem(TIES.replace('device = "auto"', f'device = "{device}"'))
    assert message == (
        f"merge.device: {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
    )


@pytest.mark.parametrize("seed", ["0", "42", "4294967295"])
def test_good_seeds(seed: str) -> None:
    assert parse(TIES.replace("seed = 0", f"seed = {seed}")).seed == int(seed)


@pytest.mark.parametrize(
    ("seed", "shown"),
    [
        ("-1", "-1"),
        ("1.5", "1.5"),
        ("2.0", "2.0"),
        ("true", "True"),
        ('"7"', "'7'"),
    ],
)
def test_bad_seed(seed: str, shown: str) -> None:
    assert only_problem(TIES.replace("seed = 0", f"seed = {seed}")) == (
        f"merge.seed: must be a whole number >= 0, not {shown}"
    )


@pytest.mark.parametrize(
    ("version", "shown"), [("3", "3"), ("0", "0"), ('"1"', "'1'"), ("true", "True")]
)
def test_bad_version(version: str, shown: str) -> None:
    assert only_problem(TIES.replace("version = 1", f"version = {version}")) == (
        f"version: this mergetui reads recipe versions 1 and 2, not {shown}; set version = 2"
    )


def test_version_may_be_omitted() -> None:
    assert parse(TIES.replace("version = 1\n", "")).version == 1


# --- shard size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"2GB"', 2 * 10**9),
        ('"500MiB"', 500 * 2**20),
        ('"1.5GB"', 1_500_000_000),
        ('"10 gib"', 10 * 2**30),
        ("1000000", 1_000_000),
    ],
)
def test_shard_size_parsing(value: str, expected: int) -> None:
    text = TIES.replace('shard_size = "2GB"', f"shard_size = {value}")
    assert parse(text).shard_size == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"2 gigs"', "cannot read size '2 gigs': use a number with B, KB, MB, GB, MiB or GiB"),
        ('"-1GB"', "cannot read size '-1GB'"),
        ('"0GB"', "a size must be positive"),
        ("0", "a size must be positive"),
        ("-5", "a size must be positive"),
        ("true", "expected a size such as '2GB' or '500MiB'"),
    ],
)
def test_bad_shard_size(value: str, problem: str) -> None:
    message = only_problem(TIES.replace('shard_size = "2GB"', f"shard_size = {value}"))
    assert message.startswith(f"output.shard_size: {problem}")
    assert message.endswith('; e.g. shard_size = "2GB"')


# --- syntax errors and files ---------------------------------------------------------------------


def test_toml_syntax_error_names_the_file_and_line(write_recipe: Callable[..., Path]) -> None:
    path = write_recipe(TIES.replace("[merge.parameters]", "[merge.parameters"))
    line = TIES.splitlines().index("[merge.parameters]") + 1
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    error = info.value
    assert error.path == str(path)
    assert str(error).startswith(f"{path}: not valid TOML: ")
    assert f"line {line}" in str(error)
    assert str(error).endswith("fix the syntax at that line")


def test_toml_duplicate_key_is_a_syntax_error() -> None:
    with pytest.raises(RecipeError) as info:
        parse(TIES.replace("seed = 0", "seed = 0\nseed = 1"))
    assert "not valid TOML" in str(info.value) and "line 8" in str(info.value)


def test_recipe_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(RecipeError) as info:
        load_recipe(missing)
    assert info.value.path == str(missing)
    assert info.value.problems == [f"recipe file not found ({missing.resolve()}); check the path"]
    assert str(info.value).startswith(f"{missing}: recipe file not found")


def test_recipe_path_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path)


def test_unreadable_recipe_file(write_recipe: Callable[..., Path]) -> None:
    path = write_recipe("")
    path.write_bytes(b"version = 1\n\xff\xfe")
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(path)


def test_load_resolves_relative_paths_against_the_recipe_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    path = folder / "merge.toml"
    path.write_text(TIES, encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(Path("..") / "project" / "recipes" / "merge.toml")
    assert recipe.base_dir == folder.resolve()
    assert recipe.source_file == str(Path("..") / "project" / "recipes" / "merge.toml")
    assert recipe.resolve_path(recipe.models[0].model) == folder.resolve() / "models" / "ft-code"
    assert recipe.output_dir == folder.resolve() / "merged"
    # absolute paths and ~ are not re-rooted
    assert recipe.resolve_path("/abs/model") == Path("/abs/model")
    assert recipe.resolve_path("~/m") == Path.home() / "m"


def test_load_errors_name_the_file(write_recipe: Callable[..., Path]) -> None:
    path = write_recipe(TIES.replace("density = 0.5", "density = 2", 1))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == (
        f"{path}: models[0].density: must be in (0, 1], not 2 (fraction of "
        "this model's task vector to keep)"
    )


# --- all problems at once ------------------------------------------------------------------------


def test_every_problem_is_reported_together() -> None:
    text = TIES.replace('dtype = "bfloat16"', 'dtpye = "bfloat16"')
    text = text.replace("seed = 0", "seed = -3").replace('device = "auto"', 'device = "gpu"')
    text = text.replace("normalize = true", "normalise = true")
    text = text.replace("density = 0.5", "density = 1.5", 1)  # models[0]
    text = text.replace(
        'model = "./models/ft-math"\nweight = 0.5', 'model = "./models/ft-math"\nnormalize = false'
    )  # models[1]
    text = text.replace('shard_size = "2GB"', 'shard_size = "lots"')
    error = reject(text)
    keys = [problem.split(": ", 1)[0] for problem in error.problems]
    assert keys == [
        "merge.dtpye",
        "merge.seed",
        "merge.device",
        "merge.parameters.normalise",
        "models[0].density",
        "models[1].normalize",
        "models[1].weight",
        "output.shard_size",
    ]
    assert str(error).startswith(f"{FILE}: 8 problems in the recipe:\n")
    for problem in error.problems:
        assert f"\n  - {problem}" in str(error)
        assert KEY_RE.match(problem), problem
        # the fix: an instruction after "; ", the accepted range or a "must be ..." rule
        assert re.search(r"; \S|must be |\(", problem), f"no fix in {problem!r}"


def test_unknown_method_still_reports_the_other_problems() -> None:
    text = TIES.replace('method = "ties"', 'method = "tiez"').replace(
        'device = "auto"', 'device = "tpu"'
    )
    error = reject(text)
    assert [p.split(": ")[0] for p in error.problems] == ["merge.method", "merge.device"]


def test_single_problem_message_is_one_line() -> None:
    error = reject(TIES.replace("seed = 0", "seed = -1"))
    assert str(error) == f"{FILE}: merge.seed: must be a whole number >= 0, not -1"
    assert "\n" not in str(error)


def test_error_without_a_file_has_no_prefix() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(TIES.replace("seed = 0", "seed = -1"))
    assert info.value.path is None
    assert str(info.value) == "merge.seed: must be a whole number >= 0, not -1"


# --- round trip ----------------------------------------------------------------------------------


@ALL_METHODS
@pytest.mark.parametrize("every_param", [False, True], ids=["required", "every-param"])
def test_round_trip_is_equal(spec: MethodSpec, every_param: bool, tmp_path: Path) -> None:
    original = parse(valid_data(spec, every_param=every_param), base_dir=tmp_path)
    text = recipe_to_toml(original)
    again = parse_recipe(text, base_dir=tmp_path, source_file=FILE)
    assert again == original
    # every parameter is written explicitly, so the text does not depend on today's defaults
    data = recipe_to_data(original)
    assert data["merge"].get("parameters", {}) == original.parameters
    for entry, written in zip(original.models, data["models"], strict=True):
        for name, value in entry.parameters.items():
            assert written[name] == value
    # and it reads top-down like the documented layout
    assert text.index("version") < text.index("[merge]") < text.index("[[models]]")
    assert text.count("[[models]]") == len(original.models)
    assert text.rstrip().splitlines()[-1].startswith(("path", "shard_size"))


def test_round_trip_of_the_documented_example(tmp_path: Path) -> None:
    original = parse(TIES, base_dir=tmp_path)
    assert parse(recipe_to_toml(original), base_dir=tmp_path) == original
    assert "shard_size" not in recipe_to_toml(original)  # the default is left out


def test_dump_recipe_writes_a_loadable_file(tmp_path: Path) -> None:
    original = parse(valid_data(METHODS["dare_ties"], every_param=True), base_dir=tmp_path)
    path = tmp_path / "saved.toml"
    dump_recipe(original, path)
    loaded = load_recipe(path)
    assert loaded == dataclasses.replace(original, source_file=str(path))


def test_absolute_paths_for_local_paths_that_exist(tmp_path: Path) -> None:
    for folder in ("models/base", "models/ft-0", "adapters/code-lora"):
        (tmp_path / folder).mkdir(parents=True)
    data = valid_data(METHODS["ties"], every_param=True)
    data["models"][1]["model"] = "org/hub-model"  # a Hub id: no such local path
    original = parse(data, base_dir=tmp_path)
    written = recipe_to_data(original, absolute_paths=True)
    root = tmp_path.resolve()
    assert written["merge"]["base"] == str(root / "models" / "base")
    assert written["merge"]["tokenizer"] == str(root / "models" / "ft-0")
    assert written["models"][0]["model"] == str(root / "models" / "ft-0")
    assert written["models"][0]["lora"] == str(root / "adapters" / "code-lora")
    assert written["models"][1]["model"] == "org/hub-model"
    assert written["output"]["path"] == str(root / "merged")  # absolute even before it exists
    # the absolute copy replays from anywhere and means the same merge
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    replay = parse_recipe(recipe_to_toml(original, absolute_paths=True), base_dir=elsewhere)
    assert replay.tokenizer == replay.models[0].model
    assert [replay.resolve_path(m.model) for m in replay.models] == [
        root / "models" / "ft-0",
        elsewhere / "org" / "hub-model",
    ]
    assert replay.resolve_path(replay.base or "") == root / "models" / "base"
    assert replay.output_dir == root / "merged"
    assert replay.parameters == original.parameters
    assert [m.parameters for m in replay.models] == [m.parameters for m in original.models]


def test_absolute_paths_leave_the_base_tokenizer_alone(tmp_path: Path) -> None:
    (tmp_path / "models" / "base").mkdir(parents=True)
    original = parse(TIES, base_dir=tmp_path)
    written = recipe_to_data(original, absolute_paths=True)
    assert written["merge"]["tokenizer"] == "base"
    assert written["models"][0]["model"] == "./models/ft-code"  # does not exist: left as written


def test_recipe_to_toml_does_not_mutate_the_recipe(tmp_path: Path) -> None:
    original = parse(valid_data(METHODS["ties"], every_param=True), base_dir=tmp_path)
    snapshot = copy.deepcopy(original)
    data = recipe_to_data(original)
    data["merge"]["parameters"]["lambda"] = 99.0
    data["models"][0]["density"] = 0.01
    recipe_to_toml(original, absolute_paths=True)
    assert original == snapshot
