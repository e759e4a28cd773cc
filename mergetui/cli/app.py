"""The ``mergetui`` command. Each command is a few lines over the engine: parse, call, render.

Exit codes: 0 done, 2 invalid recipe or incompatible models, 1 merge failure, 130 interrupted.
Heavy modules (torch, transformers, the engine) are imported inside the commands, so that
``mergetui --help`` starts instantly.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from mergetui import __version__
from mergetui.cli import evaluate as evaluate_commands
from mergetui.cli import sweep as sweep_commands
from mergetui.cli.hub import hub_app
from mergetui.cli.jobs import jobs_app
from mergetui.cli.lora import lora_app
from mergetui.cli.output import (
    JsonOpt,
    console,
    emit,
    err_console,
    fail,
    guard,
    log_path,
    print_download_event,
    signals_stop_the_merge,
    start_stream,
)
from mergetui.errors import EXIT_INTERRUPTED, EXIT_INVALID
from mergetui.logs import setup_logging
from mergetui.methods.registry import METHODS, get_method
from mergetui.pauses import pause_point
from mergetui.units import parse_size

app = typer.Typer(
    name="mergetui",
    help="Merge fine-tuned language models from validated TOML recipes.",
    no_args_is_help=False,
    invoke_without_command=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(hub_app, name="hub")
app.add_typer(jobs_app, name="jobs")
app.add_typer(lora_app, name="lora")
app.command("compare")(evaluate_commands.compare)
app.command("eval")(evaluate_commands.evaluate)
app.command("sweep")(sweep_commands.sweep)

RecipeArg = Annotated[
    Path,
    typer.Argument(
        help="Recipe TOML file, or a mergekit config (.yaml), translated in memory.",
        metavar="RECIPE",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"mergetui {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    context: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Merge fine-tuned language models from validated TOML recipes. With no command, open the
    guided merge TUI."""
    if context.invoked_subcommand is None:
        from mergetui.tui.app import create_app

        create_app().run()


MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory budget of the merge (RAM, and VRAM on a GPU), e.g. 4GiB; overrides "
        "merge.max_memory (default 1GiB). Larger tensors are merged in blocks of rows.",
        metavar="SIZE",
    ),
]


def _load(
    recipe: Path,
    output: Path | None = None,
    device: str | None = None,
    max_memory: str | None = None,
    *,
    adapters: bool = False,
) -> Any:
    """The recipe with the command line's overrides; with ``adapters``, an adapter-merge recipe
    is read too (``run`` and ``check``), else only model merges are."""
    from mergetui.recipe import AdapterRecipe, load_any_recipe, load_recipe

    loaded = load_any_recipe(recipe) if adapters else load_recipe(recipe)
    changes: dict[str, Any] = {}
    if output is not None:
        changes["output_path"] = str(output.expanduser().resolve())
    if device is not None:
        changes["device"] = device
    if max_memory is not None:
        if isinstance(loaded, AdapterRecipe):
            raise typer.BadParameter(
                "an adapter merge reads its factors module by module; --max-memory is for model "
                "merges",
                param_hint="--max-memory",
            )
        try:
            changes["max_memory"] = parse_size(max_memory)
        except ValueError as exc:
            raise typer.BadParameter(
                f"{exc}; e.g. --max-memory 4GiB", param_hint="--max-memory"
            ) from None
    return dataclasses.replace(loaded, **changes) if changes else loaded


@app.command()
def check(recipe: RecipeArg, as_json: JsonOpt = False, max_memory: MaxMemoryOpt = None) -> None:
    """Check a recipe and its models' compatibility from headers only; no weight is read. An
    adapter-merge recipe: its adapters' configs and headers."""
    from mergetui.cli.render import render_adapter_report, render_report
    from mergetui.engine.lora_steps import adapter_report, plan_adapter_recipe
    from mergetui.engine.plan import build_plan
    from mergetui.engine.report import plan_report
    from mergetui.recipe import AdapterRecipe

    with guard(as_json):
        loaded = _load(recipe, max_memory=max_memory, adapters=True)
        if isinstance(loaded, AdapterRecipe):
            adapter_plan = plan_adapter_recipe(loaded, force=True)  # an existing output is fine
            adapter_plan.close()
            report = adapter_report(adapter_plan)
        else:
            plan = build_plan(loaded, fetch=False)
            try:
                report = plan_report(plan)
            finally:
                plan.close()
    if as_json:
        print(json.dumps(report, indent=2))
    elif report.get("kind") == "adapters":
        render_adapter_report(console, report)
    else:
        render_report(console, report)
    raise typer.Exit(0 if report["ok"] else EXIT_INVALID)


@app.command()
def run(
    recipe: RecipeArg,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate, check and print the plan; read no weight.")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="Override merge.device (auto, cpu, cuda, cuda:N).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Override output.path.")
    ] = None,
    max_memory: MaxMemoryOpt = None,
) -> None:
    """Run a merge recipe headlessly (for scripts and batch jobs): a model merge (then, with
    output.lora_rank, its LoRA extraction) or an adapter merge ([adapters])."""
    from mergetui.recipe import AdapterRecipe

    if as_json:
        start_stream("run")
    with guard(as_json):
        recipe_loaded = _load(recipe, output, device, max_memory, adapters=True)
        if isinstance(recipe_loaded, AdapterRecipe):
            _execute_adapters(recipe_loaded, force=force, as_json=as_json, dry_run=dry_run)
        else:
            _execute(recipe_loaded, force=force, as_json=as_json, dry_run=dry_run)


def _execute_adapters(recipe: Any, *, force: bool, as_json: bool, dry_run: bool) -> None:
    """Plan, check and run an adapter-merge recipe, as ``mergetui lora merge`` runs it."""
    from mergetui.cli.lora import run_planned_adapter_merge
    from mergetui.cli.render import render_adapter_report
    from mergetui.engine.lora_steps import adapter_report, plan_adapter_recipe
    from mergetui.events import PlanEvent

    pause_point("before-plan")
    plan = plan_adapter_recipe(recipe, force=force or dry_run)
    if dry_run:
        plan.close()
        report = adapter_report(plan)
        if as_json:
            emit(
                PlanEvent(
                    method=f"adapters ({plan.request.combination})",
                    device=plan.device,
                    output=str(plan.output_dir),
                    tensors_total=plan.tensors_total,
                    bytes_to_read=plan.bytes_to_read,
                    ok=True,
                    dry_run=True,
                    report=report,
                )
            )
        else:
            render_adapter_report(console, report)
        raise typer.Exit(0)
    run_planned_adapter_merge(plan, force=force, as_json=as_json)


def _execute(
    recipe: Any,
    *,
    force: bool,
    as_json: bool = False,
    dry_run: bool = False,
    last_step: bool = True,
) -> Any:
    """Plan, check and run one recipe with progress output; returns the MergeResult. Unless
    ``last_step``, Ctrl-C interrupts what the command does after the merge as usual."""
    from mergetui.cli.lora_extract import render_extraction
    from mergetui.cli.render import DownloadView, ProgressView, render_report
    from mergetui.engine.executor import check_output_location
    from mergetui.engine.lora_steps import merge_and_extract
    from mergetui.engine.plan import build_plan
    from mergetui.engine.report import plan_event
    from mergetui.units import format_bytes, format_duration

    pause_point("before-plan")
    if dry_run:
        plan = build_plan(recipe, fetch=False)
    elif as_json:
        plan = build_plan(recipe, on_download=print_download_event)
    else:
        with DownloadView(console) as downloads:
            plan = build_plan(recipe, on_download=downloads.update)
    if dry_run or plan.errors:
        try:
            event = plan_event(plan, dry_run=dry_run)
        finally:
            plan.close()
        if as_json:
            emit(event)
        else:
            render_report(console, event.report)
        if plan.errors:
            first = plan.errors[0].message.splitlines()[0]
            more = f" (and {len(plan.errors) - 1} more)" if len(plan.errors) > 1 else ""
            fail(f"the models cannot be merged: {first}{more}", EXIT_INVALID, as_json=as_json)
        raise typer.Exit(0)
    try:
        check_output_location(plan, force)
    except BaseException:
        plan.close()
        raise
    for problem in plan.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(problem.message)}", soft_wrap=True)
    with signals_stop_the_merge(ignore_after=last_step) as cancel:
        if as_json:
            return merge_and_extract(plan, force=force, on_event=emit, cancel=cancel).merge
        console.print(
            f"merging {len(plan.tensors)} tensors with {plan.method.name} on "
            f"{plan.device} → {plan.recipe.output_dir}"
        )
        with ProgressView(console) as view:
            both = merge_and_extract(plan, force=force, on_event=view.update, cancel=cancel)
    result = both.merge
    rate = result.bytes_read / result.elapsed_s if result.elapsed_s else 0.0
    console.print(
        f"[green]done[/green] in {format_duration(result.elapsed_s)}: read "
        f"{format_bytes(result.bytes_read)} ({rate / 1e6:.0f} MB/s), wrote "
        f"{format_bytes(result.bytes_written)}, peak RSS {format_bytes(result.peak_rss_bytes)}"
    )
    console.print(f"output: {result.output_dir}")
    if both.extraction is not None:
        render_extraction(both.extraction, [])
    return result


@app.command("open")
def open_recipe(recipe: RecipeArg) -> None:
    """Open a recipe in the guided merge TUI, to tweak and re-run it."""
    from mergetui.tui.app import create_app
    from mergetui.tui.state import RecipeDraft

    with guard():
        draft = RecipeDraft.from_recipe(_load(recipe, adapters=True))  # an [adapters] one too
    create_app(draft=draft).run()


@app.command("import")
def import_config(
    config: Annotated[
        Path, typer.Argument(help="mergekit config (.yaml).", metavar="CONFIG", show_default=False)
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Recipe to write (default: CONFIG with .toml)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing recipe.")] = False,
) -> None:
    """Translate a mergekit config into a recipe TOML (an error names the YAML key and line of
    anything that cannot be expressed)."""
    from mergetui.recipe.mergekit_yaml import mergekit_to_toml

    target = (output or config.with_suffix(".toml")).expanduser()
    with guard():
        if target.exists() and not force:
            fail(f"{target} already exists; pass --force to replace it", EXIT_INVALID)
        try:
            text = config.expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {config}: {exc}", EXIT_INVALID)
        toml_text, notes = mergekit_to_toml(
            text, source_file=str(config), base_dir=Path.cwd(), target_dir=target.resolve().parent
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(toml_text, encoding="utf-8")
    for note in notes:
        err_console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"wrote {target}", markup=False, highlight=False)


@app.command()
def export(
    recipe: RecipeArg,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="mergekit config to write (default: standard output)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a recipe as a mergekit config, to share it with people who use mergekit."""
    from mergetui.recipe.mergekit_yaml import recipe_to_mergekit

    with guard():
        loaded = _load(recipe)
        if output is None:
            sys.stdout.write(recipe_to_mergekit(loaded))
            return
        target = output.expanduser()
        if target.exists() and not force:
            fail(f"{target} already exists; pass --force to replace it", EXIT_INVALID)
        target.write_text(recipe_to_mergekit(loaded, target_dir=Path.cwd()), encoding="utf-8")
    console.print(f"wrote {target}", markup=False, highlight=False)


@app.command()
def methods(
    name: Annotated[str | None, typer.Argument(help="Show only this method.")] = None,
) -> None:
    """List the merge methods and their parameters."""
    from mergetui.cli.render import render_methods

    spec = None
    if name is not None:
        spec = get_method(name)
        if spec is None:
            fail(f"unknown method {name!r}; choose one of {', '.join(METHODS)}", EXIT_INVALID)
    render_methods(console, spec)


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo models, recipe and output go.")
    ] = Path("mergetui-demo"),
    force: Annotated[bool, typer.Option("--force", help="Rebuild the demo from scratch.")] = False,
) -> None:
    """Train small demo models locally (no network), merge them, and show what the merge kept."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mergetui.cli.evaluate import render_eval
    from mergetui.demo import (
        DEMO_RECIPE,
        DEMO_SWEEP,
        TASKS,
        build_demo_models,
        bundled_recipe_text,
    )
    from mergetui.evaluate.evaluation import evaluate
    from mergetui.evaluate.tasks import load_answer_task
    from mergetui.recipe import load_recipe

    with guard():
        root = directory.expanduser().resolve()
        console.print(
            f"demo models in {root / 'models'}: a tiny base and two specialists trained on the CPU "
            "(a minute or two the first time, then cached)"
        )
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=console, transient=True) as bars:
            tasks: dict[str, Any] = {}

            def show(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = bars.add_task(f"training {name}", total=total)
                bars.update(tasks[name], completed=done)

            folders = build_demo_models(root, force=force, on_step=show)
        recipe_path = root / DEMO_RECIPE
        for name in (DEMO_RECIPE, DEMO_SWEEP):
            if force or not (root / name).is_file():
                (root / name).write_text(bundled_recipe_text(name), encoding="utf-8")
        console.print(f"recipe: {recipe_path}")
        result = _execute(load_recipe(recipe_path), force=True, last_step=False)
        console.print("scoring the base, both specialists and the merge on held-out task files…")
        task_files = [load_answer_task(t, root / "tasks" / f"{t}.jsonl") for t in TASKS]
        names = ["base", *[f"ft-{t}" for t in TASKS], "merged"]
        paths = [folders["base"], *[folders[f"ft-{t}"] for t in TASKS], result.output_dir]
        table = evaluate(
            names,
            paths,
            task_files,
            device="cpu",
            merged="merged",
            parents=[f"ft-{t}" for t in TASKS],
            chat_template=False,
        )
    (root / "eval.json").write_text(json.dumps(table.to_dict(), indent=2), encoding="utf-8")
    render_eval(table)
    console.print(
        "load it in Python with:\n  from transformers import AutoModelForCausalLM\n"
        f"  model = AutoModelForCausalLM.from_pretrained({str(result.output_dir)!r})",
        soft_wrap=True,
    )
    console.print(f"replay or tweak the merge with: mergetui run {recipe_path}", soft_wrap=True)
    console.print(
        f"score it again with: mergetui eval --recipe {result.output_dir / 'mergetui.toml'} "
        + " ".join(f"--task {t}={root / 'tasks' / f'{t}.jsonl'}" for t in TASKS)
        + " --no-chat-template",
        soft_wrap=True,
    )
    console.print(
        f"find better parameters with: mergetui sweep {root / DEMO_SWEEP}", soft_wrap=True
    )


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM behaves like Ctrl-C: the merge stops and removes its partial output. Only the
    first one interrupts; later ones are ignored, so they cannot cut that clean-up short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    written = setup_logging()
    log_path[:] = [written] if written is not None else []
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except KeyboardInterrupt:  # raised outside a guarded block
        err_console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
