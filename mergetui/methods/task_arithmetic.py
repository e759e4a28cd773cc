"""The task-vector family: task_arithmetic, ties, dare_ties and dare_linear.

All four share one pipeline per tensor (the "generalized task arithmetic" of mergekit):

1. task vectors δᵢ = xᵢ − base;
2. sparsify each δᵢ: TIES keeps the top-k magnitudes over the whole tensor, DARE drops entries at
   random and optionally rescales to the original L1 norm;
3. weight them, δᵢ ← wᵢ·δᵢ (before sign election, as mergekit does);
4. with sign election (ties, dare_ties): the majority sign is the sign of Σδᵢ (zero counts as +), only
   entries agreeing with it are summed, and ``normalize`` divides by the per-element sum of the
   agreeing models' weights; without it, the sum is divided by Σwᵢ;
5. scale by ``lambda`` and add to the base.

Every step works in place on the float32 inputs so that the peak memory is a small multiple of one
tensor, whatever the model size.
"""

from __future__ import annotations

import torch

from mergetui.methods.inputs import TensorInputs, tensor_generator

_RESCALE_EPS = 1e-7
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


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a flat tensor of non-negative float32 values (a 0-d tensor).

    A radix pre-selection on the top 16 bits of the float bit pattern (monotonic for non-negative
    floats) narrows the search to one histogram bucket, about 1/128 of an octave wide; an exact
    ``kthvalue`` then runs on that bucket alone. Same answer as ``kthvalue`` on the whole tensor, about
    six times faster on CPU for large tensors.
    """
    count = values.numel()
    if count <= 1 << 16:
        return torch.kthvalue(values, count - k + 1).values
    high = values.view(torch.int32) >> 16
    counts = torch.bincount(high, minlength=1 << 15)
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    bucket = int(torch.nonzero(at_or_above >= k).max())
    above = int(at_or_above[bucket + 1]) if bucket + 1 < at_or_above.numel() else 0
    candidates = values[high == bucket]
    del high
    return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values


def magnitude_prune_(
    delta: torch.Tensor, density: float, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep exactly k = max(1, int(density·numel)) largest-magnitude entries of ``delta``, in place.

    The k-th largest magnitude is found by selection (:func:`kth_largest`), not by sorting. Entries
    equal to that threshold are kept lowest index first until exactly k are kept, so the result is
    deterministic. ``scratch`` (float32, same shape) avoids allocating a magnitude buffer.
    """
    if density >= 1.0:
        return delta
    count = delta.numel()
    keep_count = max(1, int(density * count))
    magnitudes = torch.abs(delta, out=scratch) if scratch is not None else delta.abs()
    flat = magnitudes.reshape(-1)
    threshold = kth_largest(flat, keep_count)
    at_threshold = flat == threshold
    keep = flat.gt_(threshold)  # in place: 1.0 where kept, 0.0 elsewhere
    missing = keep_count - int(keep.sum())
    if missing > 0:
        keep[torch.nonzero(at_threshold).reshape(-1)[:missing]] = 1.0
    del at_threshold
    return delta.mul_(keep.view_as(delta))


def random_drop_(
    delta: torch.Tensor,
    density: float,
    rescale: bool,
    generator: torch.Generator,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, in place.

    The mask is drawn on the CPU from a per-tensor generator and moved to the compute device, so a
    seed gives the same mask on every device. With ``rescale`` the kept entries are scaled so the L1
    norm of the task vector is unchanged (mergekit's rescale, not the paper's 1/p).
    """
    if density >= 1.0:
        return delta
    on_cpu = delta.device.type == "cpu" and scratch is not None
    keep = torch.rand(
        delta.shape, generator=generator, dtype=torch.float32, out=scratch if on_cpu else None
    )
    keep = keep.lt_(density).to(delta.device)  # in place: 1.0 kept, 0.0 dropped
    l1_before = float(delta.abs().sum(dtype=torch.float64)) if rescale else 0.0
    delta.mul_(keep)
    del keep
    if rescale:
        l1_after = float(delta.abs().sum(dtype=torch.float64))
        if l1_before >= _RESCALE_EPS and l1_after >= _RESCALE_EPS:
            delta.mul_(l1_before / l1_after)
    return delta


def _merge(inputs: TensorInputs, sparsify: str | None, sign_election: bool) -> torch.Tensor:
    base = inputs.require_base()
    weights = [float(w) for w in inputs.per_model("weight")]
    params = inputs.params
    deltas = inputs.models
    scratch = inputs.empty_like(base) if sparsify or sign_election else None
    for index, delta in enumerate(deltas):
        delta.sub_(base)
        density = float(inputs.model_params[index].get("density", 1.0))
        if sparsify == "magnitude":
            magnitude_prune_(delta, density, scratch)
        elif sparsify == "random":
            generator = tensor_generator(inputs.seed, inputs.name, index)
            random_drop_(delta, density, bool(params.get("rescale", True)), generator, scratch)
        if weights[index] != 1.0:
            delta.mul_(weights[index])

    normalize = bool(params.get("normalize", False))
    if sign_election:
        assert scratch is not None
        mixed, divisor = _sign_elected_sum(inputs, deltas, weights, normalize, scratch)
    else:
        mixed = deltas[0]
        for delta in deltas[1:]:
            mixed.add_(delta)
        weight_sum = sum(weights)
        divisor = weight_sum if abs(weight_sum) >= _WEIGHT_SUM_EPS else 1.0
    if normalize:
        mixed.div_(divisor)
    scale = float(params.get("lambda", 1.0))
    if scale != 1.0:
        mixed.mul_(scale)
    return base.add_(mixed)


def _sign_elected_sum(
    inputs: TensorInputs,
    deltas: list[torch.Tensor],
    weights: list[float],
    normalize: bool,
    scratch: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Sum the entries that agree with the majority sign; also the per-element weight sum.

    With s = ±1 the majority sign, an entry agrees exactly when d·s > 0, so ``max(d·s, 0)`` is its
    magnitude where it agrees and 0 elsewhere, and s·Σ max(dᵢ·s, 0) is the agreeing sum. Pruned
    entries are exactly zero and never agree. Where no model agrees the divisor is 1 (the sum there
    is 0 anyway). Everything happens in place in the deltas and one scratch buffer.
    """
    sign = inputs.empty_like(deltas[0]).copy_(deltas[0])
    for delta in deltas[1:]:
        sign.add_(delta)
    sign.ge_(0).mul_(2).sub_(1)  # +1 where Σδ >= 0 (zero counts as +), else -1
    divisor = inputs.empty_like(sign).zero_() if normalize else None
    for delta, weight in zip(deltas, weights, strict=True):
        delta.mul_(sign).clamp_(min=0)
        if divisor is not None:
            divisor.add_(torch.sign(delta, out=scratch), alpha=weight)
    mixed = deltas[0]
    for delta in deltas[1:]:
        mixed.add_(delta)
    mixed.mul_(sign)
    del sign
    if divisor is None:
        return mixed, 1.0
    divisor.masked_fill_(divisor == 0, 1.0)
    return mixed, divisor
