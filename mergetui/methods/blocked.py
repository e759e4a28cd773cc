"""Merging one tensor in blocks of rows, for tensors larger than the memory budget allows whole.

The engine reads a large tensor as consecutive blocks of rows (every input's same rows) and hands
each block to a :class:`BlockKernel` as an ordinary :class:`TensorInputs`. A method whose math is
independent from one element (or row) to the next merges each block with its plain kernel
(:func:`independent_blocks`). A method that needs a whole-tensor statistic first (TIES' k-th
largest magnitude, DARE's L1 norms) declares ``passes`` in the registry (per tensor, with
``Blocks.rule``, when its parameters change them): the engine reads the tensor that many times,
the kernel gathers its statistics from the blocks of the first passes (``observe``) and merges on
the last one (``merge``), exactly as the whole tensor would be merged — the same bits, which the
tests check method by method.

The same bits need the same arithmetic: a sum is taken over the same chunks in the same order
whole and in blocks (blocks are aligned to whole row chunks: ``BlockPlan.align_rows``), a random
stream is drawn in the same calls, and an order statistic is found exactly (a radix selection
over the blocks, :class:`~mergetui.methods.task_arithmetic_blocks.BlockedSelection`). Where it is
simpler, the whole-tensor kernel is the block kernel run over the tensor as one block
(:mod:`mergetui.methods.chunked`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from mergetui.methods.inputs import TensorInputs


@dataclass(frozen=True)
class TensorContext:
    """What a block kernel knows about the whole tensor before its first block arrives."""

    name: str
    shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)
    model_params: tuple[dict[str, Any], ...] = ()
    seed: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class BlockKernel(Protocol):
    """Merges one tensor block by block; made fresh for every tensor.

    Blocks arrive in order, pass after pass; ``start`` is the block's first element counted in the
    whole flat tensor. ``observe`` sees every block of every pass but the last, ``merge`` every
    block of the last and returns the merged block (it may work in the inputs' buffers).
    """

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None: ...

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor: ...


@dataclass
class _Independent:
    kernel: Callable[[TensorInputs], torch.Tensor]

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        raise AssertionError("independent blocks are merged in a single pass")

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        return self.kernel(inputs)


def independent_blocks(kernel: Callable[[TensorInputs], torch.Tensor]) -> BlockKernel:
    """The block kernel of a method whose blocks are independent: its plain kernel on each."""
    return _Independent(kernel)
