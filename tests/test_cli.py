"""The `mergetui` command as a user runs it: real subprocesses, exit codes, output, signals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

EXE = [sys.executable, "-m", "mergetui"]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,  # a hang detector: generous, never the thing being tested
        env={**os.environ, "COLUMNS": "160"},
    )


def ties_recipe(models: dict[str, Path], out: Path, **extra: str) -> str:
    return f"""
version = 1
[merge]
method = "ties"
base = "{models["base"]}"
device = "cpu"
[merge.parameters]
density = 0.5
[[models]]
model = "{models["ft_a"]}"
weight = 0.5
[[models]]
model = "{extra.get("second", models["ft_b"])}"
weight = 0.5
[output]
path = "{out}"
"""


def test_help_is_fast_and_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mergetui.cli.app import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'run' in result.output and 'check' in result.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'textual', 'safetensors') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_run_json_lines_and_exit_zero(
    tmp_path: Path, models: dict[str, Path], write_recipe: Callable[..., Path]
) -> None:
    recipe = write_recipe(ties_recipe(models, tmp_path / "merged"))
    result = run_cli("run", str(recipe), "--json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["start", "plan"] and kinds[-1] == "done"
    assert events[0]["schema"] == 1 and events[1]["tensors_total"] == 21
    tensor_events = [e for e in events if e["event"] == "tensor"]
    assert tensor_events[-1]["tensors_done"] == tensor_events[-1]["tensors_total"] == 21
    last = tensor_events[-1]
    assert last["bytes_read"] == last["bytes_to_read"] > 0 and last["peak_rss_bytes"] > 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_run_human_output_and_replay_of_saved_recipe(
    tmp_path: Path, models: dict[str, Path], write_recipe: Callable[..., Path]
) -> None:
    recipe = write_recipe(ties_recipe(models, tmp_path / "merged"))
    first = run_cli("run", str(recipe))
    assert first.returncode == 0, first.stderr
    assert "done" in first.stdout and str(tmp_path / "merged") in first.stdout
    saved = tmp_path / "merged" / "mergetui.toml"
    again = run_cli("run", str(saved), "--output", str(tmp_path / "replayed"), cwd=Path("/"))
    assert again.returncode == 0, again.stderr
    a = (tmp_path / "merged" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "replayed" / "model.safetensors").read_bytes()


def test_invalid_recipe_exits_2_and_creates_nothing(
    tmp_path: Path, models: dict[str, Path], write_recipe: Callable[..., Path]
) -> None:
    text = ties_recipe(models, tmp_path / "merged").replace("density = 0.5", "densty = 0.5")
    recipe = write_recipe(text)
    result = run_cli("run", str(recipe))
    assert result.returncode == 2
    assert "recipe.toml" in result.stderr and "merge.parameters.densty" in result.stderr
    assert "did you mean `density`" in result.stderr
    assert not (tmp_path / "merged").exists()
    no_output = write_recipe(text.split("[output]")[0], "no-output.toml")
    result = run_cli("check", str(no_output))
    assert "add an [output] table" in result.stderr  # table names are not eaten as markup


def test_incompatible_models_exit_2(
    tmp_path: Path, models: dict[str, Path], write_recipe: Callable[..., Path]
) -> None:
    recipe = write_recipe(ties_recipe(models, tmp_path / "merged", second=str(models["qwen2"])))
    result = run_cli("run", str(recipe))
    assert result.returncode == 2
    assert "different architectures" in result.stdout + result.stderr
    assert not (tmp_path / "merged").exists()


def test_existing_output_exit_2_without_force(
    tmp_path: Path, models: dict[str, Path], write_recipe: Callable[..., Path]
) -> None:
    (tmp_path / "merged").mkdir()
    recipe = write_recipe(ties_recipe(models, tmp_path / "merged"))
    result = run_cli("run", str(recipe))
    assert result.returncode == 2 and "--force" in result.stderr
    assert run_cli("run", str(recipe), "--force").returncode == 0


def test_check_table_and_dry_run_read_no_weights(
    tmp_path: Path, models: dict[str, Path], write_recipe: Callable[..., Path]
) -> None:
    """The data region of a model is destroyed, its header kept: check and dry-run still pass."""
    import shutil

    hollow = tmp_path / "hollow"
    shutil.copytree(models["ft_b"], hollow)
    for shard in hollow.glob("*.safetensors"):
        data = bytearray(shard.read_bytes())
        header_end = 8 + int.from_bytes(data[:8], "little")
        data[header_end:] = b"\xff" * (len(data) - header_end)
        shard.write_bytes(bytes(data))
    recipe = write_recipe(ties_recipe(models, tmp_path / "merged", second=str(hollow)))
    check = run_cli("check", str(recipe))
    assert check.returncode == 0, check.stderr
    for text in (
        "LlamaForCausalLM",
        "llama",
        "bfloat16",
        "compatible",
        "peak RAM",
        "memory budget",
    ):
        assert text in check.stdout
    dry = run_cli("run", str(recipe), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    start, plan = (json.loads(line) for line in dry.stdout.splitlines())
    assert start["event"] == "start" and plan["event"] == "plan" and plan["dry_run"]
    report = plan["report"]
    assert plan["ok"] and len(report["models"]) == 3 and report["estimates"]["output_bytes"] > 0
    assert not (tmp_path / "merged").exists()


def test_methods_lists_registry() -> None:
    result = run_cli("methods")
    assert result.returncode == 0
    from mergetui.methods.registry import METHODS

    listed = {line.split(" — ")[0] for line in result.stdout.splitlines() if " — " in line}
    assert listed == set(METHODS)
    mergekit_015 = {  # every method mergekit 0.1.5 registers
        "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
        "della_linear", "karcher", "linear", "model_stock", "multislerp", "nearswap", "nuslerp",
        "passthrough", "ram", "ramplus_tl", "sce", "slerp", "task_arithmetic", "ties",
    }  # fmt: skip
    assert listed == mergekit_015
    assert "density (float in (0, 1]" in result.stdout
    assert "epsilon (float in [0, 1), default 0.15, per model)" in result.stdout
    assert "merge.base optional (given, the models are merged as task vectors" in result.stdout


@pytest.mark.timeout(3600)  # when no demo run has trained the shared models yet, it trains them
def test_demo_trains_specialists_merges_and_scores_them(tmp_path: Path) -> None:
    from mergetui.demo import TASKS, task_file_text

    root = tmp_path / "demo"
    # The trained models come from the shared cache (trained once per DEMO_CONFIG, usually by the
    # README's demo command run before the tests); the slow part left is scoring 4 models.
    result = run_cli("demo", "--dir", str(root), timeout=1200)
    assert result.returncode == 0, result.stderr
    assert "retained by the merge" in result.stdout and "the merge kept" in result.stdout
    merged = root / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    scores = json.loads((root / "eval.json").read_text())["scores"]
    for task in TASKS:  # training worked: each specialist beats the base on its own skill
        assert scores[f"ft-{task}"][task] > scores["base"][task] + 0.2, scores
        shipped = Path(__file__).parents[1] / "recipes" / "demo-tasks" / f"{task}.jsonl"
        assert (
            (root / "tasks" / f"{task}.jsonl").read_text()
            == shipped.read_text()
            == task_file_text(task)
        )
    from mergetui.sweep.spec import load_sweep

    sweep = load_sweep(root / "demo-sweep.toml")  # the shipped sweep, valid on the demo models
    assert sweep.strategy == "tpe" and len(sweep.dimensions) == 6
    assert f"mergetui sweep {root / 'demo-sweep.toml'}" in " ".join(result.stdout.split())
    weights = root / "models" / "ft-math" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = run_cli("demo", "--dir", str(root), timeout=1200)  # models kept, output replaced
    assert second.returncode == 0, second.stderr
    assert weights.stat().st_mtime_ns == stamp, "the cached models were retrained"


def _fill_hub_cache(hf_home: Path, repo_id: str, source: Path) -> None:
    """Lay out a model in the standard HF cache, as `hf download` would have left it."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def test_hub_ids_resolve_offline_from_the_cache(
    tmp_path: Path, models: dict[str, Path], write_recipe: Callable[..., Path]
) -> None:
    hf_home = tmp_path / "hf"
    _fill_hub_cache(hf_home, "acme/tiny-base", models["base"])
    _fill_hub_cache(hf_home, "acme/tiny-ft", models["ft_a"])
    recipe = write_recipe(f"""
[merge]
method = "task_arithmetic"
base = "acme/tiny-base"
device = "cpu"
[[models]]
model = "acme/tiny-ft@main"
weight = 1.0
[[models]]
model = "acme/not-downloaded"
weight = 1.0
[output]
path = "{tmp_path / "out"}"
""")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    missing = subprocess.run(
        [*EXE, "run", str(recipe)], capture_output=True, text=True, env=env, timeout=120
    )
    assert missing.returncode == 2
    assert "model acme/not-downloaded is not in the cache" in missing.stderr
    assert "run `mergetui hub download acme/not-downloaded` where the Hub" in missing.stderr
    recipe.write_text(
        recipe.read_text().replace('[[models]]\nmodel = "acme/not-downloaded"\nweight = 1.0\n', "")
    )
    ok = subprocess.run(
        [*EXE, "run", str(recipe)], capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- acme/tiny-base" in card and "- acme/tiny-ft" in card
