"""Background merges and sweeps that outlive the UI that started them.

A merge or a sweep started from the TUI must survive a dropped SSH session, and the next
``mergetui`` must find it again. So the TUI does not own the process; it starts a small supervisor
(``python -m mergetui.jobs FOLDER``) in its own session, away from the terminal, and that
supervisor runs ``mergetui run RECIPE --json`` (a merge) or ``mergetui sweep SWEEP --json`` (a
sweep) with its events going to a file. Everything about a job lives in one folder under the state
directory:

- ``job.json``: the supervisor's pid and start time (to tell it from a recycled pid), the output
  (a sweep's: its output folder) and the ``kind`` (``merge`` or ``sweep``);
- ``recipe.toml``: the recipe, with absolute paths (a sweep's starting recipe);
- ``sweep.toml``: a sweep's file (its ``recipe`` is the ``recipe.toml`` beside it); written before
  the supervisor starts, so the supervisor knows what to run without waiting for ``job.json``;
- ``restart``: beside it when the sweep starts over (``--restart``: the output's trials of another
  version of the sweep are deleted);
- ``events.jsonl``: the progress events, one JSON object per line (what ``--json`` prints);
- ``stderr.log``: the child's error output;
- ``exit.json``: written by the supervisor when the merge or sweep ends (its exit code);
- ``cancel``: written before a cancel signal, so a cancel is known even if it lands early;
- ``seen``: written once a UI has shown the outcome, so a finished job is offered back once.

Nothing here imports torch or Textual: the UI reads the files, and scripts can too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import psutil

from mergetui.errors import EXIT_INTERRUPTED
from mergetui.events import (
    CancelledEvent,
    DoneEvent,
    ErrorEvent,
    Event,
    EventFormatError,
    SweptEvent,
    parse_event_line,
)
from mergetui.logs import log_dir

#: What a job can be: still merging, or one of the ways a merge ends.
RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"
#: What a job runs: ``mergetui run`` on its recipe, or ``mergetui sweep`` on its sweep file.
MERGE, SWEEP = "merge", "sweep"
SWEEP_FILE = "sweep.toml"
RESTART_FILE = "restart"  # beside sweep.toml: the sweep runs with --restart
#: finished jobs kept (their logs and events) before the oldest are deleted
KEEP_JOBS = 20
log = logging.getLogger(__name__)


def jobs_dir() -> Path:
    """Where job folders live: ``runs/`` beside the log, so one place holds all the state."""
    return log_dir() / "runs"


@dataclass
class JobOutcome:
    state: str
    message: str
    exit_code: int | None = None


@dataclass
class Job:
    """One background merge or sweep, read from its folder (any process may read it)."""

    folder: Path

    @cached_property
    def info(self) -> dict[str, Any]:
        """``job.json``, read once: it is written before the job is handed out and never changes."""
        return json.loads((self.folder / "job.json").read_text(encoding="utf-8"))

    @property
    def kind(self) -> str:
        """``merge`` or ``sweep`` (jobs written before sweeps existed have no kind: merges)."""
        return str(self.info.get("kind", MERGE))

    @property
    def recipe_file(self) -> Path:
        return self.folder / "recipe.toml"

    @property
    def sweep_file(self) -> Path:
        return self.folder / SWEEP_FILE

    @property
    def events_file(self) -> Path:
        return self.folder / "events.jsonl"

    @property
    def stderr_file(self) -> Path:
        return self.folder / "stderr.log"

    @property
    def output(self) -> str:
        return str(self.info.get("output", ""))

    @property
    def started(self) -> float:
        return float(self.info.get("started", 0.0))

    def supervisor_alive(self) -> bool:
        """True while the supervisor process of this job runs (a recycled pid does not count)."""
        info = self.info
        try:
            process = psutil.Process(int(info["pid"]))
            return (
                abs(process.create_time() - float(info["pid_created"])) < 1.0
                and process.status() != psutil.STATUS_ZOMBIE
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
            return False

    def outcome(self) -> JobOutcome:
        """Running, or how it ended and why, from the exit record (or its absence)."""
        exit_file = self.folder / "exit.json"
        cancelled = (self.folder / "cancel").exists()
        if not exit_file.exists():
            if self.supervisor_alive():
                return JobOutcome(RUNNING, "sweeping" if self.kind == SWEEP else "merging")
            if not exit_file.exists():  # it may have finished between the two looks
                if cancelled:
                    return JobOutcome(CANCELLED, f"cancelled before the {self.kind} started")
                return JobOutcome(
                    FAILED,
                    f"the {self.kind} process was killed without a trace (out of memory, or a "
                    f"reboot?); see {self.stderr_file}",
                )
        code = int(json.loads(exit_file.read_text(encoding="utf-8"))["exit_code"])
        last = self._last_event()
        if code == 0 or isinstance(last, (DoneEvent, SweptEvent)):
            # a cancel that lands after the output is complete cannot undo it: say so
            return JobOutcome(DONE, self._done_message(last), code)
        if cancelled or code in (EXIT_INTERRUPTED, -signal.SIGTERM):
            if self.kind == SWEEP:  # the sweep's own words: its finished trials are kept
                said = last.message if isinstance(last, CancelledEvent) else "sweep stopped"
                return JobOutcome(CANCELLED, f"{said} (exit code {code})", code)
            return JobOutcome(
                CANCELLED, f"cancelled (exit code {code}); no partial output is left", code
            )
        return JobOutcome(FAILED, self.failure_summary() or f"exit code {code}", code)

    def _last_event(self) -> Event | None:
        """The last event: ``done`` (a merge) and ``swept`` (a sweep) come only once the work is
        complete and in place."""
        events = self.read_events(0)[0]
        return events[-1] if events else None

    def _done_message(self, last: Event | None) -> str:
        if self.kind != SWEEP:
            return f"merged into {self.output}"
        if not isinstance(last, SweptEvent) or last.best is None:
            return f"swept into {self.output}"
        objective = "?" if last.best_objective is None else f"{last.best_objective:.4f}"
        return (
            f"swept {last.trials_done} trial(s): the best is trial {last.best} "
            f"(objective {objective}), its recipe {last.best_recipe}"
        )

    def failure_summary(self) -> str:
        """The first line of the error the merge reported (its error event, else stderr)."""
        for event in reversed(self.read_events(0)[0]):
            if isinstance(event, ErrorEvent) and event.message:
                return event.message.splitlines()[0]
        errors = self.stderr_text().strip()
        return errors.splitlines()[-1] if errors else ""

    def stderr_text(self) -> str:
        try:
            return self.stderr_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def read_events(self, offset: int) -> tuple[list[Event], int]:
        """The complete event lines after byte ``offset``, and the offset to read from next (a
        line still being written is left for the next read). A line that is not an event of
        this schema (a library printing to stdout, a job of another mergetui version) is
        logged and skipped, so one odd line cannot blind the monitor."""
        try:
            with self.events_file.open("rb") as stream:
                stream.seek(offset)
                chunk = stream.read()
        except FileNotFoundError:
            return [], offset
        end = chunk.rfind(b"\n") + 1
        events = []
        for line in chunk[:end].splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                events.append(parse_event_line(line))
            except EventFormatError as exc:
                log.warning("%s: skipped a line: %s", self.events_file, exc)
        return events, offset + end

    def cancel(self) -> None:
        """Ask the merge or sweep to stop: SIGTERM to the supervisor, which passes it on once (the
        CLI treats it like Ctrl-C: a merge removes its partial output, a sweep keeps its finished
        trials). Returns at once; :meth:`outcome` tells when it has stopped."""
        if (self.folder / "exit.json").exists():
            return  # already over: nothing to stop
        (self.folder / "cancel").write_text(str(time.time()), encoding="utf-8")
        if self.supervisor_alive():
            with contextlib.suppress(ProcessLookupError):  # it ended between the two calls
                os.kill(int(self.info["pid"]), signal.SIGTERM)

    def mark_seen(self) -> None:
        (self.folder / "seen").touch()

    @property
    def seen(self) -> bool:
        return (self.folder / "seen").exists()


def start_job(
    recipe_toml: str,
    output: str,
    *,
    root: Path | None = None,
    sweep_toml: str | None = None,
    restart: bool = False,
) -> Job:
    """Write the job folder and start its supervisor in a new session, detached from this
    terminal, so closing the terminal (or the SSH connection) does not stop the merge.

    With ``sweep_toml`` the job is a sweep of ``recipe_toml``: the sweep file must name
    ``recipe = "recipe.toml"`` (the recipe beside it in the job folder), and ``output`` is the
    sweep's output folder."""
    base = root or jobs_dir()
    base.mkdir(parents=True, exist_ok=True)
    prune_jobs(base)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):  # short, sortable names: the second in a second gets "-2"
        folder = base / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    (folder / "recipe.toml").write_text(recipe_toml, encoding="utf-8")
    if sweep_toml is not None:
        (folder / SWEEP_FILE).write_text(sweep_toml, encoding="utf-8")
        if restart:  # the sweep starts over: its output's earlier trials are deleted
            (folder / RESTART_FILE).write_text("", encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "mergetui.jobs", str(folder)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    info = {
        "pid": process.pid,
        "pid_created": psutil.Process(process.pid).create_time(),
        "started": time.time(),
        "output": output,
        "kind": MERGE if sweep_toml is None else SWEEP,
    }
    temporary = folder / "job.json.tmp"
    temporary.write_text(json.dumps(info), encoding="utf-8")
    temporary.replace(folder / "job.json")
    return Job(folder)


def list_jobs(root: Path | None = None) -> list[Job]:
    """Every job with a readable record, newest first."""
    base = root or jobs_dir()
    if not base.is_dir():
        return []
    jobs = [Job(folder) for folder in base.iterdir() if (folder / "job.json").is_file()]
    return sorted(jobs, key=lambda job: job.started, reverse=True)


def prune_jobs(root: Path | None = None, keep: int = KEEP_JOBS) -> list[Path]:
    """Delete the folders of old jobs: finished ones a UI has shown, beyond the newest ``keep``
    (a running job, or one whose outcome nobody has seen, is never deleted). Returns them."""
    removed = []
    finished = [job for job in list_jobs(root) if job.seen and job.outcome().state != RUNNING]
    for job in finished[keep:]:
        shutil.rmtree(job.folder, ignore_errors=True)
        removed.append(job.folder)
    return removed


def job_to_reattach(root: Path | None = None) -> Job | None:
    """The newest job still running, or finished without a UI having shown its outcome."""
    for job in list_jobs(root):
        if job.outcome().state == RUNNING or not job.seen:
            return job
    return None


class _Forwarder:
    """Passes one cancel (SIGTERM) on to the merge, whenever it arrives: before the merge has
    started (then it is never started), while it starts, or while it runs. Exactly one signal
    reaches the merge, so a second cannot interrupt the removal of its partial output."""

    def __init__(self) -> None:
        self.requested = False
        self.sent = False
        self.child: subprocess.Popen[bytes] | None = None

    def on_signal(self, signum: int, frame: object) -> None:
        self.requested = True
        self.forward()

    def forward(self) -> None:
        child = self.child
        if self.requested and not self.sent and child is not None and child.poll() is None:
            self.sent = True
            child.send_signal(signal.SIGTERM)


def supervise(folder: Path) -> int:
    """Run the merge (or sweep) of one job folder and record its exit code (the supervisor's body).

    A cancel is a SIGTERM to this process, which forwards it to the merge (see
    :class:`_Forwarder`) and lives on to record how the merge ended.
    """
    forwarder = _Forwarder()
    signal.signal(signal.SIGTERM, forwarder.on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for _ in range(100):  # the parent writes job.json just after starting us
        if (folder / "job.json").exists():
            break
        time.sleep(0.02)
    if (folder / SWEEP_FILE).is_file():  # written before this process started: no race
        command = [sys.executable, "-m", "mergetui", "sweep", str(folder / SWEEP_FILE), "--json"]
        if (folder / RESTART_FILE).is_file():
            command.append("--restart")
    else:
        command = [sys.executable, "-m", "mergetui", "run", str(folder / "recipe.toml"), "--json"]
    with (
        (folder / "events.jsonl").open("wb") as events,
        (folder / "stderr.log").open("wb") as errors,
    ):
        if forwarder.requested or (folder / "cancel").exists():
            code = EXIT_INTERRUPTED
        else:
            forwarder.child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=events,
                stderr=errors,
                restore_signals=True,
            )
            forwarder.forward()  # a cancel that arrived while the merge was being started
            code = forwarder.child.wait()
    temporary = folder / "exit.json.tmp"
    temporary.write_text(json.dumps({"exit_code": code, "ended": time.time()}), encoding="utf-8")
    temporary.replace(folder / "exit.json")
    return code


if __name__ == "__main__":
    sys.exit(supervise(Path(sys.argv[1])))
