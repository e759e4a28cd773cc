"""SCE (Select, Calculate, Erase; Wan et al., 2024): merge task vectors without weights to tune.

Select the elements where the models disagree most (highest variance across the task vectors),
weight each task vector by its mean square, erase the entries whose sign disagrees with the
majority, and average what is left. mergekit 0.1.5's ``sce``, in float32.

Three passes over the task vectors, each in chunks: the variance (the one full-size temporary),
its top-k by selection (:func:`keep_largest_`, as TIES finds its threshold: no sort), then the
masking with each task vector's mean square summed on the way, then the election. Beyond the
inputs the kernel holds one tensor-sized buffer and a few chunk-sized ones.
"""

from __future__ import annotations

import torch

from mergetui.methods.inputs import TensorInputs
from mergetui.methods.task_arithmetic import CHUNK, keep_largest_

_WEIGHT_SUM_EPS = 1e-6
_DIVISOR_MIN = 1e-6


def sce(inputs: TensorInputs) -> torch.Tensor:
    base = inputs.require_base()
    if not inputs.models:
        return base
    deltas = [model.sub_(base).view(-1) for model in inputs.models]
    select_topk = float(inputs.params.get("select_topk", 1.0))
    if select_topk < 1.0:
        _select_(deltas, select_topk)
    squares = [
        sum(float(c.square().sum(dtype=torch.float64)) for c in d.split(CHUNK)) for d in deltas
    ]
    count = deltas[0].numel()
    squares = [s / count for s in squares]
    square_sum = sum(squares)
    if abs(square_sum) < _WEIGHT_SUM_EPS:
        weights = [1.0 / len(deltas)] * len(deltas)
    else:
        weights = [s / square_sum for s in squares]
    for start in range(0, count, CHUNK):
        parts = [d[start : start + CHUNK] for d in deltas]
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
        base.view(-1)[start : start + CHUNK].add_(merged.div_(divisor.clamp_(min=_DIVISOR_MIN)))
    return base


def _select_(deltas: list[torch.Tensor], fraction: float) -> None:
    """Zero every task vector outside the int(fraction·nnz) elements of highest variance across
    them (the population variance; nnz counts the elements where it is not zero); equal variances
    at the threshold are kept lowest index first."""
    variance = torch.empty_like(deltas[0])
    for start in range(0, variance.numel(), CHUNK):
        parts = [d[start : start + CHUNK] for d in deltas]
        mean = parts[0].clone()
        for part in parts[1:]:
            mean.add_(part)
        mean.div_(len(parts))
        chunk = variance[start : start + CHUNK].zero_()
        for part in parts:
            chunk.add_((part - mean).square_())
        chunk.div_(len(parts))
    keep = int(int(torch.count_nonzero(variance)) * fraction) if fraction > 0 else 0
    if keep == 0:
        for delta in deltas:
            delta.zero_()
        return
    keep_largest_(variance, keep)  # the kept variances are > 0: keep <= nnz
    for start in range(0, variance.numel(), CHUNK):
        dropped = variance[start : start + CHUNK] == 0
        for delta in deltas:
            delta[start : start + CHUNK].masked_fill_(dropped, 0.0)
