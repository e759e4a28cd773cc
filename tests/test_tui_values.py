"""The recipe draft carries what version 2 recipes say (slices, gradients, filtered values), and the
method step's fields read gradients and overrides. No app here: the pilot tests are in
test_tui_slices.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergetui.methods.registry import get_method
from mergetui.recipe import load_recipe, recipe_to_toml
from mergetui.recipe.params import Filtered, Gradient
from mergetui.recipe.validate import validate_recipe_data
from mergetui.tui import values
from mergetui.tui.state import ModelDraft, RecipeDraft


def slices_toml(models: dict[str, Path], output: Path | str = "merged") -> str:
    """Two slices of the same tiny 2-layer models' layers 0-1 (a 4-layer frankenmerge), with
    filtered, gradient and per-source weights, plus keys the wizard does not edit."""
    return f"""version = 2
[merge]
method = "task_arithmetic"
base = "{models["base"]}"
device = "cpu"
tokenizer = "{models["ft_a"]}"
[merge.parameters.weight]
self_attn = [0, 0.5, 1]
default = 0.5
[[slices]]
[[slices.sources]]
model = "{models["base"]}"
layer_range = [0, 2]
[[slices.sources]]
model = "{models["ft_a"]}"
layer_range = [0, 2]
[[slices]]
[slices.parameters]
weight = [1, 0]
[[slices.sources]]
model = "{models["base"]}"
layer_range = [0, 2]
[[slices.sources]]
model = "{models["ft_a"]}"
layer_range = [0, 2]
weight = 0.25
[output]
path = "{output}"
shard_size = "1MB"
"""


def test_a_slices_recipe_survives_the_draft(tmp_path: Path, models: dict[str, Path]) -> None:
    file = tmp_path / "slices.toml"
    file.write_text(slices_toml(models), encoding="utf-8")
    recipe = load_recipe(file)
    draft = RecipeDraft.from_recipe(recipe)
    assert len(draft.slices) == 2 and draft.models == []
    data = draft.to_data()
    assert data["version"] == 2 and "models" not in data
    assert data["merge"]["parameters"]["weight"] == {
        "self_attn": [0.0, 0.5, 1.0],
        "default": 0.5,
    }
    again = validate_recipe_data(data, base_dir=draft.base_dir)
    assert recipe_to_toml(again) == recipe_to_toml(recipe)
    assert again.slices == recipe.slices and again.parameters == recipe.parameters
    assert again.tokenizer == str(models["ft_a"]) and again.shard_size == 1_000_000
    # the autosave keeps it too, and the draft's data is its own (not the recipe's lists)
    draft.autosave()
    restored = RecipeDraft.load_autosave()
    assert restored is not None and restored.to_data() == data
    restored.slices[0]["sources"][0]["layer_range"][1] = 1
    assert draft.slices[0]["sources"][0]["layer_range"] == [0, 2]
    assert draft.slice_lines() == [
        f"slices[0]: {models['base']} layers 0-1 + {models['ft_a']} layers 0-1",
        f"slices[1]: {models['base']} layers 0-1 + {models['ft_a']} layers 0-1 (weight = 0.25); "
        "weight = [1.0, 0.0]",
    ]


def test_a_mergekit_config_of_slices_opens_as_a_draft(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """`mergetui open CONFIG.yaml`: a frankenmerge's slices come through the draft unchanged."""
    config = tmp_path / "frankenmerge.yaml"
    config.write_text(
        "merge_method: passthrough\n"
        "dtype: bfloat16\n"
        "slices:\n"
        f"  - sources:\n      - model: {models['base']}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {models['ft_a']}\n        layer_range: [1, 2]\n",
        encoding="utf-8",
    )
    recipe = load_recipe(config)
    draft = RecipeDraft.from_recipe(recipe)
    assert draft.to_data()["version"] == 2
    assert recipe_to_toml(draft.to_recipe()) == recipe_to_toml(recipe)
    assert draft.slice_lines() == [
        f"slices[0]: {models['base']} layers 0-1",
        f"slices[1]: {models['ft_a']} layer 1",
    ]


def test_a_slices_draft_without_a_base_is_still_autosaved(tmp_path: Path) -> None:
    draft = RecipeDraft(
        method="linear",
        slices=[{"sources": [{"model": "./a", "layer_range": [0, 2]}]}],
        base_dir=tmp_path,
    )
    assert not draft.is_empty
    draft.autosave()
    restored = RecipeDraft.load_autosave()
    assert restored is not None and restored.slices == draft.slices


def test_version_2_only_when_the_draft_needs_it(tmp_path: Path) -> None:
    draft = RecipeDraft(
        base="./base",
        models=[ModelDraft("./a", parameters={"weight": 1.0, "density": 0.5})],
        base_dir=tmp_path,
    )
    assert draft.to_data()["version"] == 1
    draft.models[0].parameters["density"] = [0.2, 0.8]
    assert draft.to_data()["version"] == 2
    draft.models[0].parameters["density"] = 0.5
    draft.parameters["lambda"] = {"mlp": 0.5, "default": 1.0}
    assert draft.to_data()["version"] == 2


def test_gradients_and_filters_validate_from_the_drafts_data(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    draft = RecipeDraft(
        base=str(models["base"]),
        models=[
            ModelDraft(str(models["ft_a"]), parameters={"weight": [0.0, 0.5, 1.0]}),
            ModelDraft(
                str(models["ft_c"]),
                parameters={"weight": 1.0, "density": {"self_attn": 0.3, "default": [1.0, 0.5]}},
            ),
        ],
        base_dir=tmp_path,
    )
    recipe = draft.to_recipe()
    assert recipe.version == 2
    assert recipe.models[0].parameters["weight"] == Gradient((0.0, 0.5, 1.0))
    assert recipe.models[1].parameters["density"] == Filtered(
        (("self_attn", 0.3), ("default", Gradient((1.0, 0.5))))
    )
    assert recipe_to_toml(RecipeDraft.from_recipe(recipe).to_recipe()) == recipe_to_toml(recipe)


WEIGHT = get_method("ties").param("weight")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("", None),
        ("0.5", 0.5),
        ("0, 0.5, 1", [0.0, 0.5, 1.0]),
        ("[0, 0.5, 1]", [0.0, 0.5, 1.0]),
        (" [1,0] ", [1.0, 0.0]),
        ("[0.5]", [0.5]),
        ("0, 1,", [0.0, 1.0]),
        ("0, x", [0.0, "x"]),  # the validator says what is wrong with "x", naming the key
        ("abc", "abc"),
    ],
)
def test_a_value_field_reads_numbers_and_gradients(text: str, value: object) -> None:
    assert values.parse_value(WEIGHT, text) == (value, None)


@pytest.mark.parametrize("text", ["[0, 1", "0, 1]", "[[0, 1]]", "0,,1", "[]", ","])
def test_a_value_field_that_cannot_be_read_says_why(text: str) -> None:
    value, problem = values.parse_value(WEIGHT, text)
    assert value is None and problem


def test_overrides_read_in_order_with_gradients() -> None:
    overrides, problem = values.parse_overrides(WEIGHT, "self_attn=0.3, mlp=[1,0.5,0], lm_head=2")
    assert problem is None
    assert list(overrides.items()) == [
        ("self_attn", 0.3),
        ("mlp", [1.0, 0.5, 0.0]),
        ("lm_head", 2.0),
    ]
    assert values.parse_overrides(WEIGHT, "  ") == ({}, None)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("mlp", "write filter=value"),
        ("=0.3", "a filter is part of a tensor name"),
        ("self attn=0.3", "without spaces"),
        ("mlp=", "no value after ="),
        ("mlp=[1, 0.5", "a [ without its ]"),
        ("mlp=1]", "a ] without its ["),
        ("mlp=1, mlp=2", "mlp is given twice"),
        ("mlp=[[1]]", "nested"),
    ],
)
def test_overrides_that_cannot_be_read_say_why(text: str, says: str) -> None:
    overrides, problem = values.parse_overrides(WEIGHT, text)
    assert overrides == {} and problem is not None and says in problem, problem


def test_the_two_fields_make_one_value_and_split_back() -> None:
    assert values.combine(0.5, {}) == (0.5, None)
    assert values.combine(None, {}) == (None, None)
    combined, _ = values.combine([0.0, 1.0], {"mlp": 0.7})
    assert list(combined.items()) == [("mlp", 0.7), ("default", [0.0, 1.0])]
    assert values.combine(None, {"mlp": 0.7}) == ({"mlp": 0.7}, None)
    value, problem = values.combine(0.5, {"default": 0.2})
    assert value is None and problem is not None and "default is given twice" in problem
    assert values.split(combined) == ([0.0, 1.0], {"mlp": 0.7})
    # a default that is not last stays in the overrides: moving it would change which one wins
    assert values.split({"default": 0.5, "mlp": 0.7}) == (None, {"default": 0.5, "mlp": 0.7})
    text = values.overrides_text(WEIGHT, {"self_attn": 0.3, "mlp": [1.0, 0.5]})
    assert text == "self_attn=0.3, mlp=[1.0, 0.5]"
    assert values.parse_overrides(WEIGHT, text) == ({"self_attn": 0.3, "mlp": [1.0, 0.5]}, None)


def test_a_gradient_is_drawn_across_the_layers() -> None:
    rising = values.curve([0.0, 1.0])
    assert len(rising) == values.CURVE_POINTS and rising[0] == "▁" and rising[-1] == "█"
    peak = values.curve([0.0, 1.0, 0.0])
    assert peak[0] == peak[-1] == "▁" and "█" in peak
    assert values.curve(0.5) == values.curve([0.5]) == values.curve([0, "x"]) == ""
