"""Version 2 recipes in the TUI, driven with Pilot on real tiny models: a gradient and a filter
override typed in the method step end up in the saved TOML and come back; a recipe of slices
opens with its output layer layout on the check step. Also ``mergetui check``'s layout."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from test_tui_values import slices_toml
from textual.widgets import Input, Static

from mergetui.recipe import load_recipe
from mergetui.recipe.params import Filtered, Gradient
from mergetui.tui.app import MergeTuiApp, create_app
from mergetui.tui.screens.check import CheckScreen
from mergetui.tui.screens.method import MethodScreen
from mergetui.tui.state import ModelDraft, RecipeDraft


def _draft(tmp_path: Path, models: dict[str, Path]) -> RecipeDraft:
    return RecipeDraft(
        base=str(models["base"]),
        models=[
            ModelDraft(str(models["ft_a"]), parameters={"weight": 1.0, "density": 0.5}),
            ModelDraft(str(models["ft_c"]), parameters={"weight": 1.0, "density": 0.5}),
        ],
        output=str(tmp_path / "merged"),
        device="cpu",
        base_dir=tmp_path,
    )


def _text(app: MergeTuiApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def _type(pilot: Any, field: Input, text: str) -> None:
    """Type into a field key by key, as a user does."""
    field.focus()
    field.value = ""
    await pilot.press(*[{" ": "space", ",": "comma"}.get(c, c) for c in text])
    await pilot.pause()


async def _method(pilot: Any, app: MergeTuiApp) -> MethodScreen:
    app.action_method()
    await pilot.pause()
    assert isinstance(app.screen, MethodScreen)
    return app.screen


async def _save(pilot: Any, screen: MethodScreen, path: Path) -> None:
    screen.query_one("#save-path", Input).value = str(path)
    await pilot.pause()
    await pilot.press("ctrl+s")
    await pilot.pause()


def test_a_gradient_typed_in_the_method_form_is_saved_as_a_list(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_gradient_flow(tmp_path, models))


async def _gradient_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    app = create_app(draft=_draft(tmp_path, models))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method(pilot, app)
        note = screen.query_one("#m0-weight-note", Static)
        assert not note.display  # one number: no curve
        await _type(pilot, screen.query_one("#m0-weight", Input), "0, 0.5, 1")
        assert app.draft.models[0].parameters["weight"] == [0.0, 0.5, 1.0]
        assert note.display
        curve = _text(app, "#m0-weight-note")
        assert "layers ▁" in curve and "█ 0…1" in curve, curve
        assert "valid recipe" in _text(app, "#problems")
        preview = _text(app, "#preview")
        assert "version = 2" in preview and "weight = [0.0, 0.5, 1.0]" in preview
        # a list that cannot be read says why, under the field and among the problems
        screen.query_one("#m0-weight", Input).value = "[1, 0"
        await pilot.pause()
        assert "a [ without its ]" in _text(app, "#m0-weight-note")
        assert "models[0].weight" in _text(app, "#problems")
        assert screen.query_one("#m0-weight", Input).has_class("-invalid")
        assert app.draft.models[0].parameters["weight"] == [0.0, 0.5, 1.0]  # the last readable
        await _type(pilot, screen.query_one("#m0-weight", Input), "[1, 0]")  # brackets work too
        assert app.draft.models[0].parameters["weight"] == [1.0, 0.0]
        assert "█" in _text(app, "#m0-weight-note")
        await _save(pilot, screen, tmp_path / "gradient.toml")
    text = (tmp_path / "gradient.toml").read_text(encoding="utf-8")
    assert "version = 2" in text and "weight = [1.0, 0.0]" in text, text
    recipe = load_recipe(tmp_path / "gradient.toml")
    assert recipe.models[0].parameters["weight"] == Gradient((1.0, 0.0))


def test_a_filter_override_round_trips(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_override_flow(tmp_path, models))


async def _override_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    saved = tmp_path / "overrides.toml"
    app = create_app(draft=_draft(tmp_path, models))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method(pilot, app)
        overrides = screen.query_one("#m1-density-filters", Input)
        overrides.value = "self_attn=0.3, mlp=[1, 0.5"
        await pilot.pause()
        assert "a [ without its ]" in _text(app, "#m1-density-note")
        assert "models[1].density: a [ without its ]" in _text(app, "#problems")
        assert overrides.has_class("-invalid")
        assert app.draft.models[1].parameters["density"] == 0.5  # the last readable value
        await pilot.press("ctrl+s")  # not saved while a field cannot be read
        await pilot.pause()
        assert not saved.exists()
        overrides.value = "self_attn=0.3, mlp=0.5, mlp=1"
        await pilot.pause()
        assert "mlp is given twice" in _text(app, "#m1-density-note")
        await _type(pilot, overrides, "self_attn=0.3, mlp=[1, 0.5, 0.2]")
        assert not overrides.has_class("-invalid")
        await _type(pilot, screen.query_one("#m1-density", Input), "0.6")
        density = app.draft.models[1].parameters["density"]
        assert list(density.items()) == [
            ("self_attn", 0.3),
            ("mlp", [1.0, 0.5, 0.2]),
            ("default", 0.6),
        ]
        assert "mlp █" in _text(app, "#m1-density-note")
        assert "valid recipe" in _text(app, "#problems")
        # out of range in an override: the validator names the filter
        await _type(pilot, overrides, "self_attn=1.5")
        assert "models[1].density.self_attn" in _text(app, "#problems")
        await _type(pilot, overrides, "self_attn=0.3, mlp=[1, 0.5, 0.2]")
        await _save(pilot, screen, saved)
    recipe = load_recipe(saved)
    assert recipe.models[1].parameters["density"] == Filtered(
        (("self_attn", 0.3), ("mlp", Gradient((1.0, 0.5, 0.2))), ("default", 0.6))
    )
    reopened = create_app(draft=RecipeDraft.from_recipe(recipe))
    async with reopened.run_test(size=(120, 40)) as pilot:
        screen = await _method(pilot, reopened)
        assert screen.query_one("#m1-density", Input).value == "0.6"
        assert (
            screen.query_one("#m1-density-filters", Input).value
            == "self_attn=0.3, mlp=[1.0, 0.5, 0.2]"
        )
        assert "mlp █" in _text(reopened, "#m1-density-note")
        assert reopened.draft.to_recipe().models == recipe.models


def test_a_filtered_switch_keeps_its_overrides(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_switch_flow(tmp_path, models))


async def _switch_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    draft = _draft(tmp_path, models)
    draft.parameters["normalize"] = {"mlp": False, "default": True}
    app = create_app(draft=draft)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method(pilot, app)
        assert screen.query_one("#g-normalize", Input).value == "true"
        assert screen.query_one("#g-normalize-filters", Input).value == "mlp=false"
        assert not screen.query("#g-lambda-note").first().display
        assert app.draft.parameters["normalize"] == {"mlp": False, "default": True}
        assert "valid recipe" in _text(app, "#problems")
        await _type(pilot, screen.query_one("#g-normalize-filters", Input), "mlp=no, lm_head=no")
        assert list(app.draft.parameters["normalize"].items()) == [
            ("mlp", False),
            ("lm_head", False),
            ("default", True),
        ]


async def _wait_for_check(pilot: Any, app: MergeTuiApp) -> str:
    for _ in range(400):
        await pilot.pause(0.05)
        status = _text(app, "#check-status")
        if "checking" not in status:
            return status
    raise AssertionError("the check never finished")


def test_open_a_slices_recipe_shows_its_layer_layout(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_slices_flow(tmp_path, models))


async def _slices_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    file = tmp_path / "slices.toml"
    file.write_text(slices_toml(models, tmp_path / "merged"), encoding="utf-8")
    recipe = load_recipe(file)
    # what `mergetui open slices.toml` does
    app = create_app(draft=RecipeDraft.from_recipe(recipe))
    base, ft_a = models["base"], models["ft_a"]
    async with app.run_test(size=(120, 40)) as pilot:
        note = _text(app, "#slices-note")
        assert "[[slices]]" in note and "edited in its TOML" in note
        app.action_check()
        await pilot.pause()
        assert isinstance(app.screen, CheckScreen)
        status = await _wait_for_check(pilot, app)
        assert "compatible" in status and "not compatible" not in status
        assert app.screen.query_one("#check-layers", Static).display
        layers = _text(app, "#check-layers")
        assert f"layers 0-1 ← {base} 0-1 + {ft_a} 0-1 (task_arithmetic)" in layers, layers
        assert f"layers 2-3 ← {base} 0-1 + {ft_a} 0-1 (task_arithmetic)" in layers, layers
        screen = await _method(pilot, app)
        info = _text(app, "#slices-info")
        assert f"slices[1]: {base} layers 0-1 + {ft_a} layers 0-1 (weight = 0.25)" in info
        assert "edit them in the recipe TOML" in str(screen.query(".model-title").first().render())
        assert not screen.query("#m0-weight")  # no [[models]] to give a weight to
        assert screen.query_one("#g-weight", Input).value == "0.5"
        assert screen.query_one("#g-weight-filters", Input).value == "self_attn=[0.0, 0.5, 1.0]"
        await _type(pilot, screen.query_one("#g-weight", Input), "0.75")
        assert "valid recipe" in _text(app, "#problems")
        await _save(pilot, screen, tmp_path / "saved.toml")
    saved = load_recipe(tmp_path / "saved.toml")
    assert saved.slices == recipe.slices and saved.version == 2
    assert saved.parameters["weight"] == Filtered(
        (("self_attn", Gradient((0.0, 0.5, 1.0))), ("default", 0.75))
    )


def test_a_plain_recipe_has_no_layer_layout(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_plain_flow(tmp_path, models))


async def _plain_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    app = create_app(draft=_draft(tmp_path, models))
    async with app.run_test(size=(120, 40)) as pilot:
        assert not app.screen.query_one("#slices-note", Static).display
        app.action_check()
        await pilot.pause()
        await _wait_for_check(pilot, app)
        assert not app.screen.query_one("#check-layers", Static).display


def test_check_prints_the_layer_layout_of_slices(tmp_path: Path, models: dict[str, Path]) -> None:
    file = tmp_path / "slices.toml"
    file.write_text(slices_toml(models, tmp_path / "merged"), encoding="utf-8")
    run = [sys.executable, "-m", "mergetui", "check", str(file)]
    shown = subprocess.run(run, capture_output=True, text=True, timeout=120, env=_wide())
    assert shown.returncode == 0, shown.stderr
    base, ft_a = models["base"], models["ft_a"]
    assert "output layers (from [[slices]]):" in shown.stdout
    assert f"layers 2-3 ← {base} 0-1 + {ft_a} 0-1 (task_arithmetic)" in shown.stdout
    report = json.loads(
        subprocess.run(
            [*run, "--json"], capture_output=True, text=True, timeout=120, check=True
        ).stdout
    )
    assert report["layers"] == [
        {"output": "0-1", "from": f"{base} 0-1 + {ft_a} 0-1 (task_arithmetic)"},
        {"output": "2-3", "from": f"{base} 0-1 + {ft_a} 0-1 (task_arithmetic)"},
    ]


def _wide() -> dict[str, str]:
    """A wide terminal for rich, so lines with long temporary paths are not wrapped."""
    import os

    return {**os.environ, "COLUMNS": "400"}
