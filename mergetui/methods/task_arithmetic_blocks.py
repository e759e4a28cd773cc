"""TIES, DARE-TIES and DARE-linear on a tensor merged in blocks of rows (:mod:`.blocked`).

The whole-tensor kernels (:mod:`.task_arithmetic`) need one statistic per task vector before any
entry can be merged; here the engine reads the tensor more than once and the statistic is gathered
from the blocks of the first passes:

- TIES (three passes): the k-th largest magnitude by the same exact two-level radix selection —
  a histogram of the top 16 bits of |δ| over every block, then one of the low 16 bits inside the
  chosen bucket — and, while merging, how many entries equal to it are still to keep, carried
  from block to block (ties are kept lowest index first, as whole).
- DARE (two passes): the L1 norms before and after the drop, summed chunk by chunk in float64 in
  the same order as whole (blocks hold whole chunks: the registry's ``align_elements``); the
  random stream is drawn again, from a fresh generator, on the merging pass.

Each block is then merged by the same code as the whole tensor (the C loops where they apply), so
the result has the same bits whatever the block size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mergetui.methods import native
from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.inputs import TensorInputs, tensor_generator
from mergetui.methods.task_arithmetic import (
    _flat,
    _from_top,
    add_l1,
    bucket_histogram,
    combine_,
    drop_at_random_,
    elect_native_,
    keep_above_,
    pattern_as_float,
    rescale_l1_,
    top_histogram,
)


def ties_blocks(context: TensorContext) -> BlockKernel:
    return _TaskVectorBlocks(context, sparsify="magnitude", sign_election=True)


def dare_ties_blocks(context: TensorContext) -> BlockKernel:
    return _TaskVectorBlocks(context, sparsify="random", sign_election=True)


def dare_linear_blocks(context: TensorContext) -> BlockKernel:
    return _TaskVectorBlocks(context, sparsify="random", sign_election=False)


@dataclass
class _Selection:
    """One task vector's magnitude selection as the passes fill it in."""

    keep: int  # how many entries to keep (k)
    high_counts: torch.Tensor | None = None  # pass 0: histogram of the top 16 bits
    high: int = 0
    above: int = 0  # entries whose top 16 bits exceed ``high``
    low_counts: torch.Tensor | None = None  # pass 1: histogram of the low 16 bits in ``high``
    pattern: int = 0  # the k-th largest |δ| as float32 bits
    ties_to_keep: int = 0  # entries equal to it still to keep, block after block


@dataclass
class _Norms:
    """One task vector's L1 norms around DARE's drop (float64 tensors once summed)."""

    before: Any = 0
    after: Any = 0


@dataclass
class _TaskVectorBlocks:
    context: TensorContext
    sparsify: str
    sign_election: bool
    selections: dict[int, _Selection] = field(default_factory=dict)
    norms: dict[int, _Norms] = field(default_factory=dict)
    generators: dict[int, torch.Generator] = field(default_factory=dict)

    def __post_init__(self) -> None:
        params = self.context.params
        self.weights = [float(p["weight"]) for p in self.context.model_params]
        self.densities = [float(p.get("density", 1.0)) for p in self.context.model_params]
        self.normalize = bool(params.get("normalize", False))
        self.scale = float(params.get("lambda", 1.0))
        self.rescale = bool(params.get("rescale", True))
        count = self.context.numel
        for index, density in enumerate(self.densities):
            if density >= 1.0:
                continue
            if self.sparsify == "magnitude":
                self.selections[index] = _Selection(keep=max(1, int(density * count)))
            elif self.rescale:
                self.norms[index] = _Norms()

    # -- the passes that gather statistics ------------------------------------------------------
    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        base = inputs.require_base()
        if self.sparsify == "random":
            self._observe_drop(inputs, base, start)
            return
        if start == 0 and pass_index == 1:
            for selection in self.selections.values():
                assert selection.high_counts is not None
                selection.high, selection.above = _from_top(selection.high_counts, selection.keep)
        for index, selection in self.selections.items():
            delta = _flat(inputs.models[index].sub_(base))
            library = native.available_for(delta)
            if pass_index == 0:
                counts = top_histogram(delta, library)
                selection.high_counts = (
                    counts if selection.high_counts is None else selection.high_counts + counts
                )
            else:
                _, counts = bucket_histogram(delta, selection.high, library)
                selection.low_counts = (
                    counts if selection.low_counts is None else selection.low_counts + counts
                )

    def _observe_drop(self, inputs: TensorInputs, base: torch.Tensor, start: int) -> None:
        if start == 0:
            self._fresh_generators()
        for index, norms in self.norms.items():
            delta = _flat(inputs.models[index].sub_(base))
            norms.before = add_l1(norms.before, delta)
            drop_at_random_(delta, self.densities[index], self.generators[index])
            norms.after = add_l1(norms.after, delta)

    def _fresh_generators(self) -> None:
        self.generators = {
            index: tensor_generator(self.context.seed, self.context.name, index)
            for index, density in enumerate(self.densities)
            if density < 1.0
        }

    # -- the merging pass -----------------------------------------------------------------------
    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        base = inputs.require_base()
        if start == 0:
            self._settle()
        deltas = [model.sub_(base) for model in inputs.models]
        for index, delta in enumerate(deltas):
            if self.sparsify == "random" and index in self.generators:
                drop_at_random_(_flat(delta), self.densities[index], self.generators[index])
                norms = self.norms.get(index)
                if norms is not None:
                    rescale_l1_(delta, float(norms.before), float(norms.after))
        library = native.available_for(base) if self.sign_election else None
        if library is not None:
            patterns, cutoffs = self._cutoffs(library, deltas)
            elect_native_(
                library, base, deltas, patterns, cutoffs, self.weights, self.normalize, self.scale
            )
            return base
        for index, delta in enumerate(deltas):
            selection = self.selections.get(index)
            if selection is not None:
                threshold = pattern_as_float(selection.pattern, delta.device)
                selection.ties_to_keep = keep_above_(
                    _flat(delta), threshold, selection.ties_to_keep
                )
            if self.weights[index] != 1.0:
                delta.mul_(self.weights[index])
        return combine_(base, deltas, self.weights, self.normalize, self.scale, self.sign_election)

    def _settle(self) -> None:
        """Turn the gathered statistics into what every merging block needs."""
        for selection in self.selections.values():
            assert selection.low_counts is not None
            low, greater = _from_top(selection.low_counts, selection.keep, offset=selection.above)
            selection.pattern = (selection.high << 16) | low
            selection.ties_to_keep = selection.keep - greater
        if self.sparsify == "random":
            self._fresh_generators()

    def _cutoffs(self, library: Any, deltas: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """Per task vector, the C loops' threshold pattern and, within this block, the index
        before which entries equal to it are kept (the quota carried over from earlier blocks)."""
        patterns, cutoffs = [], []
        for index, delta in enumerate(deltas):
            flat = _flat(delta)
            count = flat.numel()
            selection = self.selections.get(index)
            if selection is None:  # keep all: |d| >= 0, every tie before the end
                patterns.append(0)
                cutoffs.append(count)
                continue
            patterns.append(selection.pattern)
            wanted = selection.ties_to_keep
            if wanted <= 0:
                cutoffs.append(0)
                continue
            equal = _count_equal(library, flat, selection.pattern)
            if equal >= wanted:
                cutoffs.append(
                    library.mt_tie_cutoff(flat.data_ptr(), 0, count, selection.pattern, wanted)
                )
                selection.ties_to_keep = 0
            else:
                cutoffs.append(count)
                selection.ties_to_keep = wanted - equal
        return patterns, cutoffs


def _count_equal(library: Any, flat: torch.Tensor, pattern: int) -> int:
    """How many |x| of a flat float32 CPU tensor have exactly the bit pattern ``pattern``."""

    def piece(start: int, end: int) -> int:
        return int(library.mt_count_equal(flat.data_ptr(), start, end, pattern))

    return sum(native.parallel(piece, flat.numel()))
