"""Arcee Fusion: take the other model's change only where it matters most.

Each entry's importance is how far it moved times how much the row's softmax distribution moved
(the KL divergence of the other model's row from the base's); changes whose importance is an
outlier (at least the median plus 1.5 interquartile ranges) are taken, the rest stay at the base.
mergekit 0.1.5's ``arcee_fusion``, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergetui.methods.inputs import TensorInputs

_SOFTMAX_EPS = 1e-8


def arcee_fusion(inputs: TensorInputs) -> torch.Tensor:
    """base + (other − base)·[importance ≥ Q₂ + 1.5·(Q₃ − Q₁)].

    The quartiles are exact order statistics of all the importance scores (the element at
    ⌊q·(n−1)⌋ of the sorted scores, by selection, not a sort). mergekit takes them from a random
    sample of a million scores on larger tensors, which makes its result vary from run to run;
    on tensors of up to a million entries the two agree.
    """
    base = inputs.require_base()
    (other,) = inputs.models
    importance = _importance(other, base)
    flat = importance.reshape(-1)
    count = flat.numel()
    quartiles = [
        flat.kthvalue(int(torch.tensor(q, dtype=torch.float32) * (count - 1)) + 1).values
        for q in (0.25, 0.5, 0.75)
    ]
    threshold = quartiles[1] + 1.5 * (quartiles[2] - quartiles[0])
    keep = importance.ge_(threshold)
    return base.add_(other.sub_(base).mul_(keep))


def _importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other − base| times the KL divergence, per row (the last axis), of softmax(other) from
    softmax(base), each with 1e-8 added."""
    p = F.softmax(other, dim=-1).add_(_SOFTMAX_EPS)
    q = F.softmax(base, dim=-1).add_(_SOFTMAX_EPS)
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    del p, q
    return (other - base).abs_().mul_(divergence)
