"""Blocks of tensors whose rows are not a power of two wide: the float64 sums (DARE's and
breadcrumbs' rescale, SCE's weights, SLERP's norms) run over row chunks, so blocks of whole row
chunks are small at any width and give the whole tensor's bits.

Real models have such widths (5376 in a 21B model, 14336 and 11008 in MLPs). With sums over
fixed 1M-entry chunks, the smallest block held 4096 rows of 5376 (88 MiB per input, about 1.2 GB
for four inputs and their buffers): more than the default budget. The block kernels are driven
here as the executor drives them, on a 900 × 3000 tensor: 348 rows a row chunk (pairs of rows,
so chunks stay 64-byte aligned), a short last chunk of 204 rows.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from blocks_helpers import KernelCase

from mergetui.engine.blocks import DEFAULT_MAX_MEMORY, OUTPUT_COPIES, working_bytes
from mergetui.methods.registry import METHODS, BlockPlan, rows_per_chunk

SHAPE = (900, 3000)

CASES: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]]]] = {
    "dare_ties": (
        "dare_ties",
        {"rescale": True},
        [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}],
    ),
    "dare_linear": (
        "dare_linear",
        {"rescale": True, "normalize": True},
        [{"weight": 1.0, "density": 0.3}, {"weight": 0.4, "density": 0.9}],
    ),
    "breadcrumbs-rescale": (
        "breadcrumbs",
        {"rescale": True},
        [{"weight": 1.0, "density": 0.5, "gamma": 0.05}, {"weight": 0.6, "density": 0.2}],
    ),
    "sce-select": ("sce", {"select_topk": 0.3}, [{"weight": 1.0}, {"weight": 1.0}]),
    "sce": ("sce", {"select_topk": 1.0}, [{"weight": 1.0}, {"weight": 1.0}]),
    "slerp": ("slerp", {"t": 0.35}, [{"weight": 1.0}]),
}


@pytest.fixture(scope="module")
def tensors() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Task vectors over many binades, on a small base (a large one would round them to a few
    bits, and float64 would add those exactly in any order): a chunk misplaced shows in the sums."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(SHAPE, generator=generator) * 1e-4
    deltas = [
        torch.randn(SHAPE, generator=generator)
        * torch.exp(torch.randn(SHAPE, generator=generator) * 3)
        for _ in range(2)
    ]
    return base, [base + delta for delta in deltas]


def _case(case: str, tensors: tuple[torch.Tensor, list[torch.Tensor]]) -> KernelCase:
    method, params, model_params = CASES[case]
    base, models = tensors
    return KernelCase.of(method, params, model_params, base, models)


def _statistics(kernel: Any) -> list[float]:
    """The float64 totals a block kernel has gathered: the rescale's L1 norms, SCE's squares,
    SLERP's norms and dot product. (The merged bits alone would hardly show a chunk misplaced:
    a float64 total off by an ulp rarely moves a float32 result.)"""
    if hasattr(kernel, "norms"):
        return [float(v) for n in kernel.norms.values() for v in (n.before, n.after)]
    if hasattr(kernel, "squares"):
        return [float(v) for v in kernel.squares]
    return [kernel.sums.square0, kernel.sums.square1, kernel.sums.dot]


@pytest.mark.parametrize("case", list(CASES))
def test_the_sums_over_blocks_of_row_chunks_are_the_whole_tensor_sums(
    case: str, tensors: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    kernel_case = _case(case, tensors)
    assert kernel_case.block_plan().align_rows == rows_per_chunk(SHAPE[1]) == 348
    whole = _statistics(kernel_case.observed(SHAPE[0]))
    assert whole == _statistics(kernel_case.observed(348))
    assert all(total != 0 for total in whole)


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_of_row_chunks_at_an_odd_width_give_the_whole_tensor_bits(
    case: str, tensors: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    kernel_case = _case(case, tensors)
    assert kernel_case.block_plan().passes >= 2
    whole = kernel_case.whole()
    assert torch.equal(whole.view(torch.int32), kernel_case.in_blocks(348).view(torch.int32))
    assert not torch.equal(whole, kernel_case.base)  # the merge did something


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "slerp", "sce", "breadcrumbs"])
def test_the_smallest_block_of_a_5376_wide_embedding_fits_the_default_budget(method: str) -> None:
    """A 256K × 5376 embedding of four inputs: the smallest block (one row chunk, 195 rows) and
    the next one being read, their buffers and three output copies, within the default budget's
    room for buffers — and far from it (with 1M-entry chunks it was 4096 rows, over 1 GiB)."""
    shape = (256000, 5376)
    model_params = tuple(
        {"weight": 1.0, "density": 0.5} for _ in range(3 if method != "slerp" else 1)
    )
    params = {"rescale": True, "select_topk": 0.5, "t": 0.5}
    how = METHODS[method].block_plan(shape, params, model_params)
    assert isinstance(how, BlockPlan) and how.align_rows == 195
    inputs = len(model_params) + 1
    per_row = 5376 * (2 * 4 * (inputs + METHODS[method].work_buffers) + OUTPUT_COPIES * 2)
    assert how.align_rows * per_row < working_bytes(DEFAULT_MAX_MEMORY) // 8
