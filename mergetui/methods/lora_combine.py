"""Combine several LoRA adapters' factors for one module into one pair, as PEFT's
``add_weighted_adapter`` does; pure tensor math, no I/O.

Each adapter ``i`` adds ``ΔWᵢ = sᵢ · Bᵢ @ Aᵢ`` (``sᵢ`` its ``lora_alpha / r``, or ``/ sqrt(r)``
with rsLoRA) and comes with a weight ``wᵢ``. The result is a pair ``(A, B)`` whose own scale is 1
(the output config has ``lora_alpha = r``). Three families, by combination type:

* ``cat``: exact. ``A = [w₁s₁A₁; w₂s₂A₂; …]`` (rows stacked), ``B = [B₁ B₂ …]`` (columns side by
  side), so ``B @ A = Σ wᵢ sᵢ Bᵢ Aᵢ``; the rank is the sum of the ranks.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A factors are
  combined with each other and the B factors with each other, entry by entry, by the task-vector
  rule of that name, with weights ``±sqrt(|wᵢsᵢ|)`` on A (the sign of ``wᵢsᵢ``) and
  ``sqrt(|wᵢsᵢ|)`` on B. Cheap, and only an approximation of ``Σ ΔWᵢ`` (cross terms
  ``Bᵢ Aⱼ`` appear); every adapter must have the same rank for the module.
* ``svd`` and the ``*_svd`` types: the deltas ``ΔWᵢ`` are combined by the rule (``svd``: the
  weighted sum), then truncated to ``rank`` by a singular value decomposition:
  ``B = U[:, :r] · diag(S[:r])``, ``A = Vh[:r]``, optionally clamped to the ``svd_clamp`` quantile
  of their entries.

The rules (on tensors ``tᵢ`` with weights ``wᵢ``): ``linear`` Σwᵢtᵢ; ``magnitude_prune`` the same
after keeping each tᵢ's ``int(density · numel)`` largest magnitudes; ``ties`` prunes likewise,
elects a sign per entry (of Σtᵢ, ``total``, or of Σsign(tᵢ), ``frequency``; zero counts as +),
and averages the weighted entries that agree with it; ``dare_linear`` / ``dare_ties`` drop entries
at random with probability ``1 - density`` and divide the kept ones by ``density`` instead of
pruning by magnitude. A density of 1 prunes nothing. DARE's masks come from a generator seeded by
(seed, tensor, adapter index), so a seed gives the same bits on any device and in any order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergetui.methods.inputs import tensor_generator

#: The types that combine deltas and truncate them by SVD (``svd`` is the weighted sum).
SVD_RULE = {
    "svd": "linear",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
#: The types that combine the A and B factors separately (the same rank everywhere).
FACTOR_RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's pair for one module: ``ΔW = scale · b @ a`` (``a`` r×in, ``b`` out×r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Combination:
    """How to combine: the type, one weight per adapter, and the type's parameters."""

    kind: str
    weights: tuple[float, ...]
    density: float | None = None
    majority_sign_method: str = "total"
    rank: int | None = None  # the output rank of the svd types
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    seed: int = 0


def combine_lora(
    module: str, factors: list[LoraFactors], how: Combination
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined ``(A, B)`` of ``module`` (float32, on the factors' device), scale 1.

    ``module`` names the random streams of the DARE types (with ``.lora_A``, ``.lora_B`` or
    ``.delta`` appended, and the adapter's index)."""
    if len(factors) != len(how.weights):
        raise ValueError(f"{module}: {len(factors)} adapters but {len(how.weights)} weights")
    if how.kind == "cat":
        a = torch.cat([f.a * (w * f.scale) for f, w in zip(factors, how.weights, strict=True)])
        b = torch.cat([f.b for f in factors], dim=1)
        return a, b
    if how.kind in FACTOR_RULES:
        signed = [w * f.scale for f, w in zip(factors, how.weights, strict=True)]
        roots = [abs(x) ** 0.5 for x in signed]
        a_weights = [r if x >= 0 else -r for r, x in zip(roots, signed, strict=True)]
        a = combine_tensors(how.kind, [f.a for f in factors], a_weights, how, f"{module}.lora_A")
        b = combine_tensors(how.kind, [f.b for f in factors], roots, how, f"{module}.lora_B")
        return a, b
    rule = SVD_RULE.get(how.kind)
    if rule is None:
        raise ValueError(f"unknown LoRA combination type {how.kind!r}")
    if how.rank is None:
        raise ValueError(f"{module}: the {how.kind} combination needs an output rank")
    if rule == "linear" and how.svd_clamp is None:
        return _low_rank_svd(factors, how.weights, how.rank)
    deltas = [(f.b @ f.a).mul_(f.scale) for f in factors]
    delta = combine_tensors(rule, deltas, list(how.weights), how, f"{module}.delta")
    del deltas
    return _truncated_svd(delta, how)


def combine_tensors(
    rule: str, tensors: list[torch.Tensor], weights: list[float], how: Combination, name: str
) -> torch.Tensor:
    """One task-vector rule over same-shaped tensors (see the module docstring)."""
    density = how.density
    if rule == "linear":
        return _weighted_sum(tensors, weights)
    if density is None:
        raise ValueError(f"{name}: the {rule} rule needs a density")
    if rule in ("magnitude_prune", "ties"):
        kept = [_keep_largest(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        kept = [_drop_random(t, density, how.seed, name, i) for i, t in enumerate(tensors)]
    else:
        raise ValueError(f"unknown combination rule {rule!r}")
    if rule in ("magnitude_prune", "dare_linear"):
        return _weighted_sum(kept, weights)
    return _disjoint_mean(kept, weights, how.majority_sign_method)


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ wᵢtᵢ, each product rounded before it is added (no fused multiply-add): the same bits
    as PEFT's sum of the stacked weighted tensors, which matters where SVD clamping follows."""
    total = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        total.add_(tensor * weight)
    return total


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density · numel)`` largest magnitudes zeroed."""
    if density >= 1:
        return tensor
    count = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        keep[torch.topk(flat.abs(), count, largest=True).indices] = True
    return (flat * keep).reshape(tensor.shape)


def _drop_random(
    tensor: torch.Tensor, density: float, seed: int, name: str, index: int
) -> torch.Tensor:
    """DARE: each entry kept with probability ``density`` and then divided by it. The draws are
    made on the CPU from the (seed, ``name``, ``index``) generator, so every device agrees."""
    if density >= 1:
        return tensor
    draws = torch.rand(tensor.shape, generator=tensor_generator(seed, name, index))
    keep = (draws < density).to(tensor.device)
    return tensor * keep / density


def _disjoint_mean(tensors: list[torch.Tensor], weights: list[float], method: str) -> torch.Tensor:
    """TIES' sign election and disjoint merge: per entry, the elected sign is that of the sum of
    the (unweighted) entries, or of their signs with ``frequency``; zero elects +. The weighted
    entries of that sign are summed and divided by how many there are (at least 1)."""
    if method == "total":
        votes = _weighted_sum(tensors, [1.0] * len(tensors))
    elif method == "frequency":
        votes = _weighted_sum([t.sign() for t in tensors], [1.0] * len(tensors))
    else:
        raise ValueError(f"unknown majority sign method {method!r}; use total or frequency")
    elected = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
    del votes
    total = torch.zeros_like(tensors[0])
    count = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights, strict=True):
        agrees = tensor.sign() == elected
        total.add_((tensor * weight).mul_(agrees))  # rounded as PEFT rounds it
        count.add_(agrees)
    return total.div_(count.clamp_(min=1.0))


def _fit_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with exactly ``rank`` rows / columns: cut, or padded with zeros when the
    decomposition had fewer (a rank above the module's smaller side, or above the deltas')."""
    b, a = b[:, :rank], a[:rank]
    missing = rank - a.shape[0]
    if missing > 0:
        a = torch.cat([a, a.new_zeros(missing, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
    return a.contiguous(), b.contiguous()


def _truncated_svd(delta: torch.Tensor, how: Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta ≈ B @ A`` of rank ``how.rank``: the singular value decomposition, cut, the
    singular values folded into B, then optionally clamped to ±the ``svd_clamp`` quantile."""
    assert how.rank is not None
    u, s, vh = torch.linalg.svd(delta, full_matrices=how.svd_full_matrices, driver=how.svd_driver)
    del delta
    kept = min(how.rank, s.shape[0])
    b = u[:, :kept] * s[:kept]
    a = vh[:kept]
    if how.svd_clamp is not None:
        bound = _quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), how.svd_clamp)
        b = b.clamp(-bound, bound)
        a = a.clamp(-bound, bound)
    return _fit_rank(b, a, how.rank)


def _quantile(values: torch.Tensor, q: float) -> float:
    """The ``q`` quantile with linear interpolation, computed as ``torch.quantile`` computes it
    (in the values' dtype), without its limit on the input's size."""
    ordered = values.sort().values
    position = torch.tensor(q, dtype=values.dtype) * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    fraction = (position - low).to(values.device)
    return float(torch.lerp(ordered[low], ordered[high], fraction))


def _low_rank_svd(
    factors: list[LoraFactors], weights: tuple[float, ...], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``svd`` type without forming ``Σ wᵢΔWᵢ``: that sum is ``Bc @ Ac`` with the factors
    side by side (as ``cat``), whose rank k is at most the sum of the ranks; with ``Bc = Qb Rb``
    and ``Acᵀ = Qa Ra`` it is ``Qb (Rb Raᵀ) Qaᵀ``, and the SVD of the k×k core gives the same
    truncation as that of the whole delta, in a fraction of its time and memory."""
    a_cat = torch.cat([f.a * (w * f.scale) for f, w in zip(factors, weights, strict=True)])
    b_cat = torch.cat([f.b for f in factors], dim=1)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    kept = min(rank, s.shape[0])
    b = (q_b @ u[:, :kept]) * s[:kept]
    a = vh[:kept] @ q_a.T
    return _fit_rank(b, a, rank)
