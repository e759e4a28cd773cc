"""RAM (Reinforced Agent Merging): keep each model's unique changes whole, average the shared ones.

An entry "changed" in a model when its task vector exceeds ``epsilon`` in magnitude there. Where
exactly one model changed it, that model's change is kept as it is; where several did, their
changes are averaged; where none did, the base stays. ``ramplus_tl`` also scales each model's
unique changes up by how much of its change the others share (at most ``1 + r·alpha``).
mergekit 0.1.5's ``ram`` and ``ramplus_tl``, in float32.
"""

from __future__ import annotations

import torch

from mergetui.methods.inputs import TensorInputs


def ram(inputs: TensorInputs) -> torch.Tensor:
    return _ram(inputs, plus=False)


def ramplus_tl(inputs: TensorInputs) -> torch.Tensor:
    return _ram(inputs, plus=True)


def _ram(inputs: TensorInputs, plus: bool) -> torch.Tensor:
    base = inputs.require_base()
    if not inputs.models:
        return base
    epsilon = float(inputs.params.get("epsilon", 1e-5))
    deltas = [model.sub_(base) for model in inputs.models]
    changed = [delta.abs() > epsilon for delta in deltas]
    counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for mask in changed:
        counts.add_(mask)
    unique = counts == 1
    shared = counts > 1
    divisor = counts.clamp_(min=1).to(base.dtype)
    scales = _unique_scales(inputs, changed, unique, shared) if plus else None
    merged = torch.zeros_like(base)
    for index, (delta, mask) in enumerate(zip(deltas, changed, strict=True)):
        delta.mul_(mask)
        unique_part = delta * unique
        if scales is not None:
            unique_part.mul_(scales[index])
        merged.add_(unique_part.add_(delta.mul_(shared).div_(divisor)))
    return base.add_(merged)


def _unique_scales(
    inputs: TensorInputs,
    changed: list[torch.Tensor],
    unique: torch.Tensor,
    shared: torch.Tensor,
) -> list[torch.Tensor]:
    """Per model λ = 1 + r·clamp(S/max(U, ε), 0, alpha), S and U the counts of its changes that
    others share and that are its alone (float32, as mergekit computes them)."""
    r = float(inputs.params.get("r", 0.1))
    alpha = float(inputs.params.get("alpha", 0.2))
    epsilon = float(inputs.params.get("epsilon", 1e-5))
    scales = []
    for mask in changed:
        shared_count = torch.tensor(float(torch.count_nonzero(mask & shared)))
        unique_count = torch.tensor(float(torch.count_nonzero(mask & unique))).clamp(min=epsilon)
        scales.append(1 + r * (shared_count / unique_count).clamp(min=0, max=alpha))
    return scales
