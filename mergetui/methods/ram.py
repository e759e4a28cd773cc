"""RAM (Reinforced Agent Merging): keep each model's unique changes whole, average the shared ones.

An entry "changed" in a model when its task vector exceeds ``epsilon`` in magnitude there. Where
exactly one model changed it, that model's change is kept as it is; where several did, their
changes are averaged; where none did, the base stays. ``ramplus_tl`` also scales each model's
unique changes up by how much of its change the others share (at most ``1 + r·alpha``).
mergekit 0.1.5's ``ram`` and ``ramplus_tl``, in float32.

Everything is per element but ramplus_tl's scales, which count over the whole tensor: the work
runs in chunks (one counting pass first for ramplus_tl), so the temporaries are chunk-sized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.sums import elementwise_chunk


def ram(inputs: TensorInputs) -> torch.Tensor:
    return _ram(inputs, plus=False)


def ramplus_tl(inputs: TensorInputs) -> torch.Tensor:
    return _ram(inputs, plus=True)


def _ram(inputs: TensorInputs, plus: bool) -> torch.Tensor:
    base = inputs.require_base()
    if not inputs.models:
        return base
    epsilon = float(inputs.params.get("epsilon", 1e-5))
    deltas = [model.sub_(base).view(-1) for model in inputs.models]
    scales = None
    if plus:
        counts = _ChangeCounts(len(deltas))
        counts.add(deltas, epsilon)
        scales = counts.scales(inputs.params, epsilon)
    return _merge_changes(base, deltas, epsilon, scales)


def _merge_changes(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    epsilon: float,
    scales: list[torch.Tensor] | None,
) -> torch.Tensor:
    """Add each entry's unique change (scaled by ``scales``) or the mean of its shared changes to
    the base, chunk by chunk, in place."""
    flat_base = base.view(-1)
    step = elementwise_chunk(flat_base)
    for start in range(0, flat_base.numel(), step):
        parts = [delta[start : start + step] for delta in deltas]
        changed, counts = _masks(parts, epsilon)
        unique, shared = counts == 1, counts > 1
        divisor = counts.clamp_(min=1).to(parts[0].dtype)
        merged = torch.zeros_like(parts[0])
        for index, (part, mask) in enumerate(zip(parts, changed, strict=True)):
            part.mul_(mask)
            unique_part = part * unique
            if scales is not None:
                unique_part.mul_(scales[index])
            merged.add_(unique_part.add_(part.mul_(shared).div_(divisor)))
        flat_base[start : start + step].add_(merged)
    return base


def _masks(parts: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per model where it changed, and how many models changed each entry."""
    changed = [part.abs() > epsilon for part in parts]
    counts = torch.zeros(parts[0].shape, dtype=torch.int32, device=parts[0].device)
    for mask in changed:
        counts.add_(mask)
    return changed, counts


class _ChangeCounts:
    """Per model, how many of its changes others share (S) and how many are its alone (U):
    whole numbers, so blocks add up to the whole tensor's counts exactly."""

    def __init__(self, models: int) -> None:
        self.shared = [0] * models
        self.unique = [0] * models

    def add(self, deltas: list[torch.Tensor], epsilon: float) -> None:
        step = elementwise_chunk(deltas[0])
        for start in range(0, deltas[0].numel(), step):
            changed, counts = _masks([d[start : start + step] for d in deltas], epsilon)
            unique, shared = counts == 1, counts > 1
            for index, mask in enumerate(changed):
                self.shared[index] += int(torch.count_nonzero(mask & shared))
                self.unique[index] += int(torch.count_nonzero(mask & unique))

    def scales(self, params: dict[str, Any], epsilon: float) -> list[torch.Tensor]:
        """Per model λ = 1 + r·clamp(S/max(U, ε), 0, alpha) (float32, as mergekit computes it)."""
        r = float(params.get("r", 0.1))
        alpha = float(params.get("alpha", 0.2))
        scales = []
        for shared_count, unique_count in zip(self.shared, self.unique, strict=True):
            ratio = torch.tensor(float(shared_count)) / torch.tensor(float(unique_count)).clamp(
                min=epsilon
            )
            scales.append(1 + r * ratio.clamp(min=0, max=alpha))
        return scales


@dataclass
class _RamPlusBlocks:
    """RAM+ in two passes over a tensor merged in blocks: the change counts, then the merge."""

    context: TensorContext
    counts: _ChangeCounts | None = None
    scales: list[torch.Tensor] | None = None

    @property
    def epsilon(self) -> float:
        return float(self.context.params.get("epsilon", 1e-5))

    def observe(self, pass_index: int, inputs: TensorInputs, start: int) -> None:
        base = inputs.require_base()
        deltas = [model.sub_(base).view(-1) for model in inputs.models]
        if self.counts is None:
            self.counts = _ChangeCounts(len(deltas))
        self.counts.add(deltas, self.epsilon)

    def merge(self, inputs: TensorInputs, start: int) -> torch.Tensor:
        base = inputs.require_base()
        if not inputs.models:
            return base
        if self.scales is None:
            assert self.counts is not None
            self.scales = self.counts.scales(self.context.params, self.epsilon)
        deltas = [model.sub_(base).view(-1) for model in inputs.models]
        return _merge_changes(base, deltas, self.epsilon, self.scales)


def ramplus_tl_blocks(context: TensorContext) -> BlockKernel:
    return _RamPlusBlocks(context)
