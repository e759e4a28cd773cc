"""model_stock, karcher, nearswap and breadcrumbs on the edge cases every method must survive: a model identical
to the base (a zero task vector), identical models, a single model, tiny 1-D tensors, and half-precision
storage. Their agreement with mergekit is in test_mergekit_configs.py."""

from __future__ import annotations

import pytest
import torch

from mergetui.methods.inputs import TensorInputs
from mergetui.methods.registry import get_method


def run(method: str, base: torch.Tensor | None, models: list[torch.Tensor], **params: object):
    """The method's kernel on copies of the tensors: defaults filled in, a weight of 1 for every
    model, and each keyword given to the level (method-wide or per model) it belongs to."""
    spec = get_method(method)
    assert spec is not None
    defaults = {p.name: p.default for p in spec.global_params if not p.required}
    per_model = {p.name: (1.0 if p.required else p.default) for p in spec.model_params}
    per_model.update({k: v for k, v in params.items() if k in per_model})
    inputs = TensorInputs(
        name="model.layers.0.mlp.up_proj.weight",
        base=None if base is None else base.clone(),
        models=[m.clone() for m in models],
        model_params=[dict(per_model) for _ in models],
        params={**defaults, **{k: v for k, v in params.items() if k not in per_model}},
    )
    return spec.load_kernel()(inputs)


@pytest.fixture
def tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(6, 5, generator=generator) for _ in range(4)]


def test_models_identical_to_the_base_give_the_base(tensors: list[torch.Tensor]) -> None:
    base = tensors[0]
    for filter_wise in (False, True):
        out = run("model_stock", base, [base, base], filter_wise=filter_wise)
        assert torch.equal(out, base)
    assert torch.equal(run("nearswap", base, [base], t=0.01), base)


def test_identical_models_give_that_model(tensors: list[torch.Tensor]) -> None:
    model = tensors[1]
    torch.testing.assert_close(run("karcher", None, [model, model, model]), model)
    torch.testing.assert_close(run("model_stock", tensors[0], [model, model]), model)


def test_a_single_model(tensors: list[torch.Tensor]) -> None:
    assert torch.equal(run("karcher", None, [tensors[1]]), tensors[1])


def test_zero_tensors_stay_finite() -> None:
    zero = torch.zeros(8)
    assert torch.equal(run("karcher", None, [zero, zero]), zero)
    out = run("model_stock", zero, [zero, torch.ones(8)], filter_wise=True)
    assert torch.isfinite(out).all()


def test_tiny_one_dimensional_tensors() -> None:
    base, a, b = torch.tensor([1.0]), torch.tensor([1.5]), torch.tensor([0.5])
    out = run("model_stock", base, [a, b], filter_wise=True)
    # opposite task vectors: cos = -1, so t = 2·(-1)/(1-1) is singular and the base is kept
    assert torch.equal(out, base)
    assert torch.equal(run("nearswap", base, [a], t=1.0), a)  # within t: taken whole
    torch.testing.assert_close(run("nearswap", base, [a], t=0.1), base + 0.2 * (a - base))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_storage(tensors: list[torch.Tensor], dtype: torch.dtype) -> None:
    """The engine hands kernels float32 copies of half-precision inputs; the results are finite and
    close to the float32 ones on the rounded inputs."""
    rounded = [t.to(dtype).float() for t in tensors]
    for method, base, models, params in (
        ("model_stock", rounded[0], rounded[1:], {}),
        ("karcher", None, rounded[1:], {}),
        ("nearswap", rounded[0], rounded[1:2], {"t": 0.5}),
    ):
        out = run(method, base, models, **params)
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), method
        assert torch.isfinite(out.to(dtype)).all(), method


# --- breadcrumbs -----------------------------------------------------------------------------------


def sorted_reference(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit 0.1.5's rule by a full sort: ranks [N-k-top, N-top), moved to [0, k) on overlap."""
    count = delta.numel()
    keep, top = int(density * count), int(gamma * count)
    start = max(0, count - keep - top)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(count)
    mask[order[start : start + keep]] = 1
    return delta * mask.reshape(delta.shape)


@pytest.mark.parametrize(
    ("density", "gamma"), [(0.5, 0.01), (0.3, 0.2), (0.9, 0.5), (0.2, 0.0), (0.05, 0.9)]
)
def test_breadcrumbs_selection_equals_a_full_sort(density: float, gamma: float) -> None:
    from mergetui.methods.task_arithmetic import outlier_prune_

    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(37, 29, generator=generator)
    expected = sorted_reference(delta, density, gamma)
    assert torch.equal(outlier_prune_(delta.clone(), density, gamma, rescale=False), expected)


def test_breadcrumbs_ties_at_the_bounds_keep_exactly_k_lowest_index_first() -> None:
    from mergetui.methods.task_arithmetic import outlier_prune_

    delta = torch.tensor([1.0, -1.0, 1.0, 2.0, -1.0, 3.0, 1.0, 0.5])
    # N = 8, k = 4, top = 1: ranks [3, 7) by magnitude, index order among equals
    kept = outlier_prune_(delta.clone(), 0.5, 0.125, rescale=False)
    assert torch.count_nonzero(kept) == 4
    assert torch.equal(kept, sorted_reference(delta, 0.5, 0.125))


def test_breadcrumbs_edge_cases() -> None:
    from mergetui.methods.task_arithmetic import outlier_prune_

    zero = torch.zeros(10)
    assert torch.equal(outlier_prune_(zero.clone(), 0.5, 0.1, rescale=True), zero)
    one = torch.tensor([0.25])
    assert torch.equal(outlier_prune_(one.clone(), 0.5, 0.01, rescale=False), torch.zeros(1))
    assert torch.equal(outlier_prune_(one.clone(), 1.0, 0.5, rescale=False), one)
    delta = torch.randn(50, generator=torch.Generator().manual_seed(1))
    rescaled = outlier_prune_(delta.clone(), 0.4, 0.1, rescale=True)
    torch.testing.assert_close(rescaled.abs().sum(), delta.abs().sum())
    base = torch.randn(6, 5)
    same = run("breadcrumbs", base, [base, base], gamma=0.1)
    assert torch.equal(same, base)


# --- sce -------------------------------------------------------------------------------------------


def test_sce_edge_cases(tensors: list[torch.Tensor]) -> None:
    base = tensors[0]
    assert torch.equal(run("sce", base, [base, base], select_topk=0.5), base)  # zero task vectors
    torch.testing.assert_close(run("sce", base, [tensors[1]]), tensors[1])  # one model: itself
    assert torch.equal(run("sce", base, [tensors[1], tensors[2]], select_topk=0.0), base)
    one = torch.tensor([0.5])
    out = run("sce", one, [torch.tensor([1.0]), torch.tensor([-2.0])], select_topk=1.0)
    # the sum of the deltas (0.5 - 2.5) is negative: only the second model's sign survives
    torch.testing.assert_close(out, torch.tensor([-2.0]))
