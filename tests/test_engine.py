"""End-to-end merges of real tiny models through the engine: math, files, loading, safety."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import save_llama, tree_digest
from safetensors.torch import load_file

from mergetui.engine.executor import run_merge
from mergetui.engine.plan import build_plan
from mergetui.errors import CompatibilityError, MergeCancelled, OutputError, SourceError
from mergetui.events import TensorEvent
from mergetui.recipe import parse_recipe
from mergetui.recipe.schema import Recipe


def recipe_for(
    tmp_path: Path,
    method: str,
    base: Path | None,
    models: list[tuple[Path, str]],
    params: str = "",
    extra_merge: str = "",
    shard_size: str = "2GB",
) -> Recipe:
    entries = "\n".join(f'[[models]]\nmodel = "{path}"\n{opts}\n' for path, opts in models)
    base_line = f'base = "{base}"' if base else ""
    text = f"""
version = 1
[merge]
method = "{method}"
{base_line}
device = "cpu"
{extra_merge}
[merge.parameters]
{params}
{entries}
[output]
path = "{tmp_path / "out"}"
shard_size = "{shard_size}"
"""
    return parse_recipe(text, base_dir=tmp_path)


def merge(recipe: Recipe, **kwargs: object) -> Path:
    plan = build_plan(recipe)
    return run_merge(plan, **kwargs).output_dir  # type: ignore[arg-type]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def generate(directory: Path) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13]])
    out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    return out[0, 4:].tolist()


def test_linear_merge_is_the_weighted_mean_and_loads(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = recipe_for(
        tmp_path,
        "linear",
        None,
        [(models["ft_a"], "weight = 1.0"), (models["ft_b"], "weight = 3.0")],
    )
    out = merge(recipe)
    a, b, merged = weights(models["ft_a"]), weights(models["ft_b"]), weights(out)
    assert set(merged) == set(a)
    for name, tensor in merged.items():
        expected = ((a[name].float() * 1.0 + b[name].float() * 3.0) / 4.0).to(torch.bfloat16)
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected), name
    tokens = generate(out)
    assert len(tokens) == 6 and tokens == generate(out)  # greedy is deterministic


@pytest.mark.parametrize(
    "method,params,model_opts",
    [
        ("task_arithmetic", "", "weight = 0.5"),
        ("ties", "", "weight = 0.5\ndensity = 0.4"),
        ("dare_ties", "", "weight = 0.5\ndensity = 0.6"),
        ("dare_linear", "", "weight = 0.5\ndensity = 0.6"),
        ("della", "", "weight = 0.5\ndensity = 0.6\nepsilon = 0.2"),
        ("multislerp", "", "weight = 0.5"),
        ("ramplus_tl", "r = 0.3", ""),
    ],
)
def test_task_vector_methods_merge_three_models(
    tmp_path: Path, models: dict[str, Path], method: str, params: str, model_opts: str
) -> None:
    sources = [(models[k], model_opts) for k in ("ft_a", "ft_b", "ft_c")]
    out = merge(recipe_for(tmp_path, method, models["base"], sources, params))
    merged, base = weights(out), weights(models["base"])
    changed = sum(int(not torch.equal(merged[n], base[n])) for n in base)
    assert changed == len(base)  # every tensor moved away from the base
    assert len(generate(out)) == 6
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and f"- {method}" in card and "float32" in card
    assert "- the base took part in the merge arithmetic" in card
    replay = (out / "mergetui.toml").read_text()
    assert f'method = "{method}"' in replay and str(models["ft_a"]) in replay


def test_engine_matches_kernel_on_each_tensor(tmp_path: Path, models: dict[str, Path]) -> None:
    """The executor feeds the kernel exactly: ties through the engine = ties on loaded tensors."""
    from mergetui.methods.inputs import TensorInputs
    from mergetui.methods.task_arithmetic import ties

    sources = [(models["ft_a"], "weight = 0.7\ndensity = 0.3"), (models["ft_c"], "weight = 0.3")]
    recipe = recipe_for(tmp_path, "ties", models["base"], sources, "density = 0.5")
    out = weights(merge(recipe))
    base, a, c = weights(models["base"]), weights(models["ft_a"]), weights(models["ft_c"])
    for name in base:
        inputs = TensorInputs(
            name,
            base[name].float(),
            [a[name].float(), c[name].float()],
            [{"weight": 0.7, "density": 0.3}, {"weight": 0.3, "density": 0.5}],
            {"normalize": True, "lambda": 1.0},
        )
        assert torch.equal(out[name], ties(inputs).to(torch.bfloat16)), name


def test_slerp_endpoints_and_float32_output(tmp_path: Path, models: dict[str, Path]) -> None:
    recipe = recipe_for(
        tmp_path,
        "slerp",
        models["base"],
        [(models["ft_a"], "")],
        "t = 0.0",
        extra_merge='dtype = "float32"',
    )
    merged, base = weights(merge(recipe)), weights(models["base"])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, base[name].float()), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32"


def test_sharded_output_has_index_and_loads(tmp_path: Path, models: dict[str, Path]) -> None:
    recipe = recipe_for(tmp_path, "passthrough", None, [(models["ft_b"], "")], shard_size="30KB")
    out = merge(recipe)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 30_000 or len(load_file(s)) == 1 for s in shards)
    source = weights(models["ft_b"])
    merged = weights(out)
    assert all(torch.equal(merged[n], source[n]) for n in source)
    assert len(generate(out)) == 6


def test_tokenizer_config_and_generation_config_are_carried(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = recipe_for(
        tmp_path, "task_arithmetic", models["base"], [(models["ft_a"], "weight = 1")]
    )
    out = merge(recipe)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    ):
        assert (out / name).is_file(), name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"]


def test_qwen2_models_merge(tmp_path: Path, models: dict[str, Path]) -> None:
    from conftest import save_finetune

    qwen_ft = save_finetune(models["qwen2"], tmp_path / "qwen_ft", seed=9)
    out = merge(
        recipe_for(tmp_path, "ties", models["qwen2"], [(qwen_ft, "weight = 1\ndensity = 0.5")])
    )
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert len(generate(out)) == 6


def test_pytorch_bin_checkpoint_is_read_safely(tmp_path: Path, models: dict[str, Path]) -> None:
    bin_dir = tmp_path / "bin_model"
    bin_dir.mkdir()
    shutil.copy(models["ft_a"] / "config.json", bin_dir)
    torch.save(weights(models["ft_a"]), bin_dir / "pytorch_model.bin")
    out = merge(recipe_for(tmp_path, "passthrough", None, [(bin_dir, "")]))
    source, merged = weights(models["ft_a"]), weights(out)
    assert all(torch.equal(merged[n], source[n]) for n in source)


def test_lora_adapter_is_folded_in_like_peft(tmp_path: Path, models: dict[str, Path]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_pretrained(models["ft_a"], dtype=torch.float32)
    peft_model = get_peft_model(
        base_model,
        LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"down_proj": 4},
        ),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()

    out = merge(
        recipe_for(
            tmp_path,
            "passthrough",
            None,
            [(models["ft_a"], f'lora = "{tmp_path / "adapter"}"')],
            extra_merge='dtype = "float32"',
        )
    )
    merged = weights(out)
    changed = 0
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name].float(), rtol=1e-5, atol=1e-5)
        changed += int(not torch.equal(tensor, weights(models["ft_a"])[name].float()))
    assert changed == 2 * 3  # q, v, down in two layers


def test_lora_for_another_base_is_rejected_before_reading(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    wide = AutoModelForCausalLM.from_pretrained(models["wide"], dtype=torch.float32)
    get_peft_model(wide, LoraConfig(r=2, target_modules=["down_proj"])).save_pretrained(
        tmp_path / "ad"
    )
    plan = build_plan(
        recipe_for(tmp_path, "passthrough", None, [(models["ft_a"], f'lora = "{tmp_path / "ad"}"')])
    )
    assert any("down_proj" in p.message and "another base" in p.message for p in plan.errors)
    plan.close()


def test_different_architectures_are_reported(tmp_path: Path, models: dict[str, Path]) -> None:
    plan = build_plan(
        recipe_for(
            tmp_path,
            "linear",
            None,
            [(models["base"], "weight = 1"), (models["qwen2"], "weight = 1")],
        )
    )
    assert any(
        "different architectures" in p.message and "Qwen2ForCausalLM" in p.message
        for p in plan.errors
    )
    with pytest.raises(CompatibilityError):
        run_merge(plan)
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_names_models_and_fix(tmp_path: Path, models: dict[str, Path]) -> None:
    plan = build_plan(
        recipe_for(tmp_path, "ties", models["base"], [(models["big_vocab"], "weight = 1")])
    )
    messages = [p.message for p in plan.errors]
    plan.close()
    assert any(
        "vocabulary size mismatch" in m
        and "64" in m
        and "72" in m
        and "resize_token_embeddings" in m
        for m in messages
    ), messages
    assert not any(m.startswith("shape mismatch in model.embed_tokens") for m in messages)


def test_custom_code_is_warned_about_once_per_model(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    custom = {}
    for name in ("base", "ft_c"):
        custom[name] = shutil.copytree(models[name], tmp_path / f"custom-{name}")
        config = json.loads((custom[name] / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
        (custom[name] / "config.json").write_text(json.dumps(config))
    recipe = recipe_for(
        tmp_path,
        "task_arithmetic",
        custom["base"],
        [
            (models["ft_a"], "weight = 1"),
            (custom["ft_c"], "weight = 1"),
            (models["ft_b"], "weight = 1"),
        ],
    )
    plan = build_plan(recipe, fetch=False)
    plan.close()
    warned = [p.message for p in plan.warnings if "custom code" in p.message]
    assert len(warned) == 2, warned  # the base and models[1], each once
    assert warned[0].startswith("base") and warned[1].startswith("models[1]"), warned
    assert not plan.errors


def test_shape_mismatch_names_tensor_and_both_shapes(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    plan = build_plan(
        recipe_for(tmp_path, "ties", models["base"], [(models["wide"], "weight = 1")])
    )
    messages = [p.message for p in plan.errors]
    plan.close()
    assert any(
        "model.layers.0.mlp.down_proj.weight" in m and "[32, 64]" in m and "[32, 96]" in m
        for m in messages
    ), messages


def test_missing_and_extra_tensors_are_reported(tmp_path: Path, models: dict[str, Path]) -> None:
    from safetensors.torch import save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(models["ft_a"] / "config.json", partial)
    tensors = weights(models["ft_a"])
    tensors.pop("model.norm.weight")
    tensors["extra.bias"] = torch.zeros(3)
    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    plan = build_plan(recipe_for(tmp_path, "ties", models["base"], [(partial, "weight = 1")]))
    text = " ".join(p.message for p in plan.errors)
    plan.close()
    assert "lacks 1 tensor(s)" in text and "model.norm.weight" in text
    assert "extra.bias" in text


def test_missing_model_folder_is_a_source_error(tmp_path: Path, models: dict[str, Path]) -> None:
    with pytest.raises(SourceError, match="not found"):
        build_plan(recipe_for(tmp_path, "linear", None, [(tmp_path / "nope", "weight = 1")]))


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors_is_named_before_any_output(
    tmp_path: Path, models: dict[str, Path], damage: str
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models["ft_a"], broken)
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        data[: len(data) - 100] if damage == "truncate" else data[:8] + b"{not json" + data[17:]
    )
    with pytest.raises(SourceError, match=r"model\.safetensors.*(truncated|corrupt)"):
        build_plan(recipe_for(tmp_path, "linear", None, [(broken, "weight = 1")]))
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path: Path, models: dict[str, Path]) -> None:
    recipe = recipe_for(tmp_path, "passthrough", None, [(models["ft_a"], "")])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="--force"):
        merge(recipe)
    assert (out / "keep.txt").read_text() == "precious"
    merge(recipe, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.mergetui-*"))


def test_output_in_unwritable_folder_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    import os

    if os.geteuid() == 0:  # root may write anywhere; a regular file still cannot hold a folder
        locked = tmp_path / "a-file"
        locked.write_text("")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    recipe = recipe_for(tmp_path, "passthrough", None, [(models["ft_a"], "")])
    recipe = Recipe(**{**recipe.__dict__, "output_path": str(locked / "out")})
    with pytest.raises(OutputError, match="cannot write"):
        merge(recipe)


def test_output_inside_a_source_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    src = tmp_path / "src"
    shutil.copytree(models["ft_a"], src)
    recipe = recipe_for(tmp_path, "passthrough", None, [(src, "")])
    recipe = Recipe(**{**recipe.__dict__, "output_path": str(src)})
    before = tree_digest(src)
    with pytest.raises(OutputError, match="overlaps the source"):
        merge(recipe, force=True)
    assert tree_digest(src) == before


def test_cancelled_merge_leaves_nothing_and_sources_untouched(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = recipe_for(
        tmp_path,
        "ties",
        models["base"],
        [(models["ft_a"], "weight = 1"), (models["ft_b"], "weight = 1")],
    )
    before = {k: tree_digest(models[k]) for k in ("base", "ft_a", "ft_b")}
    cancel = threading.Event()
    seen: list[int] = []

    def on_event(event: object) -> None:
        if isinstance(event, TensorEvent):
            seen.append(1)
            if len(seen) == 5:
                cancel.set()

    with pytest.raises(MergeCancelled):
        merge(recipe, on_event=on_event, cancel=cancel)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
    assert {k: tree_digest(models[k]) for k in before} == before


def test_failure_mid_merge_removes_partial_output(tmp_path: Path, models: dict[str, Path]) -> None:
    """A source that breaks after planning (disk error, file replaced) fails cleanly."""
    victim = tmp_path / "victim"
    shutil.copytree(models["ft_a"], victim)
    plan = build_plan(
        recipe_for(
            tmp_path, "linear", None, [(victim, "weight = 1"), (models["ft_c"], "weight = 1")]
        )
    )
    data = (victim / "model.safetensors").read_bytes()
    (victim / "model.safetensors").write_bytes(data[: len(data) // 2])
    from mergetui.errors import MergeFailed

    with pytest.raises(MergeFailed, match="partial output was removed"):
        run_merge(plan)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_dare_is_bit_reproducible_across_runs(tmp_path: Path, models: dict[str, Path]) -> None:
    sources = [(models["ft_a"], "weight = 0.5\ndensity = 0.3"), (models["ft_b"], "weight = 0.5")]
    first = weights(
        merge(recipe_for(tmp_path, "dare_ties", models["base"], sources, "density = 0.5"))
    )
    torch.set_num_threads(1)
    try:
        shutil.rmtree(tmp_path / "out")
        second = weights(
            merge(recipe_for(tmp_path, "dare_ties", models["base"], sources, "density = 0.5"))
        )
    finally:
        torch.set_num_threads(2)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_dry_run_plan_estimates(tmp_path: Path, models: dict[str, Path]) -> None:
    plan = build_plan(
        recipe_for(
            tmp_path,
            "ties",
            models["base"],
            [(models["ft_a"], "weight = 1"), (models["ft_b"], "weight = 1")],
        )
    )
    est = plan.estimates
    plan.close()
    assert est is not None
    params = sum(t.numel() for t in weights(models["base"]).values())
    assert est.output_bytes == params * 2
    assert est.input_bytes == params * 2 * 3
    assert est.peak_ram_bytes > est.output_bytes and est.peak_vram_bytes is None
    assert est.disk_free_bytes and est.disk_free_bytes > 0


def test_bigger_layer_count_keeps_tensor_plan_order(tmp_path: Path) -> None:
    """Tensors are streamed in on-disk order of the reference, shard by shard."""
    base = save_llama(tmp_path / "deep", seed=3, num_hidden_layers=4)
    plan = build_plan(recipe_for(tmp_path, "passthrough", None, [(base, "")]))
    specs = plan.reference.checkpoint.tensors
    offsets = [specs[t.name].offset for t in plan.tensors]
    plan.close()
    assert offsets == sorted(offsets)
