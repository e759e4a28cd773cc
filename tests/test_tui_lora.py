"""The TUI's LoRA jobs, driven with Pilot on the session's tiny models and real PEFT adapters: an
adapter merge from step 1 to a finished adapter (check, combination form, save, run, reopen),
and a model merge that extracts a LoRA adapter after it (``output.lora_rank``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from test_lora_merge import _save_adapter
from test_tui import _method_step, _wait_for_check, _wait_outcome, _wait_until
from textual.widgets import Button, DataTable, Input, Select, Static

from mergetui.tui.app import create_app


@pytest.fixture(scope="module")
def adapters(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two rank-8 adapters of the session's base (different alphas), and one of other modules."""
    root = tmp_path_factory.mktemp("tui-adapters")
    base = models["base"]
    return {
        "a": _save_adapter(base, root / "a", 21, r=8, lora_alpha=16),
        "b": _save_adapter(base, root / "b", 22, r=8, lora_alpha=8),
        "other": _save_adapter(base, root / "other", 23, r=8, target_modules=["k_proj"]),
    }


def _text(screen: Any, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


async def _choose_adapters(
    pilot: Any, app: Any, base: Path | None, folders: list[tuple[Path, str]]
) -> None:
    """Step 1 switched to adapters: the base (optional), then each folder and its weight typed
    and Enter pressed, as a user would."""
    screen = app.screen
    screen.query_one("#kind", Select).value = "adapters"
    await pilot.pause()
    if base is not None:
        screen.query_one("#base", Input).value = str(base)
    for folder, weight in folders:
        screen.query_one("#model", Input).value = str(folder)
        field = screen.query_one("#weight", Input)
        field.focus()
        field.value = weight
        await pilot.press("enter")
        await pilot.pause()


def test_an_adapter_merge_from_step_1_to_the_adapter(
    tmp_path: Path, models: dict[str, Path], adapters: dict[str, Path]
) -> None:
    asyncio.run(_adapter_flow(tmp_path, models, adapters))


async def _adapter_flow(tmp_path: Path, models: dict[str, Path], adapters: dict[str, Path]) -> None:
    from mergetui.recipe import AdapterRecipe, load_any_recipe, recipe_to_toml
    from mergetui.tui.screens.adapter_method import AdapterMethodScreen
    from mergetui.tui.screens.check import CheckScreen
    from mergetui.tui.screens.models import ModelsScreen
    from mergetui.tui.screens.run import RunScreen
    from mergetui.tui.state import RecipeDraft

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await _choose_adapters(
            pilot, app, models["base"], [(adapters["a"], "0.6"), (adapters["b"], "0.4")]
        )
        screen = app.screen
        assert app.draft.is_adapter_merge and app.draft.output == "./merged-adapter"
        assert [(a.lora, a.weight) for a in app.draft.adapters] == [
            (str(adapters["a"]), 0.6),
            (str(adapters["b"]), 0.4),
        ]
        chosen = screen.query_one("#chosen", DataTable)
        assert chosen.row_count == 2
        assert [str(c.label) for c in chosen.columns.values()] == ["#", "adapter", "weight"]
        assert not screen.query_one("#sources").display  # no HF cache or Hub for adapters

        # step 2: the planner's check of the adapters, shown per adapter
        await pilot.press("ctrl+n")
        await pilot.pause()
        check = app.screen
        assert isinstance(check, CheckScreen)
        status = await _wait_for_check(pilot, app)
        assert "compatible" in status and "not compatible" not in status, _text(
            check, "#check-problems"
        )
        table = check.query_one("#check-table", DataTable)
        assert len(table.columns) == 3
        rows = {
            str(table.get_row_at(i)[0]): table.get_row_at(i)[1:] for i in range(table.row_count)
        }
        assert rows["rank (r)"] == ["8", "8"] and rows["lora_alpha"] == ["16", "8"]
        assert "q_proj" in rows["target modules"][0]
        assert rows["trained on"][0] == str(models["base"])
        estimates = _text(check, "#check-estimates")
        assert "checked against the base's headers" in estimates and "rank 8" in estimates
        check.query_one("#next", Button).press()
        await pilot.pause()

        # step 3: the combination types and the options each takes, validated as typed
        method = app.screen
        assert isinstance(method, AdapterMethodScreen)
        method.query_one("#combination", Select).value = "ties_svd"
        await pilot.pause()
        for key in ("a-density", "a-majority_sign", "a-rank", "a-svd_clamp"):
            assert method.query(f"#{key}"), key
        assert not method.query("#a-seed")  # ties_svd draws nothing at random
        problems = method.query_one("#problems", Static)
        assert "adapters.density: required by the ties_svd combination" in str(problems.render())
        density = method.query_one("#a-density", Input)
        density.value = "1.5"
        await pilot.pause()
        assert "adapters.density: must be a number in (0, 1]" in str(problems.render())
        assert density.has_class("-invalid")
        density.value = "0.5"
        method.query_one("#a-rank", Input).value = "4"
        method.query_one("#out-path", Input).value = str(tmp_path / "combined")
        await pilot.pause()
        assert "valid recipe" in str(problems.render())
        assert not density.has_class("-invalid")
        preview = str(method.query_one("#preview", Static).render())
        assert 'combination = "ties_svd"' in preview and "[[adapters.sources]]" in preview
        method.query_one("#save-path", Input).value = "adapters.toml"
        await pilot.press("ctrl+s")
        await pilot.pause()
        saved = load_any_recipe(tmp_path / "adapters.toml")
        assert isinstance(saved, AdapterRecipe)
        assert (saved.combination, saved.density, saved.rank) == ("ties_svd", 0.5, 4)
        assert [s.weight for s in saved.sources] == [0.6, 0.4]

        # step 4: the background job, to the adapter's folder and size
        await pilot.press("ctrl+r")
        await pilot.pause()
        run = app.screen
        assert isinstance(run, RunScreen)
        assert await _wait_outcome(pilot, run) == "done", _text(run, "#run-status")
        status = _text(run, "#run-status")
        assert "LoRA adapter (" in status and str(tmp_path / "combined") in status, status
        assert run.query_one("#compare", Button).disabled  # no models to compare
    output = tmp_path / "combined"
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert (output / "mergetui.toml").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), output)

    # `mergetui open adapters.toml`: back in adapter mode, every value as saved
    draft = RecipeDraft.from_recipe(load_any_recipe(tmp_path / "adapters.toml"))
    assert recipe_to_toml(draft.to_recipe()) == recipe_to_toml(saved)
    reopened = create_app(draft=draft)
    async with reopened.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        models_screen = reopened.screen
        assert isinstance(models_screen, ModelsScreen)
        assert models_screen.query_one("#kind", Select).value == "adapters"
        assert models_screen.query_one("#chosen", DataTable).row_count == 2
        reopened.action_method()
        await pilot.pause()
        method = reopened.screen
        assert isinstance(method, AdapterMethodScreen)
        assert method.query_one("#combination", Select).value == "ties_svd"
        assert method.query_one("#a-density", Input).value == "0.5"
        assert method.query_one("#w1", Input).value == "0.4"
        # sweeps and compare are for model merges: they say so and stay where they are
        reopened.action_sweep()
        reopened.action_compare()
        await pilot.pause()
        assert reopened.screen is method


def test_the_check_shows_what_the_adapter_planner_refuses(
    tmp_path: Path, models: dict[str, Path], adapters: dict[str, Path]
) -> None:
    asyncio.run(_refused_flow(tmp_path, models, adapters))


async def _refused_flow(tmp_path: Path, models: dict[str, Path], adapters: dict[str, Path]) -> None:
    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await _choose_adapters(pilot, app, None, [(adapters["a"], ""), (adapters["other"], "1")])
        app.draft.combination = "cat"
        app.action_check()
        await pilot.pause()
        status = await _wait_for_check(pilot, app)
        assert "not compatible" in status
        problems = _text(app.screen, "#check-problems")
        assert "the adapters target different modules" in problems, problems
        assert app.screen.query_one("#next", Button).disabled


def test_a_model_merge_that_extracts_a_lora_adapter(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_lora_rank_flow(tmp_path, models))


async def _lora_rank_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.recipe import load_recipe
    from mergetui.tui.screens.method import MethodScreen
    from mergetui.tui.screens.run import RunScreen
    from mergetui.tui.state import RecipeDraft

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        screen.query_one("#out-path", Input).value = str(tmp_path / "merged")  # type: ignore[attr-defined]
        screen.query_one("#out-device", Input).value = "cpu"  # type: ignore[attr-defined]
        rank = screen.query_one("#out-lora-rank", Input)  # type: ignore[attr-defined]
        rank.value = "sixteen"
        await pilot.pause()
        problems = screen.query_one("#problems", Static)  # type: ignore[attr-defined]
        assert "output.lora_rank: must be a positive whole number" in str(problems.render())
        assert rank.has_class("-invalid")
        rank.value = "4"
        await pilot.pause()
        assert "valid recipe" in str(problems.render()) and not rank.has_class("-invalid")
        assert "lora_rank = 4" in str(screen.query_one("#preview", Static).render())  # type: ignore[attr-defined]
        screen.query_one("#save-path", Input).value = "extract.toml"  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        await pilot.pause()
        await pilot.press("ctrl+r")
        await pilot.pause()
        run = app.screen
        assert isinstance(run, RunScreen)
        await _wait_until(pilot, lambda: run.stage == "extract" or run.outcome != "running", "x")
        assert await _wait_outcome(pilot, run) == "done", _text(run, "#run-status")
        assert run.stage == "extract" and run.extracted is not None
        status = _text(run, "#run-status")
        assert "LoRA adapter (rank 4" in status and str(tmp_path / "merged-lora") in status
        assert not run.query_one("#compare", Button).disabled
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged-lora" / "adapter_config.json").is_file()
    recipe = load_recipe(tmp_path / "extract.toml")
    assert recipe.lora_rank == 4
    reopened = create_app(draft=RecipeDraft.from_recipe(recipe))
    async with reopened.run_test(size=(120, 40)) as pilot:
        reopened.action_method()
        await pilot.pause()
        assert isinstance(reopened.screen, MethodScreen)
        assert reopened.screen.query_one("#out-lora-rank", Input).value == "4"


def test_an_adapter_draft_is_autosaved_and_an_adapter_job_reattached(
    tmp_path: Path, adapters: dict[str, Path]
) -> None:
    """The autosave keeps the draft's kind; a running or unseen adapter-merge job found at start
    loads its ``[adapters]`` recipe back as the draft."""
    from mergetui.recipe import load_any_recipe
    from mergetui.tui.state import ADAPTERS, AdapterDraft, RecipeDraft

    draft = RecipeDraft(
        kind=ADAPTERS,
        adapters=[AdapterDraft(str(adapters["a"]), 0.6), AdapterDraft(str(adapters["b"]), "x")],
        combination="dare_linear",
        adapter_options={"density": 0.3, "seed": 7},
        base_dir=tmp_path,
    )
    draft.autosave()
    restored = RecipeDraft.load_autosave()
    assert restored is not None and restored.is_adapter_merge
    assert restored.to_data() == draft.to_data()  # the weight as typed ("x") too

    draft.adapters[1].weight = 0.4
    draft.output = str(tmp_path / "out")
    draft.save(Path("adapters.toml"))
    asyncio.run(_reattach_flow(tmp_path, load_any_recipe(tmp_path / "adapters.toml")))


async def _reattach_flow(tmp_path: Path, recipe: Any) -> None:
    import os

    from mergetui.jobs import jobs_dir
    from mergetui.recipe import recipe_to_toml
    from mergetui.tui.screens.run import RunScreen

    folder = jobs_dir() / "20261130-000000"
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text(recipe_to_toml(recipe, absolute_paths=True))
    (folder / "job.json").write_text(
        json.dumps({"pid": os.getpid() + 10**6, "pid_created": 0, "started": 1, "output": "x"})
    )
    (folder / "events.jsonl").write_text("")
    (folder / "exit.json").write_text(json.dumps({"exit_code": 2, "ended": 2}))
    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, RunScreen) and app.screen.adapter_merge
        assert app.draft.is_adapter_merge and app.draft.combination == "dare_linear"
        assert app.screen.query_one("#compare", Button).disabled
