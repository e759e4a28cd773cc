"""SCE and Arcee Fusion merged in blocks of rows give the bits they give whole.

Both select over the whole tensor before merging: SCE keeps the elements of highest variance
across the task vectors (an exact top-k, equal variances at the threshold kept lowest index first,
the quota carried from block to block) and weights each task vector by its mean square (summed
per whole chunk); Arcee Fusion takes the changes whose importance reaches a threshold made of
three exact quartiles. Real tiny models, really merged, whole and in blocks, compared bit for bit;
a pair of fine-tunes on a coarse grid makes huge groups of equal values at the thresholds; and the
block kernels are driven directly on small tensors for the block sizes the engine never picks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from blocks_helpers import assert_same_bits, merge, squeeze, tensors_of
from conftest import method_recipe
from safetensors.torch import save_file

from mergetui.engine.executor import run_merge
from mergetui.engine.plan import MergePlan, build_plan
from mergetui.methods import fusion, sce, sums
from mergetui.methods.blocked import TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.registry import METHODS, BlockPlan
from mergetui.recipe.toml_io import parse_recipe

EMBED = "model.embed_tokens.weight"
#: The grid of the coarse models' weights: every value and every task vector a small multiple.
STEP = 2.0**-7

CASES = {
    "sce-all": ("sce", "select_topk = 1.0\n", 2),
    "sce-top-0.3": ("sce", "select_topk = 0.3\n", 4),
    "arcee_fusion": ("arcee_fusion", "", 3),
}


def recipe(case: str, base: Path, models: list[Path], output: Path) -> str:
    method, parameters, _ = CASES[case]
    text = method_recipe(method, base, models, output, dtype="bfloat16")
    return text.replace("[merge.parameters]\n", f"[merge.parameters]\n{parameters}")


def blocked_plan(text: str, folder: Path, block_rows: int | None = None) -> MergePlan:
    """The recipe's plan with a 6 MiB budget for buffers (embedding and lm_head in blocks),
    optionally with every blocked tensor's block size forced."""
    plan = build_plan(parse_recipe(text, base_dir=folder))
    squeeze(plan, 6 << 20)
    if block_rows is not None:
        for tensor in plan.tensors:
            if tensor.block_rows is not None:
                tensor.block_rows = block_rows
    return plan


@pytest.mark.parametrize("case", list(CASES))
def test_sce_and_arcee_fusion_in_blocks_give_the_whole_tensor_bits(
    case: str, wide: dict[str, Path], tmp_path: Path
) -> None:
    method, _, passes = CASES[case]
    text = recipe(case, wide["base"], [wide["ft_a"], wide["ft_c"]], tmp_path / "whole")
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=6 << 20)
    embed = next(t for t in plan.tensors if t.name == EMBED)
    assert embed.block_rows is not None and embed.shape[0] // embed.block_rows >= 2
    how = METHODS[method].block_plan(embed.shape, embed.params, tuple(embed.model_params))
    assert isinstance(how, BlockPlan) and embed.passes == how.passes == passes
    assert embed.block_rows % how.align_rows == 0
    assert_same_bits(whole, blocked)


@pytest.mark.parametrize("native", ["1", "0"])
def test_arcee_fusion_in_blocks_of_an_odd_size_matches_whole_on_both_kernel_paths(
    native: str, wide: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fusion sums nothing across rows, so blocks may hold any number of rows: 1531 (a prime;
    the last of the 16384 rows' blocks holds 1074)."""
    monkeypatch.setenv("MERGETUI_NATIVE", native)
    text = recipe("arcee_fusion", wide["base"], [wide["ft_a"]], tmp_path / "whole")
    whole, _ = merge(text, tmp_path)
    plan = blocked_plan(text.replace("whole", "blocked"), tmp_path, block_rows=1531)
    assert not METHODS["arcee_fusion"].blocks.row_chunks
    assert_same_bits(whole, run_merge(plan).output_dir)


@pytest.fixture(scope="module")
def coarse(wide: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wide base rounded to multiples of 2⁻⁷, and two fine-tunes that move each weight by
    -2..2 steps (most by none): every task vector takes five values, so the variances and the
    importance scores come in a handful of huge groups of equal values, one of which holds
    each selection's threshold."""
    root = tmp_path_factory.mktemp("coarse")
    tensors = tensors_of(wide["base"])
    base = {name: (t.float() / STEP).round().mul(STEP).to(t.dtype) for name, t in tensors.items()}
    folders = {"base": _save(wide["base"], root / "base", base)}
    for name, seed in (("ft_x", 21), ("ft_y", 22)):
        generator = torch.Generator().manual_seed(seed)
        moved = {}
        for key, tensor in base.items():
            steps = torch.randint(-2, 3, tensor.shape, generator=generator)
            steps[torch.rand(tensor.shape, generator=generator) < 0.5] = 0
            moved[key] = (tensor.float() + steps * STEP).to(tensor.dtype)
        folders[name] = _save(wide["base"], root / name, moved)
    return folders


def _save(like: Path, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A model folder with ``like``'s config files and these weights."""
    folder.mkdir()
    for file in like.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, folder / file.name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _sce_ties(
    folders: dict[str, Path], fraction: float, block_entries: int
) -> tuple[int, int, int]:
    """For the embedding's selection: how many variances equal the threshold, how many of them
    are kept, and how many lie in the first block."""
    base = tensors_of(folders["base"])[EMBED].float()
    deltas = [tensors_of(folders[n])[EMBED].float() - base for n in ("ft_x", "ft_y")]
    variance = torch.stack(deltas).var(dim=0, unbiased=False).reshape(-1)
    keep = int(int(torch.count_nonzero(variance)) * fraction)
    threshold = variance.sort(descending=True).values[keep - 1]
    kept = keep - int(torch.count_nonzero(variance > threshold))
    first = int(torch.count_nonzero(variance[:block_entries] == threshold))
    return int(torch.count_nonzero(variance == threshold)), kept, first


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("case", ["sce-top-0.3", "arcee_fusion"])
def test_many_equal_values_at_the_thresholds_are_split_across_blocks_as_whole(
    case: str,
    native: str,
    coarse: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SCE keeps part of a group of equal variances at its threshold, more of them than the
    first block holds: the quota runs on through the blocks. Fusion's quartiles fall in groups
    of equal scores (the zeros, and a row's equal changes)."""
    monkeypatch.setenv("MERGETUI_NATIVE", native)
    text = recipe(case, coarse["base"], [coarse["ft_x"], coarse["ft_y"]], tmp_path / "whole")
    whole, _ = merge(text, tmp_path)
    plan = blocked_plan(text.replace("whole", "blocked"), tmp_path)
    embed = next(t for t in plan.tensors if t.name == EMBED)
    assert embed.block_rows is not None and embed.shape[0] // embed.block_rows >= 2
    if case.startswith("sce"):
        tied, kept, in_first_block = _sce_ties(coarse, 0.3, embed.block_rows * 256)
        assert in_first_block < kept < tied
    else:
        scores = fusion._importance(
            tensors_of(coarse["ft_x"])[EMBED].float(), tensors_of(coarse["base"])[EMBED].float()
        ).reshape(-1)
        for rank in fusion.quartile_ranks(scores.numel()):
            assert int(torch.count_nonzero(scores == scores.kthvalue(rank).values)) > 1
    assert_same_bits(whole, run_merge(plan).output_dir)


# --- the block kernels driven directly ------------------------------------------------------------


def _in_blocks(
    method: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    rows: int,
    params: dict[str, Any],
) -> torch.Tensor:
    """Run the method's block kernel over blocks of ``rows`` rows as the executor does: the
    registry's passes, fresh copies of the inputs for every block of every pass."""
    spec = METHODS[method]
    model_params: tuple[dict[str, Any], ...] = tuple({} for _ in models)
    how = spec.block_plan(tuple(base.shape), params, model_params)
    assert isinstance(how, BlockPlan)
    kernel = spec.load_block_kernel()(TensorContext("t", tuple(base.shape), params, model_params))
    width = base[0].numel()
    starts = range(0, base.shape[0], rows)

    def block(start: int) -> TensorInputs:
        piece = slice(start, start + rows)
        return TensorInputs("t", base[piece].clone(), [m[piece].clone() for m in models])

    for pass_index in range(how.passes - 1):
        for start in starts:
            kernel.observe(pass_index, block(start), start * width)
    return torch.cat([kernel.merge(block(start), start * width) for start in starts])


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("fraction", [0.3, 0.75, 1.0, 0.0])
def test_sce_kernel_in_blocks_of_whole_small_chunks_matches_whole(
    fraction: float, native: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 64 entries and rows of 16: blocks of 12 rows hold three chunks (the alignment
    the squares need) and cut the groups of equal variances anywhere; the last block is short."""
    monkeypatch.setenv("MERGETUI_NATIVE", native)
    monkeypatch.setattr(sums, "CHUNK", 64)  # the squares' chunks
    monkeypatch.setattr(sce, "elementwise_chunk", lambda like: 64)
    generator = torch.Generator().manual_seed(31)
    base = torch.randint(-8, 9, (50, 16), generator=generator).float() / 8
    models = [base + torch.randint(-2, 3, (50, 16), generator=generator) / 8 for _ in range(3)]
    params = {"select_topk": fraction}
    whole = sce.sce(TensorInputs("t", base.clone(), [m.clone() for m in models], params=params))
    blocked = _in_blocks("sce", base, models, 12, params)
    assert torch.equal(whole.view(torch.int32), blocked.view(torch.int32))
    assert torch.equal(whole, base) == (fraction == 0.0)


@pytest.mark.parametrize("pairwise", [False, True], ids=["cpu-sum", "pairwise-sum"])
def test_fusion_kernel_on_rows_wider_than_a_reduction_grain_in_single_rows(
    pairwise: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of 40000 entries, one per block: torch splits a lone row that wide across threads,
    the divergence must not. The pairwise sum (used off the CPU) is row-local by construction;
    here it is checked on the CPU, whole against blocks, and against torch's sum."""
    if pairwise:
        monkeypatch.setattr(fusion, "_row_sums", fusion._pairwise_row_sums)
    generator = torch.Generator().manual_seed(32)
    base = torch.randn(5, 40000, generator=generator)
    other = base + 0.05 * torch.randn(5, 40000, generator=generator)
    other[1] = base[1] + 1e-6 * torch.randn(40000, generator=generator)  # a divergence near 0
    scores = fusion._importance(other, base)
    for row in range(5):
        lone = fusion._importance(other[row : row + 1].clone(), base[row : row + 1].clone())
        assert torch.equal(lone.view(torch.int32), scores[row : row + 1].view(torch.int32))
    whole = fusion.arcee_fusion(TensorInputs("t", base.clone(), [other.clone()]))
    blocked = _in_blocks("arcee_fusion", base, [other], 1, {})
    assert torch.equal(whole.view(torch.int32), blocked.view(torch.int32))
    terms = torch.randn(3, 1001, generator=generator)
    exact = terms.double().sum(-1, keepdim=True)
    error = (fusion._pairwise_row_sums(terms.clone()).double() - exact).abs()
    assert torch.all(error <= 1e-6 * terms.abs().sum(-1, keepdim=True))


def test_fusion_quartiles_of_negative_scores_by_radix_match_kthvalue() -> None:
    """Scores below zero (a divergence a few ulps under 0), ±0 and ties: the order keys rank
    them like kthvalue does."""
    generator = torch.Generator().manual_seed(33)
    values = torch.randn(3000, generator=generator).mul(4).round().div(4)
    values[:100] = -0.0
    kernel = fusion._FusionBlocks(values.numel())
    kernel.selection.observe_top(values)
    kernel.selection.observe_bucket(values)
    ranks = fusion.quartile_ranks(values.numel())
    for from_top, rank in zip(kernel.from_top, ranks, strict=True):
        assert kernel._value(from_top, values.device) == values.kthvalue(rank).values


def test_the_block_rules_follow_the_parameters_and_the_shape() -> None:
    sce_spec, fusion_spec = METHODS["sce"], METHODS["arcee_fusion"]
    assert sce_spec.block_plan((4096, 512), {"select_topk": 0.5}, ({},)) == BlockPlan(4, 2048)
    assert sce_spec.block_plan((8, 4, 4), {"select_topk": 1.0}, ({},)) == BlockPlan(2, 1 << 16)
    assert fusion_spec.block_plan((100, 7), {}, ({},)) == BlockPlan(3)
    assert fusion_spec.block_plan((4, 5, 6), {}, ({},)) == BlockPlan(3)  # rows: the last axis
    reason = fusion_spec.block_plan((4096,), {}, ({},))
    assert reason == "arcee_fusion works on rows and the tensor has 1 dimension"
    della = METHODS["della"]
    dense = ({"density": 0.5},)
    assert della.block_plan((256, 4096), {}, dense) == BlockPlan(2, 256)  # steps of 256 rows
    # 4 × 8192 × 256: rows of 8192 along dimension 1, 256 per expert, steps of 128
    assert della.block_plan((4, 8192, 256), {"rescale": False}, dense) == BlockPlan(1, 1)
    assert della.block_plan((6, 8192, 64), {}, dense) == BlockPlan(2, 2)


@pytest.mark.parametrize("group_entries", [64, 40, 1])
def test_fusion_scores_by_groups_of_rows_give_the_whole_tensor_bits(
    group_entries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole-tensor path scores rows a group at a time (small temporaries): groups of 4 rows,
    of 1 row (a lone row is summed as one of two), and the 3-D and 1-D shapes."""
    generator = torch.Generator().manual_seed(33)
    for shape in [(37, 16), (5, 3, 16), (16,)]:
        base = torch.randn(shape, generator=generator)
        other = base + 0.05 * torch.randn(shape, generator=generator)
        whole = fusion._group_importance(other, base)
        monkeypatch.setattr(fusion, "elementwise_chunk", lambda like: group_entries)
        grouped = fusion._importance(other, base)
        monkeypatch.undo()
        assert torch.equal(grouped.view(torch.int32), whole.view(torch.int32)), shape


@pytest.mark.parametrize("workers", ["many_workers", "one_worker"])
def test_fusion_histograms_in_c_count_what_torch_counts(
    workers: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order keys' histograms (the quartiles' radix selection) by the C loops on any number
    of threads: the counts of the torch ops, signed zeros and both signs included."""
    from mergetui.methods import native

    if native.library() is None:
        pytest.skip("no C compiler here")
    request.getfixturevalue(workers)
    generator = torch.Generator().manual_seed(21)
    scores = torch.randn(1_000_003, generator=generator)
    scores = scores * torch.exp(torch.randn(1_000_003, generator=generator) * 3)
    scores[::17], scores[::19] = -0.0, 0.0
    top = fusion._top_counts(scores)
    bins = [int(b) for b in torch.nonzero(top).flatten()[::400]]
    buckets = [fusion._bucket_counts(scores, b) for b in bins]
    monkeypatch.setenv("MERGETUI_NATIVE", "0")
    assert torch.equal(top, fusion._top_counts(scores)) and int(top.sum()) == scores.numel()
    for b, counts in zip(bins, buckets, strict=True):
        assert torch.equal(counts, fusion._bucket_counts(scores, b)), b
    assert len(bins) > 10
