"""Linear (weighted average) merge."""

from __future__ import annotations

import torch

from mergetui.methods.inputs import TensorInputs


def linear(inputs: TensorInputs) -> torch.Tensor:
    """r = Σ wᵢ·xᵢ, divided by Σ wᵢ when ``normalize`` is on.

    The validator rejects weights that sum to zero under normalize, so the division is safe here.
    """
    weights = inputs.per_model("weight")
    result = inputs.models[0].mul_(weights[0])
    for tensor, weight in zip(inputs.models[1:], weights[1:], strict=True):
        result.add_(tensor, alpha=weight)
    if inputs.params.get("normalize", True):
        result.div_(sum(weights))
    return result
