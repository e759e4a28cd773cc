"""The fused C kernels give exactly the op-by-op torch results, and merges fall back when they must."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from mergetui.methods import native
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.task_arithmetic import CHUNK, dare_ties, ties

pytestmark = pytest.mark.skipif(
    native.library() is None, reason="no C compiler here: the fused kernels cannot be built"
)


def _inputs(seed: int, numel: int, models: int, density: float) -> TensorInputs:
    """bf16-quantised task vectors, so many magnitudes tie at the TIES threshold."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g).bfloat16().float()
    finetunes = [
        (base + 0.05 * torch.randn(numel, generator=g)).bfloat16().float() for _ in range(models)
    ]
    params = [{"weight": w, "density": density} for w in (0.7, -0.2, 0.5, 1.0)[:models]]
    return TensorInputs(
        "model.layers.0.mlp.down_proj.weight",
        base,
        finetunes,
        params,
        {"normalize": True, "lambda": 0.8, "rescale": True},
        seed=3,
    )


def _clone(inputs: TensorInputs, **params: object) -> TensorInputs:
    assert inputs.base is not None
    return TensorInputs(
        inputs.name,
        inputs.base.clone(),
        [m.clone() for m in inputs.models],
        inputs.model_params,
        {**inputs.params, **params},
        inputs.seed,
    )


def _both(
    monkeypatch: pytest.MonkeyPatch, kernel: object, inputs: TensorInputs, **params: object
) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setenv("MERGETUI_NATIVE", "0")
    eager = kernel(_clone(inputs, **params))  # type: ignore[operator]
    monkeypatch.setenv("MERGETUI_NATIVE", "1")
    fused = kernel(_clone(inputs, **params))  # type: ignore[operator]
    return eager, fused


@pytest.mark.parametrize("kernel", [ties, dare_ties])
@pytest.mark.parametrize("models", [1, 3])
@pytest.mark.parametrize("numel", [2 * CHUNK + 4099, 3000])
def test_native_path_is_bit_identical_to_op_by_op(
    monkeypatch: pytest.MonkeyPatch, kernel: object, models: int, numel: int
) -> None:
    inputs = _inputs(seed=models, numel=numel, models=models, density=0.35)
    eager, fused = _both(monkeypatch, kernel, inputs)
    assert torch.equal(fused, eager)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_native_path_matches_without_normalize_and_lambda(
    monkeypatch: pytest.MonkeyPatch, normalize: bool, scale: float
) -> None:
    inputs = _inputs(seed=11, numel=70_001, models=3, density=0.2)
    eager, fused = _both(monkeypatch, ties, inputs, normalize=normalize, **{"lambda": scale})
    assert torch.equal(fused, eager)


def test_native_path_keeps_exactly_k_when_many_magnitudes_tie(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half the entries share one magnitude, so the cut-off falls inside a run of ties."""
    numel = 1 << 21
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(numel)
    delta = torch.where(torch.rand(numel, generator=g) < 0.5, 0.25, 0.0)
    delta = delta * torch.where(torch.rand(numel, generator=g) < 0.5, 1.0, -1.0)
    inputs = TensorInputs("w", base, [delta], [{"weight": 1.0, "density": 0.3}], {})
    eager, fused = _both(monkeypatch, ties, inputs)
    assert torch.equal(fused, eager)
    assert int(torch.count_nonzero(fused)) == int(0.3 * numel)


def test_a_build_failure_falls_back_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: object
) -> None:
    inputs = _inputs(seed=5, numel=CHUNK + 11, models=2, density=0.5)
    monkeypatch.setenv("MERGETUI_NATIVE", "0")
    eager = ties(_clone(inputs))
    monkeypatch.setenv("MERGETUI_NATIVE", "1")
    monkeypatch.setenv("CC", "no-such-compiler-mergetui")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    with caplog.at_level(logging.WARNING, logger="mergetui.methods.native"):
        fallback = ties(_clone(inputs))
    assert native.library() is None
    assert "no C compiler found" in caplog.text
    assert torch.equal(fallback, eager)


def test_the_library_is_cached_by_source_and_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    built = list(native.cache_dir().glob("mergetui-kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_native_path_matches_on_continuous_float32_task_vectors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp32 deltas almost never repeat a value: the sample's guess misses and the radix pass runs."""
    g = torch.Generator().manual_seed(8)
    numel = 2 * CHUNK + 333
    base = torch.randn(numel, generator=g)
    models = [base + 0.01 * torch.randn(numel, generator=g) for _ in range(3)]
    params = [{"weight": 0.5, "density": d} for d in (0.1, 0.5, 0.9)]
    inputs = TensorInputs("w", base, models, params, {"normalize": True})
    eager, fused = _both(monkeypatch, ties, inputs)
    assert torch.equal(fused, eager)


@pytest.mark.parametrize("guess", [0, 0x3F800000, 0x7F7FFFFF])
def test_a_wrong_guess_still_gives_the_exact_answer(
    monkeypatch: pytest.MonkeyPatch, guess: int
) -> None:
    """Whatever the sample suggests (here: forced far off), the selection ends up exact."""
    inputs = _inputs(seed=6, numel=CHUNK + 5, models=2, density=0.4)
    monkeypatch.setattr(native, "_state", {"library": _GuessingLibrary(native.library(), guess)})
    eager, fused = _both(monkeypatch, ties, inputs)
    assert torch.equal(fused, eager)


class _GuessingLibrary:
    """The real library, except that the sample's k-th magnitude is replaced by a fixed guess."""

    def __init__(self, library: object, guess: int) -> None:
        self._library = library
        self._guess = guess

    def mt_kth_largest_bits(self, *arguments: object) -> int:
        return self._guess

    def __getattr__(self, name: str) -> object:
        return getattr(self._library, name)


def test_openmp_waits_are_set_unless_the_user_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point's OpenMP wait policy (mergetui.openmp): set on a clean environment, and a
    user's own setting of either variable keeps both as the user has them."""
    from mergetui.openmp import OPENMP_WAITS, tune_openmp_waits

    for name in OPENMP_WAITS:
        monkeypatch.delenv(name, raising=False)
    tune_openmp_waits()
    assert {name: os.environ[name] for name in OPENMP_WAITS} == OPENMP_WAITS
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    tune_openmp_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "GOMP_SPINCOUNT" not in os.environ


def test_the_merge_process_gets_the_openmp_waits() -> None:
    """``python -m mergetui`` sets them before torch loads libgomp (a child process reports its
    environment after the entry point ran)."""
    import subprocess
    import sys

    from mergetui.openmp import OPENMP_WAITS

    env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAITS}
    script = (
        "import os, sys\n"
        "sys.argv = ['mergetui', '--help']\n"
        "from mergetui.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print({{k: os.environ.get(k) for k in {sorted(OPENMP_WAITS)!r}}}, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert repr(dict(sorted(OPENMP_WAITS.items()))) in done.stderr
