"""Ctrl-C and SIGTERM at every moment of a merge: exit 130 (or 0 once the output is in place),
never a signal's negative code, and nothing left behind.

Each run is held at a named moment (``MERGETUI_PAUSE_AT``, see :mod:`mergetui.pauses`) and signalled
there, so the moment is known by construction and not by how fast this machine merges.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tree_digest
from safetensors.torch import load_file

from mergetui.errors import MergeCancelled

EXE = [sys.executable, "-m", "mergetui"]
#: Where a signal may land, in the order a merge reaches them; "done" is after the output is in place.
INTERRUPTIBLE = [
    "before-plan",
    "plan",
    "threads-started",
    "tensor:1",
    "write:1",
    "write:7",
    "support-files",
    "publish",
]
HANG_S = 120  # a hang detector: a held merge waits for its signal, then ends within seconds


@pytest.fixture(scope="module")
def three_finetunes_recipe(
    tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]
) -> Path:
    """A TIES merge of three tiny fine-tunes (one of them sharded) into small output shards, so
    "mid-write" is the middle of a shard and the output has several."""
    folder = tmp_path_factory.mktemp("signals")
    recipe = folder / "recipe.toml"
    entries = "".join(
        f'[[models]]\nmodel = "{models[name]}"\nweight = 1.0\ndensity = 0.5\n'
        for name in ("ft_a", "ft_b", "ft_c")
    )
    recipe.write_text(
        f'version = 1\n[merge]\nmethod = "ties"\nbase = "{models["base"]}"\ndevice = "cpu"\n'
        f'{entries}[output]\npath = "out"\nshard_size = "40KB"\n',
        encoding="utf-8",
    )
    return recipe


def _run_held(
    recipe: Path, moment: str, signals: list[signal.Signals], output: Path
) -> tuple[int, list[dict[str, object]], str]:
    """Run the merge held at ``moment``, send ``signals`` once it says it is there; return the exit
    code, the JSON events and stderr."""
    env = {**os.environ, "MERGETUI_PAUSE_AT": moment}
    events_file = output.parent / f"events-{moment.replace(':', '-')}.jsonl"
    with events_file.open("w") as events_out:
        process = subprocess.Popen(
            [*EXE, "run", str(recipe), "--json", "-o", str(output)],
            stdout=events_out,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            # a shell that starts a job in the background ignores SIGINT for it, and Python
            # keeps an inherited "ignore"; a user's Ctrl-C reaches a foreground process
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if line.startswith("mergetui: paused at"):
                for number in signals:
                    process.send_signal(number)
                break
        else:
            process.wait(timeout=HANG_S)
            pytest.fail(f"the merge never paused at {moment}: {''.join(seen)}")
        rest = process.stderr.read()
        code = process.wait(timeout=HANG_S)
    lines = events_file.read_text().splitlines()
    return code, [json.loads(line) for line in lines], "".join(seen) + rest


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".out", "out")))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", INTERRUPTIBLE)
def test_a_signal_at_any_moment_exits_130_and_leaves_nothing(
    three_finetunes_recipe: Path,
    models: dict[str, Path],
    tmp_path: Path,
    moment: str,
    sig: signal.Signals,
) -> None:
    before = tree_digest(models["ft_b"])
    code, events, stderr = _run_held(three_finetunes_recipe, moment, [sig], tmp_path / "out")
    assert code == 130, stderr
    assert "terminate called" not in stderr and "Fatal Python error" not in stderr
    assert events[0]["event"] == "start"
    assert events[-1]["event"] == "cancelled" and events[-1]["exit_code"] == 130, events[-1]
    assert [e for e in events if e["event"] in ("cancelled", "error", "done")] == events[-1:]
    assert _leftovers(tmp_path) == [], "a partial output was left behind"
    assert tree_digest(models["ft_b"]) == before


def test_repeated_signals_cannot_cut_the_clean_up_short(
    three_finetunes_recipe: Path, tmp_path: Path
) -> None:
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGINT]
    code, events, stderr = _run_held(three_finetunes_recipe, "write:2", signals, tmp_path / "out")
    assert code == 130, stderr
    assert events[-1]["event"] == "cancelled"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_the_output_is_in_place_exits_0(
    three_finetunes_recipe: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """Once the output is renamed into place the merge is done: a late signal cannot undo it,
    and the exit code must not say otherwise."""
    code, events, stderr = _run_held(three_finetunes_recipe, "done", [sig], tmp_path / "out")
    assert code == 0, stderr
    assert events[-1]["event"] == "done"
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and (out / "mergetui.toml").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert load_file(out / shard)  # every shard complete and readable
    assert _leftovers(tmp_path) == ["out"]


def test_an_exception_while_the_stages_start_leaves_no_thread_running(
    models: dict[str, Path],
    tmp_path: Path,
    write_recipe: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The root of the old SIGABRT: a KeyboardInterrupt that landed while the loader thread was
    being started escaped before the block that stops and joins the threads, and the loader ran
    on into interpreter shutdown. Whatever is raised there, every started thread must end."""
    from mergetui.engine.executor import run_merge
    from mergetui.engine.plan import build_plan
    from mergetui.recipe import load_recipe

    recipe = write_recipe(
        f'version = 1\n[merge]\nmethod = "ties"\nbase = "{models["base"]}"\ndevice = "cpu"\n'
        f'[[models]]\nmodel = "{models["ft_a"]}"\nweight = 1.0\ndensity = 0.5\n'
        f'[[models]]\nmodel = "{models["ft_c"]}"\nweight = 1.0\ndensity = 0.5\n'
        f'[output]\npath = "{tmp_path / "out"}"\n'
    )
    start = threading.Thread.start

    def start_then_interrupt(thread: threading.Thread) -> None:
        start(thread)
        if thread.name == "mergetui-loader":
            raise KeyboardInterrupt  # as if Ctrl-C landed while the loader was being started

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    with pytest.raises(MergeCancelled):
        run_merge(build_plan(load_recipe(recipe)))
    monkeypatch.undo()
    for thread in threading.enumerate():  # (the C kernels' pool, "mergetui-c", lives on by design)
        if thread.name in ("mergetui-loader", "mergetui-writer"):
            thread.join(timeout=HANG_S)
            assert not thread.is_alive(), f"{thread.name} outlived the merge"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
