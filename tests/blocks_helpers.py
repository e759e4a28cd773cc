"""Shared by the tests of tensors merged in blocks: merge a recipe whole or with the budget
squeezed, and compare two outputs bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mergetui.engine.blocks import plan_memory
from mergetui.engine.executor import run_merge
from mergetui.engine.layout import out_element_size
from mergetui.engine.plan import MergePlan, build_plan
from mergetui.recipe.toml_io import parse_recipe


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def assert_same_bits(whole: Path, blocked: Path) -> None:
    expected, actual = tensors_of(whole), tensors_of(blocked)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor.view(torch.uint8), actual[name].view(torch.uint8)), name


def squeeze(plan: MergePlan, working: int) -> None:
    """Re-plan the budget as if only ``working`` bytes were left for buffers."""
    plan.memory = plan_memory(
        plan.tensors,
        plan.method,
        out_element_size(plan.out_dtype),
        None,
        {source.role for source in plan.sources if source.lora is not None},
        working=working,
    )


def merge(text: str, folder: Path, working: int | None = None) -> tuple[Path, MergePlan]:
    recipe = parse_recipe(text, base_dir=folder)
    plan = build_plan(recipe)
    if working is not None:
        squeeze(plan, working)
    return run_merge(plan).output_dir, plan
