"""``mergetui lora extract``: a PEFT LoRA adapter whose ``B @ A`` approximates MODEL − BASE.

A thin command over :mod:`mergetui.engine.extract` (imported inside the command, so ``--help`` does
not import torch). It prints a table of what each module kept (rank, share of the difference's
energy, bytes) and the adapter's size, or the event stream with ``--json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.text import Text

from mergetui.cli.output import (
    JsonOpt,
    console,
    emit,
    err_console,
    guard,
    signals_stop_the_merge,
    start_stream,
)

if TYPE_CHECKING:
    from mergetui.engine.extract import ExtractResult


def extract(
    model: Annotated[
        Path,
        typer.Argument(help="The fine-tuned model folder.", metavar="MODEL", show_default=False),
    ],
    base: Annotated[
        Path,
        typer.Option(
            "--base",
            "-b",
            help="The base model folder MODEL was fine-tuned from.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The adapter folder to write.", show_default=False),
    ],
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            "-r",
            help="The LoRA rank (mergekit's --max-rank); clamped to a module's smaller side. "
            "With --rel-cutoff, the largest rank.",
            show_default=False,
        ),
    ] = None,
    rel_cutoff: Annotated[
        float | None,
        typer.Option(
            "--rel-cutoff",
            help="Keep the singular values above this share of each module's largest one "
            "(e.g. 0.1), instead of a fixed rank: each module gets its own rank.",
            show_default=False,
        ),
    ] = None,
    sv_epsilon: Annotated[
        float,
        typer.Option(
            "--sv-epsilon",
            help="Drop singular values at or below this absolute value (mergekit's).",
        ),
    ] = 0.0,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            "-i",
            help="Only modules whose name matches this regex (repeatable; searched, as mergekit's "
            "--include-regex). The embedding and head are saved whole unless excluded.",
            metavar="REGEX",
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            "-e",
            help="Leave out modules whose name matches (repeatable).",
            metavar="REGEX",
        ),
    ] = None,
    save_module: Annotated[
        list[str] | None,
        typer.Option(
            "--save-module",
            help="Save this module whole (a name or its last part, e.g. lm_head; repeatable).",
            metavar="NAME",
        ),
    ] = None,
    embeddings: Annotated[
        bool,
        typer.Option(
            "--embeddings",
            help="Extract the embedding and the head as LoRAs too (mergekit's --embed-lora); by "
            "default they are saved whole when they changed.",
        ),
    ] = False,
    skip_undecomposable: Annotated[
        bool,
        typer.Option(
            "--skip-undecomposable",
            help="Leave out the modules that cannot be LoRAs (norms) instead of saving them whole.",
        ),
    ] = False,
    distribute_scale: Annotated[
        bool,
        typer.Option(
            "--distribute-scale/--no-distribute-scale",
            help="Split the singular values evenly between A and B (else A takes them all).",
        ),
    ] = True,
    device: Annotated[
        str,
        typer.Option(
            help="Where to compute the SVDs: auto (a GPU when there is one), cpu, cuda, cuda:N."
        ),
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Extract a LoRA adapter from a fine-tune: B·A approximates MODEL − BASE for each linear
    layer (truncated SVD, as mergekit-extract-lora). PEFT loads it with
    PeftModel.from_pretrained(base, OUTPUT)."""
    from mergetui.cli.render import ProgressView
    from mergetui.engine.extract import ExtractOptions, plan_extraction, run_extraction

    if as_json:
        start_stream("lora extract")
    options = ExtractOptions(
        rank=rank,
        rel_cutoff=rel_cutoff,
        sv_epsilon=sv_epsilon,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        embeddings=embeddings,
        save_modules=tuple(save_module or ()),
        skip_undecomposable=skip_undecomposable,
        distribute_scale=distribute_scale,
        device=device,
    )
    with guard(as_json):
        plan = plan_extraction(model, base, output, options, force=force)
        if not as_json:
            for warning in plan.warnings:
                err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
        with signals_stop_the_merge(ignore_after=True) as cancel:
            if as_json:
                run_extraction(plan, force=force, on_event=emit, cancel=cancel)
                return
            lora = sum(m.action.startswith("lora") for m in plan.modules)
            console.print(
                f"extracting {lora} LoRA modules ({len(plan.modules)} modules in all) on "
                f"{plan.options.device} → {plan.output}",
                markup=False,
                highlight=False,
            )
            with ProgressView(console) as view:
                result = run_extraction(plan, force=force, on_event=view.update, cancel=cancel)
    render_extraction(result, plan.warnings)


def render_extraction(result: ExtractResult, shown: list[str]) -> None:
    """The per-module table (what each kept and its bytes), then the totals."""
    from mergetui.cli.render import Column, print_rows
    from mergetui.units import format_bytes, format_duration

    columns = [
        Column("module"),
        Column("kept"),
        Column("energy kept", justify="right"),
        Column("bytes", justify="right", drop=1),
    ]
    rows: list[list[str | Text]] = []
    for module in result.modules:
        if module.action.startswith("lora"):
            kept: str | Text = f"rank {module.rank}"
        elif module.action == "whole":
            kept = "whole"
        else:
            kept = Text(module.action.replace("_", " "), style="dim")
        energy = "" if module.energy is None else f"{module.energy:.2%}"
        rows.append([module.module, kept, energy, format_bytes(module.nbytes)])
    print_rows(console, columns, rows, title="what the adapter keeps of MODEL − BASE")
    for warning in result.warnings:
        if warning not in shown:
            err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    energies = [m.energy for m in result.modules if m.energy is not None]
    whole = sum(m.action == "whole" for m in result.modules)
    lowest = f", lowest energy kept {min(energies):.2%}" if energies else ""
    console.print(
        f"[green]done[/green] in {format_duration(result.elapsed_s)}: rank {result.rank}, "
        f"{len(energies)} LoRA modules{lowest}, {whole} saved whole; "
        f"adapter {format_bytes(result.adapter_bytes)}, peak RSS "
        f"{format_bytes(result.peak_rss_bytes)}"
    )
    console.print(f"output: {result.output_dir}", markup=False, highlight=False)
