"""The LoRA jobs as recipes: ``[adapters]`` (``lora merge``) and ``[output] lora_rank``
(``lora extract`` after a model merge), run with ``mergetui run``.

Real parts only: the session's tiny models, real PEFT adapters saved by PEFT, the real command in a
subprocess. What a recipe writes must be the bytes the ``lora`` commands write for the same options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_lora_merge import _save_adapter

from mergetui.errors import RecipeError
from mergetui.events import DoneEvent, ExtractedEvent, PhaseEvent, parse_event_line
from mergetui.recipe import AdapterRecipe, Recipe, parse_any_recipe, parse_recipe, recipe_to_toml

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def adapters(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two rank-8 PEFT adapters of the session's base (different alphas)."""
    root = tmp_path_factory.mktemp("recipe-adapters")
    return {
        "a": _save_adapter(models["base"], root / "a", 11, r=8, lora_alpha=16),
        "b": _save_adapter(models["base"], root / "b", 12, r=8, lora_alpha=8),
    }


def _mergetui(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mergetui", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,  # a hang detector, never the thing tested
        env={**os.environ, "COLUMNS": "200"},
    )


def _same_files(first: Path, second: Path, names: tuple[str, ...] = ADAPTER_FILES) -> None:
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def _adapter_recipe(adapters: dict[str, Path], out: Path, options: str) -> str:
    return (
        f"version = 2\n[adapters]\n{options}\n"
        f'[[adapters.sources]]\nlora = "{adapters["a"]}"\nweight = 0.6\n'
        f'[[adapters.sources]]\nlora = "{adapters["b"]}"\nweight = 0.4\n'
        f'[output]\npath = "{out}"\n'
    )


# -- [adapters] ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        ('combination = "ties"\ndensity = 0.5', ["-c", "ties", "--density", "0.5"]),
        ('combination = "svd"\nrank = 4', ["-c", "svd", "--rank", "4"]),
    ],
)
def test_adapter_recipe_writes_what_lora_merge_writes(
    adapters: dict[str, Path],
    models: dict[str, Path],
    tmp_path: Path,
    options: str,
    flags: list[str],
) -> None:
    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        _adapter_recipe(adapters, out, f'{options}\nbase = "{models["base"]}"'), encoding="utf-8"
    )
    run = _mergetui("run", recipe, "--json")
    assert run.returncode == 0, run.stderr
    events = [parse_event_line(line) for line in run.stdout.splitlines()]
    assert events[0].kind == "start" and events[-1].kind == "done"
    assert sum(e.kind in ("done", "error", "cancelled") for e in events) == 1

    cli = tmp_path / "cli"
    by_hand = _mergetui(
        "lora", "merge", adapters["a"], adapters["b"], *flags, "--weights", "0.6,0.4",
        "--base", models["base"], "-o", cli,
    )  # fmt: skip
    assert by_hand.returncode == 0, by_hand.stderr
    _same_files(out, cli)

    # the recipe is saved beside the card, and replays to the same bytes
    saved = out / "mergetui.toml"
    assert isinstance(parse_any_recipe(saved.read_text(), base_dir=out), AdapterRecipe)
    again = _mergetui("run", saved, "-o", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    _same_files(out, tmp_path / "again")
    replayed = (tmp_path / "again" / "mergetui.toml").read_text()
    assert replayed.replace(str(tmp_path / "again"), str(out)) == saved.read_text()
    assert not (cli / "mergetui.toml").exists()


def test_adapter_recipe_dry_run_check_and_overrides(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(_adapter_recipe(adapters, out, 'combination = "cat"'), encoding="utf-8")
    dry = _mergetui("run", recipe, "--dry-run", "--json", "--device", "cpu")
    assert dry.returncode == 0, dry.stderr
    last = parse_event_line(dry.stdout.splitlines()[-1])
    assert last.kind == "plan" and last.to_dict()["dry_run"] is True
    assert last.to_dict()["report"]["rank"] == 16 and not out.exists()

    check = _mergetui("check", recipe)
    assert check.returncode == 0, check.stderr
    assert "adapter merge (cat)" in check.stdout and "rank 16" in check.stdout

    assert _mergetui("run", recipe).returncode == 0
    refused = _mergetui("run", recipe, "--json")
    assert refused.returncode == 2
    assert json.loads(refused.stdout.splitlines()[-1])["event"] == "error"
    assert "--force" in refused.stderr
    assert _mergetui("run", recipe, "--force").returncode == 0

    bad = _mergetui("run", recipe, "--device", "tpu")
    assert bad.returncode == 2 and "tpu" in bad.stderr


# -- [output] lora_rank --------------------------------------------------------------------------


def _merge_recipe(
    models: dict[str, Path], out: Path, output_extra: str = "", weight: float = 1.0
) -> str:
    return (
        f'version = 2\n[merge]\nmethod = "task_arithmetic"\nbase = "{models["base"]}"\n'
        f'device = "cpu"\ndtype = "float32"\n'
        f'[[models]]\nmodel = "{models["ft_a"]}"\nweight = {weight}\n'
        f'[[models]]\nmodel = "{models["ft_b"]}"\nweight = 0.5\n'
        f'[output]\npath = "{out}"\n{output_extra}'
    )


def test_lora_rank_extracts_after_the_merge(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(_merge_recipe(models, out, "lora_rank = 4\n"), encoding="utf-8")

    dry = _mergetui("run", recipe, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "then: extract a rank-4 LoRA adapter" in dry.stdout
    check = _mergetui("check", recipe, "--json")
    assert json.loads(check.stdout)["extraction"]["output"] == str(tmp_path / "merged-lora")

    run = _mergetui("run", recipe, "--json")
    assert run.returncode == 0, run.stderr
    events = [parse_event_line(line) for line in run.stdout.splitlines()]
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["start", "plan"] and kinds[-2:] == ["extracted", "done"]
    assert sum(k in ("done", "error", "cancelled") for k in kinds) == 1
    merged = next(e for e in events if isinstance(e, PhaseEvent) and "extract" in e.message)
    assert kinds.index("tensor", kinds.index(merged.kind)) > 0
    extracted = events[-2]
    assert isinstance(extracted, ExtractedEvent) and extracted.rank == 4
    assert extracted.output == str(tmp_path / "merged-lora")
    final = events[-1]
    assert isinstance(final, DoneEvent) and final.output == str(out)

    lora = tmp_path / "merged-lora"
    assert (out / "model.safetensors").is_file()
    by_hand = tmp_path / "by-hand"
    cli = _mergetui("lora", "extract", out, "--base", models["base"], "-o", by_hand, "--rank", "4")
    assert cli.returncode == 0, cli.stderr
    _same_files(lora, by_hand, (*ADAPTER_FILES, "README.md"))

    # the merge's own recipe asks for the extraction again
    saved = parse_recipe((out / "mergetui.toml").read_text(), base_dir=out)
    assert saved.lora_rank == 4 and saved.lora_dir == lora

    # plain output: the merge's summary, then the extraction's table
    text = _mergetui("run", recipe, "--force")
    assert text.returncode == 0, text.stderr
    assert "LoRA modules" in text.stdout and f"output: {lora}" in text.stdout
    _same_files(lora, by_hand, ADAPTER_FILES)


def test_failed_extraction_keeps_the_merge_and_no_adapter(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """A merge equal to its base (weights 0) has nothing to extract: the extraction fails after
    the merge is in place, and leaves nothing of the adapter behind."""
    out = tmp_path / "merged"
    recipe = tmp_path / "recipe.toml"
    text = _merge_recipe(models, out, 'lora_rank = 4\nlora_path = "adapter"\n', weight=0.0)
    recipe.write_text(text.replace("weight = 0.5", "weight = 0.0"), encoding="utf-8")
    run = _mergetui("run", recipe, "--json")
    assert run.returncode == 1, run.stderr
    events = [parse_event_line(line) for line in run.stdout.splitlines()]
    assert events[-1].kind == "error" and not any(e.kind == "done" for e in events)
    message = events[-1].to_dict()["message"]
    assert f"the merge is complete at {out}" in message and "no LoRA to extract" in message
    assert (out / "model.safetensors").is_file() and (out / "mergetui.toml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "recipe.toml"]


def test_existing_lora_output_is_refused_before_the_merge(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    (tmp_path / "merged-lora").mkdir()
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(_merge_recipe(models, out, "lora_rank = 4\n"), encoding="utf-8")
    run = _mergetui("run", recipe)
    assert run.returncode == 2
    assert "output.lora_path" in run.stderr and "--force" in run.stderr
    assert not out.exists()


# -- the recipe: round trip and validation -------------------------------------------------------


def test_round_trips(tmp_path: Path) -> None:
    adapter_text = (
        'version = 2\n[adapters]\ncombination = "dare_ties_svd"\ndensity = 0.7\n'
        'majority_sign = "frequency"\nrank = 6\nsvd_clamp = 0.99\nsvd_full_matrices = false\n'
        'svd_driver = "gesvdj"\nseed = 3\ndevice = "cuda:0"\nbase = "base"\n'
        '[[adapters.sources]]\nlora = "a"\nweight = -0.5\n[[adapters.sources]]\nlora = "b"\n'
        '[output]\npath = "out"\n'
    )
    model_text = (
        'version = 1\n[merge]\nmethod = "task_arithmetic"\nbase = "base"\n'
        '[[models]]\nmodel = "ft"\nweight = 1.0\n[output]\npath = "out"\nlora_rank = 16\nlora_path = "x/lora"\n'
    )
    for text in (adapter_text, model_text):
        recipe = parse_any_recipe(text, base_dir=tmp_path)
        written = recipe_to_toml(recipe)
        assert parse_any_recipe(written, base_dir=tmp_path) == recipe, written
    adapter = parse_any_recipe(adapter_text, base_dir=tmp_path)
    assert isinstance(adapter, AdapterRecipe) and adapter.sources[1].weight == 1.0
    model = parse_any_recipe(model_text, base_dir=tmp_path)
    assert isinstance(model, Recipe) and model.lora_dir == tmp_path / "x" / "lora"
    plain = parse_recipe(model_text.replace('lora_path = "x/lora"\n', ""), base_dir=tmp_path)
    assert plain.lora_dir == tmp_path / "out-lora"
    # neither needs a version line (the TUI may save lora_rank under version 1)
    assert "version = 1" in recipe_to_toml(model)
    unversioned = parse_any_recipe(adapter_text.replace("version = 2\n", ""), base_dir=tmp_path)
    assert unversioned == adapter


ADAPTERS = '[[adapters.sources]]\nlora = "a"\n[[adapters.sources]]\nlora = "b"\n'
OUTPUT = '[output]\npath = "out"\n'


def _adapters(table: str, sources: str = ADAPTERS, output: str = OUTPUT) -> str:
    return f"version = 2\n[adapters]\n{table}\n{sources}{output}"


MODEL = (
    'version = 2\n[merge]\nmethod = "task_arithmetic"\nbase = "base"\n'
    '[[models]]\nmodel = "ft"\nweight = 1.0\n'
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_adapters('combination = "average"'), "adapters.combination: unknown combination type"),
        (_adapters("density = 0.5"), "adapters.combination: missing"),
        (_adapters('combination = "ties"'), "adapters.density: required by the ties"),
        (_adapters('combination = "ties"\ndensity = 0.0'), "adapters.density: must be a number"),
        (_adapters('combination = "dare_linear"\ndensity = 1.5'), "(0, 1]"),
        (_adapters('combination = "cat"\ndensity = 0.5'), "adapters.density: has no effect"),
        (_adapters('combination = "cat"\nrank = 4'), "adapters.rank: is for the SVD types"),
        (_adapters('combination = "svd"\nrank = 0'), "adapters.rank: must be a positive"),
        (
            _adapters('combination = "ties"\ndensity = 0.5\nmajority_sign = "mean"'),
            "adapters.majority_sign: unknown majority sign method 'mean'",
        ),
        (
            _adapters('combination = "linear"\nmajority_sign = "total"'),
            "adapters.majority_sign: has no effect with linear",
        ),
        (_adapters('combination = "svd"\nsvd_clamp = 2.0'), "adapters.svd_clamp: is a quantile"),
        (_adapters('combination = "svd"\nsvd_driver = "qr"'), "adapters.svd_driver: unknown"),
        (_adapters('combination = "svd"\nsvd_driver = "gesvdj"'), "needs a CUDA device"),
        (_adapters('combination = "svd"\ndevice = "gpu0"'), "adapters.device: 'gpu0'"),
        (_adapters('combination = "svd"\nseed = -1'), "adapters.seed: must be a whole number"),
        (_adapters('combination = "svd"\nrnak = 4'), "did you mean `rank`?"),
        (_adapters('combination = "svd"', sources=""), "adapters.sources: missing"),
        (
            _adapters('combination = "svd"', sources="[[adapters.sources]]\nweight = 1.0\n"),
            "adapters.sources[0].lora: missing",
        ),
        (
            _adapters(
                'combination = "svd"', sources='[[adapters.sources]]\nlora = "a"\nweight = nan\n'
            ),
            "adapters.sources[0].weight: must be a finite number",
        ),
        (_adapters('combination = "svd"', output=""), "output: missing"),
        (
            _adapters('combination = "svd"', output=OUTPUT + "lora_rank = 4\n"),
            "output.lora_rank: is for model merges",
        ),
        (
            _adapters('combination = "svd"').replace("version = 2", "version = 3"),
            "version: this mergetui reads recipe versions 1 and 2, not 3",
        ),
        (MODEL + _adapters('combination = "svd"')[12:], "not both"),
        (MODEL + OUTPUT + "lora_rank = 0\n", "output.lora_rank: must be a positive whole number"),
        (MODEL.replace('base = "base"\n', "") + OUTPUT + "lora_rank = 4\n", "has no merge.base"),
        (MODEL + OUTPUT + 'lora_path = "x"\n', "output.lora_path: names where"),
    ],
)
def test_validation_names_the_key(text: str, expected: str) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_any_recipe(text)
    assert expected in str(caught.value)


def test_model_merge_commands_refuse_an_adapter_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="adapter-merge recipe"):
        parse_recipe(_adapters('combination = "svd"'))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(_adapters('combination = "average"'), encoding="utf-8")
    checked = _mergetui("check", recipe)
    assert checked.returncode == 2 and "adapters.combination" in checked.stderr
