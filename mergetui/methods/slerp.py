"""The spherical family: SLERP between the base and one other model, NuSLERP between two models
(or their task vectors), and Multi-SLERP, the barycentre of several on the hypersphere."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.task_arithmetic import CHUNK

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
    within a chunk of ``CHUNK`` entries, float64 across them): a tensor merged in blocks of whole
    chunks adds the same numbers in the same order as whole, so gets the same coefficients."""

    def __init__(self) -> None:
        self.square0 = self.square1 = self.dot = 0.0

    def add(self, v0: torch.Tensor, v1: torch.Tensor) -> None:
        for c0, c1 in zip(v0.reshape(-1).split(CHUNK), v1.reshape(-1).split(CHUNK), strict=True):
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
    parallel the interpolation is linear. mergekit 0.1.5's ``nuslerp``, in float32.
    """
    first, second = inputs.models
    weights = [float(w) for w in inputs.per_model("weight")]
    total = sum(weights)
    t = 0.5 if abs(total) < _WEIGHT_SUM_EPS else weights[1] / total
    base = inputs.base
    if base is not None:
        first.sub_(base)
        second.sub_(base)
    flatten = bool(inputs.params.get("nuslerp_flatten", True))
    row_wise = bool(inputs.params.get("nuslerp_row_wise", False))
    shape = first.shape
    if flatten:
        v0, v1 = first.reshape(-1), second.reshape(-1)
    elif row_wise:
        v0, v1 = first.transpose(0, -1), second.transpose(0, -1)
    else:
        v0, v1 = first, second
    cos_theta = (_unit(v0) * _unit(v1)).sum(dim=-1, keepdim=True).clamp_(-1, 1)
    colinear = (1 - cos_theta.square()) <= _COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    result = result.reshape(shape)
    return result.add_(base) if base is not None else result


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
    0.1.5's ``multislerp``.
    """
    models = inputs.models
    if len(models) == 1:
        return models[0]
    base = inputs.base
    eps = float(inputs.params.get("eps", 1e-8))
    weights = torch.tensor(inputs.per_model("weight"), dtype=torch.float32)
    if bool(inputs.params.get("normalize_weights", True)):
        weights = weights / weights.sum()
    vectors = [(m.sub_(base) if base is not None else m).reshape(-1) for m in models]
    norms = [torch.linalg.vector_norm(v) for v in vectors]
    units = [v / (n + eps) for v, n in zip(vectors, norms, strict=True)]
    mean = units[0] * weights[0]
    for unit, weight in zip(units[1:], weights[1:], strict=True):
        mean.add_(unit * weight)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if all(float(n) == 0.0 for n in norms):  # no model moved: nothing to interpolate
            result = vectors[0].view(models[0].shape)  # zeros
            return result.add_(base) if base is not None else result
        if len(units) == 2:  # antipodal pair: the weighted sum of the (restored) task vectors
            result = (vectors[0] * weights[0]).add_(vectors[1] * weights[1])
            result = result.view(models[0].shape)
            return result.add_(base) if base is not None else result
        raise ValueError(
            f"{inputs.name}: the models' weighted mean direction is zero (antipodal task vectors "
            "whose weights cancel), so multislerp has no barycentre here; change the weights"
        )
    del vectors
    mean.div_(mean_norm)
    tangent = torch.zeros_like(mean)
    for unit, weight in zip(units, weights, strict=True):
        dot = (unit * mean).sum()
        tangent.add_((unit - dot * mean) * weight)
    del units
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    result = mean.mul_(torch.cos(tangent_norm)).add_(
        tangent.mul_(torch.sin(tangent_norm) / tangent_norm)
    )
    average_norm = (torch.stack(norms) * weights).sum()
    result = result.mul_(average_norm).view(models[0].shape)
    return result.add_(base) if base is not None else result
