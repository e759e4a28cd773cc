"""Ids and paths are never cut: `hub search`, `hub cached`, `check` and `jobs` run for real at 80
columns in a pseudo-terminal and with stdout piped, and every id or path a user may copy must be
one unbroken substring of a line. Also: the TUI's check table at 100 columns, and the disk-space
message in human units."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ties_recipe
from hubserver import HubServer, RepoMeta, require_olah, running

EXE = [sys.executable, "-m", "mergetui"]
#: Longer than an 80-column table leaves its id column once the other columns take their share.
LONG_ID = "barorg/tiny-model-with-a-long-name-for-narrow-terminals"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
BOX = set("│┃┏┓┗┛━─┡┩└┘┌┐╇╈┼")


def run_at(
    args: list[str], env: dict[str, str], *, tty: bool, columns: int = 80, timeout: float = 240
) -> tuple[int, str]:
    """Run ``mergetui ARGS`` with COLUMNS set, its stdout a terminal of that width (a real
    pseudo-terminal) or a pipe; return the exit code and stdout with colours stripped."""
    env = {**env, "COLUMNS": str(columns), "NO_COLOR": "1"}
    if not tty:
        done = subprocess.run(
            [*EXE, *args], capture_output=True, text=True, env=env, timeout=timeout
        )
        return done.returncode, done.stdout
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(
        [*EXE, *args], stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    os.close(leader)
    code = process.wait(timeout=30)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return code, _ANSI.sub("", text)


def assert_whole(needle: str, output: str) -> None:
    """``needle`` is one unbroken substring of a line of ``output``."""
    assert any(needle in line for line in output.splitlines()), (
        f"{needle!r} is cut or missing in:\n{output}"
    )


# -- the Hub -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[HubServer]:
    """The loopback Hub of ``test_hub.py`` (olah + its front), serving one model with a long id."""
    require_olah()
    server = HubServer(tmp_path_factory.mktemp("hub-tables"))
    server.add_repo(LONG_ID, models["base"], RepoMeta(downloads=123456))
    server.add_repo("barorg/tiny-short", models["ft_a"], RepoMeta(downloads=7))
    with running(server):
        yield server


def _hub_env(hub: HubServer, hf_home: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    return env


@pytest.mark.parametrize("tty", [True, False], ids=["terminal-80", "piped"])
def test_hub_search_never_cuts_the_id(hub: HubServer, tmp_path: Path, tty: bool) -> None:
    code, out = run_at(["hub", "search", "tiny"], _hub_env(hub, tmp_path / "hf"), tty=tty)
    assert code == 0, out
    assert_whole(LONG_ID, out)
    assert_whole("barorg/tiny-short", out)
    if not tty:  # plain rows for grep and cut: the id first, tab-separated, no box drawing
        assert not BOX & set(out), out
        row = next(line for line in out.splitlines() if line.startswith(LONG_ID))
        assert row.split("\t")[0] == LONG_ID and "123.5K" in row.split("\t")


def test_hub_cached_never_cuts_the_id(hub: HubServer, tmp_path: Path) -> None:
    env = _hub_env(hub, tmp_path / "hf")
    code, out = run_at(["hub", "download", LONG_ID], env, tty=False)
    assert code == 0, out
    for tty in (True, False):
        code, out = run_at(["hub", "cached"], env, tty=tty)
        assert code == 0, out
        assert_whole(LONG_ID, out)
        assert "usable" in out
        if not tty:
            assert not BOX & set(out), out
            assert any(line.split("\t")[0] == LONG_ID for line in out.splitlines()), out


# -- check and jobs ----------------------------------------------------------------------------
def _deep_models(root: Path, models: dict[str, Path]) -> dict[str, Path]:
    """The tiny models under long paths, as on a real server (`/data/teams/.../checkpoints/...`)."""
    folder = root / "team-checkpoints-with-a-long-folder-name" / "fine-tunes-of-the-tiny-base"
    folder.mkdir(parents=True)
    deep = {}
    for name in ("base", "ft_a", "ft_c"):
        deep[name] = folder / f"{name}-checkpoint-final"
        deep[name].symlink_to(models[name], target_is_directory=True)
    return deep


@pytest.mark.parametrize("tty", [True, False], ids=["terminal-80", "piped"])
def test_check_prints_every_model_path_whole(
    tmp_path: Path, models: dict[str, Path], tty: bool
) -> None:
    deep = _deep_models(tmp_path, models)
    output = tmp_path / "outputs-of-merges-with-a-long-folder-name" / "ties-merge-of-the-fine-tunes"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(ties_recipe(deep, output))
    code, out = run_at(["check", str(recipe)], dict(os.environ), tty=tty)
    assert code == 0, out
    for path in (*deep.values(), output):
        assert_whole(str(path), out)
    assert "compatible" in out and "LlamaForCausalLM" in out


@pytest.mark.parametrize("tty", [True, False], ids=["terminal-80", "piped"])
def test_jobs_prints_outputs_and_job_folders_whole(
    tmp_path: Path, models: dict[str, Path], tty: bool
) -> None:
    from mergetui.jobs import RUNNING, jobs_dir, start_job

    output = tmp_path / "outputs-of-merges-with-a-long-folder-name" / "ties-merge-of-the-fine-tunes"
    job = start_job(ties_recipe(models, output), str(output))
    deadline = time.monotonic() + 120
    while job.outcome().state == RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.folder.parent == jobs_dir()
    code, out = run_at(["jobs"], dict(os.environ), tty=tty)
    assert code == 0, out
    assert_whole(str(output), out)
    assert_whole(str(job.folder), out)
    if not tty:
        assert not BOX & set(out), out
        row = next(line for line in out.splitlines() if line.startswith(job.folder.name))
        assert str(output) in row.split("\t") and str(job.folder) in row.split("\t")


# -- the TUI's check step at 100 columns -------------------------------------------------------
def test_tui_check_table_fits_three_models_at_100_columns(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    asyncio.run(_check_at_100(tmp_path, models))


async def _check_at_100(tmp_path: Path, models: dict[str, Path]) -> None:
    from textual.widgets import DataTable, Static

    from mergetui.tui.app import create_app
    from mergetui.tui.state import ModelDraft, RecipeDraft

    deep = _deep_models(tmp_path, models)
    draft = RecipeDraft(
        base=str(deep["base"]),
        models=[ModelDraft(str(deep["ft_a"])), ModelDraft(str(deep["ft_c"]))],
        method="ties",
        output=str(tmp_path / "merged"),
        device="cpu",
        base_dir=tmp_path,
    )
    app = create_app(draft=draft)
    async with app.run_test(size=(100, 30)) as pilot:
        app.action_check()
        for _ in range(400):
            await pilot.pause(0.05)
            found = app.screen.query("#check-status")
            if found and "checking" not in str(found.first(Static).render()):
                break
        screen = app.screen
        assert "compatible" in str(screen.query_one("#check-status", Static).render())
        table = screen.query_one("#check-table", DataTable)
        await pilot.pause()
        assert len(table.columns) == 4
        widths = sum(column.get_render_width(table) for column in table.columns.values())
        assert widths <= table.scrollable_content_region.width, "a model's column is off screen"
        assert table.max_scroll_x == 0
        path_line = screen.query_one("#check-path", Static)
        assert str(deep["base"]) in str(path_line.render())
        table.focus()
        await pilot.press("right")
        await pilot.pause()
        assert str(deep["ft_a"]) in str(path_line.render())
        await pilot.press("right")
        await pilot.pause()
        assert str(deep["ft_c"]) in str(path_line.render())


# -- the disk-space check ----------------------------------------------------------------------
def test_disk_space_message_uses_human_units(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from mergetui.engine.plan import build_plan
    from mergetui.recipe import load_recipe
    from mergetui.units import format_bytes

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(ties_recipe(models, tmp_path / "merged"))
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=5000))
    plan = build_plan(load_recipe(recipe), fetch=False)
    plan.close()
    assert plan.estimates is not None
    message = next(p.message for p in plan.errors if "disk space" in p.message)
    assert f"needs about {format_bytes(plan.estimates.output_bytes)}" in message, message
    assert "4.9 KiB free" in message and "GB" not in message, message


# -- the shared row builders -------------------------------------------------------------------
def test_report_rows_shorten_names_and_flag_what_must_match(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    from mergetui.engine.plan import build_plan
    from mergetui.engine.report import full_reference, plan_report, report_rows, short_reference
    from mergetui.recipe import load_recipe

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[merge]\nmethod = "linear"\n[merge.parameters]\nweight = 1.0\n[[models]]\nmodel = "{models["ft_a"]}"\n'
        f'[[models]]\nmodel = "{models["qwen2"]}"\n[output]\npath = "{tmp_path / "out"}"\n'
    )
    plan = build_plan(load_recipe(recipe), fetch=False)
    plan.close()
    report = plan_report(plan)
    rows = {row.label: row for row in report_rows(report)}
    assert rows["architecture"].cells == ["LlamaForCausalLM", "Qwen2ForCausalLM"]
    assert rows["architecture"].differs == [False, True]
    assert rows["dtype"].differs == [False, False]  # may differ: not flagged
    assert rows["model"].cells == [short_reference(str(models[m])) for m in ("ft_a", "qwen2")]
    assert [full_reference(m) for m in report["models"]] == [
        str(models["ft_a"]),
        str(models["qwen2"]),
    ]
    assert short_reference("acme/tiny") == "acme/tiny"
    assert (
        short_reference("/data/teams/nlp/checkpoints/run-42/final") == "…/checkpoints/run-42/final"
    )
    assert (
        short_reference("meta-llama/Meta-Llama-3.1-8B-Instruct") == "…/Meta-Llama-3.1-8B-Instruct"
    )


def test_hub_info_rows_keep_the_commit_and_flag_custom_code() -> None:
    from mergetui.sources.hub import RepoFile, RepoInfo
    from mergetui.sources.hub_summary import info_rows

    commit = "c57d793b6f242e7ce9351bda576c72329627fcda"
    info = RepoInfo(
        repo_id=LONG_ID,
        revision="main",
        commit=commit,
        files=[RepoFile("config.json", 700), RepoFile("model.safetensors", 2048)],
        config={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "auto_map": {}},
        adapter_config=None,
    )
    rows = {row.label: row for row in info_rows(info)}
    assert rows["model"].text == f"{LONG_ID} @ main → commit {commit}"
    assert rows["weights"].text == "safetensors, 2.0 KiB"
    assert "custom code" not in rows  # an empty auto_map names no code
    info.config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}  # type: ignore[index]
    assert [row.label for row in info_rows(info) if row.warning] == ["custom code"]
