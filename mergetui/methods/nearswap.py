"""NearSwap: the other model's values where they stay near the base's, the base's where they moved far.

From the QuartetAnemoi merges; mergekit's ``nearswap``, in float32.
"""

from __future__ import annotations

import torch

from mergetui.methods.inputs import TensorInputs

_MIN_DISTANCE = 1e-6


def nearswap(inputs: TensorInputs) -> torch.Tensor:
    """Take the other model's value where it is within ``t`` of the base's, blending smoothly
    beyond: w = clamp(t/|a−b|, 0, 1), r = w·b + (1−w)·a."""
    base = inputs.require_base()
    (other,) = inputs.models
    t = float(inputs.params["t"])
    # In place, in two tensor-sized buffers (the registry's work_buffers): ``t / x`` is torch's
    # ``x.reciprocal() * t`` and ``1 - w`` is ``-w + 1``, so the bits are those of the formula.
    weight = (base - other).abs_().clamp_(min=_MIN_DISTANCE).reciprocal_().mul_(t)
    weight.clamp_(min=0, max=1)
    merged = weight * other
    return merged.add_(weight.neg_().add_(1).mul_(base))
