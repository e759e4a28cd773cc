"""mergekit's own example configs, scaled down to the tiny zoo: ``mergetui run CONFIG.yaml`` gives
the output mergekit 0.1.5 gives for the same YAML, and so does the recipe ``mergetui import``
writes for it (and the YAML ``mergetui export`` writes back, run by mergekit).

The configs follow mergekit's ``examples/``: gradient-slerp (one curve for attention, another for
the MLP, a default for the rest), linear, ties with gradients over the layers (ties.yml's shape,
with mergekit's ``ties`` rather than ``ranked_ties``), bio-merge (ties with ``int8_mask``), the
44-layer frankenmerge (two overlapping ranges stacked) and a TIES whose density is filtered by
attention and MLP. The zoo's models have 4 layers, so ranges are scaled from 40 to 4.
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
from mergekit_ref import MergekitReference, assert_same_config, assert_same_model

from mergetui.engine.executor import run_merge
from mergetui.engine.plan import build_plan
from mergetui.recipe import load_recipe
from mergetui.recipe.mergekit_yaml import mergekit_to_toml, recipe_to_mergekit
from mergetui.recipe.toml_io import recipe_to_data

CONFIGS = {
    "gradient-slerp": """
        slices:
          - sources:
              - model: {ft1}
                layer_range: [0, 4]
              - model: {ft2}
                layer_range: [0, 4]
        merge_method: slerp
        base_model: {ft1}
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
    """,
    "linear": """
        models:
          - model: {ft1}
            parameters:
              weight: 1.0
          - model: {ft2}
            parameters:
              weight: 0.3
          - model: {ft3}
            parameters:
              weight: [0.2, 0.9]
        merge_method: linear
        dtype: float32
    """,
    "ties-gradients": """
        models:
          - model: {ft1}
            parameters:
              density: [0.8, 0.3, 0.1]
              weight: [1.0, 0.8, 0.5]
          - model: {ft2}
            parameters:
              density: [0.1, 0.4, 0.1]
              weight: [0.2, 0.8, 0.1]
          - model: {ft3}
            parameters:
              density: [0.1, 0.2, 0.6]
              weight: [0.5, 0.8, 1.0]
        merge_method: ties
        base_model: {base}
        dtype: float32
    """,
    "bio-merge": """
        models:
          - model: {ft1}
            parameters:
              density: 0.5
              weight: 0.5
          - model: {ft2}
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: {base}
        parameters:
          normalize: false
          int8_mask: true
        dtype: float32
    """,
    "frankenmerge-44-layer": """
        slices:
          - sources:
            - model: {ft1}
              layer_range: [0, 3]
          - sources:
            - model: {ft2}
              layer_range: [1, 4]
        merge_method: passthrough
        dtype: float32
    """,
    "ties-filtered-density": """
        models:
          - model: {base}
          - model: {ft1}
            parameters:
              weight: 1.0
              density:
                - filter: self_attn
                  value: 0.3
                - filter: mlp
                  value: [0.9, 0.2]
                - value: 0.6
          - model: {ft2}
            parameters:
              weight: 0.6
        merge_method: ties
        base_model: {base}
        parameters:
          density:
            - filter: mlp
              value: 0.4
            - value: 0.8
          normalize: true
        dtype: float32
    """,
    "slices-merged-and-stacked": """
        slices:
          - sources:
              - model: {base}
                layer_range: [0, 2]
              - model: {ft1}
                layer_range: [0, 2]
              - model: {ft2}
                layer_range: [0, 2]
            parameters:
              weight: [1.0, 0.2]
          - sources:
              - model: {base}
                layer_range: [1, 4]
              - model: {ft3}
                layer_range: [1, 4]
        merge_method: task_arithmetic
        base_model: {base}
        parameters:
          weight: 0.5
        dtype: float32
    """,
    # methods beyond the first seven (issue 12)
    "model-stock": """
        models:
          - model: {ft1}
          - model: {ft2}
          - model: {ft3}
        merge_method: model_stock
        base_model: {base}
        dtype: float32
    """,
    "model-stock-filter-wise": """
        models:
          - model: {ft1}
          - model: {ft2}
        merge_method: model_stock
        base_model: {base}
        parameters:
          filter_wise: true
        dtype: float32
    """,
    "karcher": """
        models:
          - model: {ft1}
          - model: {ft2}
          - model: {ft3}
        merge_method: karcher
        parameters:
          max_iter: 20
          tol: 1.0e-6
        dtype: float32
    """,
    "karcher-with-base": """
        models:
          - model: {ft1}
          - model: {ft2}
        merge_method: karcher
        base_model: {base}
        dtype: float32
    """,
    "nearswap": """
        models:
          - model: {ft1}
        merge_method: nearswap
        base_model: {base}
        parameters:
          t: [0.0001, 0.01]
        dtype: float32
    """,
    "breadcrumbs": """
        models:
          - model: {ft1}
            parameters:
              weight: 1.0
              density: 0.6
              gamma: 0.05
          - model: {ft2}
            parameters:
              weight: 0.5
              density: [0.9, 0.3]
              gamma: 0.0
        merge_method: breadcrumbs
        base_model: {base}
        dtype: float32
    """,
    "breadcrumbs-ties-rescaled": """
        models:
          - model: {ft1}
            parameters:
              weight: 1.0
              density: 0.5
          - model: {ft2}
            parameters:
              weight: 0.7
              density: 0.4
              gamma: 0.3
          - model: {ft3}
            parameters:
              weight: 0.4
              density: 0.8
              gamma: 0.5
        merge_method: breadcrumbs_ties
        base_model: {base}
        parameters:
          rescale: true
          normalize: true
        dtype: float32
    """,
    "sce": """
        models:
          - model: {ft1}
          - model: {ft2}
          - model: {ft3}
        merge_method: sce
        base_model: {base}
        parameters:
          select_topk: 0.3
        dtype: float32
    """,
    "sce-all": """
        models:
          - model: {ft1}
          - model: {ft2}
        merge_method: sce
        base_model: {base}
        dtype: float32
    """,
    "nuslerp": """
        models:
          - model: {ft1}
            parameters:
              weight: 0.3
          - model: {ft2}
            parameters:
              weight: 0.7
        merge_method: nuslerp
        base_model: {base}
        dtype: float32
    """,
    "nuslerp-rows-no-base": """
        models:
          - model: {ft1}
            parameters:
              weight: [1.0, 0.2]
          - model: {ft3}
            parameters:
              weight: 0.6
        merge_method: nuslerp
        parameters:
          nuslerp_flatten: false
        dtype: float32
    """,
    "nuslerp-columns": """
        models:
          - model: {ft2}
            parameters:
              weight: 0.5
          - model: {ft3}
            parameters:
              weight: 0.5
        merge_method: nuslerp
        base_model: {base}
        parameters:
          nuslerp_flatten: false
          nuslerp_row_wise: true
        dtype: float32
    """,
    "multislerp": """
        models:
          - model: {ft1}
            parameters:
              weight: 1.0
          - model: {ft2}
            parameters:
              weight: 0.5
          - model: {ft3}
            parameters:
              weight: [0.2, 0.8]
        merge_method: multislerp
        base_model: {base}
        dtype: float32
    """,
    "multislerp-no-base": """
        models:
          - model: {ft1}
            parameters:
              weight: 2.0
          - model: {ft2}
            parameters:
              weight: 1.0
        merge_method: multislerp
        parameters:
          normalize_weights: false
        dtype: float32
    """,
    "arcee-fusion": """
        models:
          - model: {ft1}
        merge_method: arcee_fusion
        base_model: {base}
        dtype: float32
    """,
    "ram": """
        models:
          - model: {ft1}
          - model: {ft2}
          - model: {ft3}
        merge_method: ram
        base_model: {base}
        parameters:
          epsilon: 0.03
        dtype: float32
    """,
    "ramplus-tl": """
        models:
          - model: {ft1}
          - model: {ft2}
          - model: {ft3}
        merge_method: ramplus_tl
        base_model: {base}
        parameters:
          epsilon: 0.04
          r: 0.5
          alpha: 0.3
        dtype: float32
    """,
}


def config_text(name: str, zoo: dict[str, Path]) -> str:
    return textwrap.dedent(CONFIGS[name]).lstrip("\n").format(**zoo)


def run_yaml(config: Path, output: Path) -> Path:
    """``mergetui run CONFIG.yaml -o OUTPUT --device cpu``, in process."""
    recipe = dataclasses.replace(load_recipe(config), output_path=str(output), device="cpu")
    return run_merge(build_plan(recipe)).output_dir


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mergekit_config_gives_mergekits_output(
    name: str, mergekit: MergekitReference, mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    text = config_text(name, mk_zoo)
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    theirs = mergekit.merge(text, tmp_path / "mergekit")
    ours = run_yaml(config, tmp_path / "mergetui")

    assert_same_model(ours, theirs)
    assert_same_config(ours, theirs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_export_round_trip(name: str, mk_zoo: dict[str, Path], tmp_path: Path) -> None:
    """import → export → import gives the same recipe."""
    text = config_text(name, mk_zoo)
    first_toml, _ = mergekit_to_toml(
        text, source_file="a.yaml", base_dir=tmp_path, target_dir=tmp_path
    )
    (tmp_path / "a.toml").write_text(first_toml, encoding="utf-8")
    first = load_recipe(tmp_path / "a.toml")
    exported = recipe_to_mergekit(first, target_dir=tmp_path)
    second_toml, _ = mergekit_to_toml(
        exported, source_file="b.yaml", base_dir=tmp_path, target_dir=tmp_path
    )
    (tmp_path / "b.toml").write_text(second_toml, encoding="utf-8")
    second = load_recipe(tmp_path / "b.toml")
    assert recipe_to_data(second) == recipe_to_data(first)


@pytest.mark.parametrize("name", ["gradient-slerp", "frankenmerge-44-layer", "ties-gradients"])
def test_exported_recipe_gives_the_same_output_in_mergekit(
    name: str, mergekit: MergekitReference, mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    """export → mergekit gives the tensors mergetui gives for the recipe."""
    toml_text, _ = mergekit_to_toml(
        config_text(name, mk_zoo), source_file="c.yaml", base_dir=tmp_path, target_dir=tmp_path
    )
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text(toml_text, encoding="utf-8")
    recipe = dataclasses.replace(
        load_recipe(recipe_file), output_path=str(tmp_path / "ours"), device="cpu"
    )
    ours = run_merge(build_plan(recipe)).output_dir
    theirs = mergekit.merge(recipe_to_mergekit(recipe, target_dir=tmp_path), tmp_path / "theirs")
    assert_same_model(ours, theirs)
    assert_same_config(ours, theirs)


def test_frankenmerge_output_loads_and_generates(mk_zoo: dict[str, Path], tmp_path: Path) -> None:
    """The stacked model is a real model: 6 layers in config.json and in the weights, and
    transformers loads it and generates."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tmp_path / "config.yaml"
    config.write_text(config_text("frankenmerge-44-layer", mk_zoo), encoding="utf-8")
    out = run_yaml(config, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    tokens = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)
