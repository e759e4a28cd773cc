"""Low-rank factors of a weight difference: the math of ``mergetui lora extract``.

For one module, ``ΔW = W_model − W_base`` (float32, shape ``(out, in)``) is decomposed with a thin
SVD, ``ΔW = U diag(σ) Vᵀ``, and cut to its first ``r`` singular triplets, the best rank-``r``
approximation in the Frobenius norm. As mergekit's ``mergekit-extract-lora`` (0.1.5) does, the
singular values are split evenly between the two factors (``distribute_scale``)::

    A = diag(√σ[:r]) Vᵀ[:r]      (r, in)     PEFT's lora_A
    B = U[:, :r] diag(√σ[:r])    (out, r)    PEFT's lora_B

so ``B @ A`` is the rank-``r`` approximation and the adapter's scale ``lora_alpha / r`` is 1. Without
``distribute_scale`` A takes all of σ and B is ``U[:, :r]``. An embedding is stored
``(vocab, hidden)`` while PEFT's ``lora_embedding_A``/``_B`` add ``(B @ A)ᵀ``: the caller passes the
transposed difference.

The rank is ``min(max_rank, min(out, in))`` (a larger request is clamped, as mergekit clamps it),
lowered further by a cut-off: ``sv_epsilon`` keeps singular values above that absolute value
(mergekit's ``--sv-epsilon``), ``rel_cutoff`` those above ``rel_cutoff · σ_max``. ``energy`` is the
share of ``‖ΔW‖²_F = Σσ²`` the kept triplets carry; the relative reconstruction error
``‖ΔW − B A‖_F / ‖ΔW‖_F`` is ``√(1 − energy)``.

Pure tensor math: no I/O. torch is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LowRank:
    """The factors of one module (float32, on the difference's device) and what they keep."""

    a: torch.Tensor  # (rank, in)
    b: torch.Tensor  # (out, rank)
    rank: int
    #: the share of the difference's energy (Σ kept σ² / Σ σ²) the factors keep; 1.0 for ΔW = 0
    energy: float
    #: the largest singular value (0.0 for ΔW = 0)
    sigma_max: float


def chosen_rank(
    singular_values: torch.Tensor,
    max_rank: int | None,
    *,
    sv_epsilon: float = 0.0,
    rel_cutoff: float | None = None,
) -> int:
    """How many singular triplets to keep from ``singular_values`` (descending)."""
    rank = singular_values.shape[0] if max_rank is None else min(max_rank, singular_values.shape[0])
    if sv_epsilon > 0:
        rank = min(rank, int((singular_values > sv_epsilon).sum()))
    if rel_cutoff is not None and singular_values.numel():
        threshold = rel_cutoff * float(singular_values[0])
        rank = min(rank, int((singular_values > threshold).sum()))
    return rank


def decompose(
    delta: torch.Tensor,
    max_rank: int | None,
    *,
    sv_epsilon: float = 0.0,
    rel_cutoff: float | None = None,
    distribute_scale: bool = True,
) -> LowRank:
    """The rank-``r`` factors ``(A, B)`` with ``B @ A ≈ delta`` (see the module docstring).

    ``max_rank`` None keeps every triplet the cut-offs allow. ``delta`` must be 2-D; it is read,
    not modified.
    """
    import torch

    if delta.dim() != 2:
        raise ValueError(
            f"a LoRA factorisation needs a 2-D difference, got shape {list(delta.shape)}"
        )
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    rank = chosen_rank(s, max_rank, sv_epsilon=sv_epsilon, rel_cutoff=rel_cutoff)
    squares = s.double().square()
    total = float(squares.sum())
    energy = float(squares[:rank].sum()) / total if total > 0 else 1.0
    kept = s[:rank]
    if distribute_scale:
        root = kept.sqrt()
        a = root[:, None] * vh[:rank]
        b = u[:, :rank] * root[None, :]
    else:
        a = kept[:, None] * vh[:rank]
        b = u[:, :rank].clone()
    sigma_max = float(s[0]) if s.numel() else 0.0
    return LowRank(
        a=a.contiguous(), b=b.contiguous(), rank=rank, energy=energy, sigma_max=sigma_max
    )


def relative_error(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖delta − B A‖_F / ‖delta‖_F`` (0.0 when both are zero), computed in float64."""
    delta64 = delta.double()
    norm = float(delta64.norm())
    residual = float((delta64 - b.double() @ a.double()).norm())
    if norm == 0:
        return 0.0 if residual == 0 else float("inf")
    return residual / norm
