"""``mergetui jobs``: the background merges and sweeps the TUI started (the headless side of
reattaching)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.text import Text

from mergetui.cli.output import JsonOpt, console, guard
from mergetui.cli.render import Cell, Column, print_rows
from mergetui.errors import UsageError
from mergetui.events import PlanEvent, ProgressEvent, TrialEvent
from mergetui.jobs import RUNNING, SWEEP, Job, jobs_dir, list_jobs

#: How long ``jobs cancel`` waits to report how the job ended (it says "running" if still going).
CANCEL_WAIT_S = 60.0

jobs_app = typer.Typer(
    help="Background merges and sweeps started from the TUI: list them, or cancel one.\n\n"
    "Piped, the list is one tab-separated line per job, paths uncut: "
    "job, started, state, progress, output, folder.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def _progress(job: Job) -> str:
    """``done/total tensors`` from a merge's newest progress event, ``done/total trials`` from a
    sweep's trials, or "" before the first."""
    events = job.read_events(0)[0]
    if job.kind == SWEEP:
        trials = [e for e in events if isinstance(e, TrialEvent)]
        return f"{len(trials)}/{trials[-1].trials_total} trials" if trials else ""
    for event in reversed(events):
        if isinstance(event, ProgressEvent):
            return f"{event.tensors_done}/{event.tensors_total} tensors"
        if isinstance(event, PlanEvent):
            return f"0/{event.tensors_total} tensors"
    return ""


@jobs_app.callback()
def list_command(context: typer.Context, as_json: JsonOpt = False) -> None:
    """List background merges and sweeps, newest first: state, progress, output and job folder.

    Piped: one tab-separated line per job, paths uncut.
    Fields: job, started, state, progress (tensors or trials), output, folder.
    """
    if context.invoked_subcommand is not None:
        return
    jobs = list_jobs()
    rows = []
    for job in jobs:
        outcome = job.outcome()
        rows.append(
            {
                "job": job.folder.name,
                "kind": job.kind,
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.started)),
                "state": outcome.state,
                "progress": _progress(job),
                "message": outcome.message,
                "output": job.output,
                "folder": str(job.folder),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no background merges or sweeps in {jobs_dir()}")
        return
    colours = {"running": "cyan", "done": "green", "cancelled": "yellow"}
    columns = [
        Column("job"),
        Column("started", drop=1),
        Column("state"),
        Column("progress", "right", drop=2),
        Column("output", path=True),
        Column("folder", path=True),
    ]
    cells: list[list[Cell]] = [
        [
            row["job"],
            row["started"],
            Text(row["state"], colours.get(row["state"], "red")),
            row["progress"],
            row["output"],
            row["folder"],
        ]
        for row in rows
    ]
    print_rows(console, columns, cells, f"background merges and sweeps in {jobs_dir()}")
    if console.is_terminal:
        console.print(
            "each job folder holds its recipe (a sweep's: sweep.toml too), events.jsonl (the "
            "--json events) and stderr.log"
        )


@jobs_app.command()
def cancel(
    job: Annotated[str, typer.Argument(help="The job's name (from `mergetui jobs`), or `latest`.")],
) -> None:
    """Cancel a running background merge (its partial output is removed) or sweep (its finished
    trials are kept)."""
    with guard():
        found = list_jobs()
        chosen = found[0] if job == "latest" and found else None
        chosen = chosen or next((j for j in found if j.folder.name == job), None)
        if chosen is None:
            raise UsageError(f"no background merge named {job!r}; `mergetui jobs` lists them")
        if chosen.outcome().state != RUNNING:
            raise UsageError(f"{chosen.folder.name} is not running ({chosen.outcome().state})")
        chosen.cancel()
        deadline = time.monotonic() + CANCEL_WAIT_S  # a merge stops within a tensor, usually <1 s
        while chosen.outcome().state == RUNNING and time.monotonic() < deadline:
            time.sleep(0.1)
    outcome = chosen.outcome()
    console.print(f"{chosen.folder.name}: {outcome.state}: {outcome.message}")
