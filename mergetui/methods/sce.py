"""SCE (Select, Calculate, Erase; Wan et al., 2024): merge task vectors without weights to tune.

Select the elements where the models disagree most (highest variance across the task vectors),
weight each task vector by its mean square, erase the entries whose sign disagrees with the
majority, and average what is left. mergekit 0.1.5's ``sce``, in float32.

Three passes over the task vectors, each in chunks: the variance (the one full-size temporary),
its top-k by selection (:func:`keep_largest_`, as TIES finds its threshold: no sort), then the
masking with each task vector's mean square summed on the way, then the election. Beyond the
inputs the kernel holds one tensor-sized buffer and a few chunk-sized ones.

A tensor merged in blocks of rows (:mod:`.blocked`) goes through the same steps, each statistic
gathered over the blocks of one reading pass: with ``select_topk`` < 1 the variances' histogram of
top 16 bits and their nonzero count, the histogram of low 16 bits inside the threshold's bucket
(the exact radix selection of TIES in blocks), then the masking (equal variances at the threshold
kept lowest index first, the quota carried from block to block) and the mean squares, then the
merge: four passes; two (the squares, the merge) when every element is kept. The squares are summed
row chunk by row chunk in float64, and blocks hold whole row chunks (the registry's ``row_chunks``), so
the weights, and the result, have the same bits as whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mergetui.methods import native
from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.sums import add_squares, chunk_elements, elementwise_chunk
from mergetui.methods.task_arithmetic import (
    _flat,
    keep_above_,
    keep_largest_,
    pattern_as_float,
)
from mergetui.methods.task_arithmetic_blocks import BlockedSelection

_WEIGHT_SUM_EPS = 1e-6
_DIVISOR_MIN = 1e-6


def sce(inputs: TensorInputs) -> torch.Tensor:
    base = inputs.require_base()
    if not inputs.models:
        return base
    chunk = chunk_elements(base.shape)
    deltas = [_flat(model.sub_(base)) for model in inputs.models]
    fraction = select_fraction(inputs.params)
    if fraction < 1.0:
        _select_(deltas, fraction)
    weights = _weights([add_squares(0, delta, chunk) for delta in deltas], deltas[0].numel())
    _elect_(_flat(base), deltas, weights)
    return base


def select_fraction(params: dict[str, Any]) -> float:
    """``select_topk``: the fraction of the elements kept; 1 keeps them all (no selection)."""
    return float(params.get("select_topk", 1.0))


def _select_(deltas: list[torch.Tensor], fraction: float) -> None:
    """Zero every task vector outside the int(fraction·nnz) elements of highest variance across
    them (the population variance; nnz counts the elements where it is not zero); equal variances
    at the threshold are kept lowest index first."""
    variance = _variance(deltas)
    keep = _keep_count(int(torch.count_nonzero(variance)), fraction)
    if keep == 0:
        for delta in deltas:
            delta.zero_()
        return
    keep_largest_(variance, keep)  # the kept variances are > 0: keep <= nnz
    _drop_where_zero_(deltas, variance)


def _keep_count(nonzero: int, fraction: float) -> int:
    """How many variances the selection keeps: a fraction of the nonzero ones (zero variances,
    where the models agree, are never selected)."""
    return int(nonzero * fraction) if fraction > 0 else 0


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The population variance across the flat task vectors, element by element (chunk by
    chunk, so the temporaries stay small; the values do not depend on the chunks)."""
    variance = torch.empty_like(deltas[0])
    step = elementwise_chunk(variance)
    for start in range(0, variance.numel(), step):
        parts = [d[start : start + step] for d in deltas]
        mean = parts[0].clone()
        for part in parts[1:]:
            mean.add_(part)
        mean.div_(len(parts))
        chunk = variance[start : start + step].zero_()
        for part in parts:
            chunk.add_((part - mean).square_())
        chunk.div_(len(parts))
    return variance


def _drop_where_zero_(deltas: list[torch.Tensor], kept_variance: torch.Tensor) -> None:
    """Zero the task vectors wherever the selection zeroed (or found zero) the variance: by the C
    loops on every core where they run (torch's ``masked_fill_`` goes element by element: a
    quarter of SCE's time), else by torch ops chunk by chunk (the same +0s)."""
    library = native.available_for(kept_variance)
    if library is not None and all(d.is_contiguous() for d in [kept_variance, *deltas]):
        pointers = native.pointer_array(deltas)
        variance = kept_variance.data_ptr()
        native.parallel(
            lambda start, end: library.mt_zero_where_zero(
                pointers, len(deltas), variance, start, end
            ),
            kept_variance.numel(),
        )
        return
    step = elementwise_chunk(kept_variance)
    for start in range(0, kept_variance.numel(), step):
        dropped = kept_variance[start : start + step] == 0
        for delta in deltas:
            delta[start : start + step].masked_fill_(dropped, 0.0)


def _weights(squares: list[Any], count: int) -> list[float]:
    """Each task vector's mean square over the sum of them (equal weights when that is ~0)."""
    means = [float(total) / count for total in squares]
    mean_sum = sum(means)
    if abs(mean_sum) < _WEIGHT_SUM_EPS:
        return [1.0 / len(means)] * len(means)
    return [mean / mean_sum for mean in means]


def _elect_(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float]) -> None:
    """Add to the flat ``base`` the weighted mean of the entries agreeing with the majority sign
    (that of the sum; zero counts as +), chunk by chunk; element-wise, so any block of the tensor
    gets the whole tensor's bits. Works in place in the deltas."""
    step = elementwise_chunk(base)
    for start in range(0, base.numel(), step):
        parts = [d[start : start + step] for d in deltas]
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        majority = torch.where(total >= 0, 1.0, -1.0)
        merged = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for part, weight in zip(parts, weights, strict=True):
            agrees = (part.sign() == majority).to(part.dtype).mul_(weight)
            merged.add_(part.mul_(agrees))
            divisor.add_(agrees)
        base[start : start + step].add_(merged.div_(divisor.clamp_(min=_DIVISOR_MIN)))


# --- a tensor merged in blocks of rows ----------------------------------------------------------


def sce_blocks(context: TensorContext) -> BlockKernel:
    """The block kernel of one tensor; its passes follow ``select_topk`` as the registry's rule
    plans them (four with a selection, two without)."""
    return _SceBlocks(context, select_fraction(context.params))


@dataclass
class _SceBlocks:
    """SCE over the blocks of one tensor; with a selection the passes are: 0 the variances'
    top-16-bit histogram and nonzero count, 1 the low-16-bit histogram in the threshold's
    bucket, 2 the masking and the squares, 3 the merge; without one: 0 the squares, 1 the merge.
    The executor hands fresh inputs to every pass, so each pass subtracts the base again."""

    context: TensorContext
    fraction: float
    nonzero: int = 0
    keep: int = 0  # how many variances the selection keeps (k)
    selection: BlockedSelection = field(default_factory=lambda: BlockedSelection(()))
    threshold: torch.Tensor | None = None  # the k-th largest variance
    greater: int = 0  # variances strictly above it
    ties_to_keep: int = 0  # variances equal to it still to keep, block after block
    squares: list[Any] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @property
    def selecting(self) -> bool:
        return self.fraction < 1.0

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        deltas = self._deltas(inputs)
        squares_pass = 2 if self.selecting else 0
        if pass_index < squares_pass:
            self._observe_variance(pass_index, _variance(deltas), start)
            return
        if start == 0:
            self._start_masking(deltas[0].device)
            self.squares = [0] * len(deltas)
        self._mask_(deltas)
        chunk = chunk_elements(self.context.shape)
        self.squares = [add_squares(s, d, chunk) for s, d in zip(self.squares, deltas, strict=True)]

    def _observe_variance(self, pass_index: int, variance: torch.Tensor, start: int) -> None:
        library = native.available_for(variance)
        if pass_index == 0:
            self.nonzero += int(torch.count_nonzero(variance))
            self.selection.observe_top(variance, library)
            return
        if start == 0:
            self.keep = _keep_count(self.nonzero, self.fraction)
            self.selection.ks = (self.keep,)  # known once every block's nonzero count is in
        if self.keep > 0:
            self.selection.observe_bucket(variance, library)

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        deltas = self._deltas(inputs)
        if start == 0:
            self._start_masking(deltas[0].device)
            self.weights = _weights(self.squares, self.context.numel)
        self._mask_(deltas)
        base = inputs.require_base()
        _elect_(_flat(base), deltas, self.weights)
        return base

    def _deltas(self, inputs: TensorInputs) -> list[torch.Tensor]:
        base = inputs.require_base()
        return [_flat(model.sub_(base)) for model in inputs.models]

    def _start_masking(self, device: torch.device) -> None:
        """At the first block of a masking pass: the threshold (found once, from the two
        histograms), and the full quota of variances equal to it to keep."""
        if not self.selecting or self.keep == 0:
            return
        if self.threshold is None:
            pattern, self.greater, _ = self.selection.found(self.keep)
            self.threshold = pattern_as_float(pattern, device)
        self.ties_to_keep = self.keep - self.greater

    def _mask_(self, deltas: list[torch.Tensor]) -> None:
        """The selection on this block's task vectors, as :func:`_select_` does whole."""
        if not self.selecting:
            return
        if self.keep == 0:
            for delta in deltas:
                delta.zero_()
            return
        assert self.threshold is not None
        variance = _variance(deltas)
        self.ties_to_keep = keep_above_(variance, self.threshold, self.ties_to_keep)
        _drop_where_zero_(deltas, variance)
