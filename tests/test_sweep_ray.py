"""Sweeps on a real Ray cluster: ``ray start --head`` on loopback with two CPUs (two worker
processes), started by the test. The trials of a sweep run there equal those of the same sweep run
in local worker processes; a node that cannot see a file the trials need is named before any
trial. Skipped where Ray is not installed (``pip install 'mergetui[ray]'``), failed instead with
``MERGETUI_REQUIRE_RAY=1`` (as in CI)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hubserver import free_port
from test_cli import run_cli
from test_sweep import project, trial_rows, write_sweep  # noqa: F401 - the fixture

from mergetui.errors import MergeTuiError
from mergetui.sweep.spec import load_sweep

GRID = '"models[0].weight" = [0.4, 0.6, 0.8, 1.0]\n'
TPE_SPACE = (
    '"models[*].weight" = { low = 0.2, high = 1.2 }\n"merge.parameters.normalize" = [true, false]\n'
)


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Ray cluster on loopback with two CPUs, stopped after the module's tests."""
    ray = Path(sys.executable).parent / "ray"
    if importlib.util.find_spec("ray") is None or not ray.exists():
        message = "Ray is not installed here: pip install 'mergetui[ray]' to run the cluster tests"
        if os.environ.get("MERGETUI_REQUIRE_RAY", "0") not in ("", "0"):
            pytest.fail(message)
        pytest.skip(message)
    port = free_port()
    # Ray starts its workers at nice 15: beside the rest of a busy test run they would get a
    # thirtieth of a core (a trial 20x slower); 0 gives them their share, as on a real node
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}
    started = subprocess.run(
        [
            str(ray),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--object-store-memory=200000000",
            f"--temp-dir={tmp_path_factory.mktemp('ray')}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang detector
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=300)


def test_a_sweep_on_a_ray_cluster_gives_the_trials_of_a_local_run(
    project: Path,  # noqa: F811 - the fixture
    ray_address: str,
) -> None:
    """TPE, 4 trials, 2 at once, the same seed: as Ray tasks and in local worker processes, the
    same trials file (the seconds aside); progress comes back from the cluster."""
    settings = 'strategy = "tpe"\ntrials = 4\nseed = 5\nworkers = 2\n'
    local = write_sweep(project, settings + 'output = "./local"\n', TPE_SPACE)
    remote = write_sweep(project, settings + 'output = "./ray"\n', TPE_SPACE, "ray.toml")
    on_ray = run_cli("sweep", str(remote), "--ray", ray_address, "--json", cwd=project)
    assert on_ray.returncode == 0, on_ray.stdout + on_ray.stderr
    events = [json.loads(line) for line in on_ray.stdout.splitlines() if line.strip()]
    assert [e["number"] for e in events if e["event"] == "trial"] == [0, 1, 2, 3]
    assert any(e["event"] == "trial_progress" and e["trial"] == 3 for e in events)
    assert run_cli("sweep", str(local), "--json", cwd=project).returncode == 0
    assert trial_rows(project / "ray") == trial_rows(project / "local")
    assert all(row["objective"] is not None for row in trial_rows(project / "ray"))
    assert (project / "ray" / "best" / "model.safetensors").is_file()


def test_a_node_that_cannot_see_a_file_is_named_before_any_trial(
    project: Path,  # noqa: F811 - the fixture
    ray_address: str,
) -> None:
    """Every node is asked for every local path a trial needs: one it cannot see is an error
    naming the node, the key and the path, before anything is merged."""
    import threading

    from mergetui.sweep.executors import RayExecutor, trial_resources
    from mergetui.sweep.work import trial_sizes

    path = write_sweep(
        project, 'strategy = "grid"\noutput = "./out"\n', '"models[0].weight" = [0.5]\n'
    )
    sweep = load_sweep(path)
    sizes = trial_sizes(sweep, "cpu")
    resources = trial_resources(sizes, "cpu")
    assert resources.gpus == 0 and resources.cpus == 1
    assert resources.memory == sizes.merge_peak_bytes + sizes.scoring_bytes > sizes.output_bytes
    assert trial_resources(sizes, "cuda").gpus == 1
    (project / "tasks.jsonl").rename(project / "moved.jsonl")  # as if not on shared storage
    with pytest.raises(MergeTuiError) as info:
        RayExecutor(sweep, "cpu", threading.Event(), None, 2, ray_address, sizes)
    import ray

    ray.shutdown()
    message = str(info.value)
    assert message.count("\nnode ") == 1  # the one node, by its address and host name
    assert "sweep.objective.tasks.add" in message
    assert str(project / "tasks.jsonl") in message and "shares" in message
    assert not (project / "out" / "trials").exists()


def test_ctrl_c_cancels_the_ray_tasks_and_the_sweep_resumes(
    project: Path,  # noqa: F811 - the fixture
    ray_address: str,
) -> None:
    """A trial held on the cluster (a pause point, sent to the tasks): Ctrl-C cancels the tasks
    in flight and exits as interrupted; the same command then runs every trial."""
    import signal
    import time

    from test_cli import EXE

    path = write_sweep(project, 'strategy = "grid"\noutput = "./out"\nworkers = 2\n', GRID)
    held = project / "out" / "trials" / "0001" / "model.safetensors"
    process = subprocess.Popen(
        [*EXE, "sweep", str(path), "--ray", ray_address, "--json"],
        cwd=project,
        env={**os.environ, "MERGETUI_PAUSE_AT": "trial-merged:2"},  # trial 1 waits, merged
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300  # a hang detector
    while not held.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert held.is_file()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    rows = trial_rows(project / "out") if (project / "out" / "trials.jsonl").exists() else []
    assert len(rows) < 4 and 1 not in [row["number"] for row in rows]
    resumed = run_cli("sweep", str(path), "--ray", ray_address, "--json", cwd=project)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert sorted(row["number"] for row in trial_rows(project / "out")) == [0, 1, 2, 3]  # type: ignore[type-var]
