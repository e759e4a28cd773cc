"""Passthrough: one model's tensors, optionally scaled."""

from __future__ import annotations

import torch

from mergetui.methods.inputs import TensorInputs


def passthrough(inputs: TensorInputs) -> torch.Tensor:
    """Return the single input, times its ``scale``."""
    (tensor,) = inputs.models
    scale = inputs.model_params[0].get("scale", 1.0) if inputs.model_params else 1.0
    return tensor if scale == 1.0 else tensor.mul_(scale)
