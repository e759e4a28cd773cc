"""``mergetui compare`` and ``mergetui eval``: parse, call :mod:`mergetui.evaluate`, render."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from mergetui.cli.output import JsonOpt, console, emit, err_console, guard, start_stream
from mergetui.errors import UsageError
from mergetui.evaluate.rows import retained_summary, score_rows
from mergetui.events import TokenEvent

ModelsArg = Annotated[
    list[str] | None, typer.Argument(help="Models: folders or Hub ids (org/name[@rev]).")
]
RecipeOpt = Annotated[
    Path | None,
    typer.Option("--recipe", help="A merge's mergetui.toml: the output, its base and its models."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]


def _models(
    models: list[str] | None, recipe: Path | None
) -> tuple[list[str], list[Path], str | None, list[str]]:
    """Names and folders of the models, and (from a recipe) which is merged and its parents."""
    from mergetui.evaluate.lineup import Lineup, recipe_lineup, short_name
    from mergetui.evaluate.models import model_path

    lineup = Lineup()
    if recipe is not None:
        from mergetui.recipe import load_recipe

        lineup = recipe_lineup(load_recipe(recipe))
    for model in models or []:
        lineup.add(short_name(model), model_path(model))
    if not lineup.names:
        raise UsageError("name at least one model, or --recipe OUTPUT/mergetui.toml")
    return lineup.names, lineup.paths, lineup.merged, lineup.parents


def compare(
    models: ModelsArg = None,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="A file with one prompt per line.")
    ] = None,
    recipe: RecipeOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int = 0,
    no_chat_template: Annotated[
        bool, typer.Option("--no-chat-template", help="Send raw text.")
    ] = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The same prompts through each model, side by side, with tokens/s."""
    from mergetui.engine.plan import resolve_device
    from mergetui.evaluate.compare import compare as run_compare
    from mergetui.evaluate.generation import GenerationSettings

    if as_json:
        start_stream("compare")
    with guard(as_json):
        prompts = list(prompt or [])
        if prompt_file is not None:
            if not prompt_file.is_file():
                raise UsageError(f"--prompt-file: not found: {prompt_file}")
            from_file = [
                p for p in prompt_file.read_text(encoding="utf-8").splitlines() if p.strip()
            ]
            if not from_file:
                raise UsageError(f"--prompt-file {prompt_file} has no prompts (one per line)")
            prompts += from_file
        if not prompts:
            raise UsageError("give at least one --prompt or a --prompt-file")
        names, paths, _, _ = _models(models, recipe)
        settings = GenerationSettings(
            max_new_tokens, temperature, top_p, seed, not no_chat_template
        )

        def stream(name: str, index: int, piece: str) -> None:
            if as_json:
                emit(TokenEvent(model=name, prompt=index, text=piece))

        if not as_json:
            err_console.print(f"generating with {len(names)} model(s)…")
        result = run_compare(
            names, paths, prompts, settings, device=resolve_device(device), on_text=stream
        )
    if as_json:
        emit(result.to_event())
        return
    for index, text in enumerate(prompts):
        table = Table(title=f"prompt {index + 1}: {text!r}", show_lines=True)
        for name in names:
            answer = result.answers[(name, index)]
            table.add_column(f"{name}\n{answer.tokens_per_s:.0f} tok/s", overflow="fold")
        table.add_row(*[result.answers[(n, index)].text for n in names])
        console.print(table)


def evaluate(
    models: ModelsArg = None,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="NAME=FILE.jsonl (prompt/answer rows).")
    ] = None,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="NAME=FILE.txt, scored by perplexity.")
    ] = None,
    recipe: RecipeOpt = None,
    merged: Annotated[
        str | None, typer.Option(help="Which model is the merge (the others are its parents).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Score only the first N rows or windows.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template")] = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
) -> None:
    """Score models on task files; for a merge, the share of each specialist's score it kept."""
    from mergetui.engine.plan import resolve_device
    from mergetui.evaluate.evaluation import evaluate as run_eval
    from mergetui.evaluate.tasks import parse_task_option

    with guard(as_json):
        tasks = [parse_task_option(t, "answers") for t in task or []]
        tasks += [parse_task_option(t, "perplexity") for t in text or []]
        if not tasks:
            raise UsageError("give at least one --task NAME=FILE.jsonl or --text NAME=FILE.txt")
        names, paths, merged_name, parents = _models(models, recipe)
        if merged is not None:
            from mergetui.evaluate.lineup import short_name

            short = short_name(merged)
            if short not in names:
                raise UsageError(
                    f"--merged {merged!r} is not one of the models: {', '.join(names)}"
                )
            merged_name, parents = short, [n for n in names if n != short]
        quiet = as_json or as_csv
        with _EvalProgress(enabled=not quiet) as progress:
            table = run_eval(
                names,
                paths,
                tasks,
                device=resolve_device(device),
                merged=merged_name,
                parents=parents,
                batch_size=batch_size,
                limit=limit,
                chat_template=not no_chat_template,
                on_progress=progress.update if not quiet else None,
            )
    if as_json:
        print(json.dumps(table.to_dict(), indent=2))
    elif as_csv:
        print(table.to_csv(), end="")
    else:
        render_eval(table)


class _EvalProgress:
    """One progress bar per (model, task) while scoring, on stderr."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.enabled = enabled
        self._bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err_console
        )
        self._tasks: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> _EvalProgress:
        if self.enabled:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bars.stop()

    def update(self, model: str, task: str, done: int, total: int) -> None:
        key = (model, task)
        if key not in self._tasks:
            self._tasks[key] = self._bars.add_task(f"{model} · {task}", total=total)
        self._bars.update(self._tasks[key], completed=done)


def render_eval(table: Any) -> None:
    """The scores as a table (rows from :func:`score_rows`, shared with the TUI) and the verdict."""
    grid = Table(title="scores (accuracy: higher is better; perplexity: lower is better)")
    grid.add_column("model", no_wrap=True)
    for task in table.tasks:
        grid.add_column(f"{task.name}\n{task.metric}", justify="right")
    styles = {"model": "", "merged": "bold", "retained": "italic"}
    for row in score_rows(table):
        grid.add_row(Text(row.label, styles[row.kind]), *row.cells)
    console.print(grid)
    summary = retained_summary(table)
    if summary is not None:
        console.print(summary)
