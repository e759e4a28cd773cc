"""Reductions over chunks of whole rows, shared by model_stock, nuslerp and multislerp, whole and
in blocks.

A tensor merged in blocks (:mod:`mergetui.methods.blocked`) must come out with the bits it has
merged whole. Elementwise arithmetic does so by itself; a reduction (a norm, a dot product, a
column sum, a row's norm) does only when it adds the same numbers in the same order in the same
kind of kernel launch, and how torch splits a reduction among vector lanes and threads (on CUDA,
among warps and thread blocks) depends on the reduced tensor's shape, not only on its values. So
these kernels reduce over *row chunks*: ``rows_per_chunk(width)`` whole rows at a time (about
``KERNEL_CHUNK_ELEMENTS`` entries), in float32 within a chunk, the chunks' results added in float64
in order. The registry aligns blocks to whole row chunks, so a block's chunks are the whole
tensor's chunks: same shapes, same alignment, same sums. Statistics per row are computed chunk by
chunk for the same reason (and so is the elementwise math on them: a transcendental function may
round a value differently in a vector lane than in the scalar tail): on CPU, rows 40000 entries
wide reduced one or seven at a time already differ in the last bit from the whole tensor's.

Each method has one implementation, a block kernel (``observe`` gathers statistics and leaves the
inputs as they are; ``merge`` works in place); the whole-tensor kernel runs it over the tensor as a
single block (:func:`merge_whole`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from mergetui.methods.blocked import TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.registry import rows_per_chunk
from mergetui.methods.sums import chunk_elements as chunk_elements  # re-exported


class MultiPassKernel(Protocol):
    """A block kernel that knows how many reading passes it needs (the registry's rule derives the
    same count for the tensors it lets be merged in blocks)."""

    passes: int

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None: ...

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor: ...


def context_of(inputs: TensorInputs) -> TensorContext:
    """What a block kernel would know of the tensor ``inputs`` hold whole."""
    reference = inputs.base if inputs.base is not None else inputs.models[0]
    return TensorContext(
        name=inputs.name,
        shape=tuple(reference.shape),
        params=dict(inputs.params),
        model_params=tuple(inputs.model_params),
        seed=inputs.seed,
    )


def merge_whole(kernel: MultiPassKernel, inputs: TensorInputs) -> torch.Tensor:
    """Merge a whole tensor with a block kernel, as a single block read ``kernel.passes`` times
    (``observe`` leaves the inputs unchanged for the next pass)."""
    for pass_index in range(kernel.passes - 1):
        kernel.observe(pass_index, inputs, 0)
    return kernel.merge(inputs, 0)


def check_aligned(context: TensorContext, start: int) -> None:
    """A block must begin on a row chunk's first entry, or its sums would not be the whole
    tensor's (the registry's rule aligns the blocks it plans)."""
    if start % chunk_elements(context.shape) != 0:
        raise ValueError(
            f"{context.name}: a block starts at entry {start}, inside a row chunk of "
            f"{chunk_elements(context.shape)} entries"
        )


def row_chunks(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Consecutive views of ``rows_per_chunk`` whole rows each (entries, for a 1-D tensor)."""
    if tensor.dim() < 2:
        return list(tensor.reshape(-1).split(chunk_elements(tensor.shape)))
    return list(tensor.split(rows_per_chunk(math.prod(tensor.shape[1:])), dim=0))


def chunks_of(
    base: torch.Tensor | None, models: Sequence[torch.Tensor]
) -> Iterator[tuple[torch.Tensor | None, list[torch.Tensor]]]:
    """The same row chunk of the base (None without one) and of every model, chunk after chunk."""
    model_chunks = [row_chunks(model) for model in models]
    base_chunks: list[torch.Tensor | None] = (
        list(row_chunks(base)) if base is not None else [None] * len(model_chunks[0])
    )
    for index, base_chunk in enumerate(base_chunks):
        yield base_chunk, [chunks[index] for chunks in model_chunks]


def task_vector(model: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """``model - base`` in a new tensor (the inputs stay as they are), or the model itself
    without a base (to be read, not written)."""
    return model if base is None else model - base


class ChunkSums:
    """Running totals of per-chunk float32 reductions, added in float64 in chunk order on the
    tensors' device (nothing waits for the device until the totals are read)."""

    def __init__(self) -> None:
        self.totals: torch.Tensor | None = None

    def add(self, *values: torch.Tensor) -> None:
        """Add one chunk's reductions (float32 tensors of one shape: scalars, or per column)."""
        chunk = torch.stack(values).to(torch.float64)
        if self.totals is None:
            self.totals = chunk
        else:
            self.totals.add_(chunk)

    def result(self, count: int, device: torch.device) -> torch.Tensor:
        """The ``count`` float64 totals (zeros when no chunk was added: an empty tensor)."""
        if self.totals is None:
            return torch.zeros(count, dtype=torch.float64, device=device)
        return self.totals
