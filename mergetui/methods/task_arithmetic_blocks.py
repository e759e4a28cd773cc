"""The task-vector family on a tensor merged in blocks of rows (:mod:`.blocked`).

The whole-tensor kernels (:mod:`.task_arithmetic`) need one statistic per task vector before any
entry can be merged; here the engine reads the tensor more than once and the statistic is gathered
from the blocks of the first passes:

- TIES (three passes): the k-th largest magnitude by the same exact two-level radix selection —
  a histogram of the top 16 bits of |δ| over every block, then one of the low 16 bits inside the
  chosen bucket (:class:`BlockedSelection`) — and, while merging, how many entries equal to it are
  still to keep, carried from block to block (ties are kept lowest index first, as whole).
- Breadcrumbs (three passes, four with ``rescale``): the two magnitudes bounding the kept ranks by
  the same selection, and how many entries lie below each; equal entries rank in index order,
  counted on from block to block (:class:`RankWindow`). With ``rescale`` a third pass sums the L1
  norm of what is kept.
- DARE and DELLA (two passes with ``rescale``, else one): the L1 norms before and after the drop,
  summed in float64 per row chunk (DARE) or per step of rows (DELLA), in the same order as whole
  (blocks hold whole chunks or steps: the registry's alignment). The draws are counter-based
  (:mod:`.philox`): the block starting at flat index ``start`` draws uniforms ``start, start + 1,
  ...`` of its task vector's stream, so the merging pass draws them again with no generator state
  carried from block to block or pass to pass.

Each block is then merged by the same code as the whole tensor (the C loops where they apply), so
the result has the same bits whatever the block size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mergetui.methods import native
from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.inputs import TensorInputs, tensor_seed
from mergetui.methods.sums import chunk_elements
from mergetui.methods.task_arithmetic import (
    L1Norms,
    RankWindow,
    _flat,
    _from_top,
    add_l1,
    bucket_histogram,
    combine_,
    count_equal,
    della_drop_,
    drop_at_random_,
    elect_native_,
    keep_above_,
    outlier_ranks,
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


def breadcrumbs_blocks(context: TensorContext) -> BlockKernel:
    return _TaskVectorBlocks(context, sparsify="outliers", sign_election=False)


def breadcrumbs_ties_blocks(context: TensorContext) -> BlockKernel:
    return _TaskVectorBlocks(context, sparsify="outliers", sign_election=True)


def della_blocks(context: TensorContext) -> BlockKernel:
    return _TaskVectorBlocks(context, sparsify="della", sign_election=True)


def della_linear_blocks(context: TensorContext) -> BlockKernel:
    return _TaskVectorBlocks(context, sparsify="della", sign_election=False)


@dataclass
class BlockedSelection:
    """The exact k-th largest magnitudes of one tensor read in blocks, for one or more k: pass 0
    histograms the top 16 bits of |x| (:meth:`observe_top`), pass 1 the low 16 bits inside the
    bucket holding each k-th (:meth:`observe_bucket`). The same answer as
    :func:`~mergetui.methods.task_arithmetic.kth_largest_magnitude` on the whole tensor."""

    ks: tuple[int, ...]
    #: other keys than the magnitude bits (signed scores): the top-16-bit histogram of a flat
    #: tensor, and the low-16-bit histogram inside one bucket; the C loops are then not used
    top_counts: Callable[[torch.Tensor], torch.Tensor] | None = None
    bucket_counts: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    high_counts: torch.Tensor | None = None
    #: per k: the top-16-bit bucket holding the k-th largest, and how many lie above that bucket
    buckets: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: per bucket: the histogram of the low 16 bits of its entries
    low_counts: dict[int, torch.Tensor] = field(default_factory=dict)

    def observe_top(self, flat: torch.Tensor, library: Any = None) -> None:
        if self.top_counts is not None:
            counts = self.top_counts(flat)
        else:
            counts = top_histogram(flat, library)
        self.high_counts = counts if self.high_counts is None else self.high_counts + counts

    def observe_bucket(self, flat: torch.Tensor, library: Any = None) -> None:
        if not self.buckets:
            assert self.high_counts is not None, "the top histogram comes first"
            self.buckets = {k: _from_top(self.high_counts, k) for k in self.ks}
        for high in {high for high, _ in self.buckets.values()}:
            if self.bucket_counts is not None:
                counts = self.bucket_counts(flat, high)
            else:
                _, counts = bucket_histogram(flat, high, library)
            previous = self.low_counts.get(high)
            self.low_counts[high] = counts if previous is None else previous + counts

    def found(self, k: int) -> tuple[int, int, int]:
        """The k-th largest |x| as float32 bits (or key, with other histograms), how many are
        larger, how many equal it."""
        high, above = self.buckets[k]
        counts = self.low_counts[high]
        low, greater = _from_top(counts, k, offset=above)
        return (high << 16) | low, greater, int(counts[low])


@dataclass
class _TopK:
    """TIES' selection of one task vector: keep its ``keep`` largest magnitudes."""

    keep: int
    selection: BlockedSelection
    pattern: int = 0  # the k-th largest |δ| as float32 bits
    ties_to_keep: int = 0  # entries equal to it still to keep, block after block


@dataclass
class _Outliers:
    """Breadcrumbs' selection of one task vector: the ranks ``[start, stop)`` by magnitude."""

    start: int
    stop: int
    selection: BlockedSelection | None  # None: nothing, or everything, is kept
    window: RankWindow | None = None
    keep_all: bool = False
    below: list[int] = field(default_factory=list)  # entries below each bound, before any block

    def restart(self) -> RankWindow | None:
        """The window for a new pass over the blocks, its counts back at the tensor's start."""
        if self.window is not None:
            self.window.below = list(self.below)
        return self.window


@dataclass
class _TaskVectorBlocks:
    context: TensorContext
    sparsify: str
    sign_election: bool
    top: dict[int, _TopK] = field(default_factory=dict)
    outliers: dict[int, _Outliers] = field(default_factory=dict)
    norms: dict[int, L1Norms] = field(default_factory=dict)
    #: per randomly dropped task vector, the key of its Philox stream
    keys: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        params = self.context.params
        models = self.context.model_params
        self.weights = [float(p["weight"]) for p in models]
        self.densities = [float(p.get("density", 1.0)) for p in models]
        self.normalize = bool(params.get("normalize", False))
        self.scale = float(params.get("lambda", 1.0))
        self.rescale = bool(params.get("rescale", self.sparsify != "outliers"))
        #: the L1 norms' chunk (blocks hold whole ones: the registry's ``row_chunks``)
        self.chunk = chunk_elements(self.context.shape)
        count = self.context.numel
        for index, density in enumerate(self.densities):
            if density >= 1.0:
                continue
            if self.sparsify == "magnitude":
                keep = max(1, int(density * count))
                self.top[index] = _TopK(keep, BlockedSelection((keep,)))
            elif self.sparsify == "outliers":
                self.outliers[index] = _outliers(count, density, models[index])
            if self.rescale and self.sparsify != "magnitude":
                self.norms[index] = L1Norms()
            if self.sparsify in ("random", "della"):
                self.keys[index] = tensor_seed(self.context.seed, self.context.name, index)

    # -- the passes that gather statistics ------------------------------------------------------
    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        base = inputs.require_base()
        if self.sparsify in ("random", "della"):
            for index, norms in self.norms.items():
                self._drop(index, inputs.models[index].sub_(base), norms, start)
            return
        if self.sparsify == "outliers" and pass_index == 2:  # with rescale: the kept L1 norms
            if start == 0:
                self._settle_outliers()
            for index, outliers in self.outliers.items():
                delta = _flat(inputs.models[index].sub_(base))
                if outliers.window is not None:
                    outliers.window.keep_(delta)
                elif not outliers.keep_all:
                    continue  # nothing kept: the norm after stays 0
                self.norms[index].after = add_l1(self.norms[index].after, delta, self.chunk)
            return
        selections = dict(self._selections())
        for index in sorted(selections.keys() | self.norms.keys()):
            delta = _flat(inputs.models[index].sub_(base))
            selection = selections.get(index)
            if selection is not None:
                library = native.available_for(delta)
                if pass_index == 0:
                    selection.observe_top(delta, library)
                else:
                    selection.observe_bucket(delta, library)
            l1 = self.norms.get(index)
            if pass_index == 0 and l1 is not None:  # breadcrumbs' rescale: the L1 before
                l1.before = add_l1(l1.before, delta, self.chunk)

    def _selections(self) -> list[tuple[int, BlockedSelection]]:
        if self.sparsify == "magnitude":
            return [(index, top.selection) for index, top in self.top.items()]
        return [(i, o.selection) for i, o in self.outliers.items() if o.selection is not None]

    def _drop(self, index: int, delta: torch.Tensor, norms: L1Norms | None, start: int) -> None:
        """DARE's or DELLA's random drop of the block of a task vector that starts at flat index
        ``start``, adding to ``norms``."""
        density = self.densities[index]
        if self.sparsify == "della":
            if density <= 0.0:
                delta.zero_()
                return
            epsilon = float(self.context.model_params[index].get("epsilon", 0.15))
            della_drop_(delta, density, epsilon, self.keys[index], norms, start)
            return
        flat = _flat(delta)
        if norms is not None:
            norms.before = add_l1(norms.before, flat, self.chunk)
        drop_at_random_(flat, density, self.keys[index], start)
        if norms is not None:
            norms.after = add_l1(norms.after, flat, self.chunk)

    # -- the merging pass -----------------------------------------------------------------------
    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        base = inputs.require_base()
        if start == 0:
            self._settle()
        deltas = [model.sub_(base) for model in inputs.models]
        for index, delta in enumerate(deltas):
            norms = self.norms.get(index)
            if index in self.keys:
                self._drop(index, delta, None, start)
            outliers = self.outliers.get(index)
            if outliers is not None and not outliers.keep_all:
                if outliers.window is None:
                    delta.zero_()
                else:
                    outliers.window.keep_(_flat(delta))
            if norms is not None:
                rescale_l1_(delta, float(norms.before), float(norms.after))
        library = native.available_for(base) if self.sign_election else None
        if library is not None and self.sparsify in ("magnitude", "random"):
            patterns, cutoffs = self._cutoffs(library, deltas)
            elect_native_(
                library, base, deltas, patterns, cutoffs, self.weights, self.normalize, self.scale
            )
            return base
        for index, delta in enumerate(deltas):
            top = self.top.get(index)
            if top is not None:
                threshold = pattern_as_float(top.pattern, delta.device)
                top.ties_to_keep = keep_above_(_flat(delta), threshold, top.ties_to_keep)
            if self.weights[index] != 1.0:
                delta.mul_(self.weights[index])
        return combine_(base, deltas, self.weights, self.normalize, self.scale, self.sign_election)

    def _settle(self) -> None:
        """Turn the gathered statistics into what every merging block needs."""
        for top in self.top.values():
            top.pattern, greater, _ = top.selection.found(top.keep)
            top.ties_to_keep = top.keep - greater
        if self.sparsify == "outliers":
            if not self.rescale:
                self._settle_outliers()
            for outliers in self.outliers.values():
                outliers.restart()

    def _settle_outliers(self) -> None:
        """Breadcrumbs' bounds and the counts below them, once both histograms are in."""
        count = self.context.numel
        for outliers in self.outliers.values():
            selection = outliers.selection
            if selection is None or outliers.window is not None:
                continue
            low, low_above, low_equal = selection.found(count - outliers.start)
            high, high_above, high_equal = selection.found(count - outliers.stop + 1)
            outliers.below = [count - low_above - low_equal]
            if high != low:
                outliers.below.append(count - high_above - high_equal)
            outliers.window = RankWindow(
                pattern_as_float(low), pattern_as_float(high), outliers.start, outliers.stop, []
            )
            outliers.restart()

    def _cutoffs(self, library: Any, deltas: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """Per task vector, the C loops' threshold pattern and, within this block, the index
        before which entries equal to it are kept (the quota carried over from earlier blocks)."""
        patterns, cutoffs = [], []
        for index, delta in enumerate(deltas):
            flat = _flat(delta)
            count = flat.numel()
            top = self.top.get(index)
            if top is None:  # keep all: |d| >= 0, every tie before the end
                patterns.append(0)
                cutoffs.append(count)
                continue
            patterns.append(top.pattern)
            wanted = top.ties_to_keep
            if wanted <= 0:
                cutoffs.append(0)
                continue
            equal = count_equal(library, flat, top.pattern)
            if equal >= wanted:
                cutoffs.append(
                    library.mt_tie_cutoff(flat.data_ptr(), 0, count, top.pattern, wanted)
                )
                top.ties_to_keep = 0
            else:
                cutoffs.append(count)
                top.ties_to_keep = wanted - equal
        return patterns, cutoffs


def _outliers(count: int, density: float, model_params: dict[str, Any]) -> _Outliers:
    """Breadcrumbs' kept ranks for one task vector, and the selection that finds their bounds
    (none when nothing, or everything, is kept)."""
    start, keep = outlier_ranks(count, density, float(model_params.get("gamma", 0.01)))
    stop = min(start + keep, count) if keep > 0 else 0
    if stop == 0:
        return _Outliers(0, 0, None)
    if start == 0 and stop >= count:
        return _Outliers(start, stop, None, keep_all=True)
    return _Outliers(start, stop, BlockedSelection((count - start, count - stop + 1)))
