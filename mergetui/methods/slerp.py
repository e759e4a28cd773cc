"""Spherical linear interpolation between the base and one other model."""

from __future__ import annotations

import math

import torch

from mergetui.methods.inputs import TensorInputs

#: Above this |cos θ| the two tensors are treated as (anti)parallel and lerped, as mergekit does.
PARALLEL_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


def slerp(inputs: TensorInputs) -> torch.Tensor:
    """Interpolate along the great circle from the base (t=0) to the other model (t=1).

    The angle comes from the normalised, flattened tensors; the coefficients are applied to the raw
    tensors, so magnitudes are interpolated rather than re-projected. Near-parallel or antiparallel
    pairs (|cos θ| > 0.9995) fall back to plain linear interpolation, where SLERP is ill-conditioned.
    """
    t = float(inputs.params["t"])
    v0 = inputs.require_base()
    (v1,) = inputs.models
    norm0 = float(torch.linalg.vector_norm(v0))
    norm1 = float(torch.linalg.vector_norm(v1))
    norm0 = norm0 if norm0 > _NORM_EPS else 1.0
    norm1 = norm1 if norm1 > _NORM_EPS else 1.0
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) / (norm0 * norm1)
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > PARALLEL_THRESHOLD:
        coef0, coef1 = 1.0 - t, t
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        coef0 = math.sin((1.0 - t) * theta) / sin_theta
        coef1 = math.sin(t * theta) / sin_theta
    return v0.mul_(coef0).add_(v1, alpha=coef1)
