"""Tensors merged in blocks of rows to keep a memory budget give the same bits as whole.

Real tiny models, really merged: once whole, once with the plan's budget squeezed so that every
large-enough tensor goes through the engine in blocks (several blocks, several passes for the
methods with statistics), and the output files compared tensor by tensor, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from blocks_helpers import assert_same_bits, merge, squeeze, tensors_of
from conftest import method_recipe, save_llama

from mergetui.engine.blocks import DEFAULT_MAX_MEMORY
from mergetui.engine.executor import run_merge
from mergetui.engine.plan import build_plan
from mergetui.methods.registry import METHODS, BlockPlan, rows_per_chunk
from mergetui.recipe.toml_io import parse_recipe, recipe_to_toml

EXE = [sys.executable, "-m", "mergetui"]
BLOCKABLE = sorted(name for name, spec in METHODS.items() if spec.mergeable_in_blocks)


@pytest.mark.parametrize("method", BLOCKABLE)
def test_every_method_that_can_be_blocked_gives_the_whole_tensor_bits(
    method: str, wide: dict[str, Path], tmp_path: Path
) -> None:
    """A budget of 6 MiB for buffers puts the embedding and lm_head (4M entries) in blocks: of
    whole row chunks (4096 rows of 256) for DARE, of a few hundred rows otherwise."""
    models = [wide["ft_a"], wide["ft_c"]]
    whole_text = method_recipe(method, wide["base"], models, tmp_path / "whole", dtype="bfloat16")
    whole, _ = merge(whole_text, tmp_path)
    blocked_text = whole_text.replace(str(tmp_path / "whole"), str(tmp_path / "blocked"))
    blocked, plan = merge(blocked_text, tmp_path, working=6 << 20)
    assert plan.memory is not None and plan.memory.blocked >= 2
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.block_rows is not None and embed.shape[0] // embed.block_rows >= 2
    how = METHODS[method].block_plan(embed.shape, embed.params, tuple(embed.model_params))
    assert isinstance(how, BlockPlan)
    assert embed.passes == how.passes and embed.block_rows % how.align_rows == 0
    if how.align_rows > 1:  # whole row chunks of sums
        assert embed.block_rows % rows_per_chunk(256) == 0
    assert_same_bits(whole, blocked)


def _tuned(text: str, global_lines: str, per_model: list[str]) -> str:
    """``text`` with lines added under ``[merge.parameters]`` and to each model's entry."""
    text = text.replace("[merge.parameters]\n", f"[merge.parameters]\n{global_lines}")
    parts = text.split("[[models]]\n")
    for index, extra in enumerate(per_model, start=1):
        lines = parts[index].split("\n")
        kept = [
            line
            for line in lines
            if not any(line.startswith(k.split(" ")[0] + " ") for k in extra.split("\n") if k)
        ]
        parts[index] = extra + "\n".join(kept)
    return "[[models]]\n".join(parts)


@pytest.mark.parametrize(
    ("method", "global_lines", "per_model"),
    [
        ("breadcrumbs", "rescale = true\n", ["density = 0.5\n", "density = 0.3\ngamma = 0.1\n"]),
        ("breadcrumbs_ties", "", ["density = 0.3\ngamma = 0.8\n", "density = 1.0\n"]),
        ("breadcrumbs", "rescale = true\n", ["density = 1e-7\n", "density = 0.6\n"]),
        ("della", "rescale = false\n", ["density = 0.4\nepsilon = 0.2\n", "density = 0.7\n"]),
        (
            "della_linear",
            "",
            ["density = 0.05\nepsilon = 0.01\n", "density = 0.9\nepsilon = 0.05\n"],
        ),
    ],
    ids=[
        "breadcrumbs-rescale",
        "breadcrumbs_ties-overlap",
        "breadcrumbs-nothing-kept",
        "della-no-rescale",
        "della_linear-sparse",
    ],
)
def test_parameters_that_change_the_passes_give_the_whole_tensor_bits(
    method: str, global_lines: str, per_model: list[str], wide: dict[str, Path], tmp_path: Path
) -> None:
    """Breadcrumbs' rescale adds a pass for the kept L1 norms and aligns blocks to whole chunks;
    DELLA without rescale merges in one pass, in blocks of its whole steps of rows."""
    models = [wide["ft_a"], wide["ft_c"]]
    text = _tuned(
        method_recipe(method, wide["base"], models, tmp_path / "whole"), global_lines, per_model
    )
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=6 << 20)
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    how = METHODS[method].block_plan(embed.shape, embed.params, tuple(embed.model_params))
    assert isinstance(how, BlockPlan) and embed.passes == how.passes
    assert embed.block_rows is not None and embed.block_rows % how.align_rows == 0
    assert_same_bits(whole, blocked)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("native", ["1", "0"])
def test_selections_in_blocks_of_odd_sizes_match_whole_on_both_kernel_paths(
    method: str,
    native: str,
    wide: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TIES carries its tie quota, breadcrumbs its ranks among equal magnitudes, from block to
    block; blocks of 61 rows cut the tensor anywhere, with the C loops and with the op-by-op torch
    path."""
    monkeypatch.setenv("MERGETUI_NATIVE", native)
    text = method_recipe(method, wide["base"], [wide["ft_a"], wide["ft_c"]], tmp_path / "whole")
    whole, _ = merge(text, tmp_path)
    recipe = parse_recipe(text.replace("whole", "blocked"), base_dir=tmp_path)
    plan = build_plan(recipe)
    squeeze(plan, 6 << 20)
    for tensor in plan.tensors:
        if tensor.block_rows is not None:
            tensor.block_rows = 61
    blocked = run_merge(plan).output_dir
    assert_same_bits(whole, blocked)


def test_a_lora_folded_in_blocks_gives_the_whole_tensor_bits(
    wide: dict[str, Path], tmp_path: Path
) -> None:
    """An adapter on the embedding (B @ A transposed), lm_head and down_proj, folded into ft_a
    block by block: the same bits as whole, and the delta is made in the same groups of rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mergetui.sources.lora import product_rows

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(wide["ft_a"], dtype=torch.float32)
    targets = ["embed_tokens", "lm_head", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts one of each pair at zero
                param.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    models = [wide["ft_a"], wide["ft_c"]]
    text = _tuned(
        method_recipe("ties", wide["base"], models, tmp_path / "whole"),
        "",
        [f'lora = "{tmp_path / "adapter"}"\n'],
    )
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=6 << 20)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensor = next(t for t in plan.tensors if t.name == name)
        assert tensor.block_rows is not None and tensor.shape[0] // tensor.block_rows >= 2
        assert tensor.block_rows % product_rows(256) == 0
    assert_same_bits(whole, blocked)
    plain = merge(
        text.replace(f'lora = "{tmp_path / "adapter"}"\n', "").replace("whole", "plain"), tmp_path
    )[0]
    changed = (
        tensors_of(plain)["model.embed_tokens.weight"]
        != tensors_of(whole)["model.embed_tokens.weight"]
    )
    assert bool(changed.any())  # the adapter was folded in


def test_blocks_that_cannot_be_made_small_enough_are_named(
    wide: dict[str, Path], tmp_path: Path
) -> None:
    """DARE's blocks hold whole row chunks of its L1 sums (4096 rows of 256): with room for
    less, the plan says which tensor overruns the budget and why, instead of quietly exceeding
    it."""
    text = method_recipe("dare_ties", wide["base"], [wide["ft_a"], wide["ft_c"]], tmp_path / "o")
    plan = build_plan(parse_recipe(text, base_dir=tmp_path))
    squeeze(plan, 6 << 20)
    assert plan.memory is not None
    over = dict(plan.memory.over_budget)
    assert over["model.embed_tokens.weight"] == (
        "is merged in blocks of at least 4096 rows (the smallest block dare_ties's sums and ranks "
        "allow)"
    )
    squeeze(plan, 64 << 20)
    assert plan.memory.over_budget == ()


@pytest.fixture(scope="module")
def appended(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base with a 16384-token tokenizer, a fine-tune that appended two chat tokens (16386
    rows) and one that kept the base's tokenizer."""
    from test_vocabulary import add_chat_tokens, save_resized_finetune, save_tokenizer

    root = tmp_path_factory.mktemp("appended")
    shape = dict(vocab_size=16384, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    base = save_llama(root / "base", seed=20, dtype="float32", **shape)
    save_tokenizer(base, ["<unk>", "<s>", "</s>", "<pad>"] + [f"t{i}" for i in range(16380)])
    return {
        "base": base,
        "chat": save_resized_finetune(base, root / "chat", seed=21, edit=add_chat_tokens),
        "plain": save_resized_finetune(base, root / "plain", seed=22),
    }


def test_tokens_appended_by_a_fine_tune_do_not_keep_the_embedding_whole(
    appended: dict[str, Path], tmp_path: Path
) -> None:
    """Merged into the base's vocabulary, the chat fine-tune's rows are its stored rows cut to
    16384: the embedding and lm_head go in blocks of stored rows, with the bits of the whole
    realignment. A union vocabulary realigns rows: its blocks gather them
    (``test_blocks_vocabulary.py``)."""
    models = [appended["chat"], appended["plain"]]
    text = method_recipe("ties", appended["base"], models, tmp_path / "whole")
    text = text.replace("seed = 7\n", 'seed = 7\ntokenizer = "base"\n')
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=6 << 20)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensor = next(t for t in plan.tensors if t.name == name)
        assert tensor.vocabulary is not None and tensor.shape[0] == 16384
        assert tensor.block_rows is not None and tensor.shape[0] // tensor.block_rows >= 2
    assert_same_bits(whole, blocked)
    union_text = text.replace('"base"', '"union"').replace("version = 1", "version = 2")
    union = build_plan(parse_recipe(union_text, base_dir=tmp_path))
    squeeze(union, 6 << 20)
    assert union.memory is not None and union.memory.over_budget == ()
    embedding = next(t for t in union.tensors if t.name == "model.embed_tokens.weight")
    assert embedding.shape[0] == 16386 and embedding.block_rows is not None  # gathered rows


def test_progress_counts_each_tensor_once_and_reads_every_pass(
    wide: dict[str, Path], tmp_path: Path
) -> None:
    text = method_recipe("ties", wide["base"], [wide["ft_a"], wide["ft_c"]], tmp_path / "out")
    recipe = parse_recipe(text, base_dir=tmp_path)
    plan = build_plan(recipe)
    squeeze(plan, 6 << 20)
    events: list[object] = []
    result = run_merge(plan, on_event=events.append)
    done = [e.tensors_done for e in events if type(e).__name__ == "TensorEvent"]  # type: ignore[attr-defined]
    assert done == sorted(done) and done[-1] == len(plan.tensors)
    assert result.bytes_read == plan.bytes_to_read
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert plan.bytes_to_read > sum(t.bytes_in for t in plan.tensors) + embed.bytes_in


def test_the_budget_is_a_recipe_key_written_back_as_written(tmp_path: Path) -> None:
    text = (
        '[merge]\nmethod = "linear"\nmax_memory = "3GiB"\n[[models]]\nmodel = "a"\nweight = 1.0\n'
        '[output]\npath = "out"\n'
    )
    recipe = parse_recipe(text, base_dir=tmp_path)
    assert recipe.max_memory == 3 << 30
    assert 'max_memory = "3GiB"' in recipe_to_toml(recipe)
    assert (
        parse_recipe(text.replace('max_memory = "3GiB"\n', ""), base_dir=tmp_path).max_memory
        is None
    )


def test_a_budget_that_is_not_a_size_is_refused_with_an_example(tmp_path: Path) -> None:
    from mergetui.errors import RecipeError

    text = (
        '[merge]\nmethod = "linear"\nmax_memory = "lots"\n[[models]]\nmodel = "a"\n'
        'weight = 1.0\n[output]\npath = "out"\n'
    )
    with pytest.raises(RecipeError, match=r"merge\.max_memory: cannot read size 'lots'.*4GiB"):
        parse_recipe(text, base_dir=tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=600)


def test_check_shows_the_budget_and_the_blocks_it_implies(
    wide: dict[str, Path], write_recipe: Callable[..., Path], tmp_path: Path
) -> None:
    recipe = write_recipe(
        method_recipe("ties", wide["base"], [wide["ft_a"], wide["ft_c"]], tmp_path / "out")
    )
    default = _cli("check", str(recipe))
    assert default.returncode == 0, default.stdout + default.stderr
    assert (
        "memory budget 1.0 GiB (default; --max-memory or [merge] max_memory): every tensor is "
        "merged whole" in default.stdout
    )
    small = _cli("check", str(recipe), "--max-memory", "450MiB")
    assert small.returncode == 0, small.stdout + small.stderr
    report = json.loads(_cli("check", str(recipe), "--max-memory", "450MiB", "--json").stdout)
    memory = report["memory"]
    assert memory["blocked"] == 2 and memory["explicit"]
    largest = memory["largest_blocked"]
    assert largest["tensor"] in ("lm_head.weight", "model.embed_tokens.weight")
    assert largest["blocks"] >= 2 and largest["rows"] * largest["blocks"] >= 16384
    assert (
        f"memory budget 450.0 MiB (set): 2 tensors merged in blocks of rows (largest: "
        f"{largest['tensor']}, {largest['blocks']} blocks of {largest['rows']} rows)"
    ) in small.stdout
    assert report["estimates"]["peak_ram_bytes"] <= 450 << 20


def test_a_budget_the_method_cannot_keep_is_an_error_naming_tensor_and_reason(
    fused_experts: dict[str, Path], write_recipe: Callable[..., Path], tmp_path: Path
) -> None:
    """DELLA's blocks of a fused Mixtral's experts hold at least one expert (8192 × 256: its
    rows along dimension 1 are 8192 long, its L1 norms summed per 128 of them): with an explicit
    budget too small for that, check says so before any weight is read."""
    models = [fused_experts["ft_a"], fused_experts["ft_c"]]
    recipe = write_recipe(method_recipe("della", fused_experts["base"], models, tmp_path / "out"))
    done = _cli("check", str(recipe), "--max-memory", "400MiB")
    assert done.returncode != 0
    text = " ".join((done.stdout + done.stderr).split())
    assert "merge.max_memory 400.0 MiB cannot be kept" in text
    assert (
        "model.layers.0.mlp.experts.gate_up_proj is merged in blocks of at least 1 row (the "
        "smallest block della's sums and ranks allow)" in text
    )
    assert "set max_memory to at least" in text
    default = _cli("check", str(recipe))  # the default budget: a warning, and the merge may run
    assert default.returncode == 0, default.stdout + default.stderr
    too_small = _cli("check", str(recipe), "--max-memory", "100MiB")
    assert "is below what the merge process needs to run" in too_small.stdout + too_small.stderr


def test_run_with_a_small_budget_writes_the_same_model_as_with_a_large_one(
    wide: dict[str, Path], write_recipe: Callable[..., Path], tmp_path: Path
) -> None:
    text = method_recipe("dare_ties", wide["base"], [wide["ft_a"], wide["ft_c"]], tmp_path / "x")
    recipe = write_recipe(text)
    large = _cli("run", str(recipe), "--max-memory", "8GiB", "-o", str(tmp_path / "large"))
    assert large.returncode == 0, large.stderr
    small = _cli("run", str(recipe), "--max-memory", "450MiB", "-o", str(tmp_path / "small"))
    assert small.returncode == 0, small.stderr
    assert_same_bits(tmp_path / "large", tmp_path / "small")
    assert DEFAULT_MAX_MEMORY == 1 << 30


def test_a_merge_cancelled_between_blocks_leaves_nothing_behind(
    wide: dict[str, Path], tmp_path: Path
) -> None:
    """Cancelled after the first block of the first tensor merged in blocks: the merge stops
    between blocks, and neither the output nor its partial folder is left."""
    import threading

    from mergetui.errors import MergeCancelled

    text = method_recipe("ties", wide["base"], [wide["ft_a"], wide["ft_c"]], tmp_path / "out")
    plan = build_plan(parse_recipe(text, base_dir=tmp_path))
    squeeze(plan, 6 << 20)
    cancel = threading.Event()
    seen: list[str] = []

    def on_event(event: object) -> None:
        name = getattr(event, "tensor_name", "")
        if type(event).__name__ == "TensorEvent" and getattr(event, "tensors_done", 0) == 0:
            seen.append(name)  # a block of a tensor not yet whole
            cancel.set()

    with pytest.raises(MergeCancelled):
        run_merge(plan, on_event=on_event, cancel=cancel)
    assert seen  # the first tensor (the embedding) was in blocks
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.mergetui-partial-*"))


def test_a_bin_checkpoint_in_blocks_gives_the_whole_tensor_bits(
    wide: dict[str, Path], tmp_path: Path
) -> None:
    """A pickled checkpoint cannot be read in part: it is unpickled once and every block copies
    its rows out of it (not a copy of the whole tensor per block)."""
    import shutil

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(wide["ft_a"] / "config.json", pickled)
    torch.save(tensors_of(wide["ft_a"]), pickled / "pytorch_model.bin")
    text = method_recipe("ties", wide["base"], [pickled, wide["ft_c"]], tmp_path / "whole")
    whole, _ = merge(text, tmp_path)
    blocked, plan = merge(text.replace("whole", "blocked"), tmp_path, working=6 << 20)
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.block_rows is not None and embed.shape[0] // embed.block_rows >= 2
    assert_same_bits(whole, blocked)
    reference = merge(
        method_recipe("ties", wide["base"], [wide["ft_a"], wide["ft_c"]], tmp_path / "st"),
        tmp_path,
    )[0]
    assert_same_bits(reference, whole)
