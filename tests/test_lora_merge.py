"""``mergetui lora merge`` against PEFT's own ``add_weighted_adapter``, on real adapters.

The adapters are real PEFT LoRA adapters of the session's tiny Llama (``get_peft_model`` +
``save_pretrained``, factors drawn at random so every ΔW is nonzero). For every deterministic
combination type, each module's ΔW = scale · B @ A of mergetui's adapter, loaded back with
``PeftModel.from_pretrained``, must equal the ΔW of the adapter PEFT combines from the same
adapters. DARE's random masks cannot be reproduced, so for the dare types: the same kept fraction
as PEFT's, a seed that gives the same bits twice and another seed that does not, and exact
equality with PEFT at density 1 (nothing dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import tree_digest

from mergetui.engine.adapter_merge import (
    COMBINATIONS,
    AdapterMergeRequest,
    merge_adapters,
)
from mergetui.errors import (
    CompatibilityError,
    MergeCancelled,
    MergeFailed,
    OutputError,
    SourceError,
    UsageError,
)
from mergetui.events import DoneEvent, Event, TensorEvent, parse_event_line

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
#: The largest relative difference of any module's ΔW from PEFT's, per deterministic type.
TOLERANCE = 1e-5


def _save_adapter(base: Path, directory: Path, seed: int, **config: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings: dict[str, Any] = {"target_modules": TARGETS, **config}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:  # B too, or every ΔW would be zero
                torch.nn.init.normal_(param, std=0.2, generator=generator)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``a`` and ``b`` share a rank (8) with different alphas; ``c`` has another rank with
    per-module rank and alpha patterns; ``rs`` uses rsLoRA; ``d`` targets other modules,
    ``wide`` another base and ``dora`` is DoRA."""
    root = tmp_path_factory.mktemp("adapters")
    base = models["base"]
    return {
        "a": _save_adapter(base, root / "a", 1, r=8, lora_alpha=16),
        "b": _save_adapter(base, root / "b", 2, r=8, lora_alpha=8),
        "c": _save_adapter(
            base,
            root / "c",
            3,
            r=4,
            lora_alpha=8,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 2},
        ),
        "rs": _save_adapter(base, root / "rs", 4, r=8, lora_alpha=16, use_rslora=True),
        "d": _save_adapter(base, root / "d", 5, r=8, target_modules=["q_proj", "k_proj"]),
        "wide": _save_adapter(models["wide"], root / "wide", 6, r=8),
        "dora": _save_adapter(base, root / "dora", 7, r=8, use_dora=True),
    }


def _base_model(models: dict[str, Path]) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)


def _deltas(peft_model: Any, adapter: str) -> dict[str, Any]:
    """Every module's ΔW of ``adapter``, as PEFT computes it (scale included)."""
    from peft.tuners.lora import LoraLayer

    return {
        name: layer.get_delta_weight(adapter).detach().clone()
        for name, layer in peft_model.base_model.model.named_modules()
        if isinstance(layer, LoraLayer)
        and (adapter in layer.lora_A or adapter in layer.lora_embedding_A)
    }


def _factors(peft_model: Any, adapter: str) -> dict[str, tuple[Any, Any]]:
    """Every module's (A, B) of ``adapter``."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, layer in peft_model.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter in layer.lora_A:
            found[name] = (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
        elif adapter in layer.lora_embedding_A:
            found[name] = (layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter])
    return {name: (a.detach().clone(), b.detach().clone()) for name, (a, b) in found.items()}


def _peft_combined(
    models: dict[str, Path],
    folders: list[Path],
    weights: list[float],
    kind: str,
    seed: int = 0,
    **options: Any,
) -> Any:
    """A PeftModel holding the adapters and PEFT's combination of them, named ``merged``."""
    import torch
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_base_model(models), folders[0], adapter_name="in0")
    for index, folder in enumerate(folders[1:], start=1):
        peft_model.load_adapter(folder, adapter_name=f"in{index}")
    torch.manual_seed(seed)  # PEFT's DARE draws from the global generator
    names = [f"in{i}" for i in range(len(folders))]
    peft_model.add_weighted_adapter(names, weights, "merged", combination_type=kind, **options)
    return peft_model


def _load_ours(models: dict[str, Path], folder: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_base_model(models), folder)


def _relative_difference(ours: dict[str, Any], theirs: dict[str, Any]) -> float:
    assert sorted(ours) == sorted(theirs)
    worst = 0.0
    for name, reference in theirs.items():
        assert ours[name].shape == reference.shape, name
        scale = float(reference.abs().max())
        assert scale > 0, f"{name}: PEFT's ΔW is zero; the test adapters are not what they seem"
        worst = max(worst, float((ours[name] - reference).abs().max()) / scale)
    return worst


def _merge(folders: list[Path], output: Path, kind: str, **options: Any) -> Path:
    merge_adapters(
        AdapterMergeRequest(adapters=tuple(folders), output=output, combination=kind, **options),
        force=True,
    )
    return output


#: (type, adapters, weights, mergetui's options, PEFT's options)
DETERMINISTIC = [
    ("linear", "ab", [0.8, -0.5], {}, {}),
    ("cat", "abc", [1.0, 0.6, -0.5], {}, {}),
    ("svd", "abc", [1.0, 0.6, -0.5], {}, {}),
    (
        "svd",
        "abc",
        [1.0, 0.6, -0.5],
        {"rank": 4, "svd_clamp": 0.9},
        {"svd_rank": 4, "svd_clamp": 0.9},
    ),
    ("ties", "ab", [0.8, 0.5], {"density": 0.5}, {"density": 0.5}),
    (
        "ties",
        "ab",
        [0.8, -0.5],
        {"density": 0.7, "majority_sign_method": "frequency"},
        {"density": 0.7, "majority_sign_method": "frequency"},
    ),
    (
        "ties_svd",
        "abc",
        [1.0, 0.6, -0.5],
        {"density": 0.5, "rank": 6},
        {"density": 0.5, "svd_rank": 6},
    ),
    ("magnitude_prune", "ab", [0.8, 0.5], {"density": 0.6}, {"density": 0.6}),
    ("magnitude_prune_svd", "abc", [1.0, 0.6, 0.4], {"density": 0.5}, {"density": 0.5}),
    # with nothing dropped, the dare types are deterministic: PEFT's result exactly
    ("dare_linear", "ab", [0.8, -0.5], {"density": 1.0}, {"density": 1.0}),
    ("dare_ties", "ab", [0.8, 0.5], {"density": 1.0}, {"density": 1.0}),
    (
        "dare_linear_svd",
        "abc",
        [1.0, 0.6, -0.5],
        {"density": 1.0, "rank": 6},
        {"density": 1.0, "svd_rank": 6},
    ),
    ("dare_ties_svd", "abc", [1.0, 0.6, -0.5], {"density": 1.0}, {"density": 1.0}),
]


@pytest.mark.filterwarnings("ignore:The density")  # PEFT warns that density 1 prunes nothing
@pytest.mark.parametrize(
    ("kind", "which", "weights", "ours", "theirs"),
    DETERMINISTIC,
    ids=[f"{case[0]}-{i}" for i, case in enumerate(DETERMINISTIC)],
)
def test_equals_peft_add_weighted_adapter(
    models: dict[str, Path],
    adapters: dict[str, Path],
    tmp_path: Path,
    kind: str,
    which: str,
    weights: list[float],
    ours: dict[str, Any],
    theirs: dict[str, Any],
) -> None:
    folders = [adapters[key] for key in which]
    before = {key: tree_digest(adapters[key]) for key in which}
    out = _merge(folders, tmp_path / "merged", kind, weights=tuple(weights), **ours)
    reference = _deltas(_peft_combined(models, folders, weights, kind, **theirs), "merged")
    loaded = _load_ours(models, out)  # PEFT loads what mergetui wrote
    difference = _relative_difference(_deltas(loaded, "default"), reference)
    print(f"{kind} {ours}: max relative difference of ΔW from PEFT's {difference:.2e}")
    assert difference <= TOLERANCE
    assert {key: tree_digest(adapters[key]) for key in which} == before  # inputs untouched
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]


def test_output_config_and_keys(adapters: dict[str, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    out = _merge([adapters["a"], adapters["b"], adapters["c"]], tmp_path / "cat", "cat")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 20 and config["lora_alpha"] == 20  # 8 + 8 + 4
    # v_proj has rank 2 in c: 8 + 8 + 2 there, through the patterns
    assert set(config["rank_pattern"].values()) == {18}
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert (
        config["base_model_name_or_path"]
        == json.loads((adapters["a"] / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ]
    )
    with safe_open(out / "adapter_model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    with safe_open(adapters["a"] / "adapter_model.safetensors", "pt") as handle:
        assert keys == set(handle.keys())  # PEFT's key names
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_rslora_inputs_are_scaled_by_alpha_over_sqrt_r(
    models: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT copies use_rslora into its combined adapter, whose own scale then is sqrt(r), not 1;
    mergetui writes scale 1, so its ΔW is PEFT's combined factors B @ A."""
    folders = [adapters["rs"], adapters["a"]]
    out = _merge(folders, tmp_path / "rs", "cat", weights=(0.7, 0.4))
    reference = {
        name: b @ a
        for name, (a, b) in _factors(
            _peft_combined(models, folders, [0.7, 0.4], "cat"), "merged"
        ).items()
    }
    for name in [n for n in reference if "embed" in n]:
        reference[name] = reference[name].T  # an embedding's ΔW is (B @ A)ᵀ
    ours = _deltas(_load_ours(models, out), "default")
    assert _relative_difference(ours, reference) <= TOLERANCE


def test_svd_at_full_rank_is_exact(
    models: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """At a rank no smaller than the sum of the ranks nothing is cut: svd gives cat's ΔW (the
    factors padded with zeros where a module is narrower than the rank; PEFT fails there)."""
    folders = [adapters["a"], adapters["b"], adapters["c"]]
    weights = (1.0, 0.6, -0.5)
    exact = _merge(folders, tmp_path / "cat", "cat", weights=weights)
    cut = _merge(folders, tmp_path / "svd", "svd", weights=weights, rank=20)
    assert json.loads((cut / "adapter_config.json").read_text())["r"] == 20
    ours = _deltas(_load_ours(models, cut), "default")
    assert _relative_difference(ours, _deltas(_load_ours(models, exact), "default")) <= TOLERANCE


def test_tensors_saved_whole_must_agree(adapters: dict[str, Path], tmp_path: Path) -> None:
    """PEFT saves the base's embedding with an adapter that targets it: the output keeps it when
    every adapter saved the same, and adapters that saved different ones are refused."""
    import torch
    from safetensors.torch import load_file, save_file

    name = "base_model.model.model.embed_tokens.base_layer.weight"
    out = _merge([adapters["a"], adapters["b"]], tmp_path / "out", "cat")
    saved = load_file(adapters["a"] / "adapter_model.safetensors")[name]
    assert torch.equal(load_file(out / "adapter_model.safetensors")[name], saved)

    resized = tmp_path / "resized"
    resized.mkdir()
    (resized / "adapter_config.json").write_bytes(
        (adapters["b"] / "adapter_config.json").read_bytes()
    )
    state = load_file(adapters["b"] / "adapter_model.safetensors")
    state[name] = state[name] + 1
    save_file(state, resized / "adapter_model.safetensors")
    message = _refused(
        CompatibilityError, [adapters["a"], resized], tmp_path / "refused", combination="cat"
    )
    assert name in message and str(resized) in message


def _fraction_zero(tensors: list[Any], relative: float = 0.0) -> float:
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t.abs() <= relative * float(t.abs().max())).sum()) for t in tensors)
    return zeros / total


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_on_factors(
    models: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """An entry of the combined A or B is zero when every adapter's entry was dropped:
    (1 - density)² of them for two adapters, in mergetui's output as in PEFT's."""
    folders = [adapters["a"], adapters["b"]]
    density = 0.5
    first = _merge(folders, tmp_path / "one", kind, density=density, seed=3)
    again = _merge(folders, tmp_path / "again", kind, density=density, seed=3)
    other = _merge(folders, tmp_path / "other", kind, density=density, seed=4)
    digest = [_digest(folder / "adapter_model.safetensors") for folder in (first, again, other)]
    assert digest[0] == digest[1] and digest[0] != digest[2]

    expected = (1 - density) ** 2
    ours = _factors(_load_ours(models, first), "default")
    theirs = _factors(_peft_combined(models, folders, [0.8, 0.5], kind, density=density), "merged")
    for factors in (ours, theirs):
        fraction = _fraction_zero([t for pair in factors.values() for t in pair])
        assert abs(fraction - expected) < 0.05, (fraction, expected)


@pytest.mark.parametrize("kind", ["dare_linear_svd", "dare_ties_svd"])
def test_dare_on_deltas(
    models: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """At rank 16, v_proj's ΔW (16 × 32) is not cut, so its zeros are the entries every adapter
    dropped: (1 - density)² of them, in mergetui's output as in PEFT's."""
    folders = [adapters["a"], adapters["b"]]
    density = 0.5
    options = {"density": density, "rank": 16}
    first = _merge(folders, tmp_path / "one", kind, seed=3, **options)
    again = _merge(folders, tmp_path / "again", kind, seed=3, **options)
    other = _merge(folders, tmp_path / "other", kind, seed=4, **options)
    digest = [_digest(folder / "adapter_model.safetensors") for folder in (first, again, other)]
    assert digest[0] == digest[1] and digest[0] != digest[2]

    expected = (1 - density) ** 2
    ours = _deltas(_load_ours(models, first), "default")
    peft_options = {"density": density, "svd_rank": 16}
    theirs = _deltas(_peft_combined(models, folders, [1.0, 1.0], kind, **peft_options), "merged")
    for deltas in (ours, theirs):
        v_proj = [t for name, t in deltas.items() if name.endswith("v_proj")]
        fraction = _fraction_zero(v_proj, relative=1e-5)
        assert abs(fraction - expected) < 0.08, (fraction, expected)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merged_adapter_generates_like_peft_combination(
    models: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    folders = [adapters["a"], adapters["b"], adapters["c"]]
    out = _merge(folders, tmp_path / "cat", "cat", weights=(0.5, 0.3, 0.2))
    ours = _load_ours(models, out).eval()
    theirs = _peft_combined(models, folders, [0.5, 0.3, 0.2], "cat").eval()
    theirs.set_adapter("merged")
    prompt = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        assert torch.allclose(ours(prompt).logits, theirs(prompt).logits, atol=1e-4, rtol=1e-4)
        generated = ours.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        plain = _base_model(models).generate(
            prompt, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    assert generated.shape == (1, 9)
    assert plain.shape == (1, 9)


# -- validation: before any work, nothing written ----------------------------------------------
def _refused(error: type[Exception], folders: list[Path], out: Path, **options: Any) -> str:
    with pytest.raises(error) as caught:
        merge_adapters(AdapterMergeRequest(adapters=tuple(folders), output=out, **options))
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.mergetui-partial-*"))
    return str(caught.value)


def test_different_target_modules_are_named(adapters: dict[str, Path], tmp_path: Path) -> None:
    message = _refused(
        CompatibilityError, [adapters["a"], adapters["d"]], tmp_path / "out", combination="cat"
    )
    assert "different modules" in message
    assert "model.layers.0.self_attn.k_proj" in message  # d has it, a does not
    assert "model.layers.0.self_attn.v_proj" in message  # a has it, d does not
    assert str(adapters["d"]) in message


def test_linear_with_different_ranks_suggests_cat_or_svd(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    for kind, options in (("linear", {}), ("ties", {"density": 0.5})):
        message = _refused(
            CompatibilityError,
            [adapters["a"], adapters["c"]],
            tmp_path / "out",
            combination=kind,
            **options,
        )
        assert "rank 8" in message and "rank 4" in message
        assert "--combination cat" in message and "svd" in message


def test_adapters_of_other_bases_are_refused(
    models: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    message = _refused(
        CompatibilityError, [adapters["a"], adapters["wide"]], tmp_path / "out", combination="cat"
    )
    assert "different bases" in message and str(adapters["wide"]) in message
    # the base named in the configs agreeing, the shapes still tell
    wide = tmp_path / "wide-renamed"
    wide.mkdir()
    for item in adapters["wide"].iterdir():
        (wide / item.name).write_bytes(item.read_bytes())
    config = json.loads((wide / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(models["base"])
    (wide / "adapter_config.json").write_text(json.dumps(config))
    message = _refused(
        CompatibilityError, [adapters["a"], wide], tmp_path / "out", combination="cat"
    )
    assert "down_proj" in message and "different bases" in message
    # and a base given to check against, from its headers
    message = _refused(
        CompatibilityError, [wide], tmp_path / "out", combination="cat", base=models["base"]
    )
    assert "does not fit the base" in message


def test_dora_is_refused(adapters: dict[str, Path], tmp_path: Path) -> None:
    message = _refused(SourceError, [adapters["a"], adapters["dora"]], tmp_path / "out")
    assert "DoRA" in message and str(adapters["dora"]) in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"combination": "average"}, "unknown combination type 'average'"),
        ({"combination": "cat", "weights": (1.0,)}, "1 weight(s) for 2 adapter(s)"),
        ({"combination": "ties"}, "needs --density"),
        ({"combination": "ties", "density": 0.0}, "(0, 1]"),
        ({"combination": "dare_linear", "density": 1.5}, "(0, 1]"),
        ({"combination": "cat", "density": 0.5}, "--density has no effect with cat"),
        ({"combination": "cat", "rank": 4}, "--rank is for the SVD types"),
        ({"combination": "svd", "rank": 0}, "--rank must be a positive integer"),
        (
            {"combination": "ties", "density": 0.5, "majority_sign_method": "mean"},
            "total or frequency",
        ),
        ({"combination": "svd", "svd_clamp": 2.0}, "quantile in (0, 1]"),
        ({"combination": "svd", "device": "gpu0"}, "unknown --device 'gpu0'"),
    ],
)
def test_bad_options_are_refused(
    adapters: dict[str, Path], tmp_path: Path, options: dict[str, Any], expected: str
) -> None:
    message = _refused(UsageError, [adapters["a"], adapters["b"]], tmp_path / "out", **options)
    assert expected in message


def test_adapters_that_change_the_base_are_refused(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    pissa = tmp_path / "pissa"
    pissa.mkdir()
    for item in adapters["b"].iterdir():
        (pissa / item.name).write_bytes(item.read_bytes())
    config = json.loads((pissa / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    (pissa / "adapter_config.json").write_text(json.dumps(config))
    message = _refused(SourceError, [adapters["a"], pissa], tmp_path / "out")
    assert "pissa" in message and "path_initial_model_for_weight_conversion" in message


def test_missing_folder_is_named(adapters: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    message = _refused(SourceError, [adapters["a"], missing], tmp_path / "out")
    assert str(missing) in message


def test_existing_output_needs_force(adapters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    request = AdapterMergeRequest(
        adapters=(adapters["a"], adapters["b"]), output=out, combination="cat"
    )
    with pytest.raises(OutputError, match="--force"):
        merge_adapters(request)
    assert (out / "keep.txt").read_text() == "old"
    merge_adapters(request, force=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    with pytest.raises(OutputError, match="overlaps the input"):
        merge_adapters(
            AdapterMergeRequest(adapters=(adapters["a"],), output=adapters["a"] / "sub"),
            force=True,
        )


def test_failed_run_leaves_no_output(adapters: dict[str, Path], tmp_path: Path) -> None:
    """An adapter whose factors hold NaN passes every check (headers only) and fails while
    streaming: the error names the tensor, and neither the output nor its partial folder stays."""
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes(
        (adapters["b"] / "adapter_config.json").read_bytes()
    )
    state = load_file(adapters["b"] / "adapter_model.safetensors")
    name = sorted(k for k in state if "layers.1" in k and "lora_B" in k)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, broken / "adapter_model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(MergeFailed, match="NaN") as caught:
        merge_adapters(
            AdapterMergeRequest(adapters=(adapters["a"], broken), output=out, combination="cat")
        )
    assert "layers.1" in str(caught.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cancel_leaves_no_output(adapters: dict[str, Path], tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[Event] = []

    def on_event(event: Event) -> None:
        seen.append(event)
        cancel.set()  # after the first tensor

    out = tmp_path / "out"
    with pytest.raises(MergeCancelled):
        merge_adapters(
            AdapterMergeRequest(
                adapters=(adapters["a"], adapters["b"]), output=out, combination="cat"
            ),
            on_event=on_event,
            cancel=cancel,
        )
    assert isinstance(seen[0], TensorEvent)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_events_count_every_tensor(adapters: dict[str, Path], tmp_path: Path) -> None:
    seen: list[Event] = []
    result = merge_adapters(
        AdapterMergeRequest(
            adapters=(adapters["a"], adapters["b"]),
            output=tmp_path / "out",
            combination="ties",
            density=0.5,
        ),
        on_event=seen.append,
    )
    tensors = [e for e in seen if isinstance(e, TensorEvent)]
    assert isinstance(seen[-1], DoneEvent) and seen[-1].output == str(result.output_dir)
    assert [e.tensors_done for e in tensors] == list(range(1, len(tensors) + 1))
    # 7 modules (q, v, down in 2 layers, the embedding), and the base's embedding that PEFT
    # saves with an adapter of it, copied
    assert len(tensors) == tensors[0].tensors_total == 2 * result.modules + 1 == 15
    assert seen[-1].bytes_read == seen[-1].bytes_to_read > 0


# -- the command -------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mergetui", "lora", "merge", *args],
        capture_output=True,
        text=True,
        timeout=300,  # a hang detector, never the thing tested
        env={**os.environ, "COLUMNS": "160"},
    )


def test_cli_json_events_end_in_done(adapters: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    args = [str(adapters["a"]), str(adapters["b"]), "--weights", "0.5,0.5"]
    result = _cli(*args, "--combination", "ties", "--density", "0.5", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    events = [parse_event_line(line) for line in result.stdout.splitlines()]
    assert events[0].kind == "start" and events[-1].kind == "done"
    assert sum(e.kind == "tensor" for e in events) == 15
    assert (out / "adapter_model.safetensors").is_file()

    refused = _cli(*args, "--combination", "ties", "--density", "0.5", "-o", str(out), "--json")
    assert refused.returncode == 2
    last = json.loads(refused.stdout.splitlines()[-1])
    assert last["event"] == "error" and "--force" in last["message"]

    ranks = _cli(str(adapters["a"]), str(adapters["c"]), "-c", "linear", "-o", str(tmp_path / "x"))
    assert ranks.returncode == 2
    assert "error:" in ranks.stderr and "--combination cat" in ranks.stderr
    assert not (tmp_path / "x").exists()


def test_cli_plain_output_and_help(adapters: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mergetui.cli.app import app
    from mergetui.cli.lora import COMBINATION_NAMES

    assert tuple(COMBINATIONS) == COMBINATION_NAMES
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app,
        [
            "lora",
            "merge",
            str(adapters["a"]),
            str(adapters["b"]),
            "-c",
            "svd",
            "--rank",
            "4",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "output:" in result.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    help_text = CliRunner().invoke(app, ["lora", "merge", "--help"], env={"COLUMNS": "200"}).output
    for name in COMBINATIONS:
        assert name in help_text


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("cat", {}),
        ("svd", {"rank": 6}),
        ("ties", {"density": 0.5}),
        ("ties_svd", {"density": 0.5}),
        ("dare_ties", {"density": 0.5}),
        ("dare_linear_svd", {"density": 0.5, "rank": 16}),
    ],
)
def test_cuda_gives_the_cpu_result(
    models: dict[str, Path], adapters: dict[str, Path], tmp_path: Path, kind: str, options: Any
) -> None:
    """On a GPU the same ΔW as on the CPU; DARE's masks are drawn on the CPU, so the same too.
    (Not with --svd-clamp: the quantile depends on the singular vectors' signs, which cuSOLVER
    and LAPACK choose differently — for PEFT as well.)"""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    folders = [adapters["a"], adapters["b"]]
    cpu = _merge(folders, tmp_path / "cpu", kind, seed=5, **options)
    gpu = _merge(folders, tmp_path / "gpu", kind, seed=5, device="cuda", **options)
    ours = _deltas(_load_ours(models, gpu), "default")
    assert _relative_difference(ours, _deltas(_load_ours(models, cpu), "default")) <= 1e-4
