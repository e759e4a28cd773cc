"""DELLA and DELLA-linear: random, so not compared with mergekit bit for bit, but

- reproducible: the same seed gives the same bits whatever the thread count or the block size the
  kernel works in (each tensor's mask comes from the seed and the tensor's name);
- right in distribution: each entry is kept with p = density − ε + 2ε·r̃ (r̃ its magnitude rank in
  its row, scaled to [0, 1]), so the kept fraction is the density and large entries survive more;
- exact in what is not random: the L1 rescale, the TIES election that follows;
- statistically equal to mergekit 0.1.5's output on the same models (kept fraction, the profile
  over magnitude ranks, the rescaled norms);
- checked before any weight is read: density ± epsilon must stay inside (0, 1).
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import torch
from mergekit_ref import MergekitReference, read_tensors
from test_methods_more import run

from mergetui.engine.executor import run_merge
from mergetui.engine.plan import build_plan
from mergetui.methods import task_arithmetic
from mergetui.methods.inputs import tensor_seed
from mergetui.methods.task_arithmetic import della_prune_
from mergetui.recipe import load_recipe

NAME = "model.layers.0.mlp.up_proj.weight"


def row_rank_fraction(delta: torch.Tensor) -> torch.Tensor:
    """r̃ for every entry: its ascending magnitude rank in its row (index order among equals),
    divided by the row length − 1."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], dtype=rows.dtype).expand_as(rows))
    return (ranks / (rows.shape[1] - 1)).reshape(delta.shape)


def assert_della_profile(
    delta: torch.Tensor, kept: torch.Tensor, density: float, epsilon: float, tolerance: float
) -> None:
    """The kept fraction overall is the density, and in each fifth of the rank range it is the
    mean of that fifth's keep probabilities (low ranks kept less often, high ranks more)."""
    assert abs(float(kept.float().mean()) - density) < tolerance
    fraction = row_rank_fraction(delta)
    probability = density - epsilon + 2 * epsilon * fraction
    for low in torch.arange(0, 1, 0.2):
        band = (fraction >= low) & (fraction < low + 0.2 if low < 0.79 else fraction <= 1)
        observed = float(kept[band].float().mean())
        expected = float(probability[band].mean())
        assert abs(observed - expected) < tolerance, (float(low), observed, expected)


@pytest.fixture(scope="module")
def task_vectors() -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(256, 384, generator=generator)
    models = [base + 0.05 * torch.randn(256, 384, generator=generator) for _ in range(3)]
    return base, models


def test_the_same_seed_gives_the_same_bits_on_any_thread_count_and_block_size(
    task_vectors: tuple[torch.Tensor, list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, models = task_vectors
    params = {"density": 0.4, "epsilon": 0.2}
    first = run("della", base, models, **params)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(task_arithmetic, "CHUNK", 1000)  # blocks of 2 rows, not 2730
        again = run("della", base, models, **params)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(first, again)
    other_seed = run("della", base, models, **params, seed=1)
    assert not torch.equal(first, other_seed)


def test_kept_fraction_and_profile_follow_the_rank(
    task_vectors: tuple[torch.Tensor, list[torch.Tensor]],
) -> None:
    base, models = task_vectors
    delta = models[0] - base
    for density, epsilon in ((0.5, 0.15), (0.2, 0.1), (0.7, 0.25)):
        key = tensor_seed(0, NAME, 0)
        kept = della_prune_(delta.clone(), density, epsilon, False, key) != 0
        assert_della_profile(delta, kept, density, epsilon, tolerance=0.01)


def test_rescale_restores_the_l1_norm_exactly(
    task_vectors: tuple[torch.Tensor, list[torch.Tensor]],
) -> None:
    base, models = task_vectors
    delta = models[1] - base
    pruned = della_prune_(delta.clone(), 0.3, 0.1, True, tensor_seed(0, NAME, 1))
    torch.testing.assert_close(
        pruned.abs().sum(dtype=torch.float64),
        delta.abs().sum(dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )
    kept = pruned != 0
    torch.testing.assert_close(
        pruned[kept] / delta[kept],
        torch.full_like(delta[kept], float(delta.abs().sum() / delta[kept].abs().sum())),
        rtol=1e-5,
        atol=0,
    )


def test_della_linear_is_the_weighted_sum_of_the_pruned_task_vectors(
    task_vectors: tuple[torch.Tensor, list[torch.Tensor]],
) -> None:
    """Everything but the mask is deterministic: rebuild the output from the documented mask."""
    base, models = task_vectors
    out = run("della_linear", base, models[:2], density=0.5, epsilon=0.1, weight=0.7)
    expected = base.clone()
    for index, model in enumerate(models[:2]):
        key = tensor_seed(0, NAME, index)
        expected += 0.7 * della_prune_(model - base, 0.5, 0.1, True, key)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_della_elects_signs_like_ties(
    task_vectors: tuple[torch.Tensor, list[torch.Tensor]],
) -> None:
    """With density 1 nothing is dropped, and della is ties at density 1 (normalize on)."""
    base, models = task_vectors
    torch.testing.assert_close(
        run("della", base, models, density=1.0, weight=0.5),
        run("ties", base, models, density=1.0, weight=0.5),
    )


def test_edge_cases() -> None:
    base = torch.tensor([1.0, 2.0, 3.0])
    for method in ("della", "della_linear"):
        # a model identical to the base: a zero task vector stays zero, whatever is dropped
        assert torch.equal(run(method, base, [base.clone()], density=0.5), base)
        # a single entry: kept with probability density, never NaN (mergekit fails here)
        lone = run(method, torch.tensor([0.5]), [torch.tensor([0.75])], density=0.5)
        assert lone.item() in (0.5, 0.75)
        # identical models: the same mask for both would be luck; the result is finite
        out = run(method, base, [base + 1, base + 1], density=0.5, epsilon=0.2)
        assert torch.isfinite(out).all()
    half = [t.to(torch.bfloat16).float() for t in (base, base + 0.3, base - 0.1)]
    out = run("della", half[0], half[1:], density=0.5)
    assert torch.isfinite(out.to(torch.bfloat16)).all()


# --- against mergekit and through the engine ------------------------------------------------------


def della_config(zoo: dict[str, Path], method: str, rescale: bool) -> str:
    return textwrap.dedent(
        f"""\
        models:
          - model: {zoo["ft1"]}
            parameters:
              weight: 1.0
              density: 0.4
              epsilon: 0.2
        merge_method: {method}
        base_model: {zoo["base"]}
        parameters:
          rescale: {str(rescale).lower()}
          normalize: false
        dtype: float32
        """
    )


@pytest.mark.parametrize("rescale", [False, True])
def test_statistically_equal_to_mergekit(
    rescale: bool, mergekit: MergekitReference, mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    """One fine-tune through della_linear in both tools: both keep 40% of each task vector on
    average, both favour large entries alike, and with rescale both restore each tensor's L1."""
    config = tmp_path / "della.yaml"
    config.write_text(della_config(mk_zoo, "della_linear", rescale), encoding="utf-8")
    theirs = read_tensors(mergekit.merge(config.read_text(), tmp_path / "mergekit"))
    recipe = dataclasses.replace(load_recipe(config), output_path=str(tmp_path / "ours"))
    ours = read_tensors(run_merge(build_plan(recipe)).output_dir)
    base, tuned = read_tensors(mk_zoo["base"]), read_tensors(mk_zoo["ft1"])
    for output in (ours, theirs):
        deltas = {n: tuned[n] - base[n] for n in base if tuned[n].dim() == 2}
        kept = {n: output[n] - base[n] != 0 for n in deltas}
        flat_delta = torch.cat([d.reshape(-1) for d in deltas.values()])
        ranks = torch.cat([row_rank_fraction(d).reshape(-1) for d in deltas.values()])
        flat_kept = torch.cat([k.reshape(-1) for k in kept.values()])
        assert abs(float(flat_kept.float().mean()) - 0.4) < 0.01
        probability = 0.2 + 0.4 * ranks
        for low in (0.0, 0.5):
            band = (ranks >= low) & (ranks <= low + 0.5)
            assert (
                abs(float(flat_kept[band].float().mean()) - float(probability[band].mean())) < 0.02
            )
        del flat_delta
        for name, delta in deltas.items():
            l1 = float((output[name] - base[name]).abs().sum())
            if rescale:
                assert l1 == pytest.approx(float(delta.abs().sum()), rel=1e-4), name
            else:
                assert l1 < 0.8 * float(delta.abs().sum()), name


def test_density_plus_epsilon_past_one_is_refused_before_any_weight_is_read(
    models: dict[str, Path], write_recipe, tmp_path: Path
) -> None:
    recipe = write_recipe(
        f"""
        version = 2
        [merge]
        method = "della"
        base = "{models["base"]}"
        [[models]]
        model = "{models["ft_a"]}"
        weight = 1.0
        density = [0.5, 0.9]
        epsilon = 0.15
        [[models]]
        model = "{models["ft_b"]}"
        weight = 1.0
        density = 0.5
        [output]
        path = "{tmp_path / "out"}"
        """
    )
    plan = build_plan(load_recipe(recipe))
    errors = [p.message for p in plan.errors]
    assert errors, plan.problems
    assert errors[0].startswith("models[0]: tensor model.layers.1."), errors
    assert "density 0.9 ± epsilon 0.15 spans [0.75, 1.05]" in errors[0]
    assert "set epsilon below 0.1" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_della_config_imports_and_exports_with_its_epsilon(
    mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    """epsilon is per model in both tools: import → export → import keeps it, and the exported
    YAML names it where mergekit reads it."""
    import yaml

    from mergetui.recipe.mergekit_yaml import mergekit_to_toml, recipe_to_mergekit

    text = della_config(mk_zoo, "della", rescale=True)
    toml_text, _ = mergekit_to_toml(
        text, source_file="a.yaml", base_dir=tmp_path, target_dir=tmp_path
    )
    (tmp_path / "a.toml").write_text(toml_text, encoding="utf-8")
    recipe = load_recipe(tmp_path / "a.toml")
    assert recipe.models[0].parameters["epsilon"] == 0.2
    exported = yaml.safe_load(recipe_to_mergekit(recipe, target_dir=tmp_path))
    assert exported["merge_method"] == "della"
    assert exported["models"][0]["parameters"]["epsilon"] == 0.2
    assert exported["parameters"]["rescale"] is True


@pytest.mark.parametrize("shape", [(37, 53), (1, 7), (6, 1), (9,), (3, 4, 5), (64, 2100)])
def test_the_c_loops_give_the_torch_paths_bits(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The radix ranks of the C loops and torch's stable sort rank alike (ties included: bf16
    values repeat), so the kept entries, the signs of the zeros and the rescale are the same."""
    from mergetui.methods import native

    if native.library() is None:
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(sum(shape))
    delta = torch.randn(shape, generator=generator).to(torch.bfloat16).float()
    delta.view(-1)[::5] = 0.0
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv("MERGETUI_NATIVE", mode)
        out = della_prune_(delta.clone(), 0.45, 0.3, True, tensor_seed(3, NAME, 0))
        results.append(out.view(torch.int32))
    assert torch.equal(results[0], results[1])
