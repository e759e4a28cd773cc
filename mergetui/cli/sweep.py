"""``mergetui sweep``: parse, call :mod:`mergetui.sweep`, render the trials as they arrive."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mergetui.cli.output import JsonOpt, console, emit, guard, signals_stop_the_merge, start_stream
from mergetui.events import Event, SweptEvent, TrialEvent, TrialProgressEvent


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
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Trials at once (overrides workers in \\[sweep]); the trials depend on it."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help=(
                "Run the trials on this Ray cluster (auto, HOST:PORT); "
                "pip install 'mergetui\\[ray]'."
            ),
        ),
    ] = None,
    plot: Annotated[
        bool, typer.Option(help="Plot the objective in the terminal at the end.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Merge and score many variants of a recipe; keep the best (best.toml, best/)."""
    if as_json:
        start_stream("sweep")
    with guard(as_json):
        from mergetui.sweep.plots import PLOTS_DIR, objective_text
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
        now_bars: dict[int | None, Any] = {}  # one bar per trial in flight

        def show(event: Event) -> None:
            if as_json:
                emit(event)
                if isinstance(event, TrialEvent):
                    finished_trials.add(event.number)
            elif isinstance(event, TrialEvent):
                finished(event.number)
                progress.console.print(_trial_line(event), highlight=False, soft_wrap=True)
                best = "" if event.best_objective is None else f", best {event.best_objective:.4f}"
                progress.update(
                    trials_bar,
                    total=event.trials_total,
                    advance=1,
                    description=f"trials{best}",
                )

        finished_trials: set[int] = set()  # a late message of a finished trial is not shown

        def activity(trial: int | None, what: str, fraction: float | None) -> None:
            if trial in finished_trials:
                return
            if as_json:
                emit(TrialProgressEvent(trial=trial, what=what, fraction=fraction))
                return
            bar = now_bars.get(trial)
            if bar is None:
                bar = now_bars[trial] = progress.add_task(what, total=1.0)
            progress.update(bar, description=what, completed=fraction or 0.0)

        def finished(number: int) -> None:
            finished_trials.add(number)
            bar = now_bars.pop(number, None)
            if bar is not None:
                progress.remove_task(bar)
            parents = now_bars.pop(None, None)  # the parents were scored before any trial
            if parents is not None:
                progress.remove_task(parents)

        if not as_json:
            names = ", ".join(d.key for d in spec.dimensions)
            where = f"on the Ray cluster at {ray or spec.ray}" if ray or spec.ray else "here"
            console.print(
                f"sweep: {spec.strategy}, {spec.trials if spec.strategy != 'grid' else 'every'} "
                f"trial(s) over {names}, {workers or spec.workers} at once {where}; scoring the "
                f"parents first → {spec.output}",
                highlight=False,
                soft_wrap=True,
            )
        with progress, signals_stop_the_merge(ignore_after=False) as cancel:
            state = run_sweep(
                spec,
                restart=restart,
                device=device,
                workers=workers,
                ray=ray,
                on_event=show,
                cancel=cancel,
                on_activity=activity,
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
        if plot and (chart := objective_text(state.trials, width=min(console.width, 100))):
            console.print(Text(chart), highlight=False, soft_wrap=True)
        console.print(f"trials merged on {state.scratch}", highlight=False, soft_wrap=True)
        pngs = spec.output / PLOTS_DIR
        if pngs.is_dir():
            console.print(f"plots: {pngs}", highlight=False, soft_wrap=True)
        if best:
            console.print(
                f"best: trial {best[0].number}, replay with `mergetui run {best_recipe} -o DIR`",
                highlight=False,
                soft_wrap=True,
            )
