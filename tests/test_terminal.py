"""The real app in a real terminal: tmux at 80×24, no true colour, NO_COLOR, keyboard only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MergeGate, ties_recipe

HANG_S = 120  # hang detectors only: each wait ends as soon as what it waits for shows

pytestmark = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="SKIPPED LOUDLY: tmux is not installed here"
)


class Tmux:
    """One tmux server of our own (its own socket), so no user session is touched."""

    def __init__(self, name: str) -> None:
        self.socket = name

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=HANG_S
        )

    def screen(self, colours: bool = False) -> str:
        return self("capture-pane", "-p", *(["-e"] if colours else []), "-t", "main").stdout

    def wait_for(self, text: str, timeout_s: float = HANG_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            shown = self.screen()
            if text in shown:
                return shown
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; the screen:\n{self.screen()}")


def test_the_app_in_tmux_at_80x24_without_colour(tmp_path: Path) -> None:
    tmux = Tmux(f"mergetui-test-{os.getpid()}")
    command = (
        f"cd {tmp_path} && exec env TERM=screen COLORTERM= NO_COLOR=1 "
        f"MERGETUI_LOG_DIR={tmp_path / 'state'} {sys.executable} -m mergetui"
    )
    started = tmux("new-session", "-d", "-s", "main", "-x", "80", "-y", "24", command)
    assert started.returncode == 0, started.stderr
    try:
        screen = tmux.wait_for("1 · Models")
        assert "Check" in screen and "f1" in screen.lower()  # the footer fits
        assert "\x1b[38;2;" not in tmux.screen(colours=True)  # no true-colour codes
        tmux("send-keys", "-t", "main", "F1")
        tmux.wait_for("merge order")  # the help of this step
        tmux("send-keys", "-t", "main", "Escape")
        deadline = time.monotonic() + HANG_S  # a lone Escape is told from a key sequence by a delay
        while "merge order" in tmux.screen() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "merge order" not in tmux.screen(), "Escape did not close the help"
        tmux("send-keys", "-t", "main", "-l", "./models/base")
        tmux.wait_for("./models/base")
        tmux("send-keys", "-t", "main", "C-q")
        deadline = time.monotonic() + HANG_S
        while tmux("has-session", "-t", "main").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tmux("has-session", "-t", "main").returncode != 0, "Ctrl+Q did not quit"
    finally:
        tmux("kill-server")
    # what was typed is not lost: the draft was autosaved on the way out
    assert "./models/base" in (tmp_path / "state" / "draft.json").read_text()


def test_a_merge_outlives_the_terminal_that_started_it(
    tmp_path: Path, models: dict[str, Path], write_recipe: object, merge_gate: MergeGate
) -> None:
    """The SSH connection drops: tmux's session is killed, the app gets SIGHUP and dies; the
    merge it started goes on to a complete output, and the next ``mergetui`` finds it."""
    from mergetui.jobs import DONE, RUNNING, list_jobs

    recipe = write_recipe(ties_recipe(models, "merged"))  # type: ignore[operator]
    state = Path(os.environ["MERGETUI_LOG_DIR"])
    tmux = Tmux(f"mergetui-hup-{os.getpid()}")
    command = f"cd {tmp_path} && exec {sys.executable} -m mergetui open {recipe}"
    # the merge waits after its first tensor, so it is surely running when the terminal goes
    hold = [
        arg for key, value in merge_gate.environment.items() for arg in ("-e", f"{key}={value}")
    ]
    started = tmux(
        "new-session", "-d", "-s", "main", "-x", "100", "-y", "30",
        "-e", f"MERGETUI_LOG_DIR={state}", *hold, command,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        tmux.wait_for("1 · Models")
        tmux("send-keys", "-t", "main", "C-n")
        tmux.wait_for("compatible")
        tmux("send-keys", "-t", "main", "C-n")
        tmux.wait_for("3 · Method")
        tmux("send-keys", "-t", "main", "C-r")
        tmux.wait_for("4 · Run")
        deadline = time.monotonic() + HANG_S
        while not list_jobs() and time.monotonic() < deadline:
            time.sleep(0.05)
        [job] = list_jobs()
        assert job.outcome().state == RUNNING
        tmux("kill-session", "-t", "main")  # the terminal goes away, as with a dropped connection
    finally:
        tmux("kill-server")
    merge_gate.release()
    deadline = time.monotonic() + HANG_S
    while job.outcome().state == RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.outcome().state == DONE, (job.outcome(), job.stderr_text())
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not job.seen  # no UI has shown the outcome yet: the next start offers it
