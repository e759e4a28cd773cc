"""The TUI's first steps, driven with Pilot on real tiny models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import MergeGate, ties_recipe, tree_digest
from textual.widgets import Button, DataTable, Input, Label, Static

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
        assert app.screen.query_one("#chosen", DataTable).row_count == 2
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
        assert app.screen.query_one("#chosen", DataTable).row_count == 0
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
        screen.query_one("#out-max-memory", Input).value = "lots"
        await pilot.pause()
        problems = str(screen.query_one("#problems", Static).render())
        assert "merge.max_memory: cannot read size 'lots'" in problems
        screen.query_one("#out-max-memory", Input).value = "2GiB"
        await pilot.pause()
        assert 'max_memory = "2GiB"' in str(screen.query_one("#preview", Static).render())
        # by default the recipe goes next to the output, following it as it changes
        assert screen.query_one("#save-path", Input).value == f"{tmp_path / 'merged'}.toml"
        screen.query_one("#save-path", Input).value = "saved.toml"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await pilot.pause()
        # elsewhere than the draft's folder, the paths are written absolute so it replays from there
        assert screen.query_one("#save-path", Input).value == "saved.toml"
        screen.query_one("#out-path", Input).value = "other"
        await pilot.pause()
        assert screen.query_one("#save-path", Input).value == "saved.toml"  # chosen by hand: kept
        screen.query_one("#save-path", Input).value = str(tmp_path / "sub" / "elsewhere.toml")
        await pilot.press("ctrl+s")
        await pilot.pause()
    elsewhere = load_recipe(tmp_path / "sub" / "elsewhere.toml")
    assert elsewhere.models[0].model == str(models["ft_a"].resolve())
    assert elsewhere.output_dir == (tmp_path / "other").resolve()
    saved = tmp_path / "saved.toml"
    recipe = load_recipe(saved)
    assert recipe.method == "ties" and recipe.models[1].parameters["density"] == 0.4
    assert recipe.max_memory == 2 << 30
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


async def _start_merge(pilot: object, app: object, models: dict[str, Path], output: Path) -> None:
    """Through steps 1 and 3 to a running merge of the base and two fine-tunes into ``output``."""
    screen = await _method_step(pilot, app, models)
    screen.query_one("#out-path", Input).value = str(output)  # type: ignore[attr-defined]
    screen.query_one("#out-device", Input).value = "cpu"  # type: ignore[attr-defined]
    await pilot.press("ctrl+r")  # type: ignore[attr-defined]
    await pilot.pause()  # type: ignore[attr-defined]


def test_run_a_merge_to_completion_then_cancel_one(
    tmp_path: Path, models: dict[str, Path], merge_gate: MergeGate
) -> None:
    asyncio.run(_run_flow(tmp_path, models, merge_gate))


async def _wait_outcome(pilot: object, screen: object, timeout_s: float = 120) -> str:
    for _ in range(int(timeout_s / 0.1)):
        await pilot.pause(0.1)  # type: ignore[attr-defined]
        if screen.outcome not in ("starting", "running"):  # type: ignore[attr-defined]
            return str(screen.outcome)  # type: ignore[attr-defined]
    raise AssertionError("the merge never finished")


async def _run_flow(tmp_path: Path, models: dict[str, Path], merge_gate: MergeGate) -> None:
    from mergetui.tui.screens.run import RunScreen

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await _start_merge(pilot, app, models, tmp_path / "merged")
        run = app.screen
        assert isinstance(run, RunScreen)
        assert await _wait_outcome(pilot, run) == "done", str(
            run.query_one("#run-status", Static).render()
        )
        assert (tmp_path / "merged" / "model.safetensors").is_file()
        assert "VRAM: no GPU in use" in str(run.query_one("#vram", Static).render())
        # the merge is over: nothing to cancel any more, and Compare is the way on
        assert not run.query_one("#cancel", Button).display
        compare = run.query_one("#compare", Button)
        assert not compare.disabled
        # focus() takes effect on a later turn of the message loop (call_later), which a busy
        # machine may not have reached when the outcome is first seen
        await _wait_until(pilot, lambda: compare.has_focus, "Compare to take the focus")
        await pilot.press("escape")
        await pilot.pause()
        app.screen.query_one("#save-path", Input).value = "replay.toml"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "mergetui run" in str(app.screen.query_one("#headless", Static).render())
        app.draft.output = str(tmp_path / "cancelled")
        merge_gate.hold()  # the next merge waits after its first tensor: it runs when cancelled
        app.action_run()
        await pilot.pause()
        second = app.screen
        assert isinstance(second, RunScreen) and second is not run
        assert second.job is not None
        second.query_one("#cancel", Button).press()
        assert await _wait_outcome(pilot, second) == "cancelled", (
            str(second.query_one("#run-status", Static).render()),
            second.job.stderr_text(),
        )
        assert not (tmp_path / "cancelled").exists()
        assert not second.query_one("#cancel", Button).display
        assert second.query_one("#compare", Button).disabled
        assert not list(tmp_path.glob(".cancelled.mergetui-partial-*"))
        merge_gate.release()  # the headless replay below must not wait
    # the saved recipe, replayed headless, gives the very same weights as the merge run in the UI
    replay = subprocess.run(
        [sys.executable, "-m", "mergetui", "run", str(tmp_path / "replay.toml"), "-o", "replayed"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert replay.returncode == 0, replay.stderr
    ui, headless = tree_digest(tmp_path / "merged"), tree_digest(tmp_path / "replayed")
    weights = [
        name for name in ui if name.endswith((".safetensors", ".json")) and "mergetui" not in name
    ]
    assert weights and all(ui[name] == headless[name] for name in weights), (ui, headless)


async def _wait_until(pilot: object, condition: object, what: str, timeout_s: float = 120) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if condition():  # type: ignore[operator]
            return
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    raise AssertionError(f"timed out waiting for {what}")


def test_check_errors_block_and_warnings_need_acknowledging(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_gating_flow(tmp_path, models))


async def _gating_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    import json
    import shutil

    from textual.widgets import Checkbox

    from mergetui.tui.screens.method import MethodScreen

    custom = shutil.copytree(models["ft_c"], tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (custom / "config.json").write_text(json.dumps(config))
    app = create_app(tmp_path)
    async with app.run_test(size=(100, 36)) as pilot:
        await _choose(pilot, app, models["base"], [models["ft_a"], models["qwen2"]])
        await pilot.press("ctrl+n")
        await _wait_for_check(pilot, app)
        check = app.screen
        assert check.query_one("#next", Button).disabled
        await pilot.press("ctrl+n")  # refused: errors block the next step
        await pilot.pause()
        assert app.screen is check and not isinstance(app.screen, MethodScreen)
        await pilot.press("escape")
        app.screen.query_one("#remove", Button).press()
        await _choose(pilot, app, models["base"], [custom])
        await pilot.press("ctrl+n")
        status = await _wait_for_check(pilot, app)
        assert "not compatible" not in status
        check = app.screen
        assert "auto_map" in str(check.query_one("#check-problems", Static).render())
        estimates = str(check.query_one("#check-estimates", Static).render())
        assert "output ≈" in estimates and "free" in estimates and "peak RAM" in estimates
        assert check.query_one("#next", Button).disabled
        await pilot.press("ctrl+n")  # refused until the warning is acknowledged
        await pilot.pause()
        assert app.screen is check
        check.query_one("#ack", Checkbox).value = True
        await pilot.pause()
        assert not check.query_one("#next", Button).disabled
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert isinstance(app.screen, MethodScreen)


def test_quit_while_merging_detaches_and_the_next_start_reattaches(
    tmp_path: Path, models: dict[str, Path], merge_gate: MergeGate
) -> None:
    merge_gate.hold()  # the merge waits after its first tensor until the reattached UI is up
    asyncio.run(_detach_flow(tmp_path, models, merge_gate))


async def _detach_flow(tmp_path: Path, models: dict[str, Path], merge_gate: MergeGate) -> None:
    from mergetui.jobs import list_jobs
    from mergetui.tui.screens.dialogs import ChoiceScreen
    from mergetui.tui.screens.run import RunScreen

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await _start_merge(pilot, app, models, tmp_path / "merged")
        first = app.screen
        assert isinstance(first, RunScreen)
        await pilot.press("escape")  # leave the screen: the merge runs on, and Run shows it again
        await pilot.pause()
        app.action_run()
        await pilot.pause()
        again = app.screen
        assert isinstance(again, RunScreen) and again is not first and again.job == first.job
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceScreen), "quitting during a merge must ask first"
        app.screen.query_one("#choice-detach", Button).press()
        await pilot.pause()
    assert app.return_code == 0 or app.return_code is None
    [job] = list_jobs()
    # `mergetui open` of another recipe keeps that recipe, and does not jump to the merge
    from mergetui.tui.state import RecipeDraft

    other = RecipeDraft(base="elsewhere/base", base_dir=tmp_path)
    opened = create_app(draft=other)
    async with opened.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert not isinstance(opened.screen, RunScreen) and opened.draft is other
    assert not job.seen
    # a new session (the SSH connection came back) finds the merge and shows it to the end
    again = create_app(tmp_path)
    async with again.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        run = again.screen
        assert isinstance(run, RunScreen) and run.reattached and run.job == job
        assert [m.model for m in again.draft.models] == [str(models["ft_a"]), str(models["ft_c"])]
        assert run.outcome == "running"
        merge_gate.release()
        assert await _wait_outcome(pilot, run) == "done"
        assert "reattached" in "\n".join(str(line) for line in run.query_one("#run-log").lines)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    third = create_app(tmp_path)  # seen once: not offered again
    async with third.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert not isinstance(third.screen, RunScreen)


def test_quit_can_cancel_the_running_merge(
    tmp_path: Path, models: dict[str, Path], merge_gate: MergeGate
) -> None:
    merge_gate.hold()  # still running when Ctrl+Q asks, whatever this machine's speed
    asyncio.run(_quit_cancel_flow(tmp_path, models))


async def _quit_cancel_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.jobs import CANCELLED, RUNNING, list_jobs

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await _start_merge(pilot, app, models, tmp_path / "merged")
        await pilot.press("ctrl+q")
        await pilot.pause()
        app.screen.query_one("#choice-cancel", Button).press()
        await pilot.pause()
    [job] = list_jobs()
    for _ in range(int(120 / 0.05)):  # a hang detector: it ends once the merge has stopped
        if job.outcome().state != RUNNING:
            break
        await asyncio.sleep(0.05)
    assert job.outcome().state == CANCELLED, (job.outcome(), job.stderr_text(), job.read_events(0))
    assert not (tmp_path / "merged").exists()


async def _wait_for(pilot: object, condition: Callable[[], bool], what: str = "") -> None:
    """Pause until ``condition`` holds; a generous hang detector, not a timing assertion."""
    for _ in range(600):
        if condition():
            return
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    raise AssertionError(f"still waiting after 30 s {what}")


def test_the_draft_is_autosaved_and_offered_back(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_autosave_flow(tmp_path, models))


async def _autosave_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.tui.screens.dialogs import ChoiceScreen

    app = create_app(tmp_path)
    async with app.run_test(size=(100, 36)) as pilot:
        await _choose(pilot, app, models["base"], [models["ft_a"], models["ft_c"]])
        await pilot.pause(app.AUTOSAVE_S + 0.5)  # the app ends abruptly, without quitting
    again = create_app(tmp_path)
    async with again.run_test(size=(100, 36)) as pilot:
        await _wait_for(pilot, lambda: isinstance(again.screen, ChoiceScreen))
        again.screen.query_one("#choice-restore", Button).press()
        await pilot.pause()
        assert again.draft.base == str(models["base"])
        assert [m.model for m in again.draft.models] == [str(models["ft_a"]), str(models["ft_c"])]
        assert again.screen.query_one("#chosen", DataTable).row_count == 2
        assert again.screen.query_one("#base", Input).value == str(models["base"])
    declined = create_app(tmp_path)
    async with declined.run_test(size=(100, 36)) as pilot:
        await _wait_for(pilot, lambda: isinstance(declined.screen, ChoiceScreen))
        await pilot.press("escape")  # the safe answer: start afresh, and forget it
        await pilot.pause()
        assert declined.draft.models == []
    fresh = create_app(tmp_path)
    async with fresh.run_test(size=(100, 36)) as pilot:
        await pilot.pause()
        assert not isinstance(fresh.screen, ChoiceScreen)


def test_help_on_every_step_and_error_detail_on_demand(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_help_flow(tmp_path, models))


async def _help_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from textual.widgets import Markdown

    from mergetui.tui.screens.dialogs import ErrorScreen, HelpScreen

    app = create_app(tmp_path)
    async with app.run_test(size=(100, 36)) as pilot:
        await _choose(pilot, app, models["base"], [models["ft_a"], models["ft_c"]])
        for step, title in (
            (None, "1 · Models"),
            (app.action_check, "2 · Check"),
            (app.action_method, "3 · Method"),
            (app.action_compare, "5 · Compare"),
        ):
            if step is not None:
                step()
                await pilot.pause()
            await pilot.press("f1")
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            source = app.screen.query_one(Markdown).source
            assert title in source and "Ctrl+Q" in source
            await pilot.press("escape")
            await pilot.pause()
            assert not isinstance(app.screen, HelpScreen)
        # an error: a task file that does not exist. One line in a toast, the rest on F2.
        compare = app.screen
        compare.query_one("#tasks", Input).value = f"math={tmp_path / 'missing.jsonl'}"
        compare.query_one("#score", Button).press()
        await pilot.pause()
        assert app.last_error is not None and "missing.jsonl" in app.last_error[0]
        await pilot.press("f2")
        await pilot.pause()
        assert isinstance(app.screen, ErrorScreen)
        detail = str(app.screen.query_one("#error-detail", Static).render())
        assert "Traceback" in detail and "missing.jsonl" in detail
        assert app.log_path is not None
        assert str(app.log_path) in str(app.screen.query(Label).last().render())
    log_text = app.log_path.read_text()
    assert "missing.jsonl" in log_text and "Traceback" in log_text


def test_the_command_palette_jumps_to_a_step(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_palette_flow(tmp_path, models))


async def _palette_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from textual.command import CommandPalette

    from mergetui.tui.screens.method import MethodScreen

    app = create_app(tmp_path)
    async with app.run_test(size=(100, 36)) as pilot:
        await _choose(pilot, app, models["base"], [models["ft_a"], models["ft_c"]])
        await pilot.press("ctrl+p")
        await _wait_until(pilot, lambda: isinstance(app.screen, CommandPalette), "the palette")
        await pilot.press(*"step 3")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await _wait_until(pilot, lambda: isinstance(app.screen, MethodScreen), "step 3")


def test_compare_answers_stream_side_by_side_and_the_eval_table(
    tmp_path: Path, models: dict[str, Path], write_recipe: object
) -> None:
    recipe_file = write_recipe(ties_recipe(models, "merged"))  # type: ignore[operator]
    done = subprocess.run(
        [sys.executable, "-m", "mergetui", "run", str(recipe_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    tasks = tmp_path / "sums.jsonl"
    tasks.write_text(
        "\n".join(f'{{"prompt": "{a}+{a}=", "answer": "{2 * a}"}}' for a in range(1, 5)) + "\n"
    )
    asyncio.run(_compare_flow(tmp_path, recipe_file, models))


async def _compare_flow(tmp_path: Path, recipe_file: Path, models: dict[str, Path]) -> None:
    from mergetui.evaluate.compare import compare
    from mergetui.evaluate.generation import GenerationSettings
    from mergetui.recipe import load_recipe
    from mergetui.tui.screens.compare import CompareScreen
    from mergetui.tui.state import RecipeDraft

    app = create_app(draft=RecipeDraft.from_recipe(load_recipe(recipe_file)))
    async with app.run_test(size=(140, 44)) as pilot:
        app.action_compare()
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, CompareScreen)
        await _wait_until(pilot, lambda: screen.names, "the lineup")
        assert screen.names == ["merged", "base", "ft_a", "ft_c"]
        assert screen.merged == "merged" and screen.parents == ["ft_a", "ft_c"]
        prompt = screen.query_one("#prompt", Input)
        prompt.focus()
        prompt.value = "ab"
        screen.query_one("#max-tokens", Input).value = "12"
        await pilot.press("enter")
        await pilot.pause()
        status = screen.query_one("#compare-status", Static)
        await _wait_until(pilot, lambda: "done" in str(status.render()), "the answers")
        shown = {
            name: str(screen.query_one(f"#answer-{i}", Static).render())
            for i, name in enumerate(screen.names)
        }
        headless = compare(
            screen.names,
            screen.paths,
            ["ab"],
            GenerationSettings(max_new_tokens=12),
            device="cpu",
        )
        for name in screen.names:  # greedy decoding: the same text as the headless compare
            assert shown[name] == headless.answers[(name, 0)].text
        assert len(set(shown.values())) > 1, "different models should not all answer alike"
        assert "ab" in screen.history.prompts
        screen.query_one("#tasks", Input).value = "sums=sums.jsonl"
        screen.query_one("#score", Button).press()
        await _wait_until(pilot, lambda: "scored" in str(status.render()), "the scores")
        table = screen.query_one("#eval-table", DataTable)
        assert table.row_count == 5 and len(table.columns) == 2
        assert str(table.get_row_at(4)[0]) == "retained by the merge"


def test_models_step_completes_paths_reorders_and_takes_a_lora(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    adapter = get_peft_model(
        AutoModelForCausalLM.from_pretrained(models["ft_c"]),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    )
    adapter.save_pretrained(tmp_path / "adapters" / "code-lora")
    asyncio.run(_models_flow(tmp_path, models))


async def _browse(pilot: object, app: object, root: Path, name: str) -> None:
    """Browse from ``root`` and pick its folder ``name``, with the tree's own selection."""
    from textual.widgets import DirectoryTree

    from mergetui.tui.screens.dialogs import BrowseScreen

    app.screen.query_one("#browse", Button).press()  # type: ignore[attr-defined]
    await pilot.pause()  # type: ignore[attr-defined]
    dialog = app.screen  # type: ignore[attr-defined]
    assert isinstance(dialog, BrowseScreen)
    field = dialog.query_one("#browse-root", Input)
    field.value = str(root)
    field.focus()
    await pilot.press("enter")  # type: ignore[attr-defined]
    tree = dialog.query_one("#browse-tree", DirectoryTree)

    def node() -> object:
        return next((n for n in tree.root.children if str(n.label) == name), None)

    await _wait_until(pilot, node, f"{name} in the tree")
    tree.select_node(node())  # type: ignore[arg-type]
    await _wait_until(pilot, lambda: not isinstance(app.screen, BrowseScreen), "the pick")  # type: ignore[attr-defined]
    await pilot.pause()  # type: ignore[attr-defined]  # (focus returns to the step's widgets)


async def _models_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    app = create_app(tmp_path)
    async with app.run_test(size=(100, 36)) as pilot:
        screen = app.screen
        await _browse(pilot, app, models["ft_b"].parent, "ft_b")
        assert screen.query_one("#model", Input).value == str(models["ft_b"])
        await _browse(pilot, app, tmp_path / "adapters", "code-lora")
        assert screen.query_one("#lora", Input).value == str(tmp_path / "adapters" / "code-lora")
        screen.query_one("#lora", Input).value = ""
        field = screen.query_one("#model", Input)
        field.focus()
        stem = str(models["ft_a"])[:-1]  # ".../ft_": ft_a, ft_b and ft_c are there
        field.value = stem
        await _wait_until(pilot, lambda: field._suggestion, "a path suggestion")
        assert field._suggestion == stem + "a/"
        await pilot.press("right")  # accept the suggestion
        assert field.value == stem + "a/"
        await pilot.press("enter")
        await pilot.pause()
        field.value = str(models["ft_c"])
        lora = screen.query_one("#lora", Input)
        lora.focus()
        lora.value = "adapt"  # relative to the recipe's folder, as the recipe takes it
        await _wait_until(pilot, lambda: lora._suggestion, "a relative path suggestion")
        assert lora._suggestion == "adapters/"
        lora.value = "adapters/code-lora"
        await pilot.press("enter")
        await pilot.pause()
        draft = app.draft
        assert [(m.model, m.lora) for m in draft.models] == [
            (stem + "a/", ""),
            (str(models["ft_c"]), "adapters/code-lora"),
        ]
        chosen = screen.query_one("#chosen", DataTable)
        assert chosen.row_count == 2 and chosen.cursor_row == 1
        chosen.focus()
        await pilot.press("alt+up")
        await pilot.pause()
        assert [m.lora for m in draft.models] == ["adapters/code-lora", ""]
        assert chosen.cursor_row == 0 and str(chosen.get_row_at(0)[2]) == "adapters/code-lora"
        screen.query_one("#down", Button).press()
        await pilot.pause()
        assert [m.lora for m in draft.models] == ["", "adapters/code-lora"]
        screen.query_one("#base", Input).value = str(models["base"])
        await pilot.press("ctrl+n")
        status = await _wait_for_check(pilot, app)
        assert "not compatible" not in status, str(
            app.screen.query_one("#check-problems", Static).render()
        )
        table = app.screen.query_one("#check-table", DataTable)
        lora_rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert any(str(row[0]) == "LoRA" and "code-lora" in str(row[-1]) for row in lora_rows)


def test_the_run_step_shows_every_gpu_the_driver_reports(
    tmp_path: Path, models: dict[str, Path], monkeypatch: object
) -> None:
    import os

    from test_gpus import TWO_GPUS, fake_nvidia_smi

    tools = fake_nvidia_smi(tmp_path / "bin", TWO_GPUS)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")  # type: ignore[attr-defined]
    asyncio.run(_gpu_flow(tmp_path, models))


async def _gpu_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.tui.screens.run import RunScreen

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await _start_merge(pilot, app, models, tmp_path / "merged")
        run = app.screen
        assert isinstance(run, RunScreen)
        await _wait_until(pilot, lambda: run.gpu_readings, "a GPU reading")
        vram = str(run.query_one("#vram", Static).render())
        assert "GPU 0 NVIDIA H200: 1.0 GiB of 140.4 GiB in use, 3% busy" in vram
        assert "GPU 1 NVIDIA H200: 78.1 GiB of 140.4 GiB in use, 97% busy" in vram
        assert run.query_one("#vram-row").display and run.vram_history
        assert await _wait_outcome(pilot, run) == "done"
