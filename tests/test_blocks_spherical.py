"""model_stock, nuslerp and multislerp merged in blocks of rows give the bits they give whole, in
every mode their parameters select (tests/test_blocks.py covers their defaults).

Their reductions run over row chunks (:mod:`mergetui.methods.chunked`), and blocks hold whole
chunks. The engine tests merge the wide fixture whole and with a squeezed budget; the kernel tests
run the block kernels directly on tensors whose last chunk is short, with three dimensions, and on
multislerp's special cases.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from blocks_helpers import assert_same_bits, merge, squeeze, tensors_of
from conftest import method_recipe

from mergetui.engine.executor import run_merge
from mergetui.engine.plan import build_plan
from mergetui.methods.blocked import TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.registry import METHODS, BlockPlan, rows_per_chunk
from mergetui.recipe.toml_io import parse_recipe

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def zoo(wide: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wide fixture and ``still``, a copy of its base listed as a fine-tune: a model that did
    not move (the recipe refuses the base itself among the models)."""
    still = tmp_path_factory.mktemp("still") / "still"
    shutil.copytree(wide["base"], still)
    return {**wide, "still": still}


def _recipe(
    method: str,
    wide: dict[str, Path],
    output: Path,
    *,
    models: tuple[str, ...] = ("ft_a", "ft_c"),
    base: bool = False,
    params: str = "",
    weights: tuple[float, ...] = (),
) -> str:
    """``method_recipe`` with a base for the methods where it is optional, method-wide
    parameters (TOML lines) and each model's weight."""
    text = method_recipe(method, wide["base"], [wide[m] for m in models], output)
    if base and 'base = "' not in text:
        text = text.replace("seed = 7\n", f'seed = 7\nbase = "{wide["base"]}"\n')
    text = text.replace("[merge.parameters]\n", f"[merge.parameters]\n{params}")
    head, *entries = text.split("[[models]]\n")
    for index, weight in enumerate(weights):
        entries[index] = entries[index].replace("weight = 0.6\n", f"weight = {weight}\n")
    return "[[models]]\n".join([head, *entries])


VARIANTS: dict[str, dict[str, Any]] = {
    "model_stock-filter_wise": dict(method="model_stock", params="filter_wise = true\n"),
    "model_stock-whole_tensor": dict(method="model_stock", params="filter_wise = false\n"),
    "nuslerp-flatten-base": dict(method="nuslerp", base=True, weights=(0.3, 0.7)),
    "nuslerp-rows": dict(method="nuslerp", params="nuslerp_flatten = false\n", weights=(1.0, 0.2)),
    "nuslerp-rows-base": dict(method="nuslerp", base=True, params="nuslerp_flatten = false\n"),
    "nuslerp-columns": dict(
        method="nuslerp",
        params="nuslerp_flatten = false\nnuslerp_row_wise = true\n",
        weights=(0.6, 0.2),
    ),
    "nuslerp-columns-base": dict(
        method="nuslerp",
        base=True,
        params="nuslerp_flatten = false\nnuslerp_row_wise = true\n",
        weights=(0.5, 0.9),
    ),
    "multislerp-base-three": dict(
        method="multislerp", base=True, models=("ft_a", "ft_c", "still"), weights=(1.0, 0.5, 0.2)
    ),
    "multislerp-unnormalized": dict(
        method="multislerp", params="normalize_weights = false\n", weights=(2.0, 1.0)
    ),
}
EXPECTED_PASSES = {
    "model_stock-filter_wise": 1,
    "model_stock-whole_tensor": 2,
    "nuslerp-flatten-base": 2,
    "nuslerp-rows": 1,
    "nuslerp-rows-base": 1,
    "nuslerp-columns": 2,
    "nuslerp-columns-base": 2,
    "multislerp-base-three": 3,
    "multislerp-unnormalized": 3,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_mode_in_blocks_gives_the_whole_tensor_bits(
    variant: str, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """A 6 MiB budget for buffers puts the embedding and lm_head in blocks of whole row chunks
    (4096 rows of 256), read as many times as the mode needs."""
    spec = VARIANTS[variant]
    text = _recipe(wide=zoo, output=tmp_path / "whole", **spec)
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=6 << 20)
    embed = next(t for t in plan.tensors if t.name == EMBED)
    method = METHODS[str(spec["method"])]
    how = method.block_plan(embed.shape, embed.params, tuple(embed.model_params))
    assert isinstance(how, BlockPlan) and how.passes == EXPECTED_PASSES[variant]
    assert how.align_rows == rows_per_chunk(256) == 4096
    assert embed.passes == how.passes and embed.block_rows is not None
    assert embed.block_rows % how.align_rows == 0 and embed.shape[0] // embed.block_rows >= 2
    assert_same_bits(whole, blocked)


@pytest.mark.parametrize(
    "variant", ["model_stock-whole_tensor", "nuslerp-columns-base", "multislerp-unnormalized"]
)
def test_blocks_of_three_chunks_and_a_short_last_block_give_the_whole_tensor_bits(
    variant: str, wide: dict[str, Path], tmp_path: Path
) -> None:
    """Blocks must hold whole row chunks, but any number of them: 3 chunks (12288 rows) then the
    last 4096 rows, the statistics still summed over every block."""
    spec = VARIANTS[variant]
    text = _recipe(wide=wide, output=tmp_path / "whole", **spec)
    whole, _ = merge(text, tmp_path)
    plan = build_plan(parse_recipe(text.replace("whole", "blocked"), base_dir=tmp_path))
    squeeze(plan, 6 << 20)
    blocked_tensors = [t for t in plan.tensors if t.block_rows is not None]
    assert {t.name for t in blocked_tensors} >= {EMBED}
    for tensor in blocked_tensors:
        tensor.block_rows = 3 * rows_per_chunk(256)
    assert_same_bits(whole, run_merge(plan).output_dir)


def test_multislerp_of_models_that_did_not_move_keeps_the_base_in_blocks(
    zoo: dict[str, Path], tmp_path: Path
) -> None:
    text = _recipe("multislerp", zoo, tmp_path / "whole", models=("still", "still"), base=True)
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=6 << 20)
    assert next(t for t in plan.tensors if t.name == EMBED).block_rows is not None
    assert_same_bits(whole, blocked)
    base = tensors_of(zoo["base"])
    merged = tensors_of(blocked)
    assert torch.equal(merged[EMBED], base[EMBED].to(merged[EMBED].dtype))


# --- the block kernels on their own --------------------------------------------------------------


def _inputs(
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    params: Mapping[str, object],
    weights: list[float],
    rows: slice = slice(None),
) -> TensorInputs:
    """Fresh copies of ``rows`` of every input, as the engine reads them for each block."""
    return TensorInputs(
        name="model.layers.0.mlp.up_proj.weight",
        base=None if base is None else base[rows].clone(),
        models=[model[rows].clone() for model in models],
        model_params=[{"weight": weight} for weight in weights],
        params=dict(params),
    )


def _merge_whole(
    method: str,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    params: Mapping[str, object],
    weights: list[float],
) -> torch.Tensor:
    return METHODS[method].load_kernel()(_inputs(base, models, params, weights))


def _merge_in_blocks(
    method: str,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    params: Mapping[str, object],
    weights: list[float],
    chunks_per_block: int = 1,
) -> torch.Tensor:
    """The engine's passes over blocks of ``chunks_per_block`` row chunks, by hand."""
    spec = METHODS[method]
    shape = tuple(models[0].shape)
    model_params = tuple({"weight": weight} for weight in weights)
    how = spec.block_plan(shape, params, model_params)
    assert isinstance(how, BlockPlan), how
    rows, width = how.align_rows * chunks_per_block, math.prod(shape[1:])
    name = "model.layers.0.mlp.up_proj.weight"
    kernel = spec.load_block_kernel()(TensorContext(name, shape, dict(params), model_params))
    starts = range(0, shape[0], rows)
    for pass_index in range(how.passes - 1):
        for start in starts:
            block = _inputs(base, models, params, weights, slice(start, start + rows))
            kernel.observe(pass_index, block, start * width)
    return torch.cat(
        [
            kernel.merge(_inputs(base, models, params, weights, slice(s, s + rows)), s * width)
            for s in starts
        ]
    )


MODES = [
    ("model_stock", {"filter_wise": False}),
    ("model_stock", {"filter_wise": True}),
    ("nuslerp", {"nuslerp_flatten": True}),
    ("nuslerp", {"nuslerp_flatten": False}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", {"normalize_weights": True, "eps": 1e-8}),
    ("karcher", {"max_iter": 10, "tol": 1e-5}),
]


@pytest.fixture(scope="module")
def three_dimensional() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """3000 × 7 × 50: 2992 rows per chunk (a multiple of 8 rows of 350 keeps chunks 64-byte
    aligned), so the second chunk holds 8 rows."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(3000, 7, 50, generator=generator)
    return base, [base + 0.1 * torch.randn(base.shape, generator=generator) for _ in range(3)]


@pytest.mark.parametrize(
    ("method", "params", "with_base"),
    [(*mode, True) for mode in MODES]
    + [(*mode, False) for mode in MODES if mode[0] != "model_stock"],
)
def test_block_kernels_on_three_dimensions_with_a_short_last_chunk(
    method: str,
    params: dict[str, object],
    with_base: bool,
    three_dimensional: tuple[torch.Tensor, list[torch.Tensor]],
) -> None:
    base, models = three_dimensional
    count = 2 if method == "nuslerp" else 3
    weights = [1.0, 0.3, 0.6][:count]
    chosen = base if with_base else None
    assert rows_per_chunk(350) == 2992
    whole = _merge_whole(method, chosen, models[:count], params, weights)
    blocked = _merge_in_blocks(method, chosen, models[:count], params, weights)
    assert torch.equal(whole.view(torch.int32), blocked.view(torch.int32))


def test_multislerp_special_cases_in_blocks() -> None:
    """An antipodal pair whose weights cancel gives their weighted sum (here the base), block by
    block as whole; three models that cancel are the error naming the tensor, raised when the
    merging pass starts."""
    base = torch.zeros(6000, 256)
    up = torch.randn(6000, 256, generator=torch.Generator().manual_seed(3))
    params = {"normalize_weights": True, "eps": 1e-8}
    pair = _merge_in_blocks("multislerp", base, [up, -up], params, [1.0, 1.0])
    assert torch.equal(pair, _merge_whole("multislerp", base, [up, -up], params, [1.0, 1.0]))
    assert torch.equal(pair, base)
    with pytest.raises(ValueError, match=r"up_proj\.weight: .*no barycentre"):
        _merge_in_blocks("multislerp", base, [up, -up, base], params, [1.0, 1.0, 1.0])
    lone = _merge_in_blocks("multislerp", base, [up], params, [1.0])
    assert torch.equal(lone, up)


def test_a_block_that_does_not_start_on_a_chunk_is_refused() -> None:
    spec = METHODS["nuslerp"]
    base = torch.zeros(8, 256)
    kernel = spec.load_block_kernel()(
        TensorContext("x", (8192, 256), {"nuslerp_flatten": True}, ({"weight": 1.0},) * 2)
    )
    with pytest.raises(ValueError, match="inside a row chunk"):
        kernel.observe(0, _inputs(None, [base, base], {}, [1.0, 1.0]), 7 * 256)


def test_the_rules_name_one_dimensional_tensors_and_count_the_passes() -> None:
    for name in ("model_stock", "nuslerp", "multislerp"):
        reason = METHODS[name].block_plan((4096,), {}, ({"weight": 1.0},) * 2)
        assert reason == f"{name} is merged in blocks of rows; the tensor has 1 dimension"
    stock = METHODS["model_stock"]
    # per row: the vectors lie along the last axis, which blocks of the first axis hold whole
    assert stock.block_plan((64, 8, 32), {"filter_wise": True}, ({}, {})) == BlockPlan(1, 4096)
    multislerp = METHODS["multislerp"]
    assert multislerp.block_plan((10, 3), {}, ({"weight": 1.0},)) == BlockPlan(1, 349520)
    assert rows_per_chunk(1 << 21) == 1 and rows_per_chunk(4096) == 256
