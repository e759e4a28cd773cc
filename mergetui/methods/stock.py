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

import torch

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

    mergekit 0.1.5's iteration, step for step, with two differences. The mean direction never
    leaves the span of the models' directions (it starts as their weighted sum, and each step adds
    a combination of them), so it is kept as one coefficient per model, and every dot product and
    norm the iteration needs comes from the models' Gram matrix: a first pass sums it in float64
    (per row chunk, then across them in order, :mod:`.chunked`), the iteration runs on those few
    numbers in float64, and a second pass writes the weighted sum of the models. So a tensor merged in blocks
    of row chunks gets the same bits, and no tensor-sized buffer is held in between. And the
    iteration also stops when a step is no shorter than the one before (in exact arithmetic the
    steps shrink every time; mergekit's float32 steps stop shrinking at rounding noise and it runs
    out its ``max_iter`` there). The results agree with mergekit's to float32 precision; mergekit's
    float32 norms of whole tensors are the less exact.
    """
    if len(inputs.models) == 1:
        return inputs.models[0]
    return merge_whole(_KarcherBlocks(context_of(inputs)), inputs)


def karcher_blocks(context: TensorContext) -> BlockKernel:
    return _KarcherBlocks(context)


@dataclass
class _KarcherBlocks:
    """The Karcher mean by row chunks: the models' Gram matrix, then their weighted sum."""

    context: TensorContext
    sums: ChunkSums = field(default_factory=ChunkSums)
    weights: list[float] | None = None
    passes: int = 2

    def __post_init__(self) -> None:
        self.count = len(self.context.model_params)
        self.pairs = list(itertools.combinations_with_replacement(range(self.count), 2))

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        check_aligned(self.context, start)
        for _, models in chunks_of(None, inputs.models):
            # float64 products: near-parallel directions differ in the 8th digit of their dot
            # product, which a float32 sum loses (and the iteration then wanders)
            flat = [model.reshape(-1).to(torch.float64) for model in models]
            self.sums.add(*(torch.dot(flat[i], flat[j]) for i, j in self.pairs))
            del flat

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        check_aligned(self.context, start)
        models = inputs.models
        if self.count == 1:
            return models[0]
        if self.weights is None:
            totals = self.sums.result(len(self.pairs), models[0].device).tolist()
            gram = [[0.0] * self.count for _ in range(self.count)]
            for (i, j), total in zip(self.pairs, totals, strict=True):
                gram[i][j] = gram[j][i] = total
            params = self.context.params
            self.weights = karcher_weights(
                gram, int(params.get("max_iter", 10)), float(params.get("tol", 1e-5))
            )
        # Σ weight·model, one rounding per operation: any rows give their whole-tensor bits
        for _, model_rows in chunks_of(None, models):
            total = model_rows[0].mul_(self.weights[0])
            for weight, rows in zip(self.weights[1:], model_rows[1:], strict=True):
                total.add_(rows.mul_(weight))
        return models[0]


def karcher_weights(gram: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """The weight of each model in its Karcher mean, from the models' Gram matrix (``gram[i][j]``
    the dot product of models i and j): mergekit 0.1.5's iteration on the mean direction's
    coefficients over the models' unit directions, in float64."""
    count = len(gram)
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(count)]
    alphas = [1.0 / count] * count
    valid = [i for i in range(count) if norms[i] > tol]
    if not valid:
        return [0.0] * count
    # the unit directions' Gram matrix, over the models whose norm counts
    units = [[gram[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]

    def dots(coefficients: list[float]) -> list[float]:
        """Each direction's dot product with the combination ``coefficients`` of them."""
        return [sum(row[k] * c for k, c in enumerate(coefficients)) for row in units]

    def norm(coefficients: list[float]) -> float:
        products = zip(coefficients, dots(coefficients), strict=True)
        return math.sqrt(max(sum(c * d for c, d in products), 0.0))

    mean_norm = norm(weights)
    first = [1.0] + [0.0] * (len(valid) - 1)  # where the directions cancel: the first one
    mean = first if mean_norm < tol else [c / mean_norm for c in weights]
    previous = float("inf")
    for _ in range(max_iter):
        tangent = [0.0] * len(valid)
        for index, dot in enumerate(dots(mean)):
            dot = max(-1.0, min(1.0, dot))
            theta = math.acos(dot)
            if theta < tol:
                continue
            coefficient = weights[index] * (theta / math.sin(theta))
            tangent[index] += coefficient  # coefficient · (unit − dot · mean)
            for k, c in enumerate(mean):
                tangent[k] -= coefficient * dot * c
        tangent_norm = norm(tangent)
        if tangent_norm < tol or tangent_norm >= previous:
            break
        previous = tangent_norm
        cosine, sine = math.cos(tangent_norm), math.sin(tangent_norm)
        mean = [cosine * m + sine * t / tangent_norm for m, t in zip(mean, tangent, strict=True)]
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = [c / unit_norm for c in mean]
    scale = sum(alpha * n for alpha, n in zip(alphas, norms, strict=True))
    result = [0.0] * count
    for k, i in enumerate(valid):
        result[i] = scale * mean[k] / norms[i]
    return result
