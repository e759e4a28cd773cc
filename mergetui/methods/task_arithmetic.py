"""The task-vector family: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della and della_linear.

All share one pipeline per tensor (the "generalized task arithmetic" of mergekit):

1. task vectors δᵢ = xᵢ − base;
2. sparsify each δᵢ: TIES keeps the top-k magnitudes over the whole tensor, DARE drops entries at
   random, Breadcrumbs drops the largest outliers and the smallest entries, DELLA drops at random
   with a probability that falls with the entry's magnitude rank in its row; DARE and DELLA
   optionally rescale to the original L1 norm;
3. weight them, δᵢ ← wᵢ·δᵢ (before sign election, as mergekit does);
4. with sign election (ties, dare_ties): the majority sign is the sign of Σδᵢ (zero counts as +), only
   entries agreeing with it are summed, and ``normalize`` divides by the per-element sum of the
   agreeing models' weights; without it, the sum is divided by Σwᵢ;
5. scale by ``lambda`` and add to the base.

Every step works in place on the float32 inputs, and every temporary (magnitudes, masks, signs,
divisors) is made for one chunk of ``CHUNK`` elements at a time: peak memory is the inputs plus a few
MiB whatever the tensor size, and the temporaries stay in the CPU cache.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from typing import Any

import torch

from mergetui.methods import native, philox
from mergetui.methods.inputs import TensorInputs, tensor_seed
from mergetui.methods.sums import CHUNK as CHUNK  # re-exported: the other kernels chunk as these do
from mergetui.methods.sums import add_l1 as add_l1
from mergetui.methods.sums import chunk_elements, elementwise_chunk

_RESCALE_EPS = 1e-7
#: The bit pattern of +inf: magnitudes above it are NaNs, which compare unlike their patterns.
_INFINITY_PATTERN = 0x7F800000
_WEIGHT_SUM_EPS = 1e-8


def task_arithmetic(inputs: TensorInputs) -> torch.Tensor:
    """base + λ·Σ wᵢ·(xᵢ − base), divided by Σ wᵢ when ``normalize`` is on."""
    return _merge(inputs, sparsify=None, sign_election=False)


def ties(inputs: TensorInputs) -> torch.Tensor:
    """TIES: magnitude top-k per task vector, sign election, disjoint mean."""
    return _merge(inputs, sparsify="magnitude", sign_election=True)


def dare_ties(inputs: TensorInputs) -> torch.Tensor:
    """DARE drop-and-rescale followed by TIES sign election."""
    return _merge(inputs, sparsify="random", sign_election=True)


def dare_linear(inputs: TensorInputs) -> torch.Tensor:
    """DARE drop-and-rescale followed by a weighted sum."""
    return _merge(inputs, sparsify="random", sign_election=False)


def breadcrumbs(inputs: TensorInputs) -> torch.Tensor:
    """Model Breadcrumbs: drop each task vector's largest outliers and its smallest entries, then
    a weighted sum."""
    return _merge(inputs, sparsify="outliers", sign_election=False)


def breadcrumbs_ties(inputs: TensorInputs) -> torch.Tensor:
    """Model Breadcrumbs' sparsification followed by TIES sign election."""
    return _merge(inputs, sparsify="outliers", sign_election=True)


def della(inputs: TensorInputs) -> torch.Tensor:
    """DELLA: magnitude-ranked random drop and rescale, then TIES sign election."""
    return _merge(inputs, sparsify="della", sign_election=True)


def della_linear(inputs: TensorInputs) -> torch.Tensor:
    """DELLA's magnitude-ranked random drop and rescale, then a weighted sum."""
    return _merge(inputs, sparsify="della", sign_election=False)


def _chunks(flat: torch.Tensor) -> list[torch.Tensor]:
    """Consecutive views of at most ``CHUNK`` elements covering a flat tensor."""
    return list(flat.split(CHUNK))


def _subtract_and_sample(
    library: Any, delta: int, base: int, step: int, sample: torch.Tensor, start: int, end: int
) -> None:
    """One thread's range of ``delta -= base``, keeping every ``step``-th magnitude in ``sample``."""
    library.mt_subtract_and_sample(delta, base, start, end, step, sample.data_ptr())


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A flat view (kernels write through it, so the tensor must be contiguous)."""
    if not tensor.is_contiguous():
        raise ValueError("kernel inputs must be contiguous")
    return tensor.view(-1)


def _magnitude_bits(chunk: torch.Tensor) -> torch.Tensor:
    """The bit pattern of |x| as int32: for non-negative floats it orders like the values."""
    return chunk.view(torch.int32).bitwise_and(0x7FFFFFFF)


_RADIX = 1 << 16
_SAMPLE_STEP = 16


def _from_top(counts: torch.Tensor, k: int, offset: int = 0) -> tuple[int, int]:
    """For a histogram, the bin holding the k-th largest entry (counting ``offset`` entries known
    to lie above every bin) and how many entries lie strictly above that bin."""
    at_or_above = counts.flip(0).cumsum(0).flip(0) + offset
    index = int(torch.nonzero(at_or_above >= k).max())
    above = int(at_or_above[index + 1]) if index + 1 < counts.numel() else offset
    return index, above


def _bucket_keys(chunk: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For one chunk: how many |x| have top 16 bits above ``high``, and per entry the low 16 bits
    where the top 16 bits equal ``high`` (``_RADIX`` elsewhere, a bin that is dropped)."""
    bits = _magnitude_bits(chunk)
    top = bits.bitwise_right_shift(16)
    keys = torch.where(top == high, bits.bitwise_and(0xFFFF), _RADIX)
    return (top > high).sum(), keys


def top_histogram(flat: torch.Tensor, library: Any = None) -> torch.Tensor:
    """Counts of the top 16 bits of |x| over a flat float32 tensor: by the C loops when
    ``library`` is given, else by torch ops (the same counts)."""
    if library is not None:
        return native_counts(library, "mt_top_histogram", flat, _RADIX)
    counts = torch.zeros(_RADIX, dtype=torch.int64, device=flat.device)
    for chunk in _chunks(flat):
        counts += torch.bincount(_magnitude_bits(chunk).bitwise_right_shift_(16), minlength=_RADIX)
    return counts


def bucket_histogram(
    flat: torch.Tensor, high: int, library: Any = None
) -> tuple[int, torch.Tensor]:
    """Entries whose top 16 bits exceed ``high``, and a histogram of the low 16 bits of those
    whose top 16 bits equal it: by the C loops when ``library`` is given, else by torch ops."""
    if library is not None:
        counts = native_counts(library, "mt_bucket", flat, _RADIX + 1, high)
        return int(counts[_RADIX]), counts[:_RADIX]
    high_t = torch.tensor(high, dtype=torch.int32, device=flat.device)
    above = torch.zeros((), dtype=torch.int64, device=flat.device)
    low_counts = torch.zeros(_RADIX + 1, dtype=torch.int64, device=flat.device)
    for chunk in _chunks(flat):
        chunk_above, keys = _bucket_keys(chunk, high_t)
        above += chunk_above
        low_counts += torch.bincount(keys.reshape(-1), minlength=_RADIX + 1)
    return int(above), low_counts[:_RADIX]


def kth_largest_magnitude(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th largest |x| of a flat float32 tensor, and how many |x| are strictly larger.

    An exact radix selection on the bit pattern of |x|, which orders like the values for
    non-negative floats. The top 16 bits of the answer are guessed from a 1-in-16 sample (or found
    from a full histogram on small tensors); one chunked pass then counts the entries above that
    bucket and histograms the low 16 bits of the entries in it, which pins down the exact value.
    A wrong guess is detected by the counts and redone from the full histogram, so the result is
    always exact: same answer as ``kthvalue`` on the whole tensor, without a sort or a full copy.
    """
    count = flat.numel()
    if count >= 64 * _SAMPLE_STEP * 1024:
        sample = _magnitude_bits(flat[::_SAMPLE_STEP].contiguous()).bitwise_right_shift_(16)
        high, _ = _from_top(torch.bincount(sample, minlength=_RADIX), -(-k // _SAMPLE_STEP))
        above, low_counts = bucket_histogram(flat, high)
        if above < k <= above + int(low_counts.sum()):
            return _pattern(high, above, low_counts, k, flat.device)
    high, _ = _from_top(top_histogram(flat), k)
    above, low_counts = bucket_histogram(flat, high)
    return _pattern(high, above, low_counts, k, flat.device)


def _pattern(
    high: int, above: int, low_counts: torch.Tensor, k: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    low, greater = _from_top(low_counts, k, offset=above)
    return pattern_as_float((high << 16) | low, device), greater


def pattern_as_float(pattern: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 whose bit pattern is ``pattern`` (a magnitude found by radix selection)."""
    return torch.tensor([pattern], dtype=torch.int32).view(torch.float32)[0].to(device)


def magnitude_prune_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly k = max(1, int(density·numel)) largest-magnitude entries of ``delta``, in place.

    The k-th largest magnitude is found by selection (:func:`kth_largest_magnitude`), not by sorting.
    Entries equal to that threshold are kept lowest index first until exactly k are kept, so the
    result is deterministic.
    """
    if density >= 1.0:
        return delta
    keep_largest_(delta, max(1, int(density * delta.numel())))
    return delta


def keep_largest_(tensor: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Zero all but the ``keep_count`` (>= 1) largest-magnitude entries of ``tensor``, in place:
    the threshold by selection, entries equal to it kept lowest index first."""
    flat = _flat(tensor)
    threshold, greater = _kth_largest(flat, keep_count)
    keep_above_(flat, threshold, keep_count - greater)
    return tensor


def keep_above_(flat: torch.Tensor, threshold: torch.Tensor, ties_to_keep: int) -> int:
    """Zero the entries of a flat tensor below ``threshold`` in magnitude, and those equal to it
    beyond the first ``ties_to_keep``, in place; returns the quota left for the blocks after this
    one (a tensor merged in blocks carries it on)."""
    for chunk in flat.split(elementwise_chunk(flat)):
        magnitude = chunk.abs()
        if ties_to_keep <= 0:
            chunk.masked_fill_(magnitude <= threshold, 0.0)
            continue
        tied = magnitude == threshold
        tied_count = int(torch.count_nonzero(tied))
        drop = magnitude < threshold
        if tied_count > ties_to_keep:  # the quota runs out in this chunk: keep the first ones
            tied[torch.nonzero(tied).reshape(-1)[:ties_to_keep]] = False
            drop |= tied
        ties_to_keep -= min(tied_count, ties_to_keep)
        chunk.masked_fill_(drop, 0.0)
    return ties_to_keep


def outlier_prune_(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool
) -> torch.Tensor:
    """Breadcrumbs, in place: of the N entries ranked by magnitude, keep k = int(density·N) just
    below the int(gamma·N) largest (mergekit 0.1.5's ranks [N−k−top, N−top), moved down to [0, k)
    when the two overlap). The bounds are found by selection (two ``kthvalue`` calls), not a sort;
    entries tied at a bound are kept lowest index first. With ``rescale`` the kept entries are
    scaled to the task vector's L1 norm."""
    if density >= 1.0:
        return delta
    flat = _flat(delta)
    chunk = chunk_elements(delta.shape)
    l1_before = _l1(flat, chunk) if rescale else 0.0
    _keep_ranks_(flat, *outlier_ranks(flat.numel(), density, gamma))
    if rescale:
        l1_after = _l1(flat, chunk)
        if l1_before >= _RESCALE_EPS and l1_after >= _RESCALE_EPS:
            delta.mul_(l1_before / l1_after)
    return delta


def outlier_ranks(count: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' kept ranks by ascending magnitude among ``count``: ``[start, start + keep)``."""
    keep = int(density * count)
    top = int(gamma * count)
    return max(0, count - keep - top), keep


def _kth_largest(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th largest |x| and how many |x| are larger: by the C loops' selection on float32 CPU
    tensors, else by :func:`kth_largest_magnitude`; the same exact answer either way."""
    library = native.available_for(flat)
    if library is None:
        return kth_largest_magnitude(flat, k)
    step = _SAMPLE_STEP if flat.numel() >= 64 * _SAMPLE_STEP * 1024 else 1
    sample = _magnitude_bits(flat[::step].contiguous())
    pattern, greater = _native_kth(library, flat, k, sample, step)
    return pattern_as_float(pattern), greater


def _keep_ranks_(flat: torch.Tensor, start: int, count: int) -> None:
    """Zero every entry whose rank by ascending magnitude is outside ``[start, start + count)``;
    equal magnitudes rank in index order.

    The magnitudes at the two bounds come from the radix selection TIES uses
    (:func:`kth_largest_magnitude`); one chunked pass counts the entries below each bound, and one
    keeps the entries strictly between them plus, at each bound, those of its equal entries whose
    rank (counted in index order across the chunks) falls inside the range. No sort, no copy.
    """
    total = flat.numel()
    if count <= 0:
        flat.zero_()
        return
    stop = min(start + count, total)
    if start == 0 and stop >= total:
        return
    low, _ = _kth_largest(flat, total - start)  # the magnitude of ascending rank start
    high, _ = _kth_largest(flat, total - stop + 1)  # ... and of rank stop - 1
    ranks = RankWindow(low, high, start, stop, [])
    native_window = ranks.native_patterns(flat)
    if native_window is not None:
        library, patterns = native_window
        for pattern in patterns:
            above, equal = native_counts(library, "mt_count_pattern", flat, 2, pattern).tolist()
            ranks.below.append(total - above - equal)  # NaNs are above every pattern, as here
    else:
        ranks.below = [0] * len(ranks.bounds)
        for chunk in _chunks(flat):
            magnitude = chunk.abs()
            for index, bound in enumerate(ranks.bounds):
                ranks.below[index] += int(torch.count_nonzero(magnitude < bound))
    ranks.keep_(flat)


@dataclasses.dataclass
class RankWindow:
    """Keeps the entries whose rank by ascending magnitude is in ``[start, stop)``, given the
    magnitudes at the two ends (``low``, ``high``) and, per distinct end, how many entries lie
    below it (``below``). Entries equal to an end rank in index order: ``keep_`` counts them on,
    so a tensor kept block after block (in order) keeps exactly the entries the whole would."""

    low: torch.Tensor
    high: torch.Tensor
    start: int
    stop: int
    below: list[int]

    @property
    def bounds(self) -> list[torch.Tensor]:
        return [self.low] if bool(self.low == self.high) else [self.low, self.high]

    def keep_(self, flat: torch.Tensor) -> None:
        """Zero the entries of ``flat`` (the next entries of the tensor) outside the window."""
        bounds = self.bounds
        native_window = self.native_patterns(flat)
        if native_window is not None:
            self._keep_native_(*native_window, flat)
            return
        for chunk in _chunks(flat):
            magnitude = chunk.abs()
            keep = (magnitude > self.low) & (magnitude < self.high)
            for index, bound in enumerate(bounds):
                equal = magnitude == bound
                ranks = torch.cumsum(equal, 0).add_(self.below[index] - 1)
                keep |= equal & (ranks >= self.start) & (ranks < self.stop)
                self.below[index] += int(torch.count_nonzero(equal))  # later entries rank after
            chunk.masked_fill_(~keep, 0.0)

    def native_patterns(self, flat: torch.Tensor) -> tuple[Any, list[int]] | None:
        """The C library and the bounds' bit patterns when the C loops handle ``flat``; None for
        the torch ops (not a float32 CPU tensor, or a NaN bound, whose pattern compares unlike
        its value)."""
        library = native.available_for(flat)
        patterns = [int(bound.view(torch.int32)) for bound in self.bounds]
        if library is None or max(patterns) > _INFINITY_PATTERN:
            return None
        return library, patterns

    def _keep_native_(self, library: Any, patterns: list[int], flat: torch.Tensor) -> None:
        """:meth:`keep_` by the C loops: an entry equal to a bound has rank ``below`` plus the
        number of equal entries before it, so the kept ones are those between two tie cutoffs
        (no chunk-sized temporaries: one counting pass per bound and one fused pass)."""
        count, pointer = flat.numel(), flat.data_ptr()

        def cutoff(pattern: int, wanted: int) -> int:
            return library.mt_tie_cutoff(pointer, 0, count, pattern, wanted) if wanted > 0 else 0

        ranges = []
        for index, pattern in enumerate(patterns):
            below = self.below[index]
            ranges.append((cutoff(pattern, self.start - below), cutoff(pattern, self.stop - below)))
            self.below[index] += count_equal(library, flat, pattern)
        low, high = patterns[0], patterns[-1]
        (low_from, low_to), (high_from, high_to) = ranges[0], ranges[-1]
        native.parallel(
            lambda begin, end: library.mt_keep_window(
                pointer, begin, end, low, high, low_from, low_to, high_from, high_to
            ),
            count,
        )


def count_equal(library: Any, flat: torch.Tensor, pattern: int) -> int:
    """How many |x| of a flat float32 CPU tensor have exactly the bit pattern ``pattern``."""

    def piece(start: int, end: int) -> int:
        return int(library.mt_count_equal(flat.data_ptr(), start, end, pattern))

    return sum(native.parallel(piece, flat.numel()))


def random_drop_(delta: torch.Tensor, density: float, rescale: bool, key: int) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, in place.

    Entry j (flat, row-major) is kept when u_j < density, u_j the Philox uniform of index j in the
    stream ``key`` (:mod:`.philox`; the key is :func:`~mergetui.methods.inputs.tensor_seed`), so a
    seed gives the same mask on every device and thread count. With ``rescale`` the kept entries
    are scaled so the L1 norm of the task vector is unchanged (mergekit's rescale, not the paper's
    1/p).
    """
    if density >= 1.0:
        return delta
    flat = _flat(delta)
    chunk = chunk_elements(delta.shape)
    l1_before = _l1(flat, chunk) if rescale else 0.0
    drop_at_random_(flat, density, key)
    if rescale:
        rescale_l1_(delta, l1_before, _l1(flat, chunk))
    return delta


def drop_at_random_(flat: torch.Tensor, density: float, key: int, start: int = 0) -> None:
    """Zero each entry of a flat tensor unless its uniform draw is below ``density`` (the float32
    nearest to it, as torch compares), in place; ``flat`` holds the tensor's entries from flat
    index ``start`` on, whose draws are uniforms ``start, start + 1, ...`` of the stream ``key``.

    Float32 CPU tensors go through the C loops (``mt_dare_drop``: the draws made in cache, on every
    core); elsewhere one :func:`.philox.uniform` per chunk of ``CHUNK`` entries, made on the
    tensor's device. Both multiply by the 0/1 mask, so they give the same bits."""
    library = native.available_for(flat)
    if library is not None and flat.numel() > 0:
        pointer = flat.data_ptr()
        native.parallel(
            lambda begin, end: library.mt_dare_drop(pointer, key, start, begin, end, density),
            flat.numel(),
        )
        return
    offset = start
    for chunk in _chunks(flat):
        uniform = philox.uniform(key, offset, chunk.numel(), chunk.device)
        chunk.mul_(uniform.lt_(density))
        offset += chunk.numel()


def rescale_l1_(delta: torch.Tensor, l1_before: float, l1_after: float) -> None:
    """Scale the kept entries back to the task vector's L1 norm (unless either norm is ~0)."""
    if l1_before >= _RESCALE_EPS and l1_after >= _RESCALE_EPS:
        delta.mul_(l1_before / l1_after)


def della_prune_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    key: int,
) -> torch.Tensor:
    """DELLA's MagPrune, in place: in each row (a 1-D tensor is one row; rows run along dimension
    1, as in mergekit), the entry of ascending magnitude rank r among n is kept with probability
    p = density − ε + 2ε·r/(n−1), so the smallest are kept least often and the mean is density.

    Ranks come from one stable sort per row (equal magnitudes rank in index order, where mergekit's
    unstable double argsort ranks them arbitrarily): on float32 CPU tensors a radix sort in the C
    loops, threads over rows (``native.mt_della_rows``), elsewhere ``torch.sort``; both give the
    same bits. A row of one entry has p = density (mergekit fails there). Entry j is kept when
    u_j < p_j, u_j the Philox uniform of j's flat index in the rows (row-major: the tensor's own
    flat index for one or two dimensions) in the stream ``key``, so a seed gives the same mask on
    every device and thread count. With ``rescale`` the kept entries are scaled to the task
    vector's L1 norm (a whole-tensor statistic; everything else is row-local).
    """
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    norms = L1Norms() if rescale else None
    della_drop_(delta, density, epsilon, key, norms)
    if norms is not None:
        rescale_l1_(delta, float(norms.before), float(norms.after))
    return delta


def della_drop_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    key: int,
    norms: L1Norms | None,
    start: int = 0,
) -> None:
    """DELLA's drop over the rows along dimension 1 of ``delta`` (the whole task vector, or a
    block of its first axis whose first entry is flat index ``start``: a block holds whole rows,
    and that entry has the same flat index in the rows' layout as in the tensor's)."""
    rows = _as_rows(delta)
    della_rows_(rows, density, epsilon, key, norms, start)
    if delta.dim() > 2:
        _restore_rows(delta, rows)


@dataclasses.dataclass
class L1Norms:
    """A task vector's L1 norm before and after a random drop, summed as it is dropped (float64
    tensors once anything was added)."""

    before: Any = 0
    after: Any = 0


def della_rows(width: int) -> int:
    """Rows DELLA prunes per step: as many as fit one ``CHUNK`` (at least one). The L1 norms are
    summed per step, so a tensor merged in blocks of a multiple of these rows sums them as whole
    (the draws themselves depend on the flat index only)."""
    return max(1, CHUNK // max(width, 1))


def della_rows_(
    rows: torch.Tensor,
    density: float,
    epsilon: float,
    key: int,
    norms: L1Norms | None = None,
    start: int = 0,
) -> None:
    """DELLA's drop over consecutive rows (0 < density < 1) whose first entry is flat index
    ``start`` of the tensor, :func:`della_rows` rows per step; with ``norms``, each step's rows'
    L1 norm is added before and after, in order. The C loops make the draws row by row in cache;
    the torch path makes them with :func:`.philox.uniform` on the rows' device."""
    width = rows.shape[1]
    positions = torch.arange(width, dtype=torch.int64, device=rows.device)
    library = native.available_for(rows)
    offset = start
    for block in rows.split(della_rows(width)):
        if norms is not None:
            norms.before = add_l1(norms.before, block.reshape(-1), CHUNK)
        if library is not None:
            _della_rows_native(library, block, key, offset, density, epsilon)
        else:
            uniform = philox.uniform(key, offset, block.numel(), rows.device)
            order = torch.sort(block.abs(), dim=1, stable=True).indices
            ranks = torch.empty(block.shape, dtype=torch.float32, device=rows.device)
            ranks.scatter_(1, order, positions.to(torch.float32).expand_as(ranks))
            del order
            if width > 1:
                probability = ranks.div_(width - 1).clamp_(0, 1)
                probability = probability.mul_(2).mul_(epsilon).add_(density - epsilon)
            else:
                probability = ranks.fill_(density)
            keep = uniform.view(block.shape).lt_(probability)
            block.mul_(keep)
        if norms is not None:
            norms.after = add_l1(norms.after, block.reshape(-1), CHUNK)
        offset += block.numel()


def _della_rows_native(
    library: Any, block: torch.Tensor, key: int, offset: int, density: float, epsilon: float
) -> None:
    """One block of rows (its first entry flat index ``offset``) through the C loops, the rows
    split across the worker threads."""
    width = block.shape[1]

    def rows(start: int, end: int) -> None:
        status = library.mt_della_rows(
            block.data_ptr(), key, offset, width, start, end,
            density - epsilon, epsilon, density,
        )  # fmt: skip
        if status != 0:
            raise MemoryError(f"out of memory for DELLA's rank buffers ({width} entries a row)")

    native.parallel(rows, block.shape[0], align=1)


def _as_rows(delta: torch.Tensor) -> torch.Tensor:
    """A 2-D view whose rows run along dimension 1 (a 1-D tensor is one row); a copy for tensors
    of more than two dimensions, written back by :func:`_restore_rows`."""
    if delta.dim() < 2:
        return delta.view(1, -1)
    if delta.dim() == 2:
        return delta
    moved = delta.movedim(1, -1).contiguous()
    return moved.view(-1, moved.shape[-1])


def _restore_rows(delta: torch.Tensor, rows: torch.Tensor) -> None:
    shape = list(delta.movedim(1, -1).shape)
    delta.copy_(rows.view(shape).movedim(-1, 1))


def _l1(flat: torch.Tensor, chunk: int) -> float:
    return float(add_l1(0, flat, chunk))


def _merge(inputs: TensorInputs, sparsify: str | None, sign_election: bool) -> torch.Tensor:
    base = inputs.require_base()
    weights = [float(w) for w in inputs.per_model("weight")]
    params = inputs.params
    deltas = inputs.models
    densities = [float(p.get("density", 1.0)) for p in inputs.model_params]
    normalize = bool(params.get("normalize", False))
    scale = float(params.get("lambda", 1.0))
    # the C loops know TIES' magnitude selection and DARE's drop; breadcrumbs' ranks run here
    library = (
        native.available_for(base)
        if sign_election and sparsify in (None, "magnitude", "random")
        else None
    )
    if library is not None:
        return _merge_native(library, inputs, sparsify, weights, densities, normalize, scale)

    for index, delta in enumerate(deltas):
        delta.sub_(base)
        if sparsify == "random":
            key = tensor_seed(inputs.seed, inputs.name, index)
            random_drop_(delta, densities[index], bool(params.get("rescale", True)), key)
        if sparsify == "della":
            key = tensor_seed(inputs.seed, inputs.name, index)
            epsilon = float(inputs.model_params[index].get("epsilon", 0.15))
            rescale = bool(params.get("rescale", True))
            della_prune_(delta, densities[index], epsilon, rescale, key)
    for index, delta in enumerate(deltas):
        if sparsify == "magnitude":
            magnitude_prune_(delta, densities[index])
        if sparsify == "outliers":
            gamma = float(inputs.model_params[index].get("gamma", 0.01))
            outlier_prune_(delta, densities[index], gamma, bool(params.get("rescale", False)))
        if weights[index] != 1.0:
            delta.mul_(weights[index])
    return combine_(base, deltas, weights, normalize, scale, sign_election)


def combine_(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    normalize: bool,
    scale: float,
    sign_election: bool,
) -> torch.Tensor:
    """Steps 4 and 5 on weighted, sparsified task vectors: sum them (or elect signs and sum the
    agreeing), normalize, scale by λ and add to ``base``, in place."""
    flats = [_flat(d) for d in deltas]
    if not sign_election:
        mixed = flats[0]
        for flat in flats[1:]:
            mixed.add_(flat)
        weight_sum = sum(weights)
        if normalize:
            mixed.div_(weight_sum if abs(weight_sum) >= _WEIGHT_SUM_EPS else 1.0)
        if scale != 1.0:
            mixed.mul_(scale)
        return base.add_(mixed.view_as(base))
    chunked = [_chunks(flat) for flat in flats]
    for base_chunk, parts in zip(_chunks(_flat(base)), zip(*chunked, strict=True), strict=True):
        mixed = _elect_chunk(list(parts), weights, normalize)
        # λ·mixed, then the add: the same two roundings as the fused path (add_ with alpha differs).
        base_chunk.add_(mixed.mul_(scale) if scale != 1.0 else mixed)
    return base


def _elect_chunk(parts: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Sign election on one chunk: the agreeing entries' sum, divided by their weight sum.

    With s = ±1 the majority sign (+ where Σδ >= 0), an entry agrees exactly when d·s > 0, so
    ``max(d·s, 0)`` is its magnitude where it agrees and 0 elsewhere, and s·Σ max(dᵢ·s, 0) is the
    agreeing sum. Pruned entries are exactly zero and never agree. Where no model agrees the
    divisor is 1 (the sum there is 0 anyway). Works in place in the deltas' chunks.
    """
    sign = parts[0].clone()
    for part in parts[1:]:
        sign.add_(part)
    sign.ge_(0).mul_(2).sub_(1)
    divisor = torch.zeros_like(sign) if normalize else None
    agrees = torch.empty_like(sign) if normalize else None
    for part, weight in zip(parts, weights, strict=True):
        part.mul_(sign).clamp_(min=0)
        if divisor is not None:
            divisor.add_(torch.sign(part, out=agrees), alpha=weight)
    mixed = parts[0]
    for part in parts[1:]:
        mixed.add_(part)
    mixed.mul_(sign)
    if divisor is not None:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed


def _merge_native(
    library: Any,
    inputs: TensorInputs,
    sparsify: str | None,
    weights: list[float],
    densities: list[float],
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """TIES and DARE-TIES with the fused C loops (:mod:`mergetui.methods.native`), on all cores.

    Per task vector: one pass subtracts the base and keeps a 1-in-16 sample of magnitudes, one
    pass counts the entries above and at the sample's k-th magnitude (:func:`_native_kth`), a
    partial pass finds where tied entries stop being kept; then one pass over all of them prunes,
    weights, elects and adds to the base. Same bits as the op-by-op path.
    """
    base = _flat(inputs.require_base())
    count = base.numel()
    step = _SAMPLE_STEP if count >= 64 * _SAMPLE_STEP * 1024 else 1
    sample = torch.empty(-(-count // step), dtype=torch.int32)
    patterns, cutoffs = [], []
    for index, delta in enumerate(inputs.models):
        flat = _flat(delta)
        native.parallel(
            functools.partial(
                _subtract_and_sample, library, flat.data_ptr(), base.data_ptr(), step, sample
            ),
            count,
        )
        density = densities[index]
        if sparsify == "random":
            key = tensor_seed(inputs.seed, inputs.name, index)
            random_drop_(delta, density, bool(inputs.params.get("rescale", True)), key)
        if sparsify != "magnitude" or density >= 1.0:
            patterns.append(0)  # |d| >= 0 always, and every tie is before the cutoff: keep all
            cutoffs.append(count)
            continue
        keep_count = max(1, int(density * count))
        pattern, greater = _native_kth(library, flat, keep_count, sample, step)
        patterns.append(pattern)
        cutoffs.append(
            library.mt_tie_cutoff(flat.data_ptr(), 0, count, pattern, keep_count - greater)
        )

    elect_native_(library, base, inputs.models, patterns, cutoffs, weights, normalize, scale)
    return inputs.require_base()


def elect_native_(
    library: Any,
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    patterns: list[int],
    cutoffs: list[int],
    weights: list[float],
    normalize: bool,
    scale: float,
) -> None:
    """The C loops' fused prune (|d| above its pattern, or equal before its cutoff), weight, sign
    election and add into ``base``, on every core."""
    flat = _flat(base)
    pointers = native.pointer_array([_flat(d) for d in deltas])
    models = len(deltas)
    pattern_array = (ctypes.c_uint32 * models)(*patterns)
    cutoff_array = (ctypes.c_int64 * models)(*cutoffs)
    weight_array = (ctypes.c_float * models)(*weights)
    native.parallel(
        lambda start, end: library.mt_ties_elect(
            flat.data_ptr(), pointers, models, start, end, pattern_array, cutoff_array,
            weight_array, int(normalize), scale,
        ),
        flat.numel(),
    )  # fmt: skip


def _native_kth(
    library: Any, flat: torch.Tensor, k: int, sample: torch.Tensor, step: int
) -> tuple[int, int]:
    """The bit pattern of the k-th largest |x| and how many |x| are strictly larger.

    The guess is the sample's own k/step-th largest magnitude. One vector pass counts the entries
    above and equal to it; when k falls among the equal ones the guess is the answer. That is the
    usual case for bf16 and fp16 checkpoints, whose task vectors take few distinct values, and
    always the case for small tensors, whose "sample" is every entry. Otherwise a radix pass over
    the guess's 16-bit bucket finds it or, when the bucket was wrong too, a full histogram picks
    the right bucket first. The answer is exact in every case.
    """

    def counted(function: str, size: int, *arguments: Any) -> torch.Tensor:
        return native_counts(library, function, flat, size, *arguments)

    guess = library.mt_kth_largest_bits(sample.data_ptr(), sample.numel(), -(-k // step))
    if guess < 0:
        raise MemoryError("out of memory for a 512 KiB histogram")
    greater, equal = counted("mt_count_pattern", 2, guess).tolist()
    if greater < k <= greater + equal:
        return guess, greater

    high = guess >> 16
    above, low_counts = bucket_histogram(flat, high, library)
    if not above < k <= above + int(low_counts.sum()):
        high, _ = _from_top(top_histogram(flat, library), k)
        above, low_counts = bucket_histogram(flat, high, library)
    low, greater = _from_top(low_counts, k, offset=above)
    return (high << 16) | low, greater


def native_counts(
    library: Any, function: str, flat: torch.Tensor, size: int, *arguments: Any
) -> torch.Tensor:
    """The int64 counts a C counting pass adds up, run on every core and summed."""

    def piece(start: int, end: int) -> torch.Tensor:
        counts = torch.zeros(size, dtype=torch.int64)
        getattr(library, function)(flat.data_ptr(), start, end, *arguments, counts.data_ptr())
        return counts

    return torch.stack(native.parallel(piece, flat.numel())).sum(0)
