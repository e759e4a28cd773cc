"""``mergetui sweep`` on real tiny models: the sweep file's validation, grid and TPE searches that
merge and score every trial, the best merge replayed bit for bit from ``best.toml``, outputs beyond
``keep`` deleted, a killed sweep resumed without repeating finished trials, and a changed sweep
file refused unless ``--restart``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from test_cli import EXE, run_cli

from mergetui.errors import RecipeError
from mergetui.sweep.spec import Choice, Range, load_sweep

#: answers the tiny random models get right or wrong at random: enough for a score to exist
TASK_ROWS = [
    {"prompt": "1+1=", "answer": "2"},
    {"prompt": "2+2=", "answer": "4"},
    {"prompt": "r:ab=", "answer": "ba"},
]


@pytest.fixture
def project(tmp_path: Path, models: dict[str, Path]) -> Path:
    """A folder with a TIES recipe over two fine-tunes and a task file."""
    (tmp_path / "tasks.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in TASK_ROWS), encoding="utf-8"
    )
    (tmp_path / "base.toml").write_text(
        textwrap.dedent(
            f"""\
            version = 1
            [merge]
            method = "ties"
            base = "{models["base"]}"
            dtype = "float32"
            device = "cpu"
            [merge.parameters]
            normalize = true
            [[models]]
            model = "{models["ft_a"]}"
            weight = 1.0
            density = 0.5
            [[models]]
            model = "{models["ft_c"]}"
            weight = 1.0
            density = 0.5
            [output]
            path = "./merged"
            """
        ),
        encoding="utf-8",
    )
    return tmp_path


def write_sweep(folder: Path, sweep: str, space: str, name: str = "sweep.toml") -> Path:
    path = folder / name
    path.write_text(
        'version = 1\nrecipe = "base.toml"\n[sweep]\n'
        + textwrap.dedent(sweep)
        + '[sweep.objective]\ntasks = { add = "tasks.jsonl" }\nlimit = 3\n[sweep.space]\n'
        + textwrap.dedent(space),
        encoding="utf-8",
    )
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_sweep(path)
    return info.value.problems


def test_a_valid_sweep_file_is_read_into_dimensions(project: Path) -> None:
    sweep = load_sweep(
        write_sweep(
            project,
            'strategy = "tpe"\ntrials = 5\n',
            '"merge.method" = ["ties", "task_arithmetic"]\n'
            '"models[*].weight" = { low = 0.2, high = 1.2 }\n'
            '"merge.parameters.normalize" = [true, false]\n',
        )
    )
    keys = [d.key for d in sweep.dimensions]
    assert keys == [
        "merge.method",
        "models[0].weight",
        "models[1].weight",
        "merge.parameters.normalize",
    ]
    assert sweep.dimensions[1].domain == Range(0.2, 1.2)
    assert sweep.dimensions[3].domain == Choice((True, False))
    assert sweep.methods == ("ties", "task_arithmetic")


def test_every_problem_of_a_sweep_file_is_named_before_anything_runs(project: Path) -> None:
    path = write_sweep(
        project,
        'strategy = "tpe"\ntrials = 0\nworkrs = 2\n',
        '"merge.method" = ["ties", "tie"]\n'
        '"models[*].densty" = { low = 0.1, high = 1 }\n'
        '"models[*].weight" = { low = 1.0, high = 0.5 }\n'
        '"merge.parameters.density" = [0.5]\n'
        '"models[*].epsilon" = { low = 0.1, high = 0.2 }\n',
    )
    path.write_text(path.read_text().replace('"tasks.jsonl"', '"missing.jsonl"'))
    found = problems_of(path)
    text = "\n".join(found)
    assert "sweep.workrs: unknown key" in text
    assert "sweep.trials: a whole number >= 1, not 0" in text
    assert "sweep.space.'merge.method': unknown method 'tie' (did you mean `ties`?)" in text
    assert "sweep.objective.tasks.add: file not found" in text
    # a space over one method (the list above is invalid): ties' parameters are checked
    path = write_sweep(
        project,
        "trials = 2\n",
        '"models[*].densty" = { low = 0.1, high = 1 }\n'
        '"models[*].weight" = { low = 1.0, high = 0.5 }\n'
        '"models[*].epsilon" = { low = 0.1, high = 0.2 }\n'
        '"merge.parameters.normalize" = { low = 0, high = 1 }\n'
        '"models[*].density" = { low = 0.5, high = 1.5 }\n',
    )
    text = "\n".join(problems_of(path))
    assert "'models[*].densty': densty is a parameter of none of the methods swept (ties)" in text
    assert "the range is empty (low 1.0 is not below high 0.5)" in text
    assert "'models[*].epsilon': epsilon is a parameter of none of the methods swept" in text
    assert "normalize is true or false; give [true, false]" in text
    assert "'models[*].density': 1.5 is outside density's range" in text


def test_a_method_the_recipe_cannot_take_is_refused_up_front(project: Path) -> None:
    """slerp merges exactly two models and wants t: the recipe (base + two models) makes it a
    recipe error, found from the sweep file alone."""
    found = problems_of(
        write_sweep(project, "trials = 2\n", '"merge.method" = ["ties", "slerp"]\n')
    )
    assert any(p.startswith("sweep.space: with merge.method = 'slerp': ") for p in found), found


def test_grid_needs_steps(project: Path) -> None:
    found = problems_of(
        write_sweep(
            project, 'strategy = "grid"\n', '"models[*].weight" = { low = 0.2, high = 1 }\n'
        )
    )
    assert "a grid needs a list of values or a range with a step" in found[0]


def test_grid_sweep_merges_scores_and_keeps_the_best(project: Path) -> None:
    """A grid of 2 methods × 2 weights: 4 trials (task_arithmetic ignores density, so nothing
    repeats); trials.jsonl has each, best.toml replays best/ bit for bit, and with keep = 2 one
    other output is kept, the rest deleted."""
    path = write_sweep(
        project,
        'strategy = "grid"\noutput = "./out"\nkeep = 2\n',
        '"merge.method" = ["ties", "task_arithmetic"]\n'
        '"models[0].weight" = { low = 0.5, high = 1.0, step = 0.5 }\n',
    )
    result = run_cli("sweep", str(path), "--json", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    trials = [e for e in events if e["event"] == "trial"]
    assert [e["number"] for e in trials] == [0, 1, 2, 3]
    assert {(t["values"]["merge.method"], t["values"]["models[0].weight"]) for t in trials} == {
        ("ties", 0.5),
        ("ties", 1.0),
        ("task_arithmetic", 0.5),
        ("task_arithmetic", 1.0),
    }
    assert all(t["objective"] is not None and "add" in t["scores"] for t in trials)
    assert events[-1]["event"] == "swept" and events[-1]["trials_done"] == 4
    out = project / "out"
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert (out / "trials.csv").read_text().splitlines()[0].startswith("trial,merge.method")
    best = events[-1]["best"]
    kept = sorted(p.name for p in (out / "trials").iterdir())
    assert len(kept) == 1 and int(kept[0]) != best  # keep = 2: the best and one more
    replay = run_cli("run", str(out / "best.toml"), "-o", str(project / "replay"), cwd=project)
    assert replay.returncode == 0, replay.stderr
    assert (out / "best" / "model.safetensors").read_bytes() == (
        project / "replay" / "model.safetensors"
    ).read_bytes()
    # the same command again: everything is done, nothing is merged again
    again = run_cli("sweep", str(path), "--json", cwd=project)
    assert again.returncode == 0
    assert not [line for line in again.stdout.splitlines() if '"event":"trial"' in line]
    assert len((out / "trials.jsonl").read_text().splitlines()) == 4


def paused_sweep(
    project: Path, path: Path, moment: str, *args: str, **popen: Any
) -> subprocess.Popen[str]:
    """``mergetui sweep PATH ARGS`` started and held at the pause point ``moment`` (see
    :mod:`mergetui.pauses`); ``popen`` adds to the environment (``env``) or to Popen."""
    env = {**os.environ, "MERGETUI_PAUSE_AT": moment, "COLUMNS": "160", **popen.pop("env", {})}
    process = subprocess.Popen(
        [*EXE, "sweep", str(path), *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 300  # a hang detector
    for line in process.stderr:
        if f"paused at {moment}" in line or time.monotonic() > deadline:
            break
    return process


def test_a_killed_tpe_sweep_resumes_and_a_changed_file_needs_restart(project: Path) -> None:
    path = write_sweep(
        project,
        'strategy = "tpe"\ntrials = 3\nseed = 1\noutput = "./out"\n',
        '"models[*].weight" = { low = 0.2, high = 1.2 }\n"merge.parameters.normalize" = [true, false]\n',
    )
    process = paused_sweep(project, path, "trial-merged:2", "--json")
    process.send_signal(signal.SIGKILL)  # no chance to clean up: as a power cut would
    process.wait(timeout=60)
    out = project / "out"
    assert len((out / "trials.jsonl").read_text().splitlines()) == 1  # trial 0 finished
    resumed = run_cli("sweep", str(path), "--json", cwd=project)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # trial 0 kept, the killed one redone, one more
    assert rows[0]["number"] == 0 and len({r["number"] for r in rows}) == 3
    done = [e for e in resumed.stdout.splitlines() if '"event":"trial"' in e]
    assert len(done) == 2
    # a changed sweep file is refused, then --restart starts over
    path.write_text(path.read_text().replace("trials = 3", "trials = 1"))
    refused = run_cli("sweep", str(path), cwd=project)
    assert refused.returncode == 2
    assert "--restart" in refused.stderr + refused.stdout
    restarted = run_cli("sweep", str(path), "--restart", "--json", cwd=project)
    assert restarted.returncode == 0, restarted.stderr
    assert len((out / "trials.jsonl").read_text().splitlines()) == 1


def test_sweep_help_is_listed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mergetui", "sweep", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "SWEEP" in result.stdout
    text = " ".join(result.stdout.split())
    assert "mergetui[ray]" in text and "[sweep]" in text  # not eaten as markup


def test_the_plain_display_lists_trials_and_the_best(project: Path) -> None:
    """Without --json: a line per trial (values, objective, timings) and the best trials' table
    with the command that replays the best."""
    path = write_sweep(
        project, 'strategy = "grid"\noutput = "./plain"\n', '"models[0].weight" = [0.5]\n'
    )
    result = run_cli("sweep", str(path), cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    assert "trial 0 [1/1] models[0].weight = 0.5" in text
    assert "→ objective" in text and "merge" in text and "eval" in text
    assert f"best: trial 0, replay with `mergetui run {project / 'plain' / 'best.toml'}" in text


def trial_rows(out: Path) -> list[dict[str, object]]:
    """``trials.jsonl`` without the seconds, which differ from run to run."""
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    for row in rows:
        del row["merge_s"], row["eval_s"]
    return rows


GRID_SPACE = (
    '"merge.method" = ["ties", "task_arithmetic"]\n'
    '"models[0].weight" = { low = 0.5, high = 1.0, step = 0.5 }\n'
)


def test_two_worker_processes_give_the_trials_of_one(project: Path) -> None:
    """workers = 2: trials run two at a time in worker processes, their progress comes back as
    trial_progress events, results are told in trial order, and the trials (values, scores,
    objectives) are those of the same grid run one at a time. The PNG plots are written."""
    parallel = write_sweep(
        project, 'strategy = "grid"\noutput = "./two"\nworkers = 2\n', GRID_SPACE
    )
    serial = write_sweep(project, 'strategy = "grid"\noutput = "./one"\n', GRID_SPACE, "one.toml")
    result = run_cli("sweep", str(parallel), "--json", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [e["number"] for e in events if e["event"] == "trial"] == [0, 1, 2, 3]
    progress = [e for e in events if e["event"] == "trial_progress"]
    assert {e["trial"] for e in progress} == {None, 0, 1, 2, 3}  # None: the parents
    assert any("merging" in e["what"] for e in progress)
    assert run_cli("sweep", str(serial), "--json", cwd=project).returncode == 0
    assert trial_rows(project / "two") == trial_rows(project / "one")
    plots = project / "two" / "plots"
    assert (plots / "objective.png").read_bytes()[:4] == b"\x89PNG"
    assert (plots / "models_0_.weight.png").is_file() and (plots / "merge.method.png").is_file()


def test_ctrl_c_stops_every_worker_and_the_sweep_resumes(project: Path) -> None:
    """Ctrl-C in a terminal reaches the whole process group: the workers ignore it, the driver
    stops them, and the sweep exits as interrupted with no worker left; the same command then
    finishes the grid without repeating a recorded trial."""
    import psutil

    path = write_sweep(project, 'strategy = "grid"\noutput = "./out"\nworkers = 2\n', GRID_SPACE)
    # trial 1, in a worker; the sweep in a process group of its own, as a terminal gives it
    process = paused_sweep(project, path, "trial-merged:2", "--json", start_new_session=True)
    workers = psutil.Process(process.pid).children(recursive=True)
    assert len([w for w in workers if "python" in w.name().lower()]) >= 2
    os.killpg(process.pid, signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive
    recorded = trial_rows(project / "out") if (project / "out" / "trials.jsonl").exists() else []
    assert len(recorded) < 4
    resumed = run_cli("sweep", str(path), "--json", cwd=project)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = trial_rows(project / "out")
    assert rows[: len(recorded)] == recorded
    assert sorted(row["number"] for row in rows) == [0, 1, 2, 3]  # type: ignore[type-var]


def test_the_objective_is_plotted_in_the_terminal(project: Path) -> None:
    from mergetui.sweep.plots import best_so_far, objective_text, parameter_text
    from mergetui.sweep.runner import TrialResult

    trials = [
        TrialResult(0, {"merge.method": "ties"}, {}, 0.5, 0, 0),
        TrialResult(1, {"merge.method": "dare"}, {}, None, 0, 0, "failed"),
        TrialResult(2, {"merge.method": "ties"}, {}, 0.8, 0, 0),
        TrialResult(3, {"merge.method": "dare"}, {}, 0.6, 0, 0),
    ]
    assert best_so_far(trials) == ([0, 2, 3], [0.5, 0.8, 0.6], [0.5, 0.8, 0.8])
    text = objective_text(trials, width=60, height=12)
    assert "objective" in text and "best so far" in text and "\x1b" not in text
    assert len(text.splitlines()) == 12
    by_method = parameter_text(trials, "merge.method", width=60, height=12)
    assert "ties" in by_method and "dare" in by_method
    assert objective_text(trials[1:2]) == ""  # nothing scored yet: nothing to plot


@pytest.mark.parametrize("scratch", ["auto", "disk"])
def test_trials_merge_in_memory_when_they_fit_and_only_kept_ones_reach_the_disk(
    project: Path, scratch: str
) -> None:
    """``auto`` (tiny models fit): trial 0 is merged into this sweep's folder in /dev/shm, not
    the output folder; the best is copied out, the memory folder is gone at the end, and best/
    still replays bit for bit. ``disk``: the trial merges into the output folder's trials/."""
    from mergetui.sweep.work import memory_folder

    path = write_sweep(
        project,
        f'strategy = "grid"\noutput = "./out"\nscratch = "{scratch}"\n',
        '"models[0].weight" = [0.5, 1.0]\n',
    )
    memory = memory_folder(load_sweep(path))
    release = project / "release"
    process = paused_sweep(
        project, path, "trial-merged:1", env={"MERGETUI_PAUSE_RELEASE": str(release)}
    )
    in_memory = (memory / "0000" / "model.safetensors").is_file()
    on_disk = (project / "out" / "trials" / "0000" / "model.safetensors").is_file()
    release.touch()
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, out + err
    assert (in_memory, on_disk) == ((True, False) if scratch == "auto" else (False, True))
    assert not memory.exists()
    assert ("trials merged on memory" in out) == (scratch == "auto")
    replay = run_cli("run", str(project / "out" / "best.toml"), "-o", str(project / "replay"))
    assert replay.returncode == 0, replay.stderr
    assert (project / "out" / "best" / "model.safetensors").read_bytes() == (
        project / "replay" / "model.safetensors"
    ).read_bytes()


def test_memory_scratch_is_refused_on_a_ray_cluster(project: Path) -> None:
    """Trials on a cluster must land on the shared output folder: said before any connection."""
    path = write_sweep(
        project,
        'strategy = "grid"\noutput = "./out"\nscratch = "memory"\n',
        '"models[0].weight" = [0.5]\n',
    )
    result = run_cli("sweep", str(path), "--ray", "127.0.0.1:9", cwd=project)
    assert result.returncode == 2
    assert 'sweep.scratch: "memory" cannot be used on a Ray cluster' in " ".join(
        (result.stdout + result.stderr).split()
    )


def test_a_stop_in_the_middle_of_a_merge_is_the_sweeps_stop(project: Path) -> None:
    """Ctrl-C while a trial is merging: the merge removes its partial output, and the sweep says
    it stopped with its trials kept (not the merge's own words), exit code 130."""
    path = write_sweep(
        project, 'strategy = "grid"\noutput = "./out"\n', '"models[0].weight" = [0.5]\n'
    )
    process = paused_sweep(project, path, "tensor:2", "--json")  # trial 0, merging
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    last = json.loads(out.splitlines()[-1])
    assert last["event"] == "cancelled" and last["message"].startswith("sweep stopped"), last
    from mergetui.sweep.work import memory_folder

    assert (
        not (project / "out" / "trials").exists() and not memory_folder(load_sweep(path)).exists()
    )
