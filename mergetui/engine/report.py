"""The compatibility report as plain data: what `mergetui check`, `--dry-run` and the TUI show."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mergetui.engine.plan import MergePlan, Source
from mergetui.units import format_bytes


@dataclass
class ModelRow:
    """One row of the report: a source model summarised from config.json and headers."""

    role: str
    model: str
    lora: str | None
    architecture: str
    model_type: str
    layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    dtype: str
    parameters: int | None
    size_on_disk: int
    format: str


def model_row(source: Source) -> ModelRow:
    ckpt = source.checkpoint
    return ModelRow(
        role=source.role,
        model=source.ref.text,
        lora=source.lora.label if source.lora else None,
        architecture=ckpt.architecture,
        model_type=ckpt.model_type,
        layers=ckpt.config_value("num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=ckpt.config_value("hidden_size", "n_embd", "d_model"),
        vocab_size=ckpt.config_value("vocab_size"),
        dtype=ckpt.storage_dtype,
        parameters=ckpt.parameter_count if ckpt.shapes_known else None,
        size_on_disk=ckpt.size_on_disk,
        format=ckpt.format,
    )


def estimate_lines(report: dict[str, Any]) -> list[str]:
    """The plan's estimates as plain lines, for the CLI's check and the TUI's check step alike
    (a shortage of disk is already one of the report's errors)."""
    est = report.get("estimates") or {}
    if not est:
        return []
    free = est["disk_free_bytes"]
    vram = est["peak_vram_bytes"]
    return [
        f"output ≈ {format_bytes(est['output_bytes'])} as {report['output_dtype']}, "
        f"{report['tensors']} tensors (disk free: {format_bytes(free) if free is not None else '?'})",
        f"reads: {format_bytes(est['input_bytes'])}",
        f"peak RAM ≈ {format_bytes(est['peak_ram_bytes'])}"
        + ("" if vram is None else f", peak VRAM ≈ {format_bytes(vram)}")
        + f" merging on {report['device']} (peak memory follows the largest working set: "
        f"{est['largest_tensor']})",
    ]


def plan_report(plan: MergePlan) -> dict[str, Any]:
    """Everything about a plan, JSON-ready."""
    estimates = asdict(plan.estimates) if plan.estimates else {}
    return {
        "method": plan.method.name,
        "device": plan.device,
        "output": str(plan.recipe.output_dir),
        "output_dtype": plan.out_dtype,
        "tensors": len(plan.tensors),
        "models": [asdict(model_row(s)) for s in plan.sources],
        "problems": [{"severity": p.severity, "message": p.message} for p in plan.problems],
        "estimates": estimates,
        "ok": not plan.errors,
    }
