"""``mergetui lora extract``: a LoRA whose B·A approximates MODEL − BASE, checked on real tiny models.

A fine-tune made of a known rank-8 change must come back exactly; PEFT must load the adapter and
merge it into the base's weights; the real mergekit 0.1.5 (``mergekit-extract-lora`` from the venv
of ``$MERGETUI_MERGEKIT_PYTHON``) must reach the same reconstruction error per module and write the
same adapter config; bad inputs are refused before any weight is read; a failed run leaves nothing.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import tree_digest
from mergekit_ref import MERGEKIT_VERSION, mergekit_python, mergekit_unavailable, read_tensors
from typer.testing import CliRunner

from mergetui.engine.extract import ExtractOptions, extract_lora, plan_extraction
from mergetui.errors import (
    CompatibilityError,
    MergeCancelled,
    MergeFailed,
    OutputError,
    UsageError,
)
from mergetui.events import (
    DoneEvent,
    ErrorEvent,
    Event,
    ExtractedEvent,
    StartEvent,
    TensorEvent,
    parse_event_line,
)

RANK = 8
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."


def _delta_of(adapter: dict[str, Any], module: str) -> Any:
    """B·A of one LoRA module of an adapter's tensors (float64)."""
    a = adapter[f"{PREFIX}{module}.lora_A.weight"].double()
    b = adapter[f"{PREFIX}{module}.lora_B.weight"].double()
    return b @ a


def _lora_modules(adapter: dict[str, Any]) -> list[str]:
    return sorted(
        name.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        for name in adapter
        if name.endswith(".lora_A.weight")
    )


@pytest.fixture(scope="module")
def known(
    models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, dict[str, Any]]:
    """(base, fine-tune, the change): the session's base loaded in float32, plus a seeded random
    rank-8 B@A on every attention and MLP weight, saved with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("known")
    model = AutoModelForCausalLM.from_pretrained(models["base"], dtype=torch.float32)
    generator = torch.Generator().manual_seed(1234)
    change: dict[str, Any] = {}
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if not name.endswith(".weight") or name.split(".")[-2] not in LINEARS:
                continue
            out_features, in_features = param.shape
            b = torch.randn(out_features, RANK, generator=generator) * 0.1
            a = torch.randn(RANK, in_features, generator=generator) * 0.1
            change[name.removesuffix(".weight")] = b @ a
            param.add_(b @ a)
    model.save_pretrained(root / "ft")
    for file in models["base"].iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(file, root / "ft" / file.name)
    return models["base"], root / "ft", change


@pytest.fixture(scope="module")
def extracted(
    known: tuple[Path, Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Any:
    base, ft, _ = known
    events: list[Event] = []
    out = tmp_path_factory.mktemp("extracted") / "adapter"
    result = extract_lora(ft, base, out, ExtractOptions(rank=RANK), on_event=events.append)
    return result, events


# -- (a) a known low-rank change comes back --------------------------------------------------------


def test_a_known_rank_8_change_is_recovered(
    known: tuple[Path, Path, dict[str, Any]], extracted: Any
) -> None:
    _, _, change = known
    result, _ = extracted
    adapter = read_tensors(result.output_dir)
    assert _lora_modules(adapter) == sorted(change)
    for module, expected in change.items():
        got = _delta_of(adapter, module)
        error = float((got - expected.double()).norm() / expected.double().norm())
        assert error < 1e-4, f"{module}: relative error {error:.3g}"
    reports = {m.module: m for m in result.modules}
    for module in change:
        assert reports[module].action == "lora" and reports[module].rank == RANK
        assert reports[module].energy == pytest.approx(1.0, abs=1e-6)
    # the embedding, head and norms did not change: left out, not saved whole
    assert {m.action for m in result.modules if m.module not in change} == {"unchanged"}
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == RANK
    assert sorted(config["target_modules"]) == sorted(LINEARS)
    assert config["modules_to_save"] is None and config["rank_pattern"] == {}
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert result.adapter_bytes == (result.output_dir / "adapter_model.safetensors").stat().st_size
    assert sum(m.nbytes for m in result.modules) < result.adapter_bytes


def test_progress_events_one_per_module_then_extracted_and_done(extracted: Any) -> None:
    result, events = extracted
    tensors = [e for e in events if isinstance(e, TensorEvent)]
    assert [e.tensors_done for e in tensors] == list(range(1, len(result.modules) + 1))
    assert [e.kind for e in events[len(tensors) :]] == ["phase", "extracted", "done"]
    summary, done = events[-2], events[-1]
    assert isinstance(summary, ExtractedEvent) and isinstance(done, DoneEvent)
    assert summary.modules == result.modules and summary.rank == RANK
    assert done.output == summary.output == str(result.output_dir)
    assert done.bytes_read == done.bytes_to_read and done.bytes_written == result.adapter_bytes
    assert parse_event_line(summary.to_json()) == summary


# -- (b) PEFT loads it -----------------------------------------------------------------------------


def test_peft_loads_the_adapter_and_merges_to_base_plus_the_extracted_change(
    known: tuple[Path, Path, dict[str, Any]], extracted: Any
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, ft_dir, _ = known
    result, _ = extracted
    adapter = read_tensors(result.output_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(result.output_dir)).merge_and_unload()
    weights = merged.state_dict()
    assert weights.keys() == base_weights.keys()
    lora = set(_lora_modules(adapter))
    for name, value in weights.items():
        module = name.removesuffix(".weight")
        expected = base_weights[name].double()
        if module in lora:
            expected = expected + _delta_of(adapter, module)
        assert torch.allclose(value.double(), expected, atol=1e-6, rtol=0), name
    tuned = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32)
    prompt = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.allclose(merged(prompt).logits, tuned(prompt).logits, atol=1e-4)
        generated = merged.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, prompt.shape[1] + 4)


# -- (c) against the real mergekit -----------------------------------------------------------------


@pytest.fixture(scope="session")
def mergekit_extract() -> Path:
    """``mergekit-extract-lora`` of the mergekit venv; skips (or fails) as the other mergekit
    comparisons do."""
    python = mergekit_python()
    script = Path(python).parent / "mergekit-extract-lora"
    if not script.is_file():
        mergekit_unavailable(f"{script} does not exist (is mergekit installed with {python}?)")
    found = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    if found != MERGEKIT_VERSION:
        mergekit_unavailable(f"{python} has mergekit {found!r}, not {MERGEKIT_VERSION}")
    return script


def _run_mergekit(script: Path, model: Path, base: Path, out: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0")
    done = subprocess.run(
        [str(script), "--model", str(model), "--base-model", str(base), "--out-path", str(out)]
        + list(args),
        capture_output=True,
        text=True,
        timeout=600,  # a hang detector only
        env=env,
        cwd=out.parent,
    )
    assert done.returncode == 0, f"mergekit-extract-lora failed:\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("rank", [8, 24])
def test_same_reconstruction_error_and_config_as_mergekit(
    rank: int, mk_zoo: dict[str, Path], mergekit_extract: Path, tmp_path: Path
) -> None:
    """rank 24 is more than k_proj/v_proj's 16 rows: both clamp them and list them in
    rank_pattern."""
    import torch

    base, ft = mk_zoo["base"], mk_zoo["ft1"]
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    extract_lora(ft, base, ours_dir, ExtractOptions(rank=rank))
    _run_mergekit(mergekit_extract, ft, base, theirs_dir, "--max-rank", str(rank))
    ours, theirs = read_tensors(ours_dir), read_tensors(theirs_dir)
    base_w, ft_w = read_tensors(base), read_tensors(ft)
    assert _lora_modules(ours) == _lora_modules(theirs)
    worst = 0.0
    for module in _lora_modules(theirs):
        delta = ft_w[f"{module}.weight"].double() - base_w[f"{module}.weight"].double()
        errors = [
            float((delta - _delta_of(adapter, module)).norm() / delta.norm())
            for adapter in (ours, theirs)
        ]
        assert errors[1] > 0
        worst = max(worst, abs(errors[0] - errors[1]) / errors[1])
        assert math.isclose(errors[0], errors[1], rel_tol=1e-4), (module, errors)
        for piece in ("lora_A.weight", "lora_B.weight"):
            name = f"{PREFIX}{module}.{piece}"
            assert ours[name].shape == theirs[name].shape and ours[name].dtype == theirs[name].dtype
    # what both save whole (the fine-tune changed every norm, the embedding and the head)
    whole = [name for name in theirs if ".lora_" not in name]
    assert sorted(whole) == sorted(name for name in ours if ".lora_" not in name)
    for name in whole:
        assert torch.equal(ours[name], theirs[name]), name
    ours_config = json.loads((ours_dir / "adapter_config.json").read_text())
    theirs_config = json.loads((theirs_dir / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type", "task_type"):
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])
    assert sorted(ours_config["modules_to_save"]) == sorted(theirs_config["modules_to_save"])
    assert worst < 1e-4


def test_rel_cutoff_gives_each_module_its_own_rank(mk_zoo: dict[str, Path], tmp_path: Path) -> None:
    """A relative cut-off keeps, per module, the singular values above that share of the largest;
    the config's r is the largest rank, the others go in rank_pattern."""
    import torch

    base, ft = mk_zoo["base"], mk_zoo["ft1"]
    result = extract_lora(ft, base, tmp_path / "out", ExtractOptions(rel_cutoff=0.5))
    base_w, ft_w = read_tensors(base), read_tensors(ft)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    ranks = {m.module: m.rank for m in result.modules if m.action == "lora"}
    assert config["r"] == max(ranks.values())
    assert config["rank_pattern"] == {k: r for k, r in ranks.items() if r != config["r"]}
    for module, rank in ranks.items():
        delta = ft_w[f"{module}.weight"] - base_w[f"{module}.weight"]
        s = torch.linalg.svdvals(delta)
        assert rank == int((s > 0.5 * s[0]).sum()), module
    assert len(set(ranks.values())) > 1  # so rank_pattern is exercised below
    # PEFT builds each module at its rank_pattern rank, and merges to base + B·A, the norms,
    # embedding and head (changed by this fine-tune, saved whole) replaced by the fine-tune's
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(tmp_path / "out")).merge_and_unload()
    adapter = read_tensors(tmp_path / "out")
    for name, value in merged.state_dict().items():
        module = name.removesuffix(".weight")
        if module in ranks:
            expected = base_w[name].double() + _delta_of(adapter, module)
        else:
            expected = ft_w[name].double()
        assert torch.allclose(value.double(), expected, atol=1e-6, rtol=0), name


# -- (d) refused before any weight is read; a failed run leaves nothing ----------------------------


def test_shapes_that_differ_name_the_tensor(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(
        CompatibilityError, match=r"model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight"
    ):
        plan_extraction(models["wide"], models["base"], tmp_path / "out", ExtractOptions(rank=4))
    assert not list(tmp_path.iterdir())


def test_a_different_vocabulary_saves_the_embeddings_whole_with_a_warning(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """As mergekit: with --embeddings but vocabularies of different sizes, the embedding and the
    head fall back to being saved whole (the base must be resized to load them)."""
    plan = plan_extraction(
        models["big_vocab"], models["base"], tmp_path / "o", ExtractOptions(rank=4, embeddings=True)
    )
    try:
        actions = {m.module: m.action for m in plan.modules}
        assert actions["model.embed_tokens"] == actions["lm_head"] == "whole"
        assert actions["model.layers.0.self_attn.q_proj"] == "lora"
        assert any("vocabularies differ" in w for w in plan.warnings)
    finally:
        plan.close()


def test_embeddings_option_extracts_them_as_loras(mk_zoo: dict[str, Path], tmp_path: Path) -> None:
    import torch

    base, ft = mk_zoo["base"], mk_zoo["ft1"]
    result = extract_lora(ft, base, tmp_path / "o", ExtractOptions(rank=64, embeddings=True))
    actions = {m.module: m.action for m in result.modules}
    assert actions["model.embed_tokens"] == "lora_embedding" and actions["lm_head"] == "lora"
    adapter = read_tensors(tmp_path / "o")
    a = adapter[f"{PREFIX}model.embed_tokens.lora_embedding_A"].double()
    b = adapter[f"{PREFIX}model.embed_tokens.lora_embedding_B"].double()
    delta = (
        read_tensors(ft)["model.embed_tokens.weight"]
        - read_tensors(base)["model.embed_tokens.weight"]
    )
    # PEFT adds (B @ A)ᵀ to an embedding; rank 64 is the full rank of this 64 x 32 difference
    assert torch.allclose((b @ a).T, delta.double(), atol=1e-5)
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert {"embed_tokens", "lm_head"} <= set(config["target_modules"])
    assert "embed_tokens" not in (config["modules_to_save"] or [])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ExtractOptions(rank=0), "--rank must be at least 1"),
        (ExtractOptions(), "--rank R"),
        (
            ExtractOptions(rank=4, include=("attention_does_not_exist",)),
            "--include 'attention_does",
        ),
        (ExtractOptions(rank=4, exclude=("nothing_like_this",)), "--exclude 'nothing_like_this'"),
        (ExtractOptions(rank=4, include=("(",)), "not a valid regex"),
        (
            ExtractOptions(rank=4, save_modules=("no_such_module",)),
            "--save-module 'no_such_module'",
        ),
        (ExtractOptions(rel_cutoff=1.5), "--rel-cutoff must be between 0 and 1"),
        (ExtractOptions(rank=4, device="tpu"), "--device must be"),
        (ExtractOptions(rank=4, include=("norm",)), "no module .* is left to extract as a LoRA"),
    ],
)
def test_bad_options_are_refused_before_reading(
    options: ExtractOptions, message: str, mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match=message):
        plan_extraction(mk_zoo["ft1"], mk_zoo["base"], tmp_path / "out", options)
    assert not list(tmp_path.iterdir())


def test_output_that_exists_or_overlaps_a_source_is_refused(
    mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    base, ft = mk_zoo["base"], mk_zoo["ft1"]
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        plan_extraction(ft, base, existing, ExtractOptions(rank=4))
    for inside in (ft / "adapter", base, base.parent):
        with pytest.raises(OutputError, match="overlaps"):
            plan_extraction(ft, base, inside, ExtractOptions(rank=4), force=True)
    assert (existing / "keep.txt").read_text() == "old"
    extract_lora(ft, base, existing, ExtractOptions(rank=4), force=True)
    assert (existing / "adapter_config.json").is_file() and not (existing / "keep.txt").exists()


def _poisoned_copy(source: Path, target: Path, tensor: str) -> Path:
    """A copy of ``source`` whose ``tensor`` holds a NaN (so the run fails at that module)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    weights[tensor] = weights[tensor].clone()
    weights[tensor][0, 0] = float("nan")
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    assert torch.isnan(load_file(target / "model.safetensors")[tensor]).any()
    return target


def test_a_failed_run_leaves_no_output_and_the_sources_untouched(
    mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    base = mk_zoo["base"]
    ft = _poisoned_copy(mk_zoo["ft1"], tmp_path / "ft", "model.layers.2.mlp.up_proj.weight")
    before = {p: tree_digest(p) for p in (base, ft)}
    out = tmp_path / "out" / "adapter"
    with pytest.raises(MergeFailed, match=r"model\.layers\.2\.mlp\.up_proj") as failure:
        extract_lora(ft, base, out, ExtractOptions(rank=4))
    assert "partial adapter was removed" in str(failure.value)
    assert list((tmp_path / "out").iterdir()) == []
    # with --force over an older adapter: the old one stays as it was
    extract_lora(mk_zoo["ft2"], base, out, ExtractOptions(rank=4))
    old = tree_digest(out)
    with pytest.raises(MergeFailed):
        extract_lora(ft, base, out, ExtractOptions(rank=4), force=True)
    assert tree_digest(out) == old
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adapter"]
    assert {p: tree_digest(p) for p in (base, ft)} == before


def test_a_cancelled_run_leaves_nothing(mk_zoo: dict[str, Path], tmp_path: Path) -> None:
    cancel = threading.Event()

    def stop_after_first(event: Event) -> None:
        if isinstance(event, TensorEvent):
            cancel.set()

    with pytest.raises(MergeCancelled):
        extract_lora(
            mk_zoo["ft1"],
            mk_zoo["base"],
            tmp_path / "out",
            ExtractOptions(rank=4),
            on_event=stop_after_first,
            cancel=cancel,
        )
    assert list(tmp_path.iterdir()) == []


# -- (e) the command -------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    from mergetui.cli.lora_extract import extract

    app = typer.Typer()
    app.command("extract")(extract)

    @app.callback()
    def group() -> None:
        """A group, so the command is invoked by name as under ``mergetui lora``."""

    return app


def test_the_command_streams_json_events(mk_zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    args = ["extract", str(mk_zoo["ft1"]), "--base", str(mk_zoo["base"]), "-o", str(out)]
    result = CliRunner().invoke(_cli(), [*args, "--rank", "4", "--exclude", r"mlp\.down", "--json"])
    assert result.exit_code == 0, result.output
    events = [parse_event_line(line) for line in result.stdout.splitlines()]
    assert isinstance(events[0], StartEvent) and events[0].command == "lora extract"
    assert isinstance(events[-1], DoneEvent) and isinstance(events[-2], ExtractedEvent)
    summary = events[-2]
    assert summary.rank == 4 and "down_proj" not in summary.target_modules
    assert all(m.rank == 4 for m in summary.modules if m.action == "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == summary.target_modules
    # again without --force: one error event, exit code 2, the adapter untouched
    before = tree_digest(out)
    again = CliRunner().invoke(_cli(), [*args, "--rank", "4", "--json"])
    assert again.exit_code == 2
    last = parse_event_line(again.stdout.splitlines()[-1])
    assert isinstance(last, ErrorEvent) and "already exists" in last.message
    assert tree_digest(out) == before


def test_the_command_prints_a_table_of_what_each_module_kept(
    mk_zoo: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "adapter"
    result = CliRunner().invoke(
        _cli(),
        ["extract", str(mk_zoo["ft1"]), "--base", str(mk_zoo["base"]), "-o", str(out), "-r", "40"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "model.layers.3.mlp.down_proj" in result.output
    assert "rank 32" in result.output and "rank 16" in result.output  # clamped to min(out, in)
    assert "clamped" in result.output  # the warning says so
    assert "adapter" in result.output and str(out) in result.output
