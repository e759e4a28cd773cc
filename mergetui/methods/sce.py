"""SCE (Select, Calculate, Erase; Wan et al., 2024): merge task vectors without weights to tune.

Select the elements where the models disagree most (highest variance across the task vectors),
weight each task vector by its mean square, erase the entries whose sign disagrees with the
majority, and average what is left. mergekit 0.1.5's ``sce``, in float32.
"""

from __future__ import annotations

import torch

from mergetui.methods.inputs import TensorInputs

_WEIGHT_SUM_EPS = 1e-6
_DIVISOR_MIN = 1e-6


def sce(inputs: TensorInputs) -> torch.Tensor:
    base = inputs.require_base()
    deltas = [model.sub_(base) for model in inputs.models]
    if not deltas:
        return base
    select_topk = float(inputs.params.get("select_topk", 1.0))
    if select_topk < 1.0:
        keep = _select_mask(deltas, select_topk)
        for delta in deltas:
            delta.mul_(keep)
        del keep
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    majority = torch.where(total >= 0, 1.0, -1.0)
    del total
    squares = [float(delta.square().mean()) for delta in deltas]
    square_sum = sum(squares)
    if abs(square_sum) < _WEIGHT_SUM_EPS:
        weights = [1.0 / len(deltas)] * len(deltas)
    else:
        weights = [s / square_sum for s in squares]
    merged = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = (delta.sign() == majority).to(delta.dtype).mul_(weight)
        merged.add_(delta.mul_(agrees))
        divisor.add_(agrees)
    return base.add_(merged.div_(divisor.clamp_(min=_DIVISOR_MIN)))


def _select_mask(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """1 at the int(fraction·nnz) elements of highest variance across the task vectors (the
    population variance; nnz counts the elements where it is not zero), 0 elsewhere."""
    if fraction <= 0:
        return torch.zeros_like(deltas[0])
    mean = deltas[0].clone()
    for delta in deltas[1:]:
        mean.add_(delta)
    mean.div_(len(deltas))
    variance = torch.zeros_like(mean)
    for delta in deltas:
        variance.add_((delta - mean).square_())
    variance.div_(len(deltas))
    count = int(int(torch.count_nonzero(variance)) * fraction)
    mask = torch.zeros_like(variance)
    if count == 0:
        return mask
    _, indices = torch.topk(variance.abs().reshape(-1), k=count, largest=True)
    mask.view(-1)[indices] = 1.0
    return mask
