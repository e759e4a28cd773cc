"""``mergetui lora``: work on PEFT LoRA adapters without loading their base model.

``lora merge`` combines adapters of one base into one adapter (:mod:`mergetui.engine.adapter_merge`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mergetui.cli.lora_extract import extract
from mergetui.cli.output import (
    JsonOpt,
    console,
    emit,
    guard,
    signals_stop_the_merge,
    start_stream,
)

lora_app = typer.Typer(
    help="Work on PEFT LoRA adapters without loading their base model.",
    no_args_is_help=True,
)


def _weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of numbers (e.g. 0.5,0.5)",
            param_hint="--weights",
        ) from None


#: The engine's COMBINATIONS, named here so that --help does not import the engine (a test
#: checks that the two agree).
COMBINATION_NAMES = (
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)


@lora_app.command("merge")
def merge(
    adapters: Annotated[
        list[Path],
        typer.Argument(
            help="PEFT adapter folders (adapter_config.json + adapter_model.safetensors), all "
            "trained on the same base.",
            metavar="ADAPTER",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The adapter folder to write.", show_default=False),
    ],
    combination: Annotated[
        str,
        typer.Option(
            "--combination",
            "-c",
            help="How to combine them, as PEFT's add_weighted_adapter: "
            + ", ".join(COMBINATION_NAMES)
            + ". cat is exact (rank = the sum of the ranks); svd and *_svd cut the combined "
            "delta to --rank; linear, ties, dare_* and magnitude_prune combine the A and B "
            "factors entry by entry (one rank; approximate).",
        ),
    ] = "svd",
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            "-w",
            help="One weight per adapter, comma-separated, e.g. 0.5,0.5 (default 1.0 each; "
            "negative subtracts).",
            metavar="W1,W2,...",
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(
            help="Fraction of entries kept, in (0, 1]: required by the ties, dare and "
            "magnitude_prune types."
        ),
    ] = None,
    majority_sign: Annotated[
        str | None,
        typer.Option(
            "--majority-sign",
            help="Sign election of the ties types: total (default) or frequency.",
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            help="Output rank of the svd types (default: the largest rank among the adapters)."
        ),
    ] = None,
    svd_clamp: Annotated[
        float | None,
        typer.Option(
            "--svd-clamp",
            help="svd types: clamp the factors to ± this quantile of their entries (e.g. 0.99).",
        ),
    ] = None,
    svd_full_matrices: Annotated[
        bool,
        typer.Option(
            "--svd-full-matrices/--svd-reduced",
            help="svd types: full or reduced SVD (PEFT's svd_full_matrices).",
        ),
    ] = True,
    svd_driver: Annotated[
        str | None,
        typer.Option("--svd-driver", help="svd types on CUDA: gesvd, gesvdj or gesvda."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the dare types' random masks.")] = 0,
    device: Annotated[
        str, typer.Option(help="Where to compute: cpu, cuda, cuda:N or auto.")
    ] = "cpu",
    base: Annotated[
        Path | None,
        typer.Option(
            help="The base model folder, to check the adapters against its tensor headers "
            "(its weights are never read).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Combine LoRA adapters of one base into one adapter, as PEFT's add_weighted_adapter does,
    without reading the base model."""
    from mergetui.engine.adapter_merge import (
        AdapterMergeRequest,
        plan_adapter_merge,
    )

    if as_json:
        start_stream("lora merge")
    request = AdapterMergeRequest(
        adapters=tuple(adapters),
        output=output,
        combination=combination,
        weights=_weights(weights),
        density=density,
        majority_sign_method=majority_sign,
        rank=rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        svd_driver=svd_driver,
        seed=seed,
        device=device,
        base=base,
    )
    with guard(as_json):
        plan = plan_adapter_merge(request, force=force)
        run_planned_adapter_merge(plan, force=force, as_json=as_json)


def run_planned_adapter_merge(plan: Any, *, force: bool, as_json: bool) -> None:
    """Run a planned adapter merge (from ``lora merge`` or an ``[adapters]`` recipe) with
    Ctrl-C and SIGTERM stopping it cleanly: JSON events, or a progress bar and a summary."""
    from mergetui.cli.render import ProgressView
    from mergetui.engine.adapter_merge import run_adapter_merge
    from mergetui.units import format_bytes, format_duration

    with signals_stop_the_merge(ignore_after=True) as cancel:
        if as_json:
            run_adapter_merge(plan, force=force, on_event=emit, cancel=cancel)
            return
        console.print(
            f"combining {len(plan.adapters)} adapters ({plan.request.combination}, "
            f"{len(plan.modules)} modules) on {plan.device} → {plan.output_dir}",
            markup=False,
        )
        with ProgressView(console) as view:
            result = run_adapter_merge(plan, force=force, on_event=view.update, cancel=cancel)
    console.print(
        f"[green]done[/green] in {format_duration(result.elapsed_s)}: rank {result.rank}, read "
        f"{format_bytes(result.bytes_read)}, wrote {format_bytes(result.bytes_written)}"
    )
    console.print(f"output: {result.output_dir}", markup=False, highlight=False)


lora_app.command("extract")(extract)
