"""The TUI's first steps, driven with Pilot on real tiny models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from textual.widgets import Button, DataTable, Input, ListView, Static

from mergetui.tui.app import create_app
from mergetui.tui.screens.check import CheckScreen


def test_the_app_starts_without_importing_torch_or_transformers(tmp_path: Path) -> None:
    probe = (
        "import asyncio, sys\n"
        "from mergetui.tui.app import create_app\n"
        "async def main():\n"
        "    app = create_app()\n"
        "    async with app.run_test() as pilot:\n"
        "        await pilot.pause()\n"
        "        heavy = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]\n"
        "        print('HEAVY', heavy)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY ['huggingface_hub']" in done.stdout or "HEAVY []" in done.stdout, done.stdout
    assert "'torch'" not in done.stdout and "'transformers'" not in done.stdout


async def _choose(pilot: object, app: object, base: Path, models: list[Path]) -> None:
    screen = app.screen  # type: ignore[attr-defined]
    screen.query_one("#base", Input).value = str(base)
    for model in models:  # keyboard first: type into the field and press Enter
        field = screen.query_one("#model", Input)
        field.focus()
        field.value = str(model)
        await pilot.press("enter")  # type: ignore[attr-defined]
        await pilot.pause()  # type: ignore[attr-defined]


async def _wait_for_check(pilot: object, app: object) -> str:
    for _ in range(200):
        await pilot.pause(0.05)  # type: ignore[attr-defined]
        status = str(app.screen.query_one("#check-status", Static).render())  # type: ignore[attr-defined]
        if "checking" not in status:
            return status
    raise AssertionError("the check never finished")


def test_choose_models_and_see_them_compatible(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_compatible_flow(tmp_path, models))


async def _compatible_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    app = create_app(tmp_path)
    async with app.run_test(size=(100, 36)) as pilot:
        await _choose(pilot, app, models["base"], [models["ft_a"], models["ft_c"]])
        assert [m.model for m in app.draft.models] == [str(models["ft_a"]), str(models["ft_c"])]
        assert len(app.screen.query_one("#chosen", ListView).children) == 2
        app.screen.query_one("#next", Button).press()
        await pilot.pause()
        assert isinstance(app.screen, CheckScreen)
        status = await _wait_for_check(pilot, app)
        assert "compatible" in status and "not compatible" not in status
        table = app.screen.query_one("#check-table", DataTable)
        assert table.row_count >= 6 and len(table.columns) == 4
        await pilot.press("escape")
        assert not isinstance(app.screen, CheckScreen)


def test_a_mismatched_model_is_explained(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_mismatch_flow(tmp_path, models))


async def _mismatch_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    app = create_app(tmp_path)
    async with app.run_test(size=(100, 36)) as pilot:
        await _choose(pilot, app, models["base"], [models["ft_a"], models["qwen2"]])
        for _ in range(2):
            app.screen.query_one("#remove", Button).press()
            await pilot.pause()
        assert app.draft.models == []
        assert len(app.screen.query_one("#chosen", ListView).children) == 0
        await _choose(pilot, app, models["base"], [models["ft_a"], models["qwen2"]])
        app.screen.query_one("#next", Button).press()
        await pilot.pause()
        status = await _wait_for_check(pilot, app)
        assert "not compatible" in status, [m.model for m in app.draft.models]
        problems = str(app.screen.query_one("#check-problems", Static).render())
        assert "different architectures" in problems


async def _method_step(pilot: object, app: object, models: dict[str, Path]) -> object:
    """Choose the base and two fine-tunes, then open step 3; returns the method screen."""
    await _choose(pilot, app, models["base"], [models["ft_a"], models["ft_c"]])
    app.action_method()  # type: ignore[attr-defined]
    await pilot.pause()  # type: ignore[attr-defined]
    return app.screen  # type: ignore[attr-defined]


def test_the_method_form_comes_from_the_registry_and_validates_as_you_type(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_method_flow(tmp_path, models))


async def _method_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from textual.widgets import Select

    from mergetui.methods.registry import get_method

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        ties = get_method("ties")
        assert ties is not None
        for param in ties.global_params:
            assert screen.query_one(f"#g-{param.name}", Input)
        for index in (0, 1):
            for param in ties.model_params:
                assert screen.query_one(f"#m{index}-{param.name}", Input)
        problems = screen.query_one("#problems", Static)
        assert "valid recipe" in str(problems.render())
        density = screen.query_one("#m0-density", Input)
        density.focus()
        density.value = ""
        await pilot.press("1", ".", "5")
        await pilot.pause()
        assert "models[0].density" in str(problems.render())
        assert app.draft.models[0].parameters["density"] == 1.5
        density.value = "0.5"
        await pilot.pause()
        assert "valid recipe" in str(problems.render())
        assert "density = 0.5" in str(screen.query_one("#preview", Static).render())
        screen.query_one("#method", Select).value = "slerp"
        await pilot.pause()
        assert screen.query_one("#g-t", Input)
        assert "slerp" in str(problems.render()) or "t:" in str(problems.render())


def test_save_the_recipe_reopen_it_and_replay_it_headless(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_save_flow(tmp_path, models))


async def _save_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.recipe import load_recipe, recipe_to_toml
    from mergetui.tui.state import RecipeDraft

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        screen.query_one("#m1-density", Input).value = "0.4"
        screen.query_one("#out-path", Input).value = str(tmp_path / "merged")
        screen.query_one("#out-device", Input).value = "cpu"
        screen.query_one("#save-path", Input).value = "saved.toml"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
    saved = tmp_path / "saved.toml"
    recipe = load_recipe(saved)
    assert recipe.method == "ties" and recipe.models[1].parameters["density"] == 0.4
    reopened = RecipeDraft.from_recipe(recipe)
    assert recipe_to_toml(reopened.to_recipe()) == recipe_to_toml(recipe)
    replay = subprocess.run(
        [sys.executable, "-m", "mergetui", "run", str(saved)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert replay.returncode == 0, replay.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_run_a_merge_to_completion_then_cancel_one(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_run_flow(tmp_path, models))


async def _wait_outcome(pilot: object, screen: object, timeout_s: float = 120) -> str:
    for _ in range(int(timeout_s / 0.1)):
        await pilot.pause(0.1)  # type: ignore[attr-defined]
        if screen.outcome not in ("starting", "running"):  # type: ignore[attr-defined]
            return str(screen.outcome)  # type: ignore[attr-defined]
    raise AssertionError("the merge never finished")


async def _run_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.tui.screens.run import RunScreen

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        screen.query_one("#out-path", Input).value = str(tmp_path / "merged")  # type: ignore[attr-defined]
        screen.query_one("#out-device", Input).value = "cpu"  # type: ignore[attr-defined]
        await pilot.press("ctrl+r")
        await pilot.pause()
        run = app.screen
        assert isinstance(run, RunScreen)
        assert await _wait_outcome(pilot, run) == "done", str(
            run.query_one("#run-status", Static).render()
        )
        assert (tmp_path / "merged" / "model.safetensors").is_file()
        assert "VRAM: no GPU in use" in str(run.query_one("#vram", Static).render())
        await pilot.press("escape")
        await pilot.pause()
        app.draft.output = str(tmp_path / "cancelled")
        app.action_run()
        await pilot.pause()
        second = app.screen
        assert isinstance(second, RunScreen) and second is not run
        for _ in range(100):  # cancel as soon as the child process exists
            if second.process is not None:
                break
            await pilot.pause(0.05)
        second.query_one("#cancel", Button).press()
        assert await _wait_outcome(pilot, second) == "cancelled", (
            str(second.query_one("#run-status", Static).render()),
            second.process.returncode if second.process else None,
        )
        assert not (tmp_path / "cancelled").exists()
        assert not list(tmp_path.glob(".cancelled.mergetui-partial-*"))
