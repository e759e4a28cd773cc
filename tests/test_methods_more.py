"""model_stock, karcher, nearswap and breadcrumbs on the edge cases every method must survive: a model identical
to the base (a zero task vector), identical models, a single model, tiny 1-D tensors, and half-precision
storage. Their agreement with mergekit is in test_mergekit_configs.py."""

from __future__ import annotations

import pytest
import torch

from mergetui.methods.inputs import TensorInputs
from mergetui.methods.registry import METHODS, get_method


def run(
    method: str,
    base: torch.Tensor | None,
    models: list[torch.Tensor],
    seed: int = 0,
    **params: object,
):
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
        seed=seed,
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


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize(
    ("density", "gamma"), [(0.5, 0.01), (0.3, 0.2), (0.9, 0.5), (0.2, 0.0), (0.05, 0.9)]
)
def test_breadcrumbs_selection_equals_a_full_sort(
    density: float, gamma: float, native: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By the C loops (the rank window fused, "1") and by torch ops ("0")."""
    from mergetui.methods.task_arithmetic import outlier_prune_

    monkeypatch.setenv("MERGETUI_NATIVE", native)
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


# --- nuslerp, multislerp, arcee_fusion, ram, ramplus_tl --------------------------------------------

SPHERICAL_AND_MASKED = [
    ("nuslerp", {}),
    ("nuslerp", {"nuslerp_flatten": False}),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", {}),
    ("arcee_fusion", {}),
    ("ram", {}),
    ("ramplus_tl", {"r": 0.5, "alpha": 0.5}),
]


def models_for(method: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """As many models as the method takes, from ``tensors[1:]``."""
    spec = get_method(method)
    assert spec is not None
    return tensors[1 : 1 + (spec.max_models or 3)]


@pytest.mark.parametrize(("method", "params"), SPHERICAL_AND_MASKED)
def test_models_identical_to_the_base_give_the_base_for_every_newer_method(
    tensors: list[torch.Tensor], method: str, params: dict[str, object]
) -> None:
    base = tensors[0]
    chosen = [base.clone() for _ in models_for(method, tensors)]
    assert torch.equal(run(method, base, chosen, **params), base)


@pytest.mark.parametrize(("method", "params"), SPHERICAL_AND_MASKED)
def test_identical_models_give_that_model_for_every_newer_method(
    tensors: list[torch.Tensor], method: str, params: dict[str, object]
) -> None:
    model = tensors[1]
    chosen = [model.clone() for _ in models_for(method, tensors)]
    out = run(method, tensors[0], chosen, **params)
    if method == "arcee_fusion":  # only the outlying changes are taken, the rest stays at the base
        assert torch.all(torch.isclose(out, model) | (out == tensors[0]))
        assert not torch.equal(out, tensors[0])
    else:
        torch.testing.assert_close(out, model)


@pytest.mark.parametrize(("method", "params"), SPHERICAL_AND_MASKED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_newer_methods_on_tiny_half_precision_tensors(
    method: str, params: dict[str, object], dtype: torch.dtype
) -> None:
    """1-D tensors of a few entries (norms, biases), stored in half precision: finite results of
    the right shape, also after rounding back to the storage dtype."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(5, generator=generator).to(dtype).float()
    others = [(base + torch.randn(5, generator=generator)).to(dtype).float() for _ in range(3)]
    out = run(method, base, models_for(method, [base, *others]), **params)
    assert out.shape == base.shape and torch.isfinite(out.to(dtype)).all()


def test_single_models_and_no_base() -> None:
    a, b = torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    assert torch.equal(run("multislerp", None, [a]), a)
    # orthogonal rows of equal norm at t = 0.5: the midpoint on the circle, norm kept
    out = run("nuslerp", None, [a, b], nuslerp_flatten=False)
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=-1), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(out[0], torch.tensor([3.0, 3.0]) / 2**0.5)
    base = torch.zeros(2, 2)
    assert torch.equal(run("ram", base, [a]), a)  # a lone model's changes are all unique
    assert torch.equal(run("ram", base, [a, a]), a)  # shared changes are averaged


def test_multislerp_on_tensors_no_model_changed_keeps_the_base() -> None:
    """mergekit fails with 'The weighted sum of the input tensors is zero' here (a frozen
    embedding in three fine-tunes, say); there is nothing to interpolate, so the base is kept."""
    base = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(run("multislerp", base, [base.clone()] * 3), base)


def test_multislerp_antipodal_models_with_cancelling_weights() -> None:
    base = torch.zeros(4)
    up = torch.tensor([1.0, 2.0, 0.0, -1.0])
    # two: the weighted sum (here zero); three: no barycentre, an error naming the tensor
    assert torch.equal(run("multislerp", base, [up, -up]), base)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: .*weights"):
        run("multislerp", base, [up, -up, torch.zeros(4)])


def test_ramplus_scales_unique_changes_by_the_shared_share() -> None:
    """Model 0 changes entries 0 and 1, model 1 changes 1 and 2: each has one unique and one shared
    change, so λ = 1 + r·min(1/1, alpha) for both; the shared entry is averaged."""
    base = torch.zeros(4)
    first, second = torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 3.0, 0.0])
    out = run("ramplus_tl", base, [first, second], r=0.5, alpha=0.4)
    torch.testing.assert_close(out, torch.tensor([1.2, 3.0, 3.6, 0.0]))
    torch.testing.assert_close(
        run("ram", base, [first, second]), torch.tensor([1.0, 3.0, 3.0, 0.0])
    )


def test_arcee_fusion_takes_only_the_outlying_changes() -> None:
    """A row where one entry moved far and the rest barely: only that entry is taken."""
    base = torch.zeros(8, 16)
    other = base + 1e-3 * torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    other[3, 5] = 4.0
    out = run("arcee_fusion", base, [other])
    assert out[3, 5] == 4.0
    assert int(torch.count_nonzero(out)) < 8 * 16 // 4


# --- the registry's block declarations ------------------------------------------------------------


def sample_params(method: str) -> dict[str, object]:
    """Values for the method's required parameters (the rest keep their defaults)."""
    spec = get_method(method)
    assert spec is not None
    values = {"t": 0.3, "weight": 0.7}
    return {p.name: values[p.name] for p in spec.params if p.required}


@pytest.mark.parametrize(
    "method", [name for name, spec in METHODS.items() if spec.blocks.independent]
)
def test_methods_declared_block_independent_give_the_same_result_block_by_block(
    method: str,
) -> None:
    """What a later streaming engine will rely on: a method that declares no whole-tensor
    statistic gives, on a tensor cut into blocks of rows, the rows of its whole-tensor result."""
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(12, 7, generator=generator)
    models = [base + 0.1 * torch.randn(12, 7, generator=generator) for _ in range(3)]
    chosen = models_for(method, [base, *models])
    params = sample_params(method)
    whole = run(method, base, chosen, **params)
    pieces = [
        run(method, base[rows], [m[rows] for m in chosen], **params)
        for rows in (slice(0, 5), slice(5, 6), slice(6, 12))
    ]
    assert torch.equal(torch.cat(pieces), whole)


def test_every_method_declares_how_it_divides_and_the_statistics_are_real() -> None:
    """Methods with a whole-tensor statistic really need it: cut into blocks, they differ."""
    generator = torch.Generator().manual_seed(10)
    base = torch.randn(16, 9, generator=generator)
    models = [base + 0.1 * torch.randn(16, 9, generator=generator) ** 3 for _ in range(3)]
    for name, spec in METHODS.items():
        assert spec.blocks.unit in ("elements", "rows"), name
        if spec.blocks.independent or spec.randomized:
            continue
        chosen = models_for(name, [base, *models])
        params = {**sample_params(name), "density": 0.5, "select_topk": 0.5}
        params = {k: v for k, v in params.items() if spec.param(k) is not None}
        if name == "ramplus_tl":  # unique changes, and a scale the cap does not flatten
            params.update(epsilon=0.02, alpha=100.0, r=0.5)
        whole = run(name, base, chosen, **params)
        halves = torch.cat(
            [
                run(name, base[r], [m[r] for m in chosen], **params)
                for r in (slice(0, 8), slice(8, 16))
            ]
        )
        assert not torch.equal(halves, whole), name


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.01), (0.3, 0.2), (0.9, 0.05), (0.2, 0.0)])
def test_breadcrumbs_across_chunks_with_many_ties_equals_a_full_sort(
    density: float, gamma: float, native: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal magnitudes at a bound that span several chunks (or the C loops' threads) are ranked
    in index order across them (bf16-rounded values repeat a lot; chunks of 64 entries)."""
    from mergetui.methods import task_arithmetic

    monkeypatch.setenv("MERGETUI_NATIVE", native)
    monkeypatch.setattr(task_arithmetic, "CHUNK", 64)
    generator = torch.Generator().manual_seed(11)
    delta = (torch.randn(41, 23, generator=generator) * 4).round() / 4
    expected = sorted_reference(delta, density, gamma)
    kept = task_arithmetic.outlier_prune_(delta.clone(), density, gamma, rescale=False)
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("workers", ["many_workers", "one_worker"])
def test_breadcrumbs_window_in_c_gives_the_torch_bits_with_ties_nan_and_inf(
    workers: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused C window against the torch ops on a tensor the threads split, with ties at both
    bounds spanning the threads' ranges, infinities, NaNs and negative zeros; and in blocks, the
    window's counts carried from block to block."""
    from mergetui.methods import native as native_loops
    from mergetui.methods import task_arithmetic

    if native_loops.library() is None:
        pytest.skip("no C compiler here")
    request.getfixturevalue(workers)
    generator = torch.Generator().manual_seed(21)
    delta = (torch.randn(300_007, generator=generator) * 8).round() / 8
    delta[::997] = float("inf")
    delta[5::1201] = float("-inf")
    delta[7::1301] = float("nan")
    delta[::17] = -0.0
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv("MERGETUI_NATIVE", mode)
        kept = task_arithmetic.outlier_prune_(delta.clone(), 0.4, 0.05, rescale=False)
        results.append(kept.view(torch.int32))
    assert torch.equal(results[0], results[1])
    total = delta.numel()
    start, count = task_arithmetic.outlier_ranks(total, 0.4, 0.05)
    monkeypatch.setenv("MERGETUI_NATIVE", "0")
    flat = delta.clone()
    low, _ = task_arithmetic._kth_largest(flat, total - start)
    high, _ = task_arithmetic._kth_largest(flat, total - (start + count) + 1)
    below = [int(torch.count_nonzero(flat.abs() < bound)) for bound in (low, high)]
    window = task_arithmetic.RankWindow(low, high, start, start + count, below)
    monkeypatch.setenv("MERGETUI_NATIVE", "1")
    for block in flat.split(40_000):
        window.keep_(block)
    assert torch.equal(flat.view(torch.int32), results[1])


def karcher_reference(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """mergekit 0.1.5's karcher, literally: every step run until ``tol`` or ``max_iter``."""
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t / n for t, n in zip(tensors, norms, strict=True)]
    mean = sum(u / len(units) for u in units)
    mean = mean / torch.linalg.vector_norm(mean)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for unit in units:
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) >= tol:
                tangent += (1 / len(units)) * (theta / torch.sin(theta)) * (unit - dot * mean)
        size = torch.linalg.vector_norm(tangent)
        if float(size) < tol:
            break
        mean = torch.cos(size) * mean + torch.sin(size) * (tangent / size)
        mean = mean / torch.linalg.vector_norm(mean)
    return sum(n / len(norms) for n in norms) * mean


@pytest.mark.parametrize("spread", [0.5, 0.01, 1e-4])
def test_karcher_is_the_float64_mean_to_float32_rounding(spread: float) -> None:
    """The iteration runs in float64 on the models' Gram matrix (summed in float64), so the
    result is mergekit's iteration run in float64, to float32 rounding, even with a tol no
    float32 arithmetic reaches. mergekit's own float32 steps cannot resolve angles under about
    3e-4 (cos θ rounds to 1): for models 1e-4 apart its mean is about 1e-4 off."""
    generator = torch.Generator().manual_seed(12)
    centre = torch.randn(64, 48, generator=generator)
    models = [centre + spread * torch.randn(64, 48, generator=generator) for _ in range(3)]
    exact = karcher_reference([m.double() for m in models], max_iter=50, tol=1e-12)
    out = run("karcher", None, models, max_iter=50, tol=1e-12)
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)
    in_float32 = karcher_reference(models, max_iter=50, tol=1e-12).double()
    assert float((out.double() - exact).abs().max()) <= float((in_float32 - exact).abs().max())


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_in_small_chunks_gives_the_same_bits(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunks only bound the temporaries: ramplus_tl's whole-tensor counts come first."""
    from mergetui.methods import ram as ram_module

    generator = torch.Generator().manual_seed(14)
    base = torch.randn(33, 29, generator=generator)
    models = [base + 0.1 * torch.randn(33, 29, generator=generator) ** 3 for _ in range(3)]
    params = {"epsilon": 0.01, "r": 0.5, "alpha": 5.0} if method == "ramplus_tl" else {}
    whole = run(method, base, models, **params)
    monkeypatch.setattr(ram_module, "elementwise_chunk", lambda like: 100)
    assert torch.equal(run(method, base, models, **params), whole)


def test_keep_largest_gives_the_same_entries_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """SCE's top-k of the variance and TIES' magnitude prune share this selection; the C loops'
    and the torch path keep the same entries, ties at the threshold lowest index first."""
    from mergetui.methods import native, task_arithmetic

    if native.library() is None:
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(15)
    values = (torch.randn(301, 37, generator=generator) * 4).round() / 4  # many equal values
    kept = []
    for mode in ("1", "0"):
        monkeypatch.setenv("MERGETUI_NATIVE", mode)
        kept.append(task_arithmetic.keep_largest_(values.clone(), 2000))
    assert torch.equal(kept[0], kept[1])
    assert int(torch.count_nonzero(kept[0])) == 2000


@pytest.mark.parametrize("workers", ["many_workers", "one_worker"])
def test_sce_drop_in_c_gives_masked_fills_bits(
    workers: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SCE's drop where the kept variance is zero, by the C loops on any number of threads: the
    bits of torch's masked_fill_ (+0 dropped, -0 and NaN variances, NaN and infinite entries)."""
    from mergetui.methods import native, sce

    if native.library() is None:
        pytest.skip("no C compiler here")
    request.getfixturevalue(workers)
    generator = torch.Generator().manual_seed(17)
    variance = torch.randn(300_001, generator=generator).abs()
    variance[::3], variance[::7], variance[5] = 0.0, -0.0, float("nan")
    deltas = [torch.randn(300_001, generator=generator) for _ in range(3)]
    deltas[0][::11], deltas[1][::13], deltas[2][3::5] = -0.0, float("nan"), float("-inf")
    in_c = [delta.clone() for delta in deltas]
    sce._drop_where_zero_(in_c, variance)
    monkeypatch.setenv("MERGETUI_NATIVE", "0")
    in_torch = [delta.clone() for delta in deltas]
    sce._drop_where_zero_(in_torch, variance)
    for c_result, torch_result in zip(in_c, in_torch, strict=True):
        assert torch.equal(c_result.view(torch.int32), torch_result.view(torch.int32))
    assert not torch.equal(in_c[0], deltas[0])  # it dropped something
