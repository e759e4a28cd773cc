"""Background merge jobs: they run detached, report through files, and can be found again."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
from conftest import MergeGate, ties_recipe

from mergetui.events import DoneEvent, TensorEvent
from mergetui.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    RUNNING,
    Job,
    job_to_reattach,
    list_jobs,
    start_job,
)

HANG_S = 120  # hang detectors only: each wait ends as soon as its condition holds


def _wait(job: Job, timeout_s: float = HANG_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job.outcome().state
        if state != RUNNING:
            return state
        time.sleep(0.1)
    raise AssertionError(f"job {job.folder} never ended")


def test_a_job_runs_detached_and_records_events_and_exit(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    job = start_job(
        ties_recipe(models, tmp_path / "out"), str(tmp_path / "out"), root=tmp_path / "runs"
    )
    supervisor = psutil.Process(job.info["pid"])
    assert os.getsid(supervisor.pid) == supervisor.pid != os.getsid(0)  # its own session
    assert job_to_reattach(tmp_path / "runs") is not None
    assert _wait(job) == DONE, job.stderr_text()
    events, offset = job.read_events(0)
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["start", "plan"] and kinds[-1] == "done" and "tensor" in kinds
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].tensors_done == events[-1].tensors_total > 0
    assert job.read_events(offset) == ([], offset)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert job.outcome().exit_code == 0
    # offered back until a UI has shown it, then not
    assert job_to_reattach(tmp_path / "runs") == job
    job.mark_seen()
    assert job_to_reattach(tmp_path / "runs") is None
    assert list_jobs(tmp_path / "runs") == [job]


def test_cancel_stops_the_merge_and_leaves_no_output(
    tmp_path: Path, models: dict[str, Path], merge_gate: MergeGate
) -> None:
    out = tmp_path / "out"
    merge_gate.hold()  # the merge waits after its first tensor: it is surely running when cancelled
    job = start_job(ties_recipe(models, out), str(out), root=tmp_path / "runs")
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline and not any(
        isinstance(e, TensorEvent) for e in job.read_events(0)[0]
    ):
        time.sleep(0.05)
    job.cancel()
    assert _wait(job) == CANCELLED
    assert job.outcome().exit_code == 130
    assert not out.exists() and not list(tmp_path.glob(".out.mergetui-partial-*"))
    assert "cancelled" in job.outcome().message


def test_a_killed_merge_is_reported_failed_not_running(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """An OOM kill takes the merge (and here its supervisor) without a word: the job must say so."""
    out = tmp_path / "out"
    job = start_job(ties_recipe(models, out), str(out), root=tmp_path / "runs")
    os.killpg(job.info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + HANG_S
    while job.supervisor_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    outcome = job.outcome()
    assert outcome.state == FAILED and "killed" in outcome.message
    assert str(job.stderr_file) in outcome.message


def test_a_failing_merge_reports_its_error(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data", encoding="utf-8")
    job = start_job(ties_recipe(models, out), str(out), root=tmp_path / "runs")
    assert _wait(job) == FAILED
    message = job.outcome().message
    assert "--force" in message or "exists" in message, message
    assert (out / "keep.txt").read_text(encoding="utf-8") == "user data"


def test_jobs_command_lists_and_cancels(
    tmp_path: Path, models: dict[str, Path], merge_gate: MergeGate
) -> None:
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    job = start_job(ties_recipe(models, out), str(out))  # in the state folder the CLI reads
    listed = subprocess.run(
        [sys.executable, "-m", "mergetui", "jobs", "--json"], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["job"] == job.folder.name and row["output"] == str(out)
    assert row["state"] in (RUNNING, DONE)
    assert _wait(job) == DONE  # a finished job cannot be cancelled: said, and nothing changes
    finished = subprocess.run(
        [sys.executable, "-m", "mergetui", "jobs", "cancel", job.folder.name],
        capture_output=True,
        text=True,
    )
    assert finished.returncode == 2 and "is not running (done)" in finished.stderr
    assert (out / "model.safetensors").is_file()
    merge_gate.hold()  # the second merge waits after its first tensor: it is running when cancelled
    second = start_job(ties_recipe(models, tmp_path / "second"), str(tmp_path / "second"))
    cancelled = subprocess.run(
        [sys.executable, "-m", "mergetui", "jobs", "cancel", "latest"],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"{second.folder.name}: cancelled" in cancelled.stdout
    assert second.outcome().state == CANCELLED and not (tmp_path / "second").exists()
    unknown = subprocess.run(
        [sys.executable, "-m", "mergetui", "jobs", "cancel", "nope"], capture_output=True, text=True
    )
    assert unknown.returncode == 2 and "no background merge named 'nope'" in unknown.stderr
    table = subprocess.run(
        [sys.executable, "-m", "mergetui", "jobs"], capture_output=True, text=True
    )
    assert table.returncode == 0 and job.folder.name in table.stdout


def test_old_finished_jobs_are_pruned_but_not_running_or_unseen_ones(tmp_path: Path) -> None:
    import json

    from mergetui.jobs import prune_jobs

    root = tmp_path / "runs"
    for index in range(6):  # job folders as finished merges leave them
        folder = root / f"job-{index}"
        folder.mkdir(parents=True)
        (folder / "job.json").write_text(
            json.dumps({"pid": 0, "pid_created": 0, "started": index, "output": "x"})
        )
        (folder / "exit.json").write_text(json.dumps({"exit_code": 0}))
        if index != 0:  # job-0 finished while nobody watched: kept until a UI shows it
            (folder / "seen").touch()
    removed = prune_jobs(root, keep=2)
    assert sorted(p.name for p in removed) == ["job-1", "job-2", "job-3"]
    assert sorted(p.name for p in root.iterdir()) == ["job-0", "job-4", "job-5"]
