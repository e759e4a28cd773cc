"""The CUDA path: every method on a GPU gives the CPU's result, and the VRAM figures are real.

Marked ``cuda`` and skipped where no GPU is visible (CI has none); ``bench/gpu_check.sh`` runs them
on a GPU machine together with the bench-size checks. ``MERGETUI_CHECK_DEVICE=cpu`` runs them on
the CPU instead (a dry run of the check, so it cannot fail on the GPU machine for a silly reason).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CHECK_DEVICE, check_device_marks, method_recipe
from safetensors.torch import load_file

from mergetui.engine.executor import run_merge
from mergetui.engine.plan import build_plan
from mergetui.events import Event, ProgressEvent
from mergetui.methods.registry import METHODS
from mergetui.recipe import parse_recipe

DEVICE = CHECK_DEVICE
pytestmark = check_device_marks()


def _merge(
    tmp_path: Path, models: dict[str, Path], method: str, device: str, name: str = "merged"
) -> tuple:
    text = method_recipe(
        method,
        models["base"],
        [models["ft_a"], models["ft_b"], models["ft_c"]],
        tmp_path / name,
        device=device,
    )
    events: list[Event] = []
    plan = build_plan(parse_recipe(text, base_dir=tmp_path))
    estimate = plan.estimates.peak_vram_bytes if plan.estimates else None
    result = run_merge(plan, on_event=events.append)
    tensors = {}
    for file in sorted(result.output_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors, events, estimate


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_cuda_gives_the_cpu_result(
    tmp_path: Path, models: dict[str, Path], method: str
) -> None:
    on_cpu, _, _ = _merge(tmp_path, models, method, "cpu", "reference")
    on_gpu, _, _ = _merge(tmp_path, models, method, DEVICE, "on-device")
    assert on_cpu.keys() == on_gpu.keys()
    for name, expected in on_cpu.items():
        if METHODS[method].randomized:  # counter-based masks, drawn on the device: CPU bits
            assert torch.equal(on_gpu[name], expected), name
        else:  # float32 math in another order: float tolerance
            torch.testing.assert_close(on_gpu[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_progress_names_the_merge_gpu_and_stays_under_the_estimate(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    _, events, estimate = _merge(tmp_path, models, "ties", DEVICE)
    progress = [e for e in events if isinstance(e, ProgressEvent)]
    last = progress[-1]
    if DEVICE == "cpu":  # the dry run: no GPU figures at all
        assert last.gpus is None and last.gpu_bytes is None and estimate is None
        return
    assert last.gpus and last.gpus[0].total_bytes > last.gpus[0].used_bytes > 0
    assert last.gpu_peak_bytes is not None and last.gpu_peak_bytes > 0
    assert estimate is not None and last.gpu_peak_bytes <= estimate, (last, estimate)


def test_philox_on_the_device_gives_the_cpu_bits() -> None:
    """DARE's and DELLA's uniforms are made on the device (no CPU draws, no copy) by the torch
    rounds of :mod:`mergetui.methods.philox`: the bits of the CPU's torch path and C loops, at
    unaligned starts and across the torch path's pieces; and DARE's drop there masks alike."""
    from mergetui.methods import native, philox
    from mergetui.methods.task_arithmetic import drop_at_random_

    key = 0x5DEECE66D1234567
    for start, count in ((0, 5), (3, 4099), (4 * (1 << 32) - 2, 1001), (7, (1 << 20) + 13)):
        on_device = philox.uniform(key, start, count, DEVICE)
        assert on_device.device.type == torch.device(DEVICE).type
        expected = philox.uniform(key, start, count, "cpu")
        assert torch.equal(on_device.cpu(), expected), (start, count)
        library = native.library()
        if library is not None:
            made = torch.empty(count)
            library.mt_philox_uniform(made.data_ptr(), key, start, 0, count)
            assert torch.equal(made, expected), (start, count)
    delta = torch.randn(3 << 20, generator=torch.Generator().manual_seed(1))
    on_cpu = delta.clone()
    drop_at_random_(on_cpu, 0.35, key, 5)
    on_device = delta.to(DEVICE)
    drop_at_random_(on_device, 0.35, key, 5)
    assert torch.equal(on_device.cpu(), on_cpu)


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic", "passthrough"])
def test_blocks_on_cuda_give_the_whole_tensor_bits(
    tmp_path: Path, models: dict[str, Path], method: str
) -> None:
    """The blocked engine on the device: the embedding and lm_head (64 x 32) go in blocks of a
    few rows, with the same bits as the same merge done whole on the device. (DARE needs blocks
    of whole row chunks, about 1M entries, more than these models have: ``bench/gpu_check.py``
    checks it on the bench models. Realigned vocabularies, Karcher and DELLA on fused experts
    have their device checks beside their block tests: ``-m cuda`` runs them all.)"""
    from mergetui.engine.blocks import plan_memory
    from mergetui.engine.layout import out_element_size

    whole, _, _ = _merge(tmp_path, models, method, DEVICE, "whole")
    text = method_recipe(
        method,
        models["base"],
        [models["ft_a"], models["ft_b"], models["ft_c"]],
        tmp_path / "blocked",
        device=DEVICE,
    )
    plan = build_plan(parse_recipe(text, base_dir=tmp_path))
    plan.memory = plan_memory(
        plan.tensors, plan.method, out_element_size(plan.out_dtype), None, set(), working=16 << 10
    )
    assert any(t.block_rows for t in plan.tensors)
    result = run_merge(plan)
    blocked = {}
    for file in sorted(result.output_dir.glob("*.safetensors")):
        blocked.update(load_file(file))
    assert blocked.keys() == whole.keys()
    for name, expected in whole.items():
        assert torch.equal(blocked[name], expected), name
