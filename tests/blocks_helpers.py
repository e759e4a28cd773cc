"""Shared by the tests of tensors merged in blocks: merge a recipe whole or with the budget
squeezed, compare two outputs bit for bit, and drive a method's block kernel by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mergetui.engine.blocks import plan_memory
from mergetui.engine.executor import run_merge
from mergetui.engine.layout import out_element_size
from mergetui.engine.plan import MergePlan, build_plan
from mergetui.methods.blocked import TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.registry import METHODS, BlockPlan
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


@dataclass
class KernelCase:
    """One method and its parameters (the registry's defaults filled in, as the plan resolves
    them) on in-memory tensors: merged whole by its kernel, or block by block by its block kernel
    as the executor drives it (every pass, fresh copies of the inputs for every block)."""

    method: str
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    base: torch.Tensor
    models: list[torch.Tensor]
    name: str = "model.layers.3.mlp.down_proj.weight"
    seed: int = 11

    @classmethod
    def of(
        cls,
        method: str,
        params: dict[str, Any],
        model_params: list[dict[str, Any]],
        base: torch.Tensor,
        models: list[torch.Tensor],
    ) -> KernelCase:
        defaults = [p for p in METHODS[method].params if not p.required]
        wide = {p.name: p.default for p in defaults if p.scope == "global"}
        each = {p.name: p.default for p in defaults if p.scope == "model"}
        filled = [{**each, **given} for given in model_params]
        return cls(method, {**wide, **params}, filled, base, models[: len(filled)])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    def inputs(self, rows: slice = slice(None)) -> TensorInputs:
        """Fresh copies of ``rows`` (of the first axis) of every input."""
        return TensorInputs(
            name=self.name,
            base=self.base[rows].clone(),
            models=[model[rows].clone() for model in self.models],
            model_params=[dict(p) for p in self.model_params],
            params=dict(self.params),
            seed=self.seed,
        )

    def block_plan(self) -> BlockPlan:
        how = METHODS[self.method].block_plan(self.shape, self.params, tuple(self.model_params))
        assert isinstance(how, BlockPlan), how
        return how

    def whole(self) -> torch.Tensor:
        return METHODS[self.method].load_kernel()(self.inputs())

    def observed(self, rows: int) -> Any:
        """The block kernel after every pass but the merging one, over blocks of ``rows``."""
        context = TensorContext(
            self.name, self.shape, dict(self.params), tuple(self.model_params), self.seed
        )
        kernel = METHODS[self.method].load_block_kernel()(context)
        width = math.prod(self.shape[1:])
        for pass_index in range(self.block_plan().passes - 1):
            for start in range(0, self.shape[0], rows):
                kernel.observe(pass_index, self.inputs(slice(start, start + rows)), start * width)
        return kernel

    def in_blocks(self, rows: int) -> torch.Tensor:
        kernel = self.observed(rows)
        width = math.prod(self.shape[1:])
        starts = range(0, self.shape[0], rows)
        return torch.cat([kernel.merge(self.inputs(slice(s, s + rows)), s * width) for s in starts])
