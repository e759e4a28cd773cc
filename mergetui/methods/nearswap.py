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
    weight = (t / (base - other).abs_().clamp_(min=_MIN_DISTANCE)).clamp_(min=0, max=1)
    return weight * other + (1 - weight) * base
