"""Geometric averages of fine-tunes: model_stock (Jang et al., 2024) and the Karcher mean.

Both look at the models as points around a centre: model_stock measures how aligned the task
vectors are and moves from the base towards their average by that much; the Karcher mean averages
the directions on the unit sphere and restores the average norm. mergekit's 0.1.5 arithmetic, in
float32 — but for model_stock's whole-tensor dot products, summed in float64 across row chunks so
that the tensor merged in blocks gives the same bits (:mod:`.chunked`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mergetui.methods import native
from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.chunked import (
    ChunkSums,
    check_aligned,
    chunks_of,
    context_of,
    merge_whole,
    task_vector,
)
from mergetui.methods.inputs import TensorInputs

_COS_EPS = 1e-6
_SINGULAR = 1e-6


def model_stock(inputs: TensorInputs) -> torch.Tensor:
    """t·mean(models) + (1−t)·base, with t = N·c/(1+(N−1)·c) from the mean pairwise cosine c of
    the task vectors (per row with ``filter_wise``). Where 1+(N−1)·c vanishes there is no finite
    estimate and the base is kept, as mergekit 0.1.5 does.

    The whole-tensor cosines come from dot products summed per row chunk (float64 across chunks,
    :mod:`.chunked`), so the tensor merged in blocks gives the same bits."""
    return merge_whole(_StockBlocks(context_of(inputs)), inputs)


def model_stock_blocks(context: TensorContext) -> BlockKernel:
    return _StockBlocks(context)


@dataclass
class _StockBlocks:
    """model_stock by row chunks: with ``filter_wise`` each chunk merged on its own (its rows'
    cosines are its own); otherwise a first pass sums the task vectors' squared norms and pairwise
    dot products over the whole tensor."""

    context: TensorContext
    sums: ChunkSums = field(default_factory=ChunkSums)
    interpolation: float | None = None

    def __post_init__(self) -> None:
        self.count = len(self.context.model_params)
        # a 1-D tensor is a single row: its cosine is the whole tensor's
        self.filter_wise = bool(self.context.params.get("filter_wise", False)) and (
            len(self.context.shape) > 1
        )
        self.passes = 1 if self.filter_wise else 2
        self.pairs = list(itertools.combinations(range(self.count), 2))

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        check_aligned(self.context, start)
        for base, models in chunks_of(inputs.require_base(), inputs.models):
            assert base is not None
            deltas = [task_vector(model.reshape(-1), base.reshape(-1)) for model in models]
            self.sums.add(
                *(torch.dot(delta, delta) for delta in deltas),
                *(torch.dot(deltas[i], deltas[j]) for i, j in self.pairs),
            )

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        check_aligned(self.context, start)
        base = inputs.require_base()
        if not self.filter_wise:
            if self.interpolation is None:
                self.interpolation = self._interpolation(base.device)
            return _move_towards_average(base, inputs.models, self.interpolation)
        for base_rows, model_rows in chunks_of(base, inputs.models):
            assert base_rows is not None
            _move_towards_average(base_rows, model_rows, _row_interpolation(base_rows, model_rows))
        return inputs.models[0]

    def _interpolation(self, device: torch.device) -> float:
        """t from the whole tensor's mean pairwise cosine (0, keeping the base, where singular)."""
        totals = self.sums.result(self.count + len(self.pairs), device).tolist()
        norms = [math.sqrt(square) for square in totals[: self.count]]
        cosines = [
            max(-1.0, min(1.0, dot / max(norms[i] * norms[j], _COS_EPS)))
            for (i, j), dot in zip(self.pairs, totals[self.count :], strict=True)
        ]
        cosine = sum(cosines) / len(cosines)
        denominator = 1 + (self.count - 1) * cosine
        if abs(denominator) < _SINGULAR:
            return 0.0
        return self.count * cosine / denominator


def _row_interpolation(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """t per row (vector along the last axis) of one row chunk, in float32 as mergekit computes
    it: 0, keeping the base, where 1+(N−1)·c vanishes."""
    offsets = [model - base for model in models]
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1 :]:
            norms = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(
                second, dim=-1
            )
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=_COS_EPS)).clamp(-1, 1))
    del offsets
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(models)
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < _SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cosine), (count * cosine) / safe)


def _move_towards_average(
    base: torch.Tensor, models: list[torch.Tensor], t: float | torch.Tensor
) -> torch.Tensor:
    """t·mean(models) + (1−t)·base, in the first model's buffer (returned); the base is scaled
    in place. Elementwise, so any rows give the bits they have in the whole tensor."""
    average = models[0]
    for model in models[1:]:
        average.add_(model)
    average.div_(len(models)).mul_(t)
    return average.add_(base.mul_(1 - t))


def karcher(inputs: TensorInputs) -> torch.Tensor:
    """The equal-weight Karcher (Riemannian) mean of the models' directions on the unit sphere,
    scaled by their mean norm: a fixed-point iteration of at most ``max_iter`` steps that stops when
    the tangent step is shorter than ``tol``.

    mergekit 0.1.5's arithmetic, operation for operation, with differences that only save work:
    the directions are made in place, every step reuses one buffer (no tensor-sized allocations),
    on float32 CPU tensors each model's term is one fused pass of the C loops (same roundings),
    and the iteration also stops when a step is no shorter than the one before. In
    exact arithmetic the steps shrink every time; when they stop shrinking, float32 cannot resolve
    the angles any more (cos θ rounds to within 6e-8 of 1, so θ never falls below ~3e-4 and a
    ``tol`` under that is never met), and further steps only move the mean by rounding noise.
    mergekit runs out its ``max_iter`` steps there; the results agree to float32 precision.
    """
    tensors = list(inputs.models)
    if len(tensors) == 1:
        return tensors[0]
    max_iter = int(inputs.params.get("max_iter", 10))
    tol = float(inputs.params.get("tol", 1e-5))
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [
        t.zero_() if float(n) == 0.0 else t.div_(n) for t, n in zip(tensors, norms, strict=True)
    ]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return units[0].zero_()
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    directions = [units[i] for i in valid]
    mean = torch.zeros_like(directions[0])
    step = torch.empty_like(mean)
    library = native.available_for(mean) if mean.is_contiguous() else None
    for weight, unit in zip(weights, directions, strict=True):
        if library is not None and unit.is_contiguous():
            _fused(library.mt_add_scaled, mean, unit, weight)
        else:
            mean += torch.mul(unit, weight, out=step)
    mean_norm = torch.linalg.vector_norm(mean)
    if float(mean_norm) < tol:
        mean.copy_(directions[0])
    else:
        mean.div_(mean_norm)
    tangent = torch.empty_like(mean)
    previous = float("inf")
    for _ in range(max_iter):
        tangent.zero_()
        for weight, unit in zip(weights, directions, strict=True):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            coefficient = weight * (theta / torch.sin(theta))
            if library is not None and unit.is_contiguous():
                _fused(library.mt_karcher_term, tangent, unit, mean, float(dot), float(coefficient))
                continue
            torch.mul(mean, dot, out=step)  # unit - dot·mean, scaled, as mergekit rounds it
            torch.sub(unit, step, out=step)
            tangent += step.mul_(coefficient)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol or float(tangent_norm) >= previous:
            break
        previous = float(tangent_norm)
        mean.mul_(torch.cos(tangent_norm)).add_(
            tangent.div_(tangent_norm).mul_(torch.sin(tangent_norm))
        )
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean.div_(unit_norm)
    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return mean.mul_(scale)


def _fused(function: Any, target: torch.Tensor, *arguments: Any) -> None:
    """``function(target, tensors..., start, end, scalars...)`` over the elements on every core."""
    tensors = [a.data_ptr() for a in arguments if isinstance(a, torch.Tensor)]
    scalars = [a for a in arguments if not isinstance(a, torch.Tensor)]
    native.parallel(
        lambda start, end: function(target.data_ptr(), *tensors, start, end, *scalars),
        target.numel(),
    )
