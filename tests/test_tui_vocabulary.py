"""The TUI's vocabulary settings, on real tiny models whose vocabularies differ: the method step's
fields (tokenizer, missing tokens, padding, chat template) flow into the preview and the saved
recipe as the recipe layer writes them, a bad value is marked where it was typed, a recipe or an
autosaved draft shows its choices again, and the check step says what the setting will do."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import save_llama
from snapshot_scenes import CHAT_TOKENS, save_chat_finetune
from test_tui import _choose, _wait_for, _wait_for_check
from textual.widgets import Button, DataTable, Input, Select, Static

from mergetui.recipe import load_recipe, recipe_to_toml
from mergetui.recipe.vocab import MISSING_TOKEN_RULES
from mergetui.tui.app import create_app
from mergetui.tui.screens.check import CheckScreen
from mergetui.tui.screens.method import (
    TEMPLATE_FILE,
    TEMPLATE_TEXT,
    MethodScreen,
    tokenizer_choices,
)
from mergetui.tui.state import RecipeDraft


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base with the character tokenizer, a model with the same vocabulary, and a chat
    fine-tune that added the ChatML tokens (its embedding resized to them)."""
    from mergetui.demo import VOCAB, save_char_tokenizer

    root = tmp_path_factory.mktemp("vocab-models")
    zoo = {}
    for name, seed in (("base", 0), ("plain", 1)):
        zoo[name] = save_llama(root / name, seed, dtype="float32", vocab_size=len(VOCAB))
        save_char_tokenizer(zoo[name])
    zoo["chat"] = save_chat_finetune(zoo["base"], root / "chat")
    return zoo


def _text(screen: object, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())  # type: ignore[attr-defined]


async def _open_method_step(app: object, pilot: object) -> MethodScreen:
    """Step 3, once its form is up."""
    app.action_method()  # type: ignore[attr-defined]
    await _wait_for(
        pilot,
        lambda: isinstance(app.screen, MethodScreen) and bool(app.screen.query("#vocab-note")),  # type: ignore[attr-defined]
        "for the method step",
    )
    return app.screen  # type: ignore[attr-defined]


async def _method_step(pilot: object, app: object, models: dict[str, Path]) -> MethodScreen:
    """The base and both models chosen in step 1, then step 3."""
    await _choose(pilot, app, models["base"], [models["plain"], models["chat"]])
    return await _open_method_step(app, pilot)


def test_union_flows_into_the_preview_and_the_saved_recipe(
    tmp_path: Path, vocab_models: dict[str, Path]
) -> None:
    asyncio.run(_union_flow(tmp_path, vocab_models))


async def _union_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        tokenizer = screen.query_one("#vocab-tokenizer", Select)
        # the choices: base, union and each chosen model
        choices = [value for _, value in tokenizer_choices(app.draft)]
        assert choices == ["base", "union", "models[0]", "models[1]"]
        assert tokenizer.value == "base"
        assert "tokenizer" not in _text(screen, "#preview")  # the default is left out
        tokenizer.value = "union"
        await _wait_for(pilot, lambda: 'tokenizer = "union"' in _text(screen, "#preview"))
        assert "version = 2" in _text(screen, "#preview")
        assert "valid recipe" in _text(screen, "#problems")

        missing = screen.query_one("#vocab-missing", Select)
        assert MISSING_TOKEN_RULES["borrow"] in _text(screen, "#vocab-missing-help")
        missing.value = "zero"
        await _wait_for(pilot, lambda: 'missing_tokens = "zero"' in _text(screen, "#preview"))
        assert MISSING_TOKEN_RULES["zero"] in _text(screen, "#vocab-missing-help")
        screen.query_one("#vocab-template", Select).value = "chatml"
        await _wait_for(pilot, lambda: 'chat_template = "chatml"' in _text(screen, "#preview"))

        screen.query_one("#save-path", Input).value = "saved.toml"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await _wait_for(pilot, lambda: (tmp_path / "saved.toml").is_file(), "for the save")
        preview = _text(screen, "#preview")
    saved = tmp_path / "saved.toml"
    text = saved.read_text(encoding="utf-8")
    recipe = load_recipe(saved)
    assert (recipe.tokenizer, recipe.missing_tokens, recipe.chat_template) == (
        "union",
        "zero",
        "chatml",
    )
    assert text == recipe_to_toml(recipe)  # written by the recipe layer
    for line in ('tokenizer = "union"', 'missing_tokens = "zero"', 'chat_template = "chatml"'):
        assert line in text.splitlines() and line in preview.splitlines(), line


def test_the_check_step_says_what_the_vocabulary_setting_does(
    tmp_path: Path, vocab_models: dict[str, Path]
) -> None:
    asyncio.run(_check_flow(tmp_path, vocab_models))


async def _check_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.engine.report import vocabulary_lines

    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        screen.query_one("#vocab-tokenizer", Select).value = "union"
        await _wait_for(pilot, lambda: app.draft.tokenizer == "union")
        app.action_check()
        await _wait_for(pilot, lambda: isinstance(app.screen, CheckScreen), "for the check step")
        status = await _wait_for_check(pilot, app)
        assert "compatible" in status and "not compatible" not in status, status
        check = app.screen
        assert isinstance(check, CheckScreen) and check.report is not None
        lines = vocabulary_lines(check.report)
        assert lines and lines[0].startswith("tokenizer = union")
        block = check.query_one("#check-vocabulary", Static)
        assert block.display
        shown = str(block.render())
        assert shown.splitlines() == ["vocabulary:", *lines]
        assert all(repr(token) in shown for token in CHAT_TOKENS)  # added to the tokenizer
        table = check.query_one("#check-table", DataTable)
        labels = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert {"tokens", "lacks/drops", "special", "chat template"} <= set(labels)


def test_a_bad_pad_to_multiple_of_is_marked_where_it_was_typed(
    tmp_path: Path, vocab_models: dict[str, Path]
) -> None:
    asyncio.run(_pad_flow(tmp_path, vocab_models))


async def _pad_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        pad = screen.query_one("#vocab-pad", Input)
        note = screen.query_one("#vocab-note", Static)
        assert not note.display and not pad.has_class("-invalid")
        for typed in ("abc", "0", "1.5"):
            pad.value = typed
            await _wait_for(pilot, lambda: note.display, f"for the note on {typed!r}")
            assert pad.has_class("-invalid"), typed
            assert "merge.pad_to_multiple_of: must be a whole number >= 1" in str(note.render())
            assert "merge.pad_to_multiple_of" in _text(screen, "#problems")
        await pilot.press("ctrl+s")  # refused while the value is wrong
        await pilot.pause()
        assert not (tmp_path / "merged.toml").exists()
        pad.value = "64"
        await _wait_for(pilot, lambda: not note.display, "for the note to go")
        assert not pad.has_class("-invalid")
        assert "pad_to_multiple_of = 64" in _text(screen, "#preview").splitlines()
        assert app.draft.pad_to_multiple_of == 64 and "valid recipe" in _text(screen, "#problems")
        pad.value = ""  # empty: no padding, the key left out
        await _wait_for(pilot, lambda: "pad_to_multiple_of" not in _text(screen, "#preview"))
        assert app.draft.pad_to_multiple_of is None


def test_a_recipe_and_an_autosaved_draft_show_their_vocabulary_choices(
    tmp_path: Path, vocab_models: dict[str, Path]
) -> None:
    asyncio.run(_restore_flow(tmp_path, vocab_models))


async def _restore_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.tui.screens.dialogs import ChoiceScreen

    (tmp_path / "chat.jinja").write_text(
        "{% for message in messages %}{{ message['content'] }}{% endfor %}", encoding="utf-8"
    )
    file = tmp_path / "vocab.toml"
    file.write_text(
        f"""version = 2
[merge]
method = "ties"
base = "{models["base"]}"
device = "cpu"
tokenizer = "models[1]"
missing_tokens = "base_mean"
pad_to_multiple_of = 16
tie_word_embeddings = false
chat_template = "chat.jinja"
[merge.tokens]
"<|im_end|>" = {{ source = "models[1]", force = true }}
[[models]]
model = "{models["plain"]}"
weight = 1.0
density = 0.5
[[models]]
model = "{models["chat"]}"
weight = 1.0
density = 0.5
[output]
path = "merged"
""",
        encoding="utf-8",
    )
    recipe = load_recipe(file)

    async def shows_the_recipe(app: object, pilot: object) -> MethodScreen:
        screen = await _open_method_step(app, pilot)
        assert screen.query_one("#vocab-tokenizer", Select).value == "models[1]"
        assert screen.query_one("#vocab-missing", Select).value == "base_mean"
        assert screen.query_one("#vocab-pad", Input).value == "16"
        assert screen.query_one("#vocab-template", Select).value == TEMPLATE_FILE
        assert screen.query_one("#vocab-file-row").display
        assert screen.query_one("#vocab-template-file", Input).value == "chat.jinja"
        await _wait_for(pilot, lambda: "valid recipe" in _text(screen, "#problems"))
        preview = _text(screen, "#preview")
        assert "[merge.tokens]" in preview and "tie_word_embeddings = false" in preview
        return screen

    app = create_app(draft=RecipeDraft.from_recipe(recipe))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await shows_the_recipe(app, pilot)
        screen.query_one("#save-path", Input).value = "again.toml"
        await pilot.pause()
        await pilot.press("ctrl+s")
        await _wait_for(pilot, lambda: (tmp_path / "again.toml").is_file(), "for the save")
        app.draft.autosave()  # as the app does while the user works
    # what the wizard did not edit ([merge.tokens], tie_word_embeddings) survives the trip
    assert (tmp_path / "again.toml").read_text(encoding="utf-8") == recipe_to_toml(recipe)

    again = create_app(tmp_path)
    async with again.run_test(size=(120, 40)) as pilot:
        await _wait_for(pilot, lambda: isinstance(again.screen, ChoiceScreen), "for the offer")
        again.screen.query_one("#choice-restore", Button).press()
        await _wait_for(pilot, lambda: again.draft.tokenizer == "models[1]", "for the restore")
        await shows_the_recipe(again, pilot)
        assert recipe_to_toml(again.draft.to_recipe()) == recipe_to_toml(recipe)


#: a chat template given as Jinja text in the recipe (two lines)
JINJA = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


def test_a_version_1_tokenizer_reference_and_jinja_text_are_shown_as_given(
    tmp_path: Path, vocab_models: dict[str, Path]
) -> None:
    asyncio.run(_reference_flow(tmp_path, vocab_models))


async def _reference_flow(tmp_path: Path, models: dict[str, Path]) -> None:
    file = tmp_path / "v1.toml"
    file.write_text(
        f'version = 1\n[merge]\nmethod = "linear"\ndevice = "cpu"\n'
        f'tokenizer = "{models["chat"]}"\n'
        f"chat_template = {JINJA!r}\n"
        f'[[models]]\nmodel = "{models["plain"]}"\nweight = 0.5\n'
        f'[[models]]\nmodel = "{models["chat"]}"\nweight = 0.5\n'
        f'[output]\npath = "merged"\n',
        encoding="utf-8",
    )
    recipe = load_recipe(file)
    app = create_app(draft=RecipeDraft.from_recipe(recipe))
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _open_method_step(app, pilot)
        tokenizer = screen.query_one("#vocab-tokenizer", Select)
        assert tokenizer.value == str(models["chat"])
        template = screen.query_one("#vocab-template", Select)
        assert template.value == TEMPLATE_TEXT and not screen.query_one("#vocab-file-row").display
        template.value = "chatml"
        await _wait_for(pilot, lambda: app.draft.chat_template == "chatml")
        template.value = TEMPLATE_TEXT  # back to the recipe's text, kept while chatml was chosen
        await _wait_for(pilot, lambda: app.draft.chat_template == JINJA)
        await _wait_for(pilot, lambda: "valid recipe" in _text(screen, "#problems"))
        assert "version = 1" in _text(screen, "#preview")  # nothing here needs version 2
        tokenizer.value = "models[0]"  # the numbered choice needs version 2
        await _wait_for(pilot, lambda: 'tokenizer = "models[0]"' in _text(screen, "#preview"))
        assert "version = 2" in _text(screen, "#preview")
        assert "valid recipe" in _text(screen, "#problems")
    assert recipe_to_toml(RecipeDraft.from_recipe(recipe).to_recipe()) == recipe_to_toml(recipe)


def test_an_instruct_model_with_chat_tokens_merges_from_the_tui(
    tmp_path: Path, vocab_models: dict[str, Path]
) -> None:
    """The issue's "done when", in the TUI: a base, a model of the base's vocabulary and an
    instruct fine-tune that added the ChatML tokens, merged with tokenizer = union and the
    instruct model's chat template, run from the method step. The output loads with matching
    sizes, keeps the instruct model's ids for its tokens and its template."""
    asyncio.run(_merge_union_from_the_tui(tmp_path, vocab_models))


async def _merge_union_from_the_tui(tmp_path: Path, models: dict[str, Path]) -> None:
    import shutil

    from test_tui import _wait_outcome
    from transformers import AutoTokenizer

    from mergetui.tui.screens.run import RunScreen

    instruct = tmp_path / "instruct"  # the chat fine-tune, with a ChatML template of its own
    shutil.copytree(models["chat"], instruct)
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
    )
    (instruct / "chat_template.jinja").write_text(template, encoding="utf-8")
    models = {**models, "chat": instruct}
    output = tmp_path / "merged"
    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        screen.query_one("#vocab-tokenizer", Select).value = "union"
        screen.query_one("#vocab-template", Select).value = "models[1]"
        await _wait_for(pilot, lambda: 'chat_template = "models[1]"' in _text(screen, "#preview"))
        screen.query_one("#out-path", Input).value = str(output)
        screen.query_one("#out-device", Input).value = "cpu"
        await _wait_for(pilot, lambda: "valid recipe" in _text(screen, "#problems"))
        await pilot.press("ctrl+r")
        await _wait_for(pilot, lambda: isinstance(app.screen, RunScreen), "for the run step")
        run = app.screen
        assert await _wait_outcome(pilot, run) == "done", str(
            run.query_one("#run-status", Static).render()
        )
    merged = AutoTokenizer.from_pretrained(output)
    chat = AutoTokenizer.from_pretrained(models["chat"])
    assert [merged.convert_tokens_to_ids(t) for t in CHAT_TOKENS] == [
        chat.convert_tokens_to_ids(t) for t in CHAT_TOKENS
    ]
    assert merged.chat_template == chat.chat_template == template
    config = json.loads((output / "config.json").read_text())
    assert len(merged) == config["vocab_size"] == len(chat)
