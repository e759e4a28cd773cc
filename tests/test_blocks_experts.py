"""Tensors of three dimensions (a fused mixture of experts' weights: experts × rows × columns)
under the methods that work on rows, merged in blocks of the first axis with the whole tensor's
bits.

DELLA ranks along dimension 1 (mergekit's rows, so ``prod(shape[2:])`` rows per expert), and
sums its L1 norms per step of ``CHUNK // shape[1]`` rows: blocks hold whole experts, enough of
them for whole steps. Arcee fusion scores rows along the last axis, which any block of experts
holds whole. The engine test merges a fused Mixtral (gate_up_proj 4 × 8192 × 256) whole and with
the budget squeezed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from blocks_helpers import KernelCase, assert_same_bits, merge, tensors_of
from conftest import CHECK_DEVICE, method_recipe, on_check_device

#: rows of 8192 along dimension 1: steps of 128 rows, so blocks of 2 experts (64 rows each)
SHAPE = (6, 8192, 64)

CASES = {
    "della-rescale": (
        "della",
        {"rescale": True},
        [{"weight": 1.0, "density": 0.4, "epsilon": 0.1}, {"weight": 0.5, "density": 0.7}],
    ),
    "della_linear-without-rescale": (
        "della_linear",
        {"rescale": False},
        [{"weight": 1.0, "density": 0.3}, {"weight": 1.0, "density": 0.6, "epsilon": 0.2}],
    ),
    "arcee_fusion": ("arcee_fusion", {}, [{"weight": 1.0}]),
}


@pytest.fixture(scope="module")
def experts() -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(SHAPE, generator=generator)
    return base, [base + 0.05 * torch.randn(SHAPE, generator=generator) for _ in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_three_dimensional_blocks_of_whole_experts_give_the_whole_tensor_bits(
    case: str, experts: tuple[torch.Tensor, list[torch.Tensor]]
) -> None:
    method, params, model_params = CASES[case]
    kernel_case = KernelCase.of(method, params, model_params, *experts)
    kernel_case.name = "model.layers.0.mlp.experts.gate_up_proj"
    rows = kernel_case.block_plan().align_rows
    assert rows == (2 if method.startswith("della") else 1)
    whole = kernel_case.whole()
    assert torch.equal(whole.view(torch.int32), kernel_case.in_blocks(rows).view(torch.int32))
    assert torch.equal(whole.view(torch.int32), kernel_case.in_blocks(3 * rows).view(torch.int32))
    assert not torch.equal(whole, kernel_case.base)


@pytest.mark.parametrize("method", ["della", "arcee_fusion"])
def test_a_fused_mixtral_in_blocks_of_experts_gives_the_whole_merge(
    method: str, fused_experts: dict[str, Path], tmp_path: Path
) -> None:
    models = [fused_experts["ft_a"]] + ([fused_experts["ft_c"]] if method == "della" else [])
    text = method_recipe(method, fused_experts["base"], models, tmp_path / "whole")
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=120 << 20)
    experts = [t for t in plan.tensors if len(t.shape) == 3]
    assert {t.name for t in experts} == {
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    }
    gate_up = next(t for t in experts if t.name.endswith("gate_up_proj"))
    assert gate_up.block_rows is not None and gate_up.block_rows < gate_up.shape[0]
    assert plan.memory is not None and plan.memory.over_budget == ()
    assert_same_bits(whole, blocked)


@on_check_device
@pytest.mark.parametrize("method", ["della", "karcher"])
def test_a_fused_mixtral_in_blocks_on_the_check_device(
    method: str, fused_experts: dict[str, Path], tmp_path: Path
) -> None:
    """On the GPU (``bench/gpu_check.sh``): blocks of experts give the whole merge's bits on the
    device, and the CPU's result to float tolerance (DELLA's draws: the CPU's bits)."""
    models = [fused_experts["ft_a"], fused_experts["ft_c"]]

    def text_for(output: str, device: str) -> str:
        return method_recipe(
            method, fused_experts["base"], models, tmp_path / output, device=device
        )

    on_cpu, _ = merge(text_for("on-cpu", "cpu"), tmp_path)
    whole, _ = merge(text_for("whole", CHECK_DEVICE), tmp_path)
    blocked, plan = merge(text_for("blocked", CHECK_DEVICE), tmp_path, working=120 << 20)
    assert any(t.block_rows for t in plan.tensors if len(t.shape) == 3)
    assert_same_bits(whole, blocked)
    expected, found = tensors_of(on_cpu), tensors_of(whole)
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
