"""The compiled (fused) CPU path gives exactly the op-by-op results, and falls back when it must."""

from __future__ import annotations

import pytest
import torch

from mergetui.methods import compiled
from mergetui.methods.inputs import TensorInputs
from mergetui.methods.task_arithmetic import CHUNK, dare_ties, kth_largest_magnitude, ties


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


def _clone(inputs: TensorInputs) -> TensorInputs:
    assert inputs.base is not None
    return TensorInputs(
        inputs.name,
        inputs.base.clone(),
        [m.clone() for m in inputs.models],
        inputs.model_params,
        inputs.params,
        inputs.seed,
    )


@pytest.mark.parametrize("kernel", [ties, dare_ties])
@pytest.mark.parametrize("models", [1, 3])
def test_compiled_path_is_bit_identical_to_op_by_op(
    monkeypatch: pytest.MonkeyPatch, kernel: object, models: int
) -> None:
    inputs = _inputs(seed=models, numel=2 * CHUNK + 4099, models=models, density=0.35)
    monkeypatch.setenv("MERGETUI_COMPILE", "0")
    eager = kernel(_clone(inputs))  # type: ignore[operator]
    monkeypatch.setenv("MERGETUI_COMPILE", "1")
    fused = kernel(_clone(inputs))  # type: ignore[operator]
    assert not compiled._disabled, "the compiled path was not exercised"
    assert torch.equal(fused, eager)


def test_compiled_radix_selection_matches_kthvalue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGETUI_COMPILE", "1")
    values = _inputs(seed=9, numel=(1 << 20) + 7, models=1, density=1.0).models[0]
    k = 123_457
    threshold, greater = kth_largest_magnitude(values, k)
    expected = torch.kthvalue(values.abs(), values.numel() - k + 1).values
    assert threshold.item() == expected.item()
    assert greater == int((values.abs() > expected).sum())


def test_a_compiler_failure_falls_back_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = _inputs(seed=5, numel=CHUNK + 11, models=2, density=0.5)
    monkeypatch.setenv("MERGETUI_COMPILE", "0")
    eager = ties(_clone(inputs))

    def broken_compile(function: object, **kwargs: object) -> object:
        def fail(*args: object) -> object:
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setenv("MERGETUI_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_disabled", [])
    with caplog.at_level("WARNING", logger="mergetui.methods.compiled"):
        fallback = ties(_clone(inputs))
    assert torch.equal(fallback, eager)
    assert "no C++ compiler found" in caplog.text and "op by op" in caplog.text


def test_small_tensors_and_other_devices_are_not_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGETUI_COMPILE", "auto")
    small = torch.zeros(compiled.MIN_ELEMENTS - 1)
    assert compiled.compiled_kernel(ties, small) is None
    assert compiled.compiled_kernel(ties, torch.zeros(compiled.MIN_ELEMENTS)) is not None
    assert compiled.compiled_kernel(ties, torch.zeros(1, device="meta")) is None
    monkeypatch.setenv("MERGETUI_COMPILE", "0")
    assert compiled.compiled_kernel(ties, torch.zeros(compiled.MIN_ELEMENTS)) is None
