"""mergetui runs mergekit YAML on architectures other than Llama and gives mergekit 0.1.5's output.

The Llama comparisons (``test_mergekit_configs.py``, ``test_mergekit_equal.py``) cannot show what
depends on the architecture's tensors; these can:

- **Qwen2 with tied embeddings** (``tie_word_embeddings: true``): the checkpoint has no
  ``lm_head.weight``; the output must not grow one, and must stay tied in ``config.json``. Qwen2
  also has attention biases (1-D tensors the sparsifiers rank on their own).
- **Phi-3**: fused projections (``self_attn.qkv_proj``, ``mlp.gate_up_proj``): every per-tensor
  statistic (top-k, norms, variance) runs over the fused matrix, on both sides.
- **Mixtral**: a mixture of experts, stored per expert (``block_sparse_moe.experts.N.w1/w2/w3``
  and the router ``block_sparse_moe.gate``), as transformers 5's ``save_pretrained`` still writes
  it. mergetui merges and writes the checkpoint's tensors as stored (an output any transformers
  version loads); mergekit 0.1.5 reads them through transformers 5's checkpoint conversion and
  merges, and writes, transformers 5's fused model layout (``mlp.experts.gate_up_proj``
  ``[experts, 2 * intermediate, hidden]``, each expert's w1 and w3 concatenated, experts stacked;
  ``mlp.experts.down_proj`` ``[experts, hidden, intermediate]``, the w2s stacked; the router
  ``mlp.gate``). So these outputs are compared as transformers loads them (the model layout on
  both sides): the element-wise methods agree, and the methods whose arithmetic reads a whole
  tensor (a norm, a top-k, a variance, a count) take that statistic per expert in mergetui and
  over all experts in mergekit: those cases are strict xfails on :class:`FusedExpertsDiffer`
  alone (:data:`PER_TENSOR_METHODS`), so a change on either side shows, and every other tensor
  (attention, router, norms, embeddings) must still be equal.
- **Mixtral, fused**: the same models with their checkpoints rewritten in that fused layout
  (:func:`fuse_mixtral_experts`; transformers 5 loads them as they are, to the same model). Both
  tools then merge the same tensors, and every method must give mergekit's output file for file.

Each architecture's models (a random float32 base and three fine-tunes, ``build_zoo``) are built
once per session; each case is one YAML config, run by both tools.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY_LLAMA
from mergekit_ref import (
    MergekitReference,
    assert_same_config,
    assert_same_model,
    assert_same_tensors,
    build_zoo,
    read_tensors,
)

from mergetui.engine.executor import run_merge
from mergetui.engine.plan import build_plan
from mergetui.methods.registry import get_method
from mergetui.recipe import load_recipe

#: The three architectures' shared sizes: the suite's tiny Llama, narrower (hidden 16).
TINY: dict[str, Any] = {**TINY_LLAMA, "hidden_size": 16, "intermediate_size": 32}


def qwen2_tied() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**TINY, tie_word_embeddings=True)


def phi3() -> Any:
    from transformers import Phi3Config

    return Phi3Config(**TINY)


def mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)


#: A per-expert Mixtral tensor: the layer, the expert, the projection (w1 gate, w2 down, w3 up).
PER_EXPERT = re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def fuse_mixtral_experts(tensors: dict[str, Any]) -> dict[str, Any]:
    """A Mixtral checkpoint's tensors in transformers 5's fused model layout (the names and shapes
    ``MixtralForCausalLM(config).state_dict()`` has, and mergekit 0.1.5's ``mixtral.json``), as
    transformers 5's conversion builds them when loading: per layer,
    ``mlp.experts.gate_up_proj[e] = cat(w1_e, w3_e)`` (``[experts, 2 * intermediate, hidden]``),
    ``mlp.experts.down_proj[e] = w2_e`` (``[experts, hidden, intermediate]``), and the router
    ``block_sparse_moe.gate`` renamed ``mlp.gate``; every other tensor as it is."""
    import torch

    fused: dict[str, Any] = {}
    experts: dict[str, dict[str, dict[int, Any]]] = {}
    for name, tensor in tensors.items():
        if found := PER_EXPERT.fullmatch(name):
            layer, expert, projection = found.group(1), int(found.group(2)), found.group(3)
            experts.setdefault(layer, {}).setdefault(projection, {})[expert] = tensor
        else:
            fused[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = tensor
    for layer, projections in experts.items():
        count = len(projections["w1"])
        assert all(sorted(p) == list(range(count)) for p in projections.values()), layer
        w1, w2, w3 = (projections[p] for p in ("w1", "w2", "w3"))
        fused[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w1[e], w3[e]]) for e in range(count)]
        )
        fused[f"{layer}.mlp.experts.down_proj"] = torch.stack([w2[e] for e in range(count)])
    return fused


def rewrite_fused(directory: Path) -> None:
    """Rewrite the single-file checkpoint ``save_pretrained`` wrote in ``directory`` (per expert:
    transformers 5 converts back to the stored layout on save) with :func:`fuse_mixtral_experts`;
    ``config.json``, ``generation_config.json`` and the tokenizer files stay as written."""
    from safetensors.torch import save_file

    assert [f.name for f in directory.glob("*.safetensors")] == ["model.safetensors"], directory
    fused = fuse_mixtral_experts(read_tensors(directory))
    save_file(fused, str(directory / "model.safetensors"), metadata={"format": "pt"})


@dataclass(frozen=True)
class Architecture:
    """One architecture under test. ``model_layout``: mergekit merges and writes transformers'
    model layout rather than the checkpoint's (see the module docstring), so outputs are compared
    as loaded; ``tied``: the checkpoint has no ``lm_head.weight`` and the output must not either;
    ``rewrite``: applied to each of the zoo's checkpoint folders once the zoo is built."""

    config: Callable[[], Any]
    seed: int
    tied: bool = False
    model_layout: bool = False
    rewrite: Callable[[Path], None] | None = None


ARCHITECTURES = {
    "qwen2-tied": Architecture(qwen2_tied, seed=20, tied=True),
    "phi3": Architecture(phi3, seed=30),
    "mixtral": Architecture(mixtral, seed=40, model_layout=True),
    # The same seed: the same models as "mixtral", stored fused.
    "mixtral-fused": Architecture(mixtral, seed=40, rewrite=rewrite_fused),
}


@dataclass(frozen=True)
class MethodConfig:
    """A mergekit config of one method, apart from the models' folders: ``models`` holds the
    parameters of ``ft1``, ``ft2``... in order (one entry a model), ``base`` whether
    ``base_model`` is the zoo's base, ``parameters`` the method-wide ones."""

    models: tuple[dict[str, float], ...]
    base: bool = True
    parameters: dict[str, float] = field(default_factory=dict)

    def yaml(self, method: str, zoo: dict[str, Path]) -> str:
        """The ``mergekit-yaml`` config for ``zoo``'s models, float32."""
        import yaml

        config: dict[str, Any] = {
            "models": [
                {"model": str(zoo[f"ft{n}"]), **({"parameters": values} if values else {})}
                for n, values in enumerate(self.models, start=1)
            ],
            "merge_method": method,
        }
        if self.base:
            config["base_model"] = str(zoo["base"])
        if self.parameters:
            config["parameters"] = self.parameters
        config["dtype"] = "float32"
        return yaml.safe_dump(config, sort_keys=False)


def weighted(*weights: float, **per_model: float) -> tuple[dict[str, float], ...]:
    """One model a weight, each with the same other parameters (``per_model``)."""
    return tuple({"weight": weight, **per_model} for weight in weights)


NO_PARAMETERS: tuple[dict[str, float], ...] = ({}, {}, {})

#: The config each method runs on every architecture, by mergekit's method name. A method
#: mergetui's registry does not have (yet) is skipped, so one is covered by adding its entry.
METHOD_CONFIGS = {
    "linear": MethodConfig(weighted(1.0, 0.6, 0.3), base=False),
    "slerp": MethodConfig(({},), parameters={"t": 0.3}),
    "task_arithmetic": MethodConfig(weighted(1.0, 0.5, -0.3)),
    "ties": MethodConfig(weighted(1.0, 0.7, 0.4, density=0.5)),
    "breadcrumbs": MethodConfig(weighted(1.0, 0.5, density=0.6, gamma=0.05)),
    "breadcrumbs_ties": MethodConfig(weighted(1.0, 0.7, 0.4, density=0.6, gamma=0.05)),
    "sce": MethodConfig(NO_PARAMETERS, parameters={"select_topk": 0.3}),
    "model_stock": MethodConfig(NO_PARAMETERS),
    "karcher": MethodConfig(NO_PARAMETERS, base=False),
    "nearswap": MethodConfig(({},), parameters={"t": 0.001}),
    "nuslerp": MethodConfig(weighted(0.3, 0.7)),
    "multislerp": MethodConfig(weighted(0.5, 0.3, 0.2)),
    "arcee_fusion": MethodConfig(({},)),
    # Every entry of the fine-tunes' dense task vectors is a change at the default epsilon, so
    # ram would only average and ramplus_tl's shares would be all 0. At 0.08 (1.6 times the
    # noise's scale) about a tenth of each counts: changes made by one, two or three models all
    # occur, and a model's shared-to-unique ratio (about 0.24) stays under alpha, so ramplus_tl's
    # scale is each tensor's own, not the cap.
    "ram": MethodConfig(NO_PARAMETERS, parameters={"epsilon": 0.08}),
    "ramplus_tl": MethodConfig(NO_PARAMETERS, parameters={"r": 0.2, "alpha": 0.3, "epsilon": 0.08}),
}

#: Methods whose arithmetic reads each tensor whole (a norm, a top-k, a variance, a quantile, a
#: count): on the per-expert Mixtral they take that statistic per expert in mergetui and over all
#: experts in mergekit. The element-wise methods (linear, task_arithmetic, nearswap, ram) agree.
PER_TENSOR_METHODS = frozenset(METHOD_CONFIGS) - {"linear", "task_arithmetic", "nearswap", "ram"}
FUSED_EXPERTS = (
    "mergetui keeps the checkpoint's stored per-expert layout "
    "(block_sparse_moe.experts.N.w1/w2/w3, loadable by any transformers version), "
    "while mergekit 0.1.5 rewrites it into transformers 5's "
    "fused layout (mlp.experts.gate_up_proj [4, 64, 16], mlp.experts.down_proj [4, 16, 32]) and "
    "merges that: whole-tensor statistics are per expert in mergetui and over all experts in "
    "mergekit (the mixtral-fused cases, one layout on both sides, are equal)"
)


class FusedExpertsDiffer(AssertionError):
    """The expert weights differ between the outputs (and only they: the other tensors were
    compared first), the one difference :data:`FUSED_EXPERTS` explains."""


def marks(architecture: str, method: str) -> list[pytest.MarkDecorator]:
    """A case waits for its method in mergetui's registry; Mixtral's per-tensor methods are
    strict xfails (see :data:`PER_TENSOR_METHODS`)."""
    found: list[pytest.MarkDecorator] = [
        pytest.mark.skipif(
            get_method(method) is None, reason=f"mergetui has no method {method} yet"
        )
    ]
    if ARCHITECTURES[architecture].model_layout and method in PER_TENSOR_METHODS:
        found.append(
            pytest.mark.xfail(raises=FusedExpertsDiffer, strict=True, reason=FUSED_EXPERTS)
        )
    return found


CASES = [
    pytest.param(
        architecture, method, marks=marks(architecture, method), id=f"{architecture}-{method}"
    )
    for architecture in ARCHITECTURES
    for method in METHOD_CONFIGS
]


@pytest.fixture(scope="session")
def arch_zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Path]]:
    """``arch_zoo(name)``: the architecture's ``base`` and ``ft1``..``ft3``, built on first use
    and kept for the session (a test that needs one architecture pays for that one only)."""
    root = tmp_path_factory.mktemp("arch-models")
    built: dict[str, dict[str, Path]] = {}

    def zoo(name: str) -> dict[str, Path]:
        if name not in built:
            architecture = ARCHITECTURES[name]
            built[name] = build_zoo(root / name, architecture.config, seed=architecture.seed)
            if architecture.rewrite is not None:
                for directory in built[name].values():
                    architecture.rewrite(directory)
        return built[name]

    return zoo


def write_config(method: str, zoo: dict[str, Path], folder: Path) -> Path:
    """The method's config for ``zoo``'s models, written as ``folder/config.yaml``."""
    config = folder / "config.yaml"
    config.write_text(METHOD_CONFIGS[method].yaml(method, zoo), encoding="utf-8")
    return config


def mergetui_run(config: Path, output: Path) -> Path:
    """``mergetui run CONFIG.yaml -o OUTPUT --device cpu``, in process."""
    recipe = dataclasses.replace(load_recipe(config), output_path=str(output), device="cpu")
    return run_merge(build_plan(recipe)).output_dir


def loaded_tensors(directory: Path) -> dict[str, Any]:
    """The state dict transformers loads from ``directory``: the model layout, whatever layout
    the checkpoint was written in."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def assert_same_loaded_model(ours: Path, theirs: Path) -> None:
    """The models transformers loads from ``ours`` and ``theirs`` are the same, the expert
    weights compared last and reported apart (:class:`FusedExpertsDiffer`)."""
    a, b = loaded_tensors(ours), loaded_tensors(theirs)
    experts = {name for name in b if ".mlp.experts." in name}
    assert experts, f"{theirs} loads without expert weights"
    assert a.keys() == b.keys(), f"{ours} and {theirs} load different tensors"
    rest = a.keys() - experts
    assert_same_tensors({n: a[n] for n in rest}, {n: b[n] for n in rest}, ours, theirs)
    try:
        assert_same_tensors({n: a[n] for n in experts}, {n: b[n] for n in experts}, ours, theirs)
    except AssertionError as exc:
        raise FusedExpertsDiffer(str(exc)) from None


@pytest.mark.parametrize(("architecture", "method"), CASES)
def test_mergekit_config_gives_mergekits_output(
    architecture: str,
    method: str,
    mergekit: MergekitReference,
    arch_zoo: Callable[[str], dict[str, Path]],
    tmp_path: Path,
) -> None:
    """The same YAML through both tools gives the same tensors and ``config.json`` (per-expert
    Mixtral: the same loaded model), and a tied model stays tied: no ``lm_head.weight`` written."""
    spec = ARCHITECTURES[architecture]
    config = write_config(method, arch_zoo(architecture), tmp_path)
    theirs = mergekit.merge(config.read_text(encoding="utf-8"), tmp_path / "mergekit")
    ours = mergetui_run(config, tmp_path / "mergetui")

    assert_same_config(ours, theirs)
    if spec.model_layout:
        assert "model.layers.0.mlp.experts.gate_up_proj" in read_tensors(theirs)
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in read_tensors(ours)
        assert_same_loaded_model(ours, theirs)
    else:
        assert_same_model(ours, theirs)
    if spec.rewrite is rewrite_fused:
        assert "model.layers.0.mlp.experts.gate_up_proj" in read_tensors(ours)
    if spec.tied:
        assert "lm_head.weight" not in read_tensors(ours)
        assert json.loads((ours / "config.json").read_text())["tie_word_embeddings"] is True


def load_complete(directory: Path) -> Any:
    """The model transformers loads from ``directory`` (float32), which must find every weight it
    has in the checkpoint, of the right shape, and use every tensor the checkpoint holds."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, output_loading_info=True
    )
    model, info = loaded
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), (
        f"{directory} loads incompletely: {info}"
    )
    return model


def test_fused_mixtral_checkpoint_is_transformers_model_layout(
    arch_zoo: Callable[[str], dict[str, Path]],
) -> None:
    """The fused zoo's checkpoints hold exactly the tensors ``MixtralForCausalLM`` has (names and
    shapes: mergekit's ``mixtral.json`` names), load with nothing missing or left over, and are
    the per-expert zoo's models: the same loaded weights, the same logits."""
    import torch
    from transformers import MixtralForCausalLM

    model_layout = {
        name: tuple(tensor.shape)
        for name, tensor in MixtralForCausalLM(mixtral()).state_dict().items()
    }
    assert "model.layers.0.mlp.experts.gate_up_proj" in model_layout
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9]])
    per_expert, fused = arch_zoo("mixtral"), arch_zoo("mixtral-fused")
    for name in per_expert:
        stored = read_tensors(fused[name])
        assert {n: tuple(t.shape) for n, t in stored.items()} == model_layout
        a, b = load_complete(per_expert[name]), load_complete(fused[name])
        assert_same_tensors(b.state_dict(), a.state_dict(), fused[name], per_expert[name], rel=0.0)
        assert_same_tensors(stored, b.state_dict(), fused[name], "the loaded model", rel=0.0)
        with torch.no_grad():
            # Fresh copies: the weights transformers maps from the fused file sit at another
            # alignment than the ones its conversion allocates, and the CPU kernels then round
            # differently in the last bit; at the same alignment the logits are bit-equal.
            for model in (a, b):
                for param in model.parameters():
                    param.data = param.data.clone()
            assert torch.equal(a(tokens).logits, b(tokens).logits), name


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_merged_model_loads_and_generates(
    architecture: str, arch_zoo: Callable[[str], dict[str, Path]], tmp_path: Path
) -> None:
    """A TIES merge is a model transformers loads (its own architecture class, every weight
    found, tied embeddings still tied, a fused Mixtral still fused) and generates with."""
    import torch

    out = mergetui_run(write_config("ties", arch_zoo(architecture), tmp_path), tmp_path / "out")
    model = load_complete(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(model).__name__]
    if ARCHITECTURES[architecture].tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if ARCHITECTURES[architecture].rewrite is rewrite_fused:
        stored = read_tensors(out)
        assert not any(".block_sparse_moe." in name for name in stored)
        assert_same_tensors(stored, model.state_dict(), out, "the loaded model", rel=0.0)
    tokens = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 7)
