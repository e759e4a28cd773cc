"""The spherical family: SLERP between the base and one other model, NuSLERP between two models
(or their task vectors), and Multi-SLERP, the barycentre of several on the hypersphere."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.chunked import (
    ChunkSums,
    check_aligned,
    chunks_of,
    context_of,
    merge_whole,
    row_chunks,
    task_vector,
)
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.sums import chunk_elements

#: Above this |cos θ| the two tensors are treated as (anti)parallel and lerped, as mergekit does.
PARALLEL_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


def slerp(inputs: TensorInputs) -> torch.Tensor:
    """Interpolate along the great circle from the base (t=0) to the other model (t=1).

    The angle comes from the normalised, flattened tensors; the coefficients are applied to the raw
    tensors, so magnitudes are interpolated rather than re-projected. Near-parallel or antiparallel
    pairs (|cos θ| > 0.9995) fall back to plain linear interpolation, where SLERP is ill-conditioned.
    """
    v0 = inputs.require_base()
    (v1,) = inputs.models
    sums = _SlerpSums()
    sums.add(v0, v1)
    coef0, coef1 = sums.coefficients(float(inputs.params["t"]))
    return v0.mul_(coef0).add_(v1, alpha=coef1)


class _SlerpSums:
    """The squared norms of both tensors and their dot product, summed chunk by chunk (float32
    within a row chunk, :func:`.sums.chunk_elements`, float64 across them): a tensor merged in
    blocks of whole row chunks adds the same numbers in the same order as whole, so gets the same
    coefficients."""

    def __init__(self) -> None:
        self.square0 = self.square1 = self.dot = 0.0

    def add(self, v0: torch.Tensor, v1: torch.Tensor) -> None:
        """Add the sums of ``v0`` and ``v1``: whole tensors, or the same block of whole row chunks
        of each (a block's rows are as wide as the tensor's, so its chunks are the tensor's)."""
        chunk = chunk_elements(v0.shape)
        for c0, c1 in zip(v0.reshape(-1).split(chunk), v1.reshape(-1).split(chunk), strict=True):
            self.square0 += float(torch.dot(c0, c0))
            self.square1 += float(torch.dot(c1, c1))
            self.dot += float(torch.dot(c0, c1))

    def coefficients(self, t: float) -> tuple[float, float]:
        """(base, other) coefficients: along the great circle, or linear when (anti)parallel."""
        norm0 = math.sqrt(self.square0)
        norm1 = math.sqrt(self.square1)
        norm0 = norm0 if norm0 > _NORM_EPS else 1.0
        norm1 = norm1 if norm1 > _NORM_EPS else 1.0
        dot = max(-1.0, min(1.0, self.dot / (norm0 * norm1)))
        if abs(dot) > PARALLEL_THRESHOLD:
            return 1.0 - t, t
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


@dataclass
class _SlerpBlocks:
    """SLERP in two passes over a tensor merged in blocks: the sums, then the interpolation."""

    context: TensorContext
    sums: _SlerpSums = field(default_factory=_SlerpSums)
    coefficients: tuple[float, float] | None = None

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        (v1,) = inputs.models
        self.sums.add(inputs.require_base(), v1)

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        if self.coefficients is None:
            self.coefficients = self.sums.coefficients(float(self.context.params["t"]))
        coef0, coef1 = self.coefficients
        (v1,) = inputs.models
        return inputs.require_base().mul_(coef0).add_(v1, alpha=coef1)


def slerp_blocks(context: TensorContext) -> BlockKernel:
    return _SlerpBlocks(context)


_UNIT_EPS = 1e-7
_COLINEAR_EPS = 1e-8
_WEIGHT_SUM_EPS = 1e-6


def nuslerp(inputs: TensorInputs) -> torch.Tensor:
    """NuSLERP: SLERP between two models at t = w₁/(w₀+w₁) (0.5 when the weights cancel), of their
    task vectors when a base is given (the base is added back), of the models themselves without.

    The angle is taken over the whole tensor (``nuslerp_flatten``, the default), or per row — each
    ``W[i, :]`` — or, with ``nuslerp_row_wise``, per column. Where the two vectors are (anti)
    parallel the interpolation is linear. mergekit 0.1.5's ``nuslerp``; the norms and dot products
    of the whole tensor or of its columns are summed per row chunk (float64 across chunks,
    :mod:`.chunked`), so the tensor merged in blocks gives the same bits.
    """
    return merge_whole(_NuslerpBlocks(context_of(inputs)), inputs)


def nuslerp_blocks(context: TensorContext) -> BlockKernel:
    return _NuslerpBlocks(context)


@dataclass
class _NuslerpBlocks:
    """NuSLERP by row chunks. Over the whole tensor or per column, a first pass sums both vectors'
    squared norms and their dot product (per column: over every row); per row, each chunk is
    merged on its own."""

    context: TensorContext
    sums: ChunkSums = field(default_factory=ChunkSums)
    coefficients: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        weights = [float(p["weight"]) for p in self.context.model_params]
        total = sum(weights)
        self.t = 0.5 if abs(total) < _WEIGHT_SUM_EPS else weights[1] / total
        params = self.context.params
        if bool(params.get("nuslerp_flatten", True)) or len(self.context.shape) < 2:
            self.angle = "tensor"  # a 1-D tensor is one row and one column
        elif bool(params.get("nuslerp_row_wise", False)):
            self.angle = "column"
        else:
            self.angle = "row"
        self.passes = 1 if self.angle == "row" else 2

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        check_aligned(self.context, start)
        for base, (first, second) in chunks_of(inputs.base, inputs.models):
            v0, v1 = task_vector(first, base), task_vector(second, base)
            if self.angle == "tensor":
                v0, v1 = v0.reshape(-1), v1.reshape(-1)
                self.sums.add(torch.dot(v0, v0), torch.dot(v1, v1), torch.dot(v0, v1))
            else:
                v0, v1 = v0.reshape(v0.shape[0], -1), v1.reshape(v1.shape[0], -1)
                self.sums.add((v0 * v0).sum(dim=0), (v1 * v1).sum(dim=0), (v0 * v1).sum(dim=0))

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        check_aligned(self.context, start)
        first, second = inputs.models
        base = inputs.base
        if base is not None:
            first.sub_(base)
            second.sub_(base)
        if self.angle == "row":
            for v0, v1 in zip(row_chunks(first), row_chunks(second), strict=True):
                v0.copy_(_slerp_rows(v0, v1, self.t))
        else:
            if self.coefficients is None:
                totals = self.sums.result(3, first.device)
                self.coefficients = _nuslerp_coefficients(totals, self.t)
            coef0, coef1 = self.coefficients
            if self.angle == "column":  # one coefficient per column, the same for every row
                v0, v1 = first.view(first.shape[0], -1), second.view(second.shape[0], -1)
            else:
                v0, v1 = first, second
            v0.mul_(coef0).add_(v1.mul_(coef1))
        return first.add_(base) if base is not None else first


def _nuslerp_coefficients(totals: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The (first, second) float32 coefficients from float64 ``[|v0|², |v1|², v0·v1]`` (scalars,
    or one per column): along the great circle, or linear where the vectors are (anti)parallel.
    The cosine is mergekit's, the dot product of the vectors divided by their norms (at least
    ``_UNIT_EPS``)."""
    square0, square1, dot = totals
    norms = square0.sqrt().clamp(min=_UNIT_EPS) * square1.sqrt().clamp(min=_UNIT_EPS)
    cos_theta = (dot / norms).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= _COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.where(colinear, 1, torch.sin(theta))
    coef0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return coef0.to(torch.float32), coef1.to(torch.float32)


def _slerp_rows(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """NuSLERP of each row (vector along the last axis) of one row chunk, in float32 as mergekit
    computes it."""
    cos_theta = (_unit(v0) * _unit(v1)).sum(dim=-1, keepdim=True).clamp_(-1, 1)
    colinear = (1 - cos_theta.square()) <= _COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    """Each vector along the last axis divided by its norm (at least ``_UNIT_EPS``)."""
    return vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True).clamp(min=_UNIT_EPS)


def multislerp(inputs: TensorInputs) -> torch.Tensor:
    """Multi-SLERP: the weighted barycentre of several models on the hypersphere — their directions
    averaged in the tangent space at their weighted mean direction, mapped back, and scaled to
    their weighted mean norm. Task vectors when a base is given (the base is added back).

    Two antipodal models whose weights cancel fall back to a weighted sum; more models that cancel
    have no barycentre, which is an error naming the tensor. Where every task vector is zero (a
    tensor no fine-tune changed) the base is returned; mergekit fails there. Otherwise mergekit
    0.1.5's ``multislerp``, with the norms summed per row chunk (float64 across chunks,
    :mod:`.chunked`) so that the tensor merged in blocks gives the same bits.

    The tangent-space average mergekit computes at the weighted mean direction m = M/|M| of the
    unit vectors uᵢ is zero in exact arithmetic: Σwᵢ(uᵢ − (uᵢ·m)m) = M − (M·m)m = M − |M|m = 0. It
    holds float32 rounding errors only, which mergekit maps back through cos/sin of its norm (plus
    ``eps``); this kernel maps back the exact zero, m·cos(eps), and so needs two statistics passes
    (the norms, then |M|) instead of four. On small tensors the two differ by rounding; on large
    ones mergekit's errors are not small (its float32 norm of 33M entries is off by 0.2%, and the
    merged task vector by 0.3%), while the sums here stay within 1e-7 of exact.
    """
    return merge_whole(_MultislerpBlocks(context_of(inputs)), inputs)


def multislerp_blocks(context: TensorContext) -> BlockKernel:
    return _MultislerpBlocks(context)


@dataclass
class _MultislerpBlocks:
    """Multi-SLERP by row chunks: the task vectors' squared norms, then the squared norm of their
    weighted mean direction M = Σ wᵢ·vᵢ/(|vᵢ|+eps), then the merge (M rescaled)."""

    context: TensorContext
    squares: ChunkSums = field(default_factory=ChunkSums)
    mean_square: ChunkSums = field(default_factory=ChunkSums)
    outcome: _Barycentre | None = None

    def __post_init__(self) -> None:
        params = self.context.params
        self.count = len(self.context.model_params)
        self.passes = 3 if self.count > 1 else 1
        self.eps = float(params.get("eps", 1e-8))
        weights = torch.tensor([float(p["weight"]) for p in self.context.model_params])
        if bool(params.get("normalize_weights", True)):
            weights = weights / weights.sum()  # inf or NaN if they cancel, as mergekit's
        self.weights: list[float] = weights.tolist()
        self.scales: list[float] = []

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        check_aligned(self.context, start)
        if pass_index == 1 and start == 0:
            self.scales = self._direction_scales(inputs.models[0].device)
        for base, models in chunks_of(inputs.base, inputs.models):
            vectors = [task_vector(model, base).reshape(-1) for model in models]
            if pass_index == 0:
                self.squares.add(*(torch.dot(vector, vector) for vector in vectors))
            else:
                mean = vectors[0] * self.scales[0]
                for vector, scale in zip(vectors[1:], self.scales[1:], strict=True):
                    mean.add_(vector * scale)
                self.mean_square.add(torch.dot(mean, mean))

    def _direction_scales(self, device: torch.device) -> list[float]:
        """wᵢ/(|vᵢ|+eps): the factor of each task vector in the weighted mean direction M."""
        norms = self.squares.result(self.count, device).sqrt()
        weights = torch.tensor(self.weights, dtype=torch.float64, device=device)
        scales: list[float] = (weights / (norms + self.eps)).tolist()
        return scales

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        check_aligned(self.context, start)
        models, base = inputs.models, inputs.base
        if self.count == 1:
            return models[0]
        if self.outcome is None:
            self.outcome = self._barycentre(models[0].device)
        vectors = [model.sub_(base) if base is not None else model for model in models]
        result = vectors[0]
        if self.outcome.kind == "mean":
            result.mul_(self.scales[0])
            for vector, scale in zip(vectors[1:], self.scales[1:], strict=True):
                result.add_(vector.mul_(scale))
            result.mul_(self.outcome.factor)
        elif self.outcome.kind == "weighted_sum":
            result.mul_(self.weights[0]).add_(vectors[1].mul_(self.weights[1]))
        # "unchanged": every task vector is zero, the first one is the result
        return result.add_(base) if base is not None else result

    def _barycentre(self, device: torch.device) -> _Barycentre:
        """What the gathered norms say the merge is; an error where there is no barycentre."""
        squares = self.squares.result(self.count, device).tolist()
        (mean_square,) = self.mean_square.result(1, device).tolist()
        mean_norm = math.sqrt(mean_square)
        if mean_norm < self.eps:
            if all(square == 0.0 for square in squares):  # no model moved: nothing to interpolate
                return _Barycentre("unchanged")
            if self.count == 2:  # antipodal pair: the weighted sum of the task vectors
                return _Barycentre("weighted_sum")
            raise ValueError(
                f"{self.context.name}: the models' weighted mean direction is zero (antipodal "
                "task vectors whose weights cancel), so multislerp has no barycentre here; change "
                "the weights"
            )
        average_norm = sum(
            weight * math.sqrt(square) for weight, square in zip(self.weights, squares, strict=True)
        )
        # m·cos(|tangent| + eps)·(average norm), the tangent being zero (see multislerp); a
        # tensor's division gives inf or NaN where a float's would raise (eps = 0, |M| = 0)
        factor = torch.tensor(math.cos(self.eps) * average_norm, dtype=torch.float64) / mean_norm
        return _Barycentre("mean", float(factor))


@dataclass(frozen=True)
class _Barycentre:
    """How multislerp merges one tensor: ``"mean"``, the weighted mean direction M times
    ``factor``; ``"weighted_sum"``, of an antipodal pair; ``"unchanged"``, no task vector moved."""

    kind: Literal["mean", "weighted_sum", "unchanged"]
    factor: float = 1.0
