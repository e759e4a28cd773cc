"""Tests for the pure tensor kernels in :mod:`mergetui.methods`.

The reference implementations below are written from ``shared/notes/merge-math.md``
("Exact math"), deliberately naively (full sorts, explicit sign comparisons, float64
arithmetic) and without importing any helper from the kernels, so that a kernel and its
reference cannot share a bug. The only shared pieces
are :func:`mergetui.methods.inputs.tensor_seed` and :func:`mergetui.methods.philox.uniform`,
because the DARE masking contract is defined in terms of them: the mask of model ``i`` is
``philox.uniform(tensor_seed(seed, name, i), 0, numel) < density``, reshaped (``uniform``
itself is checked against Philox4x32-10's published known answers and a scalar reference in
``test_philox.py``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from mergetui.methods import philox
from mergetui.methods.inputs import TensorInputs, tensor_seed
from mergetui.methods.linear import linear
from mergetui.methods.passthrough import passthrough
from mergetui.methods.registry import METHODS, MethodSpec
from mergetui.methods.slerp import slerp
from mergetui.methods.task_arithmetic import (
    dare_linear,
    dare_ties,
    magnitude_prune_,
    random_drop_,
    task_arithmetic,
    ties,
)

Kernel = Callable[[TensorInputs], torch.Tensor]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Shapes for the reference comparisons: 1-D, 2-D and 3-D, odd sizes, and a single element.
SHAPES: list[tuple[int, ...]] = [(1,), (7,), (257,), (33, 17), (64, 48), (5, 3, 11)]


# --- helpers --------------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    """A private CPU generator so test data never depends on the global RNG or on test order."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def random_base_and_models(
    shape: tuple[int, ...], count: int, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` fine-tunes of it, with task vectors of different scales (continuous, so
    magnitude ties have probability zero)."""
    g = generator(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.1 * (index + 1) * torch.randn(shape, generator=g) for index in range(count)]
    return base, models


def run_kernel(
    kernel: Kernel,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    model_params: Sequence[dict[str, Any]],
    params: dict[str, Any] | None = None,
    *,
    name: str = "model.layers.0.mlp.weight",
    seed: int = 0,
) -> torch.Tensor:
    """Call ``kernel`` on clones (kernels own and may overwrite their inputs) and check the contract
    that the result is float32 with the inputs' shape."""
    inputs = TensorInputs(
        name=name,
        base=None if base is None else base.clone(),
        models=[model.clone() for model in models],
        model_params=[dict(p) for p in model_params],
        params=dict(params or {}),
        seed=seed,
    )
    result = kernel(inputs)
    assert result.dtype == torch.float32
    assert result.shape == models[0].shape
    return result


def weight_params(weights: Sequence[float], densities: Sequence[float] | None = None) -> list[dict]:
    """Per-model parameter dicts as the executor would resolve them."""
    if densities is None:
        return [{"weight": w} for w in weights]
    return [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Put torch's intra-op thread count back after a test that changes it."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- reference implementations (float64, straight from the note) --------------------------------


def reference_linear(
    models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    """r = Σ wᵢ·xᵢ, divided by Σ wᵢ when normalize is on."""
    result = torch.zeros(models[0].shape, dtype=torch.float64)
    for model, weight in zip(models, weights, strict=True):
        result = result + weight * model.double()
    if normalize:
        result = result / sum(weights)
    return result.float()


def reference_slerp(
    base: torch.Tensor, other: torch.Tensor, t: float, dot_offset: float = 0.0
) -> torch.Tensor:
    """SLERP from the base (t=0) to the other model (t=1), lerp when |cos θ| > 0.9995.

    ``dot_offset`` perturbs cos θ, to measure how sensitive the result is to its rounding.
    """
    a = base.double().flatten()
    b = other.double().flatten()
    norm_a = float(torch.sqrt((a * a).sum()))
    norm_b = float(torch.sqrt((b * b).sum()))
    if norm_a <= 1e-8:
        norm_a = 1.0
    if norm_b <= 1e-8:
        norm_b = 1.0
    dot = float(((a / norm_a) * (b / norm_b)).sum())
    dot = min(1.0, max(-1.0, dot + dot_offset))
    if abs(dot) > 0.9995:
        result = (1.0 - t) * a + t * b
    else:
        theta = math.acos(dot)
        result = (
            math.sin((1.0 - t) * theta) / math.sin(theta) * a
            + math.sin(t * theta) / math.sin(theta) * b
        )
    return result.reshape(base.shape).float()


def reference_magnitude_sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density·numel)) largest |δ| over the whole tensor (full argsort)."""
    if density >= 1.0:
        return delta.clone()
    flat = delta.flatten()
    keep_count = max(1, int(density * flat.numel()))
    order = torch.argsort(flat.abs(), descending=True)
    mask = torch.zeros_like(flat)
    mask[order[:keep_count]] = 1.0
    return (flat * mask).reshape(delta.shape)


def reference_dare_mask(
    shape: tuple[int, ...], density: float, seed: int, name: str, model_index: int
) -> torch.Tensor:
    """The documented DARE masking contract: Bernoulli(density) from the per-tensor Philox
    stream's flat uniforms (the kernel draws them in chunks or per thread; the stream is the
    same)."""
    key = tensor_seed(seed, name, model_index)
    return (philox.uniform(key, 0, math.prod(shape)) < density).reshape(shape)


def reference_rescale(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """masked·(‖δ‖₁/‖masked‖₁) over the whole tensor, skipped when either norm < 1e-7."""
    l1_original = float(original.abs().sum())
    l1_masked = float(masked.abs().sum())
    if l1_original < 1e-7 or l1_masked < 1e-7:
        return masked
    return masked * (l1_original / l1_masked)


def reference_task_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    *,
    sparsifier: str | None = None,
    sign_election: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    seed: int = 0,
    name: str = "model.layers.0.mlp.weight",
) -> torch.Tensor:
    """Generalized task arithmetic: sparsify, weight, sign-elect, normalize, scale, add to base."""
    if densities is None:
        densities = [1.0] * len(models)
    base64 = base.double()
    deltas: list[torch.Tensor] = []
    for index, (model, weight, density) in enumerate(zip(models, weights, densities, strict=True)):
        delta = model.double() - base64
        if sparsifier == "magnitude":
            delta = reference_magnitude_sparsify(delta, density)
        elif sparsifier == "random":
            mask = reference_dare_mask(tuple(base.shape), density, seed, name, index)
            masked = delta * mask.double()
            delta = reference_rescale(delta, masked) if rescale else masked
        deltas.append(weight * delta)

    if sign_election:
        total = torch.zeros_like(base64)
        for delta in deltas:
            total = total + delta
        majority = torch.where(total >= 0, 1.0, -1.0).double()
        mixed = torch.zeros_like(base64)
        divisor = torch.zeros_like(base64)
        for delta, weight in zip(deltas, weights, strict=True):
            agrees = (torch.sign(delta) == majority).double()
            mixed = mixed + delta * agrees
            divisor = divisor + weight * agrees
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        if normalize:
            mixed = mixed / divisor
    else:
        mixed = torch.zeros_like(base64)
        for delta in deltas:
            mixed = mixed + delta
        weight_sum = sum(weights)
        if normalize:
            mixed = mixed / (weight_sum if abs(weight_sum) >= 1e-8 else 1.0)
    if lam != 1.0:
        mixed = mixed * lam
    return (base64 + mixed).float()


# --- linear ---------------------------------------------------------------------------------------

LINEAR_CASES: list[tuple[list[float], bool]] = [
    ([1.0], True),
    ([0.3, 0.7], True),
    ([0.3, 0.7], False),
    ([0.5, 1.5, -0.25], True),
    ([2.0, 1.0, 1.0, 0.5], False),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("weights", "normalize"), LINEAR_CASES)
def test_linear_matches_reference(
    shape: tuple[int, ...], weights: list[float], normalize: bool
) -> None:
    """The weighted (normalised) average must match Σwx/Σw on random tensors."""
    _, models = random_base_and_models(shape, len(weights), seed=sum(shape) + len(weights))
    result = run_kernel(linear, None, models, weight_params(weights), {"normalize": normalize})
    torch.testing.assert_close(result, reference_linear(models, weights, normalize))


def test_linear_of_identical_models_is_that_model() -> None:
    """Averaging copies of one model must give it back, whatever the weights."""
    model = torch.randn(31, 9, generator=generator(1))
    weights = [0.2, 3.0, 0.7]
    result = run_kernel(linear, None, [model] * 3, weight_params(weights), {"normalize": True})
    torch.testing.assert_close(result, model)


# --- slerp ----------------------------------------------------------------------------------------


def slerp_pair(
    relation: str, shape: tuple[int, ...], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors with a chosen geometric relation, covering both branches of SLERP."""
    g = generator(seed)
    v0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    if relation == "independent":
        return v0, 1.5 * noise
    if relation == "correlated":  # cos θ ≈ 0.89: the spherical branch
        return v0, 2.0 * (v0 + 0.5 * noise)
    if relation == "anticorrelated":  # cos θ ≈ -0.89
        return v0, -(v0 + 0.5 * noise)
    if relation == "parallel":  # cos θ > 0.9995: the lerp fallback
        return v0, 1.7 * v0 + 1e-3 * noise
    if relation == "antiparallel":  # cos θ < -0.9995: lerp as well
        return v0, -2.0 * v0 + 1e-3 * noise
    if relation == "zero_base":  # a zero norm is replaced by 1, so cos θ = 0
        return torch.zeros(shape), noise
    if relation == "tiny_base":  # parallel, but a norm ≤ 1e-8 is replaced by 1, so cos θ ≈ 0
        return 1e-10 * noise, noise
    if relation in THRESHOLD_COSINES:  # an exact cosine close to the 0.9995 threshold
        return v0, with_cosine(v0, noise, THRESHOLD_COSINES[relation])
    raise AssertionError(relation)


#: Cosines on either side of the 0.9995 threshold, far enough from it that fp32 rounding of the dot
#: product cannot flip the branch, close enough that SLERP and lerp differ measurably.
THRESHOLD_COSINES: dict[str, float] = {
    "just_above_threshold": 0.9997,
    "just_below_threshold": 0.9992,
    "anti_just_above_threshold": -0.9997,
    "anti_just_below_threshold": -0.9992,
}


def with_cosine(v0: torch.Tensor, noise: torch.Tensor, cosine: float) -> torch.Tensor:
    """A tensor whose cosine with ``v0`` is exactly ``cosine`` (degenerate for one element)."""
    a = v0.double().flatten()
    if a.numel() == 1:
        return (1.3 * math.copysign(1.0, cosine) * v0).reshape(v0.shape)
    orthogonal = noise.double().flatten()
    orthogonal = orthogonal - (orthogonal @ a) / (a @ a) * a
    orthogonal = orthogonal / orthogonal.norm() * a.norm()
    tangent = math.sqrt(1.0 / cosine**2 - 1.0)
    result = 1.3 * math.copysign(1.0, cosine) * (a + tangent * orthogonal)
    return result.reshape(v0.shape).float()


SLERP_RELATIONS = [
    "independent",
    "correlated",
    "anticorrelated",
    "parallel",
    "antiparallel",
    "zero_base",
    "tiny_base",
    *THRESHOLD_COSINES,
]
#: Near θ = π (and below the lerp threshold) SLERP is ill-conditioned: the coefficients are
#: ~1/sin θ ≈ 25 and d(coef)/d(cos θ) ~ 1/sin³θ, so one ulp of rounding in an fp32 dot product
#: moves the result by ~5e-5 relative. These get a tolerance derived from that sensitivity
#: instead of the fixed one.
ILL_CONDITIONED_RELATIONS = {"anti_just_below_threshold"}


SLERP_SHAPES: list[tuple[int, ...]] = [(1,), (7,), (33, 17), (64, 48)]
SLERP_TS: list[float] = [0.0, 0.25, 0.5, 0.9, 1.0]


@pytest.mark.parametrize("shape", SLERP_SHAPES)
@pytest.mark.parametrize(
    "relation", [r for r in SLERP_RELATIONS if r not in ILL_CONDITIONED_RELATIONS]
)
@pytest.mark.parametrize("t", SLERP_TS)
def test_slerp_matches_reference(shape: tuple[int, ...], relation: str, t: float) -> None:
    """SLERP, including the |cos θ| > 0.9995 lerp fallback, must match the formula in the note."""
    v0, v1 = slerp_pair(relation, shape, seed=len(shape) * 10 + SLERP_RELATIONS.index(relation))
    result = run_kernel(slerp, v0, [v1], [{}], {"t": t})
    torch.testing.assert_close(result, reference_slerp(v0, v1, t))


@pytest.mark.parametrize("shape", SLERP_SHAPES)
@pytest.mark.parametrize("relation", sorted(ILL_CONDITIONED_RELATIONS))
@pytest.mark.parametrize("t", SLERP_TS)
def test_slerp_matches_reference_within_fp32_conditioning(
    shape: tuple[int, ...], relation: str, t: float
) -> None:
    """Near-antiparallel SLERP: the kernel must agree with the formula evaluated at a cos θ
    within a few fp32 ulps of the exact one (the note computes the dot product in fp32, so no
    kernel can do better)."""
    v0, v1 = slerp_pair(relation, shape, seed=len(shape) * 10 + SLERP_RELATIONS.index(relation))
    result = run_kernel(slerp, v0, [v1], [{}], {"t": t})
    dot_rounding = 4 * 2.0**-24  # the kernel's fp32 dot is observed within 2 ulps of the exact one
    low = reference_slerp(v0, v1, t, dot_offset=-dot_rounding)
    high = reference_slerp(v0, v1, t, dot_offset=dot_rounding)
    drift = float((high - low).abs().max()) / 2  # how far `dot_rounding` moves the result
    torch.testing.assert_close(result, reference_slerp(v0, v1, t), rtol=1.3e-6, atol=1e-5 + drift)


@pytest.mark.parametrize("relation", list(THRESHOLD_COSINES))
def test_slerp_threshold_pairs_have_the_intended_cosine(relation: str) -> None:
    """Premise of the threshold cases: the cosine is what was asked for, well off 0.9995."""
    v0, v1 = slerp_pair(relation, (33, 17), seed=0)
    cosine = float(
        torch.nn.functional.cosine_similarity(v0.double().flatten(), v1.double().flatten(), dim=0)
    )
    assert cosine == pytest.approx(THRESHOLD_COSINES[relation], abs=1e-6)
    assert abs(abs(cosine) - 0.9995) > 1e-4


@pytest.mark.parametrize("relation", ["independent", "correlated", "anticorrelated"])
def test_slerp_endpoints_are_the_inputs(relation: str) -> None:
    """t=0 gives the base and t=1 gives the other model."""
    v0, v1 = slerp_pair(relation, (40, 25), seed=3)
    torch.testing.assert_close(run_kernel(slerp, v0, [v1], [{}], {"t": 0.0}), v0)
    torch.testing.assert_close(run_kernel(slerp, v0, [v1], [{}], {"t": 1.0}), v1)


@pytest.mark.parametrize("relation", ["parallel", "antiparallel"])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.8])
def test_slerp_of_near_parallel_tensors_is_lerp(relation: str, t: float) -> None:
    """Where SLERP is ill-conditioned the result is plain (1-t)·a + t·b."""
    v0, v1 = slerp_pair(relation, (50, 20), seed=4)
    cosine = torch.nn.functional.cosine_similarity(v0.flatten(), v1.flatten(), dim=0)
    assert abs(float(cosine)) > 0.9995  # the premise of the test
    result = run_kernel(slerp, v0, [v1], [{}], {"t": t})
    torch.testing.assert_close(result, (1 - t) * v0 + t * v1)


def test_slerp_keeps_the_norm_of_orthogonal_equal_norm_inputs() -> None:
    """Halfway between two orthogonal unit vectors lies on the unit circle (what SLERP is for)."""
    v0 = torch.tensor([1.0, 0.0, 0.0])
    v1 = torch.tensor([0.0, 1.0, 0.0])
    result = run_kernel(slerp, v0, [v1], [{}], {"t": 0.5})
    half = math.sqrt(0.5)
    torch.testing.assert_close(result, torch.tensor([half, half, 0.0]))


# --- task arithmetic, TIES, DARE against the reference --------------------------------------------

TA_CASES: list[tuple[list[float], bool, float]] = [
    ([1.0], False, 1.0),
    ([0.5, 0.8], False, 1.0),
    ([0.5, 0.8], True, 1.0),
    ([1.0, -0.5, 0.7], False, 0.6),
    ([0.3, 0.3, 0.4, 1.2], True, 1.5),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("weights", "normalize", "lam"), TA_CASES)
def test_task_arithmetic_matches_reference(
    shape: tuple[int, ...], weights: list[float], normalize: bool, lam: float
) -> None:
    """base + λ·Σwδ (÷Σw under normalize) on random tensors."""
    base, models = random_base_and_models(shape, len(weights), seed=11 + len(weights))
    params = {"normalize": normalize, "lambda": lam}
    result = run_kernel(task_arithmetic, base, models, weight_params(weights), params)
    expected = reference_task_merge(base, models, weights, normalize=normalize, lam=lam)
    torch.testing.assert_close(result, expected)


TIES_CASES: list[tuple[list[float], list[float], bool, float]] = [
    ([1.0], [0.5], True, 1.0),
    ([1.0, 1.0], [0.2, 0.2], True, 1.0),
    ([0.7, 1.3, 0.4], [0.1, 0.5, 0.9], True, 1.0),
    ([0.7, 1.3, 0.4], [0.1, 0.5, 0.9], False, 0.8),
    ([1.0, -0.5, 0.7], [0.3, 0.6, 1.0], True, 1.2),
    ([0.25, 0.5, 1.0, 2.0], [0.05, 0.33, 0.5, 0.75], False, 1.0),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("weights", "densities", "normalize", "lam"), TIES_CASES)
def test_ties_matches_reference(
    shape: tuple[int, ...],
    weights: list[float],
    densities: list[float],
    normalize: bool,
    lam: float,
) -> None:
    """Top-k by global magnitude, weighting before the 'sum' sign election, per-element divisor."""
    base, models = random_base_and_models(shape, len(weights), seed=21 + len(weights))
    params = {"normalize": normalize, "lambda": lam}
    result = run_kernel(ties, base, models, weight_params(weights, densities), params)
    expected = reference_task_merge(
        base,
        models,
        weights,
        densities,
        sparsifier="magnitude",
        sign_election=True,
        normalize=normalize,
        lam=lam,
    )
    torch.testing.assert_close(result, expected)


DARE_CASES: list[tuple[list[float], list[float], bool, bool, float]] = [
    ([1.0], [0.5], False, True, 1.0),
    ([1.0], [0.5], False, False, 1.0),
    ([0.6, 0.9], [0.3, 0.7], True, True, 1.0),
    ([0.6, 0.9], [0.3, 0.7], False, False, 0.5),
    ([1.0, -0.5, 0.7], [0.2, 0.5, 0.9], False, True, 1.3),
    ([0.4, 0.4, 0.4], [0.1, 0.1, 1.0], True, True, 1.0),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel_name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize(("weights", "densities", "normalize", "rescale", "lam"), DARE_CASES)
def test_dare_matches_reference_with_the_documented_mask(
    shape: tuple[int, ...],
    kernel_name: str,
    weights: list[float],
    densities: list[float],
    normalize: bool,
    rescale: bool,
    lam: float,
) -> None:
    """Same mask as the documented contract, then L1 rescale, weighting and (for dare_ties) TIES."""
    kernel = {"dare_linear": dare_linear, "dare_ties": dare_ties}[kernel_name]
    base, models = random_base_and_models(shape, len(weights), seed=31 + len(weights))
    seed, name = 1234, "model.layers.3.self_attn.q_proj.weight"
    params = {"normalize": normalize, "rescale": rescale, "lambda": lam}
    model_params = weight_params(weights, densities)
    result = run_kernel(kernel, base, models, model_params, params, name=name, seed=seed)
    expected = reference_task_merge(
        base,
        models,
        weights,
        densities,
        sparsifier="random",
        sign_election=kernel_name == "dare_ties",
        normalize=normalize,
        rescale=rescale,
        lam=lam,
        seed=seed,
        name=name,
    )
    torch.testing.assert_close(result, expected)


# --- properties of the task-vector family --------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_with_weight_zero_is_the_base(normalize: bool) -> None:
    """Zero weights add nothing (and Σw = 0 under normalize must not divide by zero)."""
    base, models = random_base_and_models((23, 19), 2, seed=41)
    params = {"normalize": normalize, "lambda": 2.0}
    result = run_kernel(task_arithmetic, base, models, weight_params([0.0, 0.0]), params)
    assert torch.equal(result, base)


def test_task_arithmetic_of_one_model_with_weight_one_is_that_model() -> None:
    """base + (x − base) = x."""
    base, models = random_base_and_models((23, 19), 1, seed=42)
    result = run_kernel(task_arithmetic, base, models, weight_params([1.0]), {"normalize": False})
    torch.testing.assert_close(result, models[0])


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weight", [1.0, 0.4, -0.7])
def test_ties_with_one_model_and_density_one_is_task_arithmetic(
    normalize: bool, weight: float
) -> None:
    """With nothing pruned and nobody to disagree with, TIES reduces to task arithmetic."""
    base, models = random_base_and_models((37, 13), 1, seed=43)
    params = {"normalize": normalize, "lambda": 0.9}
    ties_result = run_kernel(ties, base, models, weight_params([weight], [1.0]), params)
    ta_result = run_kernel(task_arithmetic, base, models, weight_params([weight]), params)
    torch.testing.assert_close(ties_result, ta_result)


@pytest.mark.parametrize("normalize", [False, True])
def test_dare_linear_with_density_one_and_no_rescale_is_task_arithmetic(normalize: bool) -> None:
    """Bernoulli(1) keeps everything, so DARE adds nothing to task arithmetic."""
    weights = [0.5, 1.2, -0.3]
    base, models = random_base_and_models((37, 13), 3, seed=44)
    params = {"normalize": normalize, "rescale": False, "lambda": 1.1}
    dare_result = run_kernel(
        dare_linear, base, models, weight_params(weights, [1.0] * 3), params, seed=9
    )
    ta_result = run_kernel(task_arithmetic, base, models, weight_params(weights), params)
    torch.testing.assert_close(dare_result, ta_result)


@pytest.mark.parametrize("rescale", [False, True])
def test_dare_ties_with_density_one_is_ties_with_density_one(rescale: bool) -> None:
    """Nothing dropped (so nothing rescaled): both reduce to sign election over the full deltas."""
    weights = [0.5, 1.2, 0.3]
    base, models = random_base_and_models((37, 13), 3, seed=45)
    params = {"normalize": True, "rescale": rescale, "lambda": 1.0}
    model_params = weight_params(weights, [1.0] * 3)
    dare_result = run_kernel(dare_ties, base, models, model_params, params, seed=5)
    ties_result = run_kernel(ties, base, models, model_params, params)
    torch.testing.assert_close(dare_result, ties_result)


def test_ties_drops_disagreeing_entries() -> None:
    """A hand-worked sign election: minority signs and pruned zeros leave sum and divisor."""
    base = torch.zeros(5)
    model_a = torch.tensor([1.0, 2.0, -1.0, 0.0, 1.5])
    model_b = torch.tensor([3.0, -1.0, -2.0, 0.0, -1.5])
    params = {"normalize": True, "lambda": 1.0}
    result = run_kernel(
        ties, base, [model_a, model_b], weight_params([1.0, 1.0], [1.0, 1.0]), params
    )
    # sums: 4 (+), 1 (+), -3 (-), 0 (+, nobody agrees so the divisor is 1), 0 (+: a zero sum
    # counts as positive, so only model_a's +1.5 survives)
    torch.testing.assert_close(result, torch.tensor([2.0, 2.0, -1.5, 0.0, 1.5]))


def test_ties_zero_divisor_is_replaced_by_one() -> None:
    """Opposite weights can make the agreeing weights sum to 0 where the sum is not 0: the note
    replaces such a divisor by 1 rather than dividing by zero."""
    base = torch.zeros(2)
    models = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])]
    params = {"normalize": True, "lambda": 1.0}
    result = run_kernel(ties, base, models, weight_params([1.0, -1.0], [1.0, 1.0]), params)
    # element 0: weighted deltas +1 and +1 both agree, divisor 1 + (-1) = 0 -> 1, so 2
    # element 1: weighted deltas +2 and -1, majority +, only the first agrees: 2 / 1
    torch.testing.assert_close(result, torch.tensor([2.0, 2.0]))


def test_ties_weights_before_sign_election() -> None:
    """The election uses weighted deltas: a heavy minority can outvote a light majority."""
    base = torch.zeros(1)
    models = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-1.0])]
    params = {"normalize": True, "lambda": 1.0}
    result = run_kernel(ties, base, models, weight_params([0.1, 0.1, 1.0], [1.0] * 3), params)
    torch.testing.assert_close(result, torch.tensor([-1.0]))


@pytest.mark.parametrize("scale", [1.0, 2.5, -0.5, 0.0])
def test_passthrough_scales_the_single_model(scale: float) -> None:
    """Passthrough returns its input times ``scale``."""
    model = torch.randn(17, 5, generator=generator(46))
    result = run_kernel(passthrough, None, [model], [{"scale": scale}])
    torch.testing.assert_close(result, model * scale)


def test_passthrough_without_model_params_is_the_identity() -> None:
    """No per-model parameters means scale 1."""
    model = torch.randn(9, generator=generator(47))
    assert torch.equal(run_kernel(passthrough, None, [model], []), model)


# --- TIES pruning keeps exactly k ----------------------------------------------------------------


def tied_integer_delta(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Non-zero integer values in ±{1, 2, 3}: many equal magnitudes, and no zero is ever 'kept'."""
    g = generator(seed)
    magnitudes = torch.randint(1, 4, shape, generator=g).float()
    signs = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return magnitudes * signs


@pytest.mark.parametrize("shape", [(1,), (10,), (1000,), (37, 29), (4, 5, 6)])
@pytest.mark.parametrize("density", [0.001, 0.1, 0.25, 0.3, 0.5, 0.77, 0.999])
def test_magnitude_prune_keeps_exactly_k_despite_ties(
    shape: tuple[int, ...], density: float
) -> None:
    """Exactly k = max(1, int(density·numel)) entries survive, none smaller than a dropped one."""
    delta = tied_integer_delta(shape, seed=51)
    original = delta.clone()
    pruned = magnitude_prune_(delta, density)
    keep_count = max(1, int(density * original.numel()))
    kept = pruned != 0
    assert int(kept.sum()) == keep_count
    assert torch.equal(pruned[kept], original[kept])  # survivors are untouched
    if keep_count < original.numel():
        assert original.abs()[kept].min() >= original.abs()[~kept].max()


def test_magnitude_prune_breaks_ties_lowest_index_first() -> None:
    """All magnitudes equal: the documented deterministic rule keeps the first k entries."""
    delta = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    pruned = magnitude_prune_(delta.clone(), 0.3)
    expected = torch.tensor([1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(pruned, expected)


@pytest.mark.parametrize("shape", [(7,), (257,), (33, 17)])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9])
def test_magnitude_prune_matches_full_sort_on_continuous_values(
    shape: tuple[int, ...], density: float
) -> None:
    """Selection (kthvalue) must pick the same entries as a full argsort when there are no ties."""
    delta = torch.randn(shape, generator=generator(52))
    expected = reference_magnitude_sparsify(delta.double(), density).float()
    assert torch.equal(magnitude_prune_(delta.clone(), density), expected)


def test_magnitude_prune_with_density_one_changes_nothing() -> None:
    """density ≥ 1 returns δ unchanged."""
    delta = tied_integer_delta((13, 7), seed=53)
    assert torch.equal(magnitude_prune_(delta.clone(), 1.0), delta)


@pytest.mark.parametrize("density", [0.05, 0.5])
def test_ties_kernel_keeps_exactly_k_despite_ties(density: float) -> None:
    """Through the kernel too: one model on a zero base, so the result is the pruned task vector."""
    delta = tied_integer_delta((31, 17), seed=54)
    params = {"normalize": False, "lambda": 1.0}
    result = run_kernel(
        ties, torch.zeros_like(delta), [delta], weight_params([1.0], [density]), params
    )
    assert int((result != 0).sum()) == max(1, int(density * delta.numel()))


# --- DARE reproducibility -------------------------------------------------------------------------

DARE_TENSORS: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (300, 64),
    "model.layers.0.mlp.up_proj.weight": (129, 77),
    "model.norm.weight": (513,),
}


def dare_merge_all(
    kernel: Kernel, order: Sequence[str], seed: int, disturb_global_rng: bool = False
) -> dict[str, torch.Tensor]:
    """Merge every tensor of a small 'model' in the given order, optionally consuming the global RNG
    between tensors (a result must not depend on it)."""
    weights, densities = [0.7, 1.1, 0.4], [0.3, 0.6, 0.9]
    params = {"normalize": False, "rescale": True, "lambda": 1.0}
    results: dict[str, torch.Tensor] = {}
    for tensor_name in order:
        base, models = random_base_and_models(DARE_TENSORS[tensor_name], 3, seed=61)
        if disturb_global_rng:
            torch.manual_seed(len(results))
            torch.rand(100)
        results[tensor_name] = run_kernel(
            kernel,
            base,
            models,
            weight_params(weights, densities),
            params,
            name=tensor_name,
            seed=seed,
        )
    return results


@pytest.mark.parametrize("kernel", [dare_linear, dare_ties])
def test_dare_is_bit_identical_whatever_the_tensor_order(kernel: Kernel) -> None:
    """The mask comes from (seed, name, model index), not from a shared stream."""
    names = list(DARE_TENSORS)
    forward = dare_merge_all(kernel, names, seed=7)
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as other tests expect it
        backward = dare_merge_all(kernel, names[::-1], seed=7, disturb_global_rng=True)
    for tensor_name in names:
        assert torch.equal(forward[tensor_name], backward[tensor_name]), tensor_name


@pytest.mark.parametrize("kernel", [dare_linear, dare_ties])
def test_dare_is_bit_identical_across_thread_counts(kernel: Kernel, restore_threads: None) -> None:
    """Large enough tensors that torch parallelises; one and two threads must agree bit for bit."""
    base, models = random_base_and_models((512, 1024), 3, seed=62)
    model_params = weight_params([0.7, 1.1, 0.4], [0.3, 0.6, 0.9])
    params = {"normalize": True, "rescale": True, "lambda": 0.8}
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(run_kernel(kernel, base, models, model_params, params, seed=3))
    assert torch.equal(results[0], results[1])


def dare_kept_mask(
    seed: int, name: str, density: float = 0.5, shape: tuple[int, ...] = (64, 64)
) -> torch.Tensor:
    """Which entries dare_linear keeps for one model (continuous task vector on a zero base)."""
    delta = torch.randn(shape, generator=generator(63))
    params = {"normalize": False, "rescale": False, "lambda": 1.0}
    result = run_kernel(
        dare_linear,
        torch.zeros(shape),
        [delta],
        weight_params([1.0], [density]),
        params,
        name=name,
        seed=seed,
    )
    return result != 0


def test_dare_same_seed_and_name_give_the_same_mask() -> None:
    """Reproducible: the same (seed, name) gives the same mask."""
    assert torch.equal(dare_kept_mask(1, "a.weight"), dare_kept_mask(1, "a.weight"))


def test_dare_different_seed_gives_a_different_mask() -> None:
    """The seed changes the mask."""
    assert not torch.equal(dare_kept_mask(1, "a.weight"), dare_kept_mask(2, "a.weight"))


def test_dare_different_tensor_name_gives_a_different_mask() -> None:
    """Tensors with the same shape must not share a mask."""
    assert not torch.equal(dare_kept_mask(1, "a.weight"), dare_kept_mask(1, "b.weight"))


def test_dare_models_get_different_masks() -> None:
    """Two models of one tensor draw from different generators."""
    masks = [reference_dare_mask((64, 64), 0.5, 1, "a.weight", index) for index in range(2)]
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_about_density_of_the_entries(density: float) -> None:
    """On 10⁶ entries the kept fraction is within 5σ (σ ≤ 5e-4) of the density."""
    kept = dare_kept_mask(8, "big.weight", density=density, shape=(1000, 1000))
    assert abs(float(kept.float().mean()) - density) < 2.5e-3


@pytest.mark.parametrize("density", [0.05, 0.3, 0.8])
def test_dare_rescale_preserves_each_task_vectors_l1_norm(density: float) -> None:
    """mergekit's rescale matches the L1 norm of the whole task vector (not 1/p)."""
    name, seed = "model.layers.1.mlp.down_proj.weight", 17
    base, models = random_base_and_models((97, 61), 3, seed=64)
    for index, model in enumerate(models):
        delta = model - base
        dropped = random_drop_(delta.clone(), density, True, tensor_seed(seed, name, index))
        assert (dropped == 0).any()  # something was dropped
        torch.testing.assert_close(
            dropped.abs().sum(dtype=torch.float64),
            delta.abs().sum(dtype=torch.float64),
            rtol=1e-6,
            atol=0.0,
        )
    # and through the kernel: one model on a zero base, so the result is the rescaled task vector
    delta = models[0] - base
    params = {"normalize": False, "rescale": True, "lambda": 1.0}
    result = run_kernel(
        dare_linear,
        torch.zeros_like(delta),
        [delta],
        weight_params([1.0], [density]),
        params,
        name=name,
        seed=seed,
    )
    torch.testing.assert_close(
        result.abs().sum(dtype=torch.float64),
        delta.abs().sum(dtype=torch.float64),
        rtol=1e-6,
        atol=0.0,
    )


def test_dare_rescale_is_skipped_for_tiny_norms() -> None:
    """Below an L1 norm of 1e-7 the masked vector is returned as is (no blow-up)."""
    delta = torch.full((50,), 1e-10)
    mask = reference_dare_mask((50,), 0.5, 0, "tiny", 0)
    dropped = random_drop_(delta.clone(), 0.5, True, tensor_seed(0, "tiny", 0))
    assert torch.equal(dropped, delta * mask)


def test_dare_rescale_with_everything_dropped_gives_zeros() -> None:
    """If the mask drops every entry the masked norm is 0: no division, no NaN."""
    delta = torch.randn(5, generator=generator(65))
    name = next(
        f"t{i}" for i in range(1000) if not reference_dare_mask((5,), 0.05, 0, f"t{i}", 0).any()
    )
    params = {"normalize": False, "rescale": True, "lambda": 1.0}
    result = run_kernel(
        dare_linear, torch.zeros(5), [delta], weight_params([1.0], [0.05]), params, name=name
    )
    assert torch.equal(result, torch.zeros(5))


# --- registry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(METHODS.values()), ids=list(METHODS))
def test_every_method_has_a_loadable_kernel_and_documented_params(spec: MethodSpec) -> None:
    """The CLI, the TUI and the model card are generated from the registry: nothing may be blank."""
    kernel = spec.load_kernel()
    assert callable(kernel)
    assert spec.summary.strip() and spec.when_to_use.strip()
    for param in spec.params:
        assert isinstance(param.help, str) and param.help.strip(), f"{spec.name}.{param.name}"


@pytest.mark.parametrize("spec", list(METHODS.values()), ids=list(METHODS))
def test_every_kernel_runs_with_registry_defaults(spec: MethodSpec) -> None:
    """Filling parameters exactly as the registry declares them gives a finite float32 result."""
    required_values = {"weight": 0.5, "t": 0.5}
    count = spec.min_models if spec.max_models == spec.min_models else max(spec.min_models, 2)
    base, models = random_base_and_models((6, 5), count, seed=71)

    def value(name: str, default: Any) -> Any:
        return required_values[name] if spec.param(name).required else default

    params = {p.name: value(p.name, p.default) for p in spec.global_params}
    model_params = [{p.name: value(p.name, p.default) for p in spec.model_params} for _ in models]
    result = run_kernel(spec.load_kernel(), base, models, model_params, params, seed=1)
    assert torch.isfinite(result).all()


def test_registry_defaults_match_the_note() -> None:
    """Defaults from the note's table: normalize on for ties (not DARE), rescale on for DARE."""
    expected = {
        "task_arithmetic": {"normalize": False, "lambda": 1.0},
        "ties": {"normalize": True, "lambda": 1.0, "density": 1.0},
        "dare_ties": {"normalize": False, "rescale": True, "lambda": 1.0, "density": 1.0},
        "dare_linear": {"normalize": False, "rescale": True, "lambda": 1.0, "density": 1.0},
        "linear": {"normalize": True},
    }
    for method_name, defaults in expected.items():
        spec = METHODS[method_name]
        for param_name, default in defaults.items():
            param = spec.param(param_name)
            assert param is not None, f"{method_name}.{param_name}"
            assert param.default == default, f"{method_name}.{param_name}"
    assert METHODS["slerp"].param("t").required
    assert METHODS["dare_ties"].randomized and METHODS["dare_linear"].randomized
    assert not any(METHODS[m].randomized for m in ("linear", "slerp", "task_arithmetic", "ties"))


@pytest.mark.parametrize("module", ["mergetui.methods.registry", "mergetui.methods"])
def test_registry_import_does_not_import_torch(module: str) -> None:
    """The CLI and TUI read the registry at start-up; torch must load only when a merge runs."""
    code = (
        "import importlib, sys\n"
        f"mod = importlib.import_module({module!r})\n"
        "from mergetui.methods.registry import METHODS\n"
        "assert METHODS and all(s.params is not None for s in METHODS.values())\n"
        "print('torch' in sys.modules)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "False"


@pytest.mark.parametrize("native_mode", ["1", "0"])
def test_dare_mask_follows_the_flat_stream_on_large_multi_chunk_tensors(
    native_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked drawing (torch ops) and the C loops' per-thread ranges must both equal the
    documented flat stream, also past one chunk and in 2-D."""
    from mergetui.methods.task_arithmetic import CHUNK

    monkeypatch.setenv("MERGETUI_NATIVE", native_mode)
    shape = (3, CHUNK // 2 + 5)  # 1.5 chunks and a ragged tail
    delta = torch.ones(shape)
    pruned = random_drop_(delta, 0.4, False, tensor_seed(7, "w", 0))
    assert torch.equal(pruned != 0, reference_dare_mask(shape, 0.4, 7, "w", 0))


def test_magnitude_prune_is_exact_across_chunks_with_ties() -> None:
    """Ties at the threshold spread over several chunks are kept lowest index first, exactly k."""
    from mergetui.methods.task_arithmetic import CHUNK

    g = torch.Generator().manual_seed(3)
    delta = torch.randint(-3, 4, (2 * CHUNK + 17,), generator=g).float()
    keep = max(1, int(0.37 * delta.numel()))
    pruned = magnitude_prune_(delta.clone(), 0.37)
    assert int((pruned != 0).sum()) == keep
    order = torch.sort(
        delta.abs(), descending=True, stable=True
    ).indices  # ties: lowest index first
    expected = torch.zeros_like(delta)
    expected[order[:keep]] = delta[order[:keep]]
    assert torch.equal(pruned, expected)


@pytest.mark.parametrize("layout", ["normal", "bf16_ties", "sample_misleads"])
@pytest.mark.parametrize("density", [0.01, 0.5, 0.93])
def test_kth_largest_magnitude_matches_kthvalue(layout: str, density: float) -> None:
    """The radix selection is exact, including when the strided sample points at a wrong bucket."""
    from mergetui.methods.task_arithmetic import kth_largest_magnitude

    g = torch.Generator().manual_seed(11)
    count = (1 << 20) + 12_345
    values = torch.randn(count, generator=g)
    if layout == "bf16_ties":
        values = values.bfloat16().float() - torch.randn(count, generator=g).bfloat16().float()
    elif layout == "sample_misleads":
        values[::16] *= 1000.0  # every sampled entry is huge, the rest are not
    k = max(1, int(density * count))
    threshold, greater = kth_largest_magnitude(values, k)
    expected = torch.kthvalue(values.abs(), count - k + 1).values
    assert threshold.item() == expected.item()
    assert greater == int((values.abs() > expected).sum())
