"""The LoRA jobs of a recipe, for ``mergetui run`` and ``mergetui check``.

- An adapter-merge recipe (:class:`~mergetui.recipe.adapters.AdapterRecipe`) becomes the
  :class:`~mergetui.engine.adapter_merge.AdapterMergeRequest` that ``mergetui lora merge`` would
  make from the same options, and runs through the same planner and runner, so the adapter is the
  same file; only the recipe itself (``mergetui.toml``) is added beside the card, to replay it.
- A model merge with ``[output] lora_rank`` is followed by an extraction of (merged − base) at that
  rank (:mod:`mergetui.engine.extract`, as ``mergetui lora extract --rank R`` would do it). The
  extraction's output location is checked before the merge starts, so a run that can only fail
  there fails before reading a weight. An extraction that fails after the merge leaves the merged
  model in place and no part of the adapter (the extraction publishes its folder whole).

The two steps share one event stream: the merge's ``done`` is held back (a ``phase`` event says the
merge is in place), the extraction's events follow (``tensor``…, ``extracted``), and the stream ends
with the held ``done`` (the merged model's folder; its elapsed time the whole run's) — or with the
extraction's failure — so it keeps exactly one terminal event.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergetui.engine.adapter_merge import (
    COMBINATIONS,
    AdapterMergePlan,
    AdapterMergeRequest,
    plan_adapter_merge,
)
from mergetui.engine.executor import MergeResult, run_merge
from mergetui.engine.extract import ExtractOptions, ExtractResult, plan_extraction, run_extraction
from mergetui.engine.plan import MergePlan, existing_ancestor
from mergetui.engine.progress import ProgressCallback
from mergetui.errors import MergeCancelled, MergeFailed, MergeTuiError, OutputError, RecipeError
from mergetui.events import DoneEvent, Event, PhaseEvent, ProgressEvent
from mergetui.recipe.adapters import AdapterRecipe
from mergetui.recipe.toml_io import recipe_to_toml

# -- adapter merges ------------------------------------------------------------------------------


def adapter_request(recipe: AdapterRecipe) -> AdapterMergeRequest:
    """The request ``mergetui lora merge`` makes from the same options (paths resolved against the
    recipe's folder), with the recipe's TOML to save inside the output."""
    return AdapterMergeRequest(
        adapters=tuple(recipe.resolve_path(s.lora) for s in recipe.sources),
        output=recipe.output_dir,
        combination=recipe.combination,
        weights=tuple(s.weight for s in recipe.sources),
        density=recipe.density,
        majority_sign_method=recipe.majority_sign,
        rank=recipe.rank,
        svd_clamp=recipe.svd_clamp,
        svd_full_matrices=recipe.svd_full_matrices,
        svd_driver=recipe.svd_driver,
        seed=recipe.seed,
        device=recipe.device,
        base=recipe.resolve_path(recipe.base) if recipe.base is not None else None,
        recipe_text=recipe_to_toml(recipe, absolute_paths=True),
    )


def plan_adapter_recipe(recipe: AdapterRecipe, *, force: bool = False) -> AdapterMergePlan:
    """Open and check the adapters (configs and headers only); the engine's checks, unchanged."""
    return plan_adapter_merge(adapter_request(recipe), force=force)


def adapter_report(plan: AdapterMergePlan) -> dict[str, Any]:
    """What ``check`` and ``--dry-run`` show of a planned adapter merge, JSON-ready."""
    request = plan.request
    return {
        "kind": "adapters",
        "combination": request.combination,
        "summary": COMBINATIONS[request.combination].summary,
        "device": plan.device,
        "output": str(plan.output_dir),
        "rank": int(plan.config["r"]),
        "modules": len(plan.modules),
        "tensors": plan.tensors_total,
        "bytes_to_read": plan.bytes_to_read,
        "adapters": [
            {
                "lora": str(adapter.directory),
                "weight": weight,
                "r": adapter.config.get("r"),
                "lora_alpha": adapter.config.get("lora_alpha"),
            }
            for adapter, weight in zip(plan.adapters, plan.weights, strict=True)
        ],
        "base": str(request.base) if request.base is not None else None,
        "problems": [],
        "ok": True,
    }


# -- a model merge, then an extraction -----------------------------------------------------------


@dataclass(frozen=True)
class ExtractionStep:
    """``[output] lora_rank``: extract ``output`` from the merged model against ``base`` (the
    local folder of ``merge.base``, as the merge plan resolved it: a Hub id works too)."""

    model: Path
    base: Path
    output: Path
    options: ExtractOptions

    def describe(self) -> str:
        return (
            f"then extract a rank-{self.options.rank} LoRA adapter of (merged − base) into "
            f"{self.output}"
        )


def extraction_step(plan: MergePlan) -> ExtractionStep | None:
    """The extraction a plan's recipe asks for after the merge, or None."""
    recipe = plan.recipe
    lora_dir = recipe.lora_dir
    if lora_dir is None or recipe.lora_rank is None:
        return None
    base = next((s for s in plan.sources if s.role == "base"), None)
    if base is None:  # validation requires merge.base with lora_rank
        raise RecipeError(["output.lora_rank: needs merge.base"], recipe.source_file)
    # the extraction takes cpu or cuda; a merge on mps extracts on the CPU
    device = plan.device if plan.device.startswith("cuda") else "cpu"
    return ExtractionStep(
        model=recipe.output_dir.resolve(),
        base=base.checkpoint.directory.resolve(),
        output=lora_dir.resolve(),
        options=ExtractOptions(rank=recipe.lora_rank, device=device),
    )


def check_extraction_output(step: ExtractionStep, plan: MergePlan, force: bool) -> None:
    """Before the merge: the adapter's folder must not exist (without ``force``), overlap the
    merge's output or a source, or be unwritable — errors name ``output.lora_path``."""
    out = step.output
    folders = [("output.path", step.model)] + [
        (source.label, source.checkpoint.directory.resolve()) for source in plan.sources
    ]
    for label, folder in folders:
        if out == folder or out in folder.parents or folder in out.parents:
            raise OutputError(
                f"output.lora_path {out} overlaps {label} at {folder}; the adapter goes in a "
                "folder of its own — set output.lora_path elsewhere (default: <output.path>-lora)"
            )
    if out.exists():
        if not force:
            raise OutputError(
                f"output.lora_path {out} already exists; pass --force to replace it (the old one "
                "is removed only after the new adapter is complete)"
            )
        if not out.is_dir():
            raise OutputError(
                f"output.lora_path {out} exists and is not a folder; remove it or change "
                "output.lora_path"
            )
    probe = existing_ancestor(out.parent)
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write the adapter under {probe}: permission denied; choose a writable "
            "output.lora_path"
        )


@dataclass
class RecipeRunResult:
    """A model merge's result and, with ``lora_rank``, the extraction's."""

    merge: MergeResult
    extraction: ExtractResult | None = None


def merge_and_extract(
    plan: MergePlan,
    *,
    force: bool = False,
    on_event: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> RecipeRunResult:
    """Run the merge and, when the recipe asks for one, the extraction after it, as one stream
    of events with one terminal event (see the module's docstring)."""
    emit = on_event or (lambda event: None)
    step = extraction_step(plan)
    if step is None:
        return RecipeRunResult(run_merge(plan, force=force, on_event=emit, cancel=cancel))
    started = time.perf_counter()
    try:
        check_extraction_output(step, plan, force)
    except BaseException:
        plan.close()
        raise
    held: list[DoneEvent] = []

    def merge_events(event: Event) -> None:
        if isinstance(event, DoneEvent):
            held.append(event)
            progress = {f.name: getattr(event, f.name) for f in dataclasses.fields(ProgressEvent)}
            emit(PhaseEvent(**progress, message=f"merged into {event.output}; {step.describe()}"))
        else:
            emit(event)

    merged = run_merge(plan, force=force, on_event=merge_events, cancel=cancel)

    def extraction_events(event: Event) -> None:
        if not isinstance(event, DoneEvent):  # the run's done comes last, once
            emit(event)

    try:
        extract_plan = plan_extraction(
            step.model, step.base, step.output, step.options, force=force
        )
        extracted = run_extraction(
            extract_plan, force=force, on_event=extraction_events, cancel=cancel
        )
    except MergeTuiError as exc:
        raise _after_merge(exc, merged.output_dir) from exc
    if held:
        emit(dataclasses.replace(held[0], elapsed_s=round(time.perf_counter() - started, 3)))
    return RecipeRunResult(merged, extracted)


def _after_merge(exc: MergeTuiError, merged: Path) -> MergeTuiError:
    """The extraction's error, saying that the merged model is in place. A cancel stays a cancel
    (exit code 130); anything else is a failure (exit code 1), never 2, which promises that
    nothing was written."""
    message = (
        f"the merge is complete at {merged}, but extracting its LoRA adapter (output.lora_rank) "
        f"failed: {exc}"
    )
    if isinstance(exc, MergeCancelled):
        return MergeCancelled(message)
    return MergeFailed(message)
