"""``mergetui sweep``: parse, call :mod:`mergetui.sweep`, render the trials as they arrive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mergetui.cli.output import JsonOpt, console, emit, guard, signals_stop_the_merge, start_stream
from mergetui.events import Event, SweptEvent, TrialEvent


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_line(event: TrialEvent) -> str:
    values = ", ".join(f"{k} = {_value(v)}" for k, v in event.values.items())
    if event.objective is None:
        outcome = f"failed: {event.message.splitlines()[0] if event.message else '?'}"
    else:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in event.scores.items())
        outcome = f"objective {event.objective:.4f} ({scores})"
    best = (
        "" if event.best_objective is None else f"  best #{event.best} {event.best_objective:.4f}"
    )
    timing = f"merge {event.merge_s:.1f} s, eval {event.eval_s:.1f} s"
    return (
        f"trial {event.number} [{event.number + 1}/{event.trials_total}] {values}\n"
        f"  → {outcome}; {timing}{best}"
    )


def sweep(
    sweep_file: Annotated[
        Path, typer.Argument(help="A sweep file (TOML).", metavar="SWEEP", show_default=False)
    ],
    restart: Annotated[
        bool,
        typer.Option("--restart", help="Delete this sweep's earlier trials and start over."),
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="Override the recipe's device (auto, cpu, cuda, cuda:N).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge and score many variants of a recipe; keep the best (best.toml, best/)."""
    if as_json:
        start_stream("sweep")
    with guard(as_json):
        from mergetui.sweep.runner import run_sweep
        from mergetui.sweep.spec import load_sweep

        spec = load_sweep(sweep_file)

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
            disable=as_json,
            transient=True,
        )
        trials_bar = progress.add_task("trials", total=None)
        now_bar = progress.add_task("starting", total=1.0)

        def show(event: Event) -> None:
            if as_json:
                emit(event)
            elif isinstance(event, TrialEvent):
                progress.console.print(_trial_line(event), highlight=False, soft_wrap=True)
                best = "" if event.best_objective is None else f", best {event.best_objective:.4f}"
                progress.update(
                    trials_bar,
                    total=event.trials_total,
                    advance=1,
                    description=f"trials{best}",
                )

        def activity(what: str, fraction: float | None) -> None:
            progress.update(now_bar, description=what, completed=fraction or 0.0)

        if not as_json:
            names = ", ".join(d.key for d in spec.dimensions)
            console.print(
                f"sweep: {spec.strategy}, {spec.trials if spec.strategy != 'grid' else 'every'} "
                f"trial(s) over {names}; scoring the parents first → {spec.output}",
                highlight=False,
                soft_wrap=True,
            )
        with progress, signals_stop_the_merge(ignore_after=False) as cancel:
            state = run_sweep(
                spec,
                restart=restart,
                device=device,
                on_event=show,
                cancel=cancel,
                on_activity=None if as_json else activity,
            )
        best = state.best()
        best_recipe = spec.output / "best.toml"
        done = SweptEvent(
            trials_done=len(state.trials),
            best=best[0].number if best else None,
            best_objective=best[0].objective if best else None,
            best_recipe=str(best_recipe) if best else None,
            output=str(spec.output),
        )
        if as_json:
            emit(done)
            return
        table = Table(title="best trials", title_justify="left")
        for column in ("trial", "objective", "values"):
            table.add_column(column, overflow="fold")
        for trial in state.best(5):
            values = ", ".join(f"{k} = {_value(v)}" for k, v in trial.values.items())
            table.add_row(str(trial.number), f"{trial.objective:.4f}", values)
        console.print(table)
        if best:
            console.print(
                f"best: trial {best[0].number}, replay with `mergetui run {best_recipe} -o DIR`",
                highlight=False,
                soft_wrap=True,
            )
