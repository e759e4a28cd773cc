"""How generation uses the CPU, checked without timing anything (speed is measured by
``bench/bench_generation.py``): a toy model generates on one torch thread, one forward pass per
token through the KV cache; the TUI leaves a core for its own thread; torch's thread count is
put back afterwards."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from textual.widgets import Input, Static

from mergetui.evaluate.generation import GenerationSettings, generate
from mergetui.evaluate.models import (
    leave_a_core_for_the_ui,
    load_model,
    torch_thread_limit,
    torch_threads,
)


def test_thread_limits_nest_and_torch_gets_its_own_count_back() -> None:
    own = torch.get_num_threads()
    with torch_thread_limit(own + 5) as outer:
        assert outer == own  # a limit never raises the count
        with torch_thread_limit(1) as inner:
            assert inner == torch.get_num_threads() == 1
            assert torch_threads() == own
        assert torch.get_num_threads() == own
    assert torch.get_num_threads() == own
    with leave_a_core_for_the_ui() as threads:
        assert threads == torch.get_num_threads() == max(1, own - 1)
    assert torch.get_num_threads() == own


def test_a_toy_model_generates_on_one_thread_one_forward_per_token(
    models: dict[str, Path],
) -> None:
    loaded = load_model("base", models["base"], "cpu")
    seen: list[tuple[int, int]] = []  # (torch threads, tokens fed) per forward pass

    def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append((torch.get_num_threads(), kwargs["input_ids"].shape[1]))

    own = torch.get_num_threads()
    hook = loaded.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        answer = generate(loaded, "ab", GenerationSettings(max_new_tokens=6, chat_template=False))
    finally:
        hook.remove()
    assert torch.get_num_threads() == own
    assert {threads for threads, _ in seen} == {1}
    prompt_length = seen[0][1]
    assert prompt_length >= 2 and all(fed == 1 for _, fed in seen[1:]), seen  # the KV cache
    assert len(seen) == answer.new_tokens + int(answer.stopped_on_eos)


def test_the_compare_step_leaves_a_core_for_the_ui(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mergetui.evaluate.compare as compare_module

    real = compare_module.generate
    threads_at_call: list[int] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads_at_call.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_module, "generate", spy)
    own = torch.get_num_threads()
    asyncio.run(_generate_in_the_tui(tmp_path, models))
    assert threads_at_call and set(threads_at_call) == {max(1, own - 1)}
    assert torch.get_num_threads() == own


async def _generate_in_the_tui(tmp_path: Path, models: dict[str, Path]) -> None:
    from mergetui.tui.app import create_app
    from mergetui.tui.screens.compare import CompareScreen
    from mergetui.tui.state import ModelDraft, RecipeDraft

    draft = RecipeDraft(
        base=str(models["base"]),
        models=[ModelDraft(str(models["ft_a"])), ModelDraft(str(models["ft_c"]))],
        output=str(tmp_path / "not-merged-yet"),
        device="cpu",
        base_dir=tmp_path,
    )
    app = create_app(draft=draft)
    async with app.run_test(size=(120, 40)) as pilot:
        app.call_later(app.action_compare)
        await _wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), "step 5")
        screen = app.screen
        assert isinstance(screen, CompareScreen)
        await _wait_until(pilot, lambda: screen.names, "the lineup")
        screen.query_one("#prompt", Input).value = "ab"
        screen.query_one("#max-tokens", Input).value = "4"
        screen.action_generate()
        status = screen.query_one("#compare-status", Static)
        await _wait_until(pilot, lambda: not screen.busy, "the answers")
        assert str(status.render()).startswith("done"), str(status.render())


async def _wait_until(pilot: Any, condition: Any, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)
