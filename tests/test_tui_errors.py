"""No failure in the TUI's background work is silent.

Each step's worker is made to hit an unexpected exception (the engine or evaluate function it
calls raises ``RuntimeError("boom")``) in the real app, driven with Pilot on real tiny models.
Every time: a one-line toast names what failed, F2 shows the traceback, and the screen leaves
its busy state ("checking…", "searching…") instead of waiting forever.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ties_recipe
from textual.widgets import Button, Input, Log, Static
from textual.worker import Worker, WorkerState

from mergetui.tui.app import MergeTuiApp, create_app
from mergetui.tui.state import ModelDraft, RecipeDraft

BOOM = "boom"
ENDED = (WorkerState.ERROR, WorkerState.SUCCESS, WorkerState.CANCELLED)
TUI = Path(__file__).resolve().parent.parent / "mergetui" / "tui"


def _boom(*args: object, **kwargs: object) -> Any:
    raise RuntimeError(BOOM)


async def _wait_until(
    pilot: Any, condition: Callable[[], object], what: str, timeout_s: float = 120
) -> None:
    """Wait on a condition; the timeout only catches a hang."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


@dataclass
class Case:
    """One worker made to fail: how to get the app there, which worker, what it must say."""

    group: str  # the worker's group
    what: str  # in the toast: the worker's description
    patches: dict[str, Any]  # "module.attr" → replacement
    busy: Callable[[Any], str] | None  # the text that showed the busy state (must not stay)
    failed: str = ""  # what the screen shows instead


def _models_screen(app: MergeTuiApp) -> Any:
    from mergetui.tui.screens.models import ModelsScreen

    assert isinstance(app.screen, ModelsScreen)
    return app.screen


def _hit(repo_id: str) -> Any:
    from mergetui.sources.hub import SearchHit

    return SearchHit(repo_id, "text-generation", "transformers", 500_000, None, 10)


def _repo_info(folder: Path) -> Callable[..., Any]:
    """The Hub's answer for a repo holding ``folder`` (there is no Hub here; the happy path with
    a real Hub-compatible server is in test_hub.py)."""
    from mergetui.sources.hub import RepoFile, RepoInfo

    def info(ref: Any) -> Any:
        return RepoInfo(
            ref.repo_id,
            "main",
            "0" * 40,
            [RepoFile(f.name, f.stat().st_size) for f in sorted(folder.iterdir())],
            json.loads((folder / "config.json").read_text()),
            None,
        )

    return info


def _status(selector: str) -> Callable[[Any], str]:
    return lambda app: str(app.screen.query_one(selector, Static).render())


CASES: dict[str, Case] = {
    "check": Case(
        "check",
        "the compatibility check",
        {"mergetui.engine.plan.build_plan": _boom},
        _status("#check-status"),
        "cannot check",
    ),
    "hf-cache": Case(
        "cache",
        "reading the HF cache",
        {"mergetui.sources.hub.cached_models": _boom},
        None,  # the cache table has no busy state: it stays empty, and the toast says why
    ),
    "hub-search": Case(
        "hub-search",
        "the Hub search",
        {"mergetui.sources.hub.search": _boom},
        _status("#hub-info"),
        "search failed",
    ),
    "hub-info": Case(
        "hub-info",
        "reading a Hub model's details",
        {
            "mergetui.sources.hub.search": lambda query, limit=20: [_hit("acme/tiny-code")],
            "mergetui.sources.hub.repo_info": _boom,
        },
        _status("#hub-info"),
        "acme/tiny-code: failed",
    ),
    "hub-download": Case(
        "download",
        "downloading acme/tiny-code",
        {"mergetui.sources.hub.download": _boom},  # (+ search and info, set in the test)
        _status("#download-status"),
        "downloading acme/tiny-code failed",
    ),
    "compare-lineup": Case(
        "lineup",
        "finding the models to compare",
        {"mergetui.evaluate.lineup.recipe_lineup": _boom},
        _status("#compare-status"),
        "cannot line up the models",
    ),
    "compare-generate": Case(
        "generate",
        "generation",
        {"mergetui.evaluate.compare.compare": _boom},
        _status("#compare-status"),
        "generation failed",
    ),
    "compare-score": Case(
        "eval",
        "scoring",
        {"mergetui.evaluate.evaluation.evaluate": _boom},
        _status("#compare-status"),
        "scoring failed",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_an_unexpected_error_in_a_worker_is_reported_and_ends_the_busy_state(
    name: str,
    tmp_path: Path,
    models: dict[str, Path],
    write_recipe: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = CASES[name]
    patches = dict(case.patches)
    if name == "hub-download":
        patches["mergetui.sources.hub.search"] = CASES["hub-info"].patches[
            "mergetui.sources.hub.search"
        ]
        patches["mergetui.sources.hub.repo_info"] = _repo_info(models["ft_a"])
    for target, replacement in patches.items():
        monkeypatch.setattr(target, replacement)
    recipe = write_recipe(ties_recipe(models, tmp_path / "merged"))
    (tmp_path / "sums.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n')
    asyncio.run(_error_flow(name, case, tmp_path, recipe))


async def _error_flow(name: str, case: Case, tmp_path: Path, recipe_file: Path) -> None:
    from mergetui.recipe import load_recipe

    ended: list[Worker[Any]] = []

    def hook(message: object) -> None:
        if isinstance(message, Worker.StateChanged) and message.state in ENDED:
            ended.append(message.worker)

    draft = RecipeDraft.from_recipe(load_recipe(recipe_file))
    draft.base_dir = tmp_path
    app = create_app(draft=draft)
    async with app.run_test(size=(120, 40), notifications=True, message_hook=hook) as pilot:
        await pilot.pause()
        await _start(name, app, pilot, ended)
        await _wait_until(
            pilot, lambda: any(w.group == case.group for w in ended), f"the {case.group} worker"
        )
        worker = next(w for w in ended if w.group == case.group)
        assert worker.state == WorkerState.ERROR, (worker, worker.error)
        await _assert_reported(pilot, app, case.what)
        if case.busy is not None:
            shown = case.busy(app)
            assert case.failed in shown and "…" not in shown, shown
        if name == "compare-generate":
            screen: Any = app.screen
            assert not screen.busy, "Generate must work again"


async def _start(name: str, app: MergeTuiApp, pilot: Any, ended: list[Worker[Any]]) -> None:
    """Take the app to where the case's worker runs, the way a user would."""
    from mergetui.tui.screens.compare import CompareScreen

    screen: Any
    if name == "check":
        await pilot.press("ctrl+n")
    elif name.startswith("hub-"):
        screen = _models_screen(app)
        screen.query_one("#sources").active = "hub-tab"
        screen.query_one("#hub-query", Input).value = "tiny"
        screen.query_one("#hub-search", Button).press()
        if name == "hub-download":
            download = screen.query_one("#hub-download", Button)
            await _wait_until(pilot, lambda: not download.disabled, "the Download button")
            download.press()
    elif name.startswith("compare-"):
        app.call_later(app.action_compare)  # (in the app's context: message_hook sees it)
        await _wait_until(pilot, lambda: isinstance(app.screen, CompareScreen), "step 5")
        if name == "compare-lineup":
            return
        screen = app.screen
        await _wait_until(pilot, lambda: any(w.group == "lineup" for w in ended), "the lineup")
        assert screen.names, str(screen.query_one("#compare-status", Static).render())
        if name == "compare-generate":
            screen.query_one("#prompt", Input).value = "ab"
            screen.query_one("#max-tokens", Input).value = "4"
            screen.query_one("#generate", Button).press()
        else:
            screen.query_one("#tasks", Input).value = "sums=sums.jsonl"
            screen.query_one("#score", Button).press()


async def _assert_reported(pilot: Any, app: MergeTuiApp, what: str) -> None:
    """A toast naming what failed, and behind F2 the traceback (and in the log)."""
    from mergetui.tui.screens.dialogs import ErrorScreen

    await _wait_until(pilot, lambda: app.last_error is not None, "the error report", 30)
    assert app.last_error is not None
    summary, detail = app.last_error
    assert summary.startswith(f"{what} failed") and f"RuntimeError: {BOOM}" in summary, summary

    # notify() posts a message: the toast is in the list once the app has handled it
    def toasts() -> list[str]:
        return [n.message for n in app._notifications if n.severity == "error"]

    await _wait_until(
        pilot, lambda: any(summary in t and "F2" in t for t in toasts()), "the error toast", 30
    )
    under = app.screen
    await pilot.press("f2")
    await _wait_until(pilot, lambda: isinstance(app.screen, ErrorScreen), "the error detail")
    text = str(app.screen.query_one("#error-detail", Static).render())
    assert "Traceback" in text and f"RuntimeError: {BOOM}" in text and "_boom" in text, text
    await pilot.press("escape")
    await _wait_until(pilot, lambda: app.screen is under, "the error detail to close")
    assert app.log_path is not None and f"RuntimeError: {BOOM}" in app.log_path.read_text()


def test_a_failing_gpu_sampler_is_reported_once_and_stops(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Run screen samples the GPUs once a second: a sampler that breaks is reported, then
    stops (not a toast a second), and the log says the merge's own GPU figures remain."""
    from test_gpus import TWO_GPUS, fake_nvidia_smi

    tools = fake_nvidia_smi(tmp_path / "bin", TWO_GPUS)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr("mergetui.tui.screens.run.read_gpus", _boom)
    # a merge job that runs until the test ends it: its supervisor is a sleeping process
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        asyncio.run(_gpu_sampler_flow(tmp_path, models, sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()


def _running_job(pid: int, output: Path) -> Any:
    """A job folder as ``start_job`` writes it, whose supervisor is the process ``pid``."""
    import psutil

    from mergetui.jobs import Job, jobs_dir

    folder = jobs_dir() / "sampler-test"
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text("version = 1\n", encoding="utf-8")
    info = {
        "pid": pid,
        "pid_created": psutil.Process(pid).create_time(),
        "started": time.time(),
        "output": str(output),
    }
    (folder / "job.json").write_text(json.dumps(info), encoding="utf-8")
    return Job(folder)


async def _gpu_sampler_flow(tmp_path: Path, models: dict[str, Path], pid: int) -> None:
    from mergetui.jobs import RUNNING
    from mergetui.tui.screens.run import RunScreen

    ended: list[Worker[Any]] = []

    def hook(message: object) -> None:
        if isinstance(message, Worker.StateChanged) and message.state in ENDED:
            ended.append(message.worker)

    draft = RecipeDraft(base=str(models["base"]), models=[ModelDraft(str(models["ft_a"]))])
    app = create_app(draft=draft)
    async with app.run_test(size=(120, 40), notifications=True, message_hook=hook) as pilot:
        await pilot.pause()
        job = _running_job(pid, tmp_path / "merged")
        assert job.outcome().state == RUNNING
        run = RunScreen(job)
        app.call_later(app.push_screen, run)  # (in the app's context: message_hook sees it)
        await _wait_until(pilot, lambda: app.screen is run, "the run step")
        await _wait_until(pilot, lambda: any(w.group == "gpus" for w in ended), "the sampler")
        [worker] = [w for w in ended if w.group == "gpus"]
        assert worker.state == WorkerState.ERROR
        await _assert_reported(pilot, app, "reading the GPUs (nvidia-smi)")
        log = run.query_one("#run-log", Log)
        await _wait_until(
            pilot, lambda: any("cannot read the GPUs" in str(x) for x in log.lines), "a log line"
        )
        assert run.gpu_timer is None, "the sampler must stop after it failed"
        assert run.outcome == "running", "the merge is still watched"


def test_every_worker_is_described_and_reported_by_its_step_screen() -> None:
    """A worker outside a ``StepScreen`` would fail silently (its failure message goes to the
    node that started it, not to the app), and one without a description could not be named
    in the toast."""
    from mergetui.tui.screens.base import StepScreen

    problems = []
    for path in sorted((TUI / "screens").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            bases = {ast.unparse(b) for b in cls.bases}
            for function in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                for deco in function.decorator_list:
                    if not (isinstance(deco, ast.Call) and ast.unparse(deco.func) == "work"):
                        continue
                    keywords = {k.arg: ast.unparse(k.value) for k in deco.keywords}
                    where = f"{path.name}: {cls.name}.{function.name}"
                    if "StepScreen" not in bases:
                        problems.append(f"{where} is not on a StepScreen")
                    if "description" not in keywords:
                        problems.append(f"{where} has no description")
                    if keywords.get("exit_on_error") != "False":
                        problems.append(f"{where} would close the app on an error")
    assert not problems, "\n".join(problems)
    from mergetui.tui.screens import check, compare, method, models, run

    for module, name in (
        (models, "ModelsScreen"),
        (check, "CheckScreen"),
        (method, "MethodScreen"),
        (run, "RunScreen"),
        (compare, "CompareScreen"),
    ):
        assert issubclass(getattr(module, name), StepScreen), name
