"""Arcee Fusion: take the other model's change only where it matters most.

Each entry's importance is how far it moved times how much the row's softmax distribution moved
(the KL divergence of the other model's row from the base's); changes whose importance is an
outlier (at least the median plus 1.5 interquartile ranges) are taken, the rest stay at the base.
mergekit 0.1.5's ``arcee_fusion``, in float32.

A tensor merged in blocks of rows (:mod:`.blocked`) is read three times: the importance is
row-local, so each block computes its own rows' scores with the same bits as the whole tensor;
the three quartiles are found by an exact two-level radix selection over the blocks (a histogram
of the top 16 bits of every score, then of the low 16 bits inside each quartile's bucket); the
last pass merges with the threshold they give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mergetui.methods import native
from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.sums import elementwise_chunk
from mergetui.methods.task_arithmetic import native_counts, pattern_as_float
from mergetui.methods.task_arithmetic_blocks import BlockedSelection

_SOFTMAX_EPS = 1e-8
_QUARTILES = (0.25, 0.5, 0.75)
_RADIX = 1 << 16
#: The sign bit of a float32 and the bits below it, on an int32 view.
_MAGNITUDE_BITS = 0x7FFFFFFF


def arcee_fusion(inputs: TensorInputs) -> torch.Tensor:
    """base + (other − base)·[importance ≥ Q₂ + 1.5·(Q₃ − Q₁)].

    The quartiles are exact order statistics of all the importance scores (the element at
    ⌊q·(n−1)⌋ of the sorted scores, by a radix selection: no sort, no copy). mergekit takes them from a random
    sample of a million scores on larger tensors, which makes its result vary from run to run;
    on tensors of up to a million entries the two agree.
    """
    base = inputs.require_base()
    (other,) = inputs.models
    importance = _importance(other, base)
    flat = importance.reshape(-1)
    # the blocks' radix selection on a single block: the kthvalue answers (tested), with no copy
    kernel = _FusionBlocks(flat.numel())
    kernel.selection.observe_top(flat)
    kernel.selection.observe_bucket(flat)
    return _take_outliers_(base, other, importance, kernel.found_threshold(flat.device))


def quartile_ranks(count: int) -> list[int]:
    """The 1-based ascending ranks of Q₁, Q₂ and Q₃ among ``count`` scores: ⌊q·(count−1)⌋ + 1,
    the product rounded in float32 as mergekit's index into its sorted scores is."""
    return [int(torch.tensor(q, dtype=torch.float32) * (count - 1)) + 1 for q in _QUARTILES]


def _threshold(quartiles: list[torch.Tensor]) -> torch.Tensor:
    q1, q2, q3 = quartiles
    return q2 + 1.5 * (q3 - q1)


def _take_outliers_(
    base: torch.Tensor, other: torch.Tensor, importance: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """The base, plus the other model's change where the importance reaches ``threshold``; in
    place in ``base`` (``other`` and ``importance`` are used up)."""
    keep = importance.ge_(threshold)
    return base.add_(other.sub_(base).mul_(keep))


def _importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other − base| times the KL divergence, per row (the last axis), of softmax(other) from
    softmax(base), each with 1e-8 added. Every row's scores depend on that row alone, bit for bit
    (softmax works row by row; :func:`_row_sums`), so a block of rows gets the whole tensor's.

    For the same reason the rows are scored a group at a time (about ``elementwise_chunk``
    entries), into one scores tensor: the five tensor-sized temporaries of the formula become
    small ones the heap reuses, not fresh memory faulted in page by page."""
    if other.dim() < 2:
        return _group_importance(other, base)
    width = other.shape[-1]
    other_rows, base_rows = other.reshape(-1, width), base.reshape(-1, width)
    group = max(1, elementwise_chunk(other) // max(width, 1))
    if group >= other_rows.shape[0]:
        return _group_importance(other, base)
    scores = torch.empty_like(other_rows)
    for start in range(0, other_rows.shape[0], group):
        end = start + group
        scores[start:end] = _group_importance(other_rows[start:end], base_rows[start:end])
    return scores.view(other.shape)


def _group_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """:func:`_importance` of all the rows given at once."""
    p = F.softmax(other, dim=-1).add_(_SOFTMAX_EPS)
    q = F.softmax(base, dim=-1).add_(_SOFTMAX_EPS)
    terms = p * torch.log(p / q)
    del p, q
    return (other - base).abs_().mul_(_row_sums(terms))


def _row_sums(terms: torch.Tensor) -> torch.Tensor:
    """The sums along the last axis (kept as an axis of one), each row's bits fixed by that row
    alone, however many rows are summed at once.

    On the CPU ``torch.sum`` (mergekit's bits): it sums every row of a many-row tensor by the same
    serial loop, but splits a lone row of 32768 entries or more across threads, so a lone row is
    summed as one of two (a broadcast view, no copy). Elsewhere the reduction's layout follows the
    number of rows (CUDA's), so :func:`_pairwise_row_sums` fixes the order instead.
    """
    if terms.device.type != "cpu":
        return _pairwise_row_sums(terms)
    rows = terms.reshape(-1, terms.shape[-1])
    if rows.shape[0] == 1:
        return rows.expand(2, -1).sum(dim=-1, keepdim=True)[:1].reshape(*terms.shape[:-1], 1)
    return terms.sum(dim=-1, keepdim=True)


def _pairwise_row_sums(terms: torch.Tensor) -> torch.Tensor:
    """The sums along the last axis by a fixed tree of element-wise additions, in place in
    ``terms``: entry i gets entry i + ⌈w/2⌉ added, the width w halves (rounding up), until one
    is left. The order of additions depends on the width alone, on every device."""
    rows = terms.reshape(-1, terms.shape[-1])
    width = rows.shape[-1]
    while width > 1:
        half = width // 2
        rows[:, :half].add_(rows[:, width - half : width])
        width -= half
    return rows[:, :1].reshape(*terms.shape[:-1], 1)


# --- a tensor merged in blocks of rows ----------------------------------------------------------


def arcee_fusion_blocks(context: TensorContext) -> BlockKernel:
    """The block kernel of one 2-D tensor (the registry keeps other tensors whole)."""
    return _FusionBlocks(context.numel)


@dataclass
class _FusionBlocks:
    """Arcee Fusion in three passes over a tensor merged in blocks: the histogram of every
    score's top 16 bits, the low-16-bit histogram inside each quartile's bin (the blocked radix
    selection of TIES, :class:`BlockedSelection`), then the merge.

    The scores can be negative (a row's divergence is a few ulps below zero where the two rows
    barely differ), so the histograms count order keys rather than magnitude bits:
    :func:`_order_keys`."""

    count: int
    threshold: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # the k-th smallest score is the (n − k + 1)-th largest
        self.from_top = [self.count - rank + 1 for rank in quartile_ranks(self.count)]
        self.selection = BlockedSelection(tuple(self.from_top), _top_counts, _bucket_counts)

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        base = inputs.require_base()
        (other,) = inputs.models
        scores = _importance(other, base).view(-1)
        if pass_index == 0:
            self.selection.observe_top(scores)
        else:
            self.selection.observe_bucket(scores)

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        base = inputs.require_base()
        (other,) = inputs.models
        if start == 0:
            self.threshold = self.found_threshold(base.device)
        assert self.threshold is not None
        return _take_outliers_(base, other, _importance(other, base), self.threshold)

    def found_threshold(self, device: torch.device) -> torch.Tensor:
        """Q₂ + 1.5·(Q₃ − Q₁), once both histograms have seen every score."""
        return _threshold([self._value(k, device) for k in self.from_top])

    def _value(self, from_top: int, device: torch.device) -> torch.Tensor:
        """The score of that rank: its bin is offset by half the radix (:func:`_top_bins`)."""
        bins, _, _ = self.selection.found(from_top)
        return _key_as_float(bins - (_RADIX // 2 << 16), device)


def _order_keys(chunk: torch.Tensor) -> torch.Tensor:
    """int32 keys of a contiguous float32 tensor that order like its values, signs included:
    the bits themselves for x ≥ +0, the magnitude bits flipped below (−0 just under +0)."""
    bits = chunk.view(torch.int32)
    return bits.bitwise_xor(bits.bitwise_right_shift(31).bitwise_and_(_MAGNITUDE_BITS))


def _key_as_float(key: int, device: torch.device) -> torch.Tensor:
    """The float32 whose order key (:func:`_order_keys`, as a signed 32-bit int) is ``key``."""
    bits = key ^ ((key >> 31) & _MAGNITUDE_BITS)  # the mapping is its own inverse
    return pattern_as_float(bits, device)


def _top_bins(keys: torch.Tensor) -> torch.Tensor:
    """Each key's top 16 bits as a bin in [0, 65536), ascending like the keys."""
    return keys.bitwise_right_shift(16).add_(_RADIX // 2)


def _top_counts(flat: torch.Tensor) -> torch.Tensor:
    """How many scores of a flat float32 tensor fall in each top-16-bit bin: by the C loops on
    every core (``mt_key_top_histogram``) where they run, else by torch ops chunk by chunk (the
    same counts)."""
    library = native.available_for(flat)
    if library is not None and flat.is_contiguous():
        return native_counts(library, "mt_key_top_histogram", flat, _RADIX)
    counts = torch.zeros(_RADIX, dtype=torch.int64, device=flat.device)
    for chunk in flat.split(elementwise_chunk(flat)):  # whole-number counts: any chunking
        counts += torch.bincount(_top_bins(_order_keys(chunk)), minlength=_RADIX)
    return counts


def _bucket_counts(flat: torch.Tensor, bucket: int) -> torch.Tensor:
    """How many scores of the top-16-bit bin ``bucket`` have each low 16 bits: by the C loops
    (``mt_key_bucket``, which skip runs of 64 with none in the bin) where they run, else by torch
    ops chunk by chunk (the other scores go to an extra bin that is dropped)."""
    library = native.available_for(flat)
    if library is not None and flat.is_contiguous():
        return native_counts(library, "mt_key_bucket", flat, _RADIX + 1, bucket)[:_RADIX]
    counts = torch.zeros(_RADIX + 1, dtype=torch.int64, device=flat.device)
    for chunk in flat.split(elementwise_chunk(flat)):  # whole-number counts: any chunking
        keys = _order_keys(chunk)
        low = torch.where(_top_bins(keys) == bucket, keys.bitwise_and(0xFFFF), _RADIX)
        counts += torch.bincount(low, minlength=_RADIX + 1)
    return counts[:_RADIX]
