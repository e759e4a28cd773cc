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


def magnitude_prune_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly k = max(1, int(density·numel)) largest-magnitude entries of ``delta``, in place.

    The k-th largest magnitude is found by selection (O(n)), not by sorting the whole tensor. Entries
    equal to that threshold are kept lowest index first until exactly k are kept, so the result is
    deterministic.
    """
    if density >= 1.0:
        return delta
    count = delta.numel()
    keep_count = max(1, int(density * count))
    magnitudes = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitudes, count - keep_count + 1).values
    keep = magnitudes > threshold
    missing = keep_count - int(keep.sum())
    if missing > 0:
        at_threshold = torch.nonzero(magnitudes == threshold).reshape(-1)[:missing]
        keep[at_threshold] = True
    del magnitudes
    return delta.mul_(keep.view_as(delta))


def random_drop_(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, in place.

    The mask is drawn on the CPU from a per-tensor generator and moved to the compute device, so a
    seed gives the same mask on every device. With ``rescale`` the kept entries are scaled so the L1
    norm of the task vector is unchanged (mergekit's rescale, not the paper's 1/p).
    """
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    keep = keep.to(delta.device)
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
    for index, delta in enumerate(deltas):
        delta.sub_(base)
        density = float(inputs.model_params[index].get("density", 1.0))
        if sparsify == "magnitude":
            magnitude_prune_(delta, density)
        elif sparsify == "random":
            generator = tensor_generator(inputs.seed, inputs.name, index)
            random_drop_(delta, density, bool(params.get("rescale", True)), generator)
        delta.mul_(weights[index])

    normalize = bool(params.get("normalize", False))
    if sign_election:
        mixed, divisor = _sign_elected_sum(deltas, weights, normalize)
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
    deltas: list[torch.Tensor], weights: list[float], normalize: bool
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Sum the entries that agree with the majority sign; also the per-element weight sum.

    Pruned entries are exactly zero and never agree with either sign, so they neither add to the sum
    nor to the divisor. Where no model agrees the divisor is 1 (the sum there is 0 anyway).
    """
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    majority_positive = total >= 0
    del total
    divisor = torch.zeros_like(deltas[0]) if normalize else None
    for delta, weight in zip(deltas, weights, strict=True):
        agree = torch.where(majority_positive, delta > 0, delta < 0)
        delta.mul_(agree)
        if divisor is not None:
            divisor.add_(agree.to(divisor.dtype), alpha=weight)
    mixed = deltas[0]
    for delta in deltas[1:]:
        mixed.add_(delta)
    if divisor is None:
        return mixed, 1.0
    divisor[divisor == 0] = 1.0
    return mixed, divisor
