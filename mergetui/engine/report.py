"""The compatibility report as plain data: what `mergetui check`, `--dry-run` and the TUI show."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mergetui.engine.outputs import layer_spans
from mergetui.engine.plan import MergePlan, Source
from mergetui.engine.vocabulary import describe, summary_rows
from mergetui.events import PlanEvent
from mergetui.units import format_bytes, format_count


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
        + f" merging on {report['device']} (the largest working set: "
        f"{est['largest_tensor']})",
        *([summary] if (summary := (report.get("memory") or {}).get("summary")) else []),
    ]


#: Attributes every model must share with the first: the UIs highlight a cell that differs.
MUST_MATCH = ("architecture", "model_type", "layers", "hidden_size", "vocab_size")


@dataclass(frozen=True)
class ReportRow:
    """One attribute of the check table across the models: its label, one formatted cell per
    model, and which cells differ from the first model where they must match. Plain strings, so
    the CLI (rich) and the TUI (DataTable) build the same table and only style it."""

    label: str
    cells: list[str]
    differs: list[bool]


def short_reference(reference: str, width: int = 28) -> str:
    """A long path or id as its trailing parts within ``width`` (``…/ckpt/ft-code``), so one
    column per model fits a narrow terminal; the last part is kept whole even when longer. The
    UIs show the full reference elsewhere (:func:`full_reference`), so nothing is lost."""
    if len(reference) <= width or "/" not in reference.rstrip("/"):
        return reference
    parts = reference.rstrip("/").split("/")
    kept = parts[-1]
    for part in reversed(parts[:-1]):
        if len("…/") + len(part) + 1 + len(kept) > width:
            break
        kept = f"{part}/{kept}"
    return f"…/{kept}"


def lora_reference(row: dict[str, Any]) -> str | None:
    """The LoRA as written in the recipe, from the label the plan gives it (``ROLE.lora (REF)``)."""
    label = row.get("lora")
    if not label:
        return None
    prefix = f"{row['role']}.lora ("
    return label[len(prefix) : -1] if label.startswith(prefix) and label.endswith(")") else label


def full_reference(row: dict[str, Any]) -> str:
    """A model's reference as written in the recipe, with its LoRA's, never shortened: shown once
    under the CLI's table and for the highlighted column in the TUI, where it can be copied."""
    lora = lora_reference(row)
    return row["model"] if lora is None else f"{row['model']} + LoRA {lora}"


def report_rows(report: dict[str, Any]) -> list[ReportRow]:
    """The check table of :func:`plan_report`'s report, one row per attribute (the columns are
    the models, headed by their roles: eight attributes side by side would not fit 80 columns,
    four models do). Models and LoRAs are shortened; unknown values show as "?"."""
    models = report["models"]

    def cell(value: Any) -> str:
        return "?" if value is None else str(value)

    spec: list[tuple[str, str, list[str]]] = [  # label, report key, cells
        ("model", "model", [short_reference(m["model"]) for m in models]),
        ("architecture", "architecture", [cell(m["architecture"]) for m in models]),
        ("model_type", "model_type", [cell(m["model_type"]) for m in models]),
        ("layers", "layers", [cell(m["layers"]) for m in models]),
        ("hidden size", "hidden_size", [cell(m["hidden_size"]) for m in models]),
        ("vocab size", "vocab_size", [cell(m["vocab_size"]) for m in models]),
        ("dtype", "dtype", [cell(m["dtype"]) for m in models]),
        (
            "parameters",
            "parameters",
            ["?" if m["parameters"] is None else format_count(m["parameters"]) for m in models],
        ),
        ("size on disk", "size_on_disk", [format_bytes(m["size_on_disk"] or 0) for m in models]),
    ]
    vocabulary = report.get("vocabulary") or {}
    by_role = {row["role"]: row for row in vocabulary.get("models", [])}
    if by_role:
        spec += [
            ("tokens", "tokens", [by_role.get(m["role"], {}).get("tokens", "") for m in models]),
            (
                "lacks/drops",
                "lacks",
                [
                    f"{r['lacks']}/{r['drops']}" if (r := by_role.get(m["role"])) else ""
                    for m in models
                ],
            ),
            ("special", "special", [by_role.get(m["role"], {}).get("special", "") for m in models]),
            (
                "chat template",
                "chat_template",
                [by_role.get(m["role"], {}).get("chat_template", "") for m in models],
            ),
        ]
    if any(m.get("lora") for m in models):
        loras = [lora_reference(m) for m in models]
        spec.insert(1, ("LoRA", "lora", [short_reference(r) if r else "" for r in loras]))
    rows = []
    for label, key, cells in spec:
        # vocabularies may differ when their rows are aligned by token
        check = key in MUST_MATCH and not (key == "vocab_size" and vocabulary.get("aligned"))
        rows.append(ReportRow(label, cells, [check and c != cells[0] for c in cells]))
    return rows


def plan_report(plan: MergePlan) -> dict[str, Any]:
    """Everything about a plan, JSON-ready. ``layers``: for a recipe of slices, the output's
    layers and where each run of them comes from (``{"output": "0-23", "from": "./a 0-23"}``,
    one per slice); empty for whole models."""
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
        "layers": [{"output": span, "from": origin} for span, origin in layer_spans(plan)],
        "vocabulary": vocabulary_report(plan),
        "memory": memory_report(plan),
        "extraction": extraction_report(plan),
        "ok": not plan.errors,
    }


def extraction_report(plan: MergePlan) -> dict[str, Any]:
    """``[output] lora_rank``: the adapter extracted after the merge (empty without one)."""
    recipe = plan.recipe
    lora_dir = recipe.lora_dir
    if recipe.lora_rank is None or lora_dir is None:
        return {}
    return {
        "rank": recipe.lora_rank,
        "output": str(lora_dir),
        "summary": (
            f"then: extract a rank-{recipe.lora_rank} LoRA adapter of (merged − {recipe.base}) "
            f"into {lora_dir}"
        ),
    }


def memory_report(plan: MergePlan) -> dict[str, Any]:
    """The memory budget and the tensors merged in blocks to keep it."""
    memory = plan.memory
    if memory is None:
        return {}
    largest = memory.largest_blocked
    return {
        "max_memory_bytes": memory.max_memory,
        "explicit": memory.explicit,
        "blocked": memory.blocked,
        "largest_blocked": (
            None
            if largest is None
            else {"tensor": largest[0], "rows": largest[1], "blocks": largest[2]}
        ),
        "summary": memory.summary(),
    }


def vocabulary_report(plan: MergePlan) -> dict[str, Any]:
    """The vocabulary situation: the setting, the output's size, what the setting does (plain
    lines), and per model its tokens, how many output tokens it lacks, how many of its own the
    output drops, its special tokens and whether it has a chat template."""
    vocabulary = plan.vocabulary
    if vocabulary is None:
        return {}
    models = []
    for role, size, lacks, drops, special in summary_rows(vocabulary):
        model = vocabulary.models[role]
        has_template = model.vocabulary is not None and model.vocabulary.has_chat_template
        models.append(
            {
                "role": role,
                "tokens": size,
                "lacks": lacks,
                "drops": drops,
                "special": special,
                "chat_template": "yes" if has_template else "no",
            }
        )
    return {
        "setting": vocabulary.setting,
        "tokens": vocabulary.size,
        "rows": vocabulary.rows,
        "aligned": not vocabulary.identity,
        "added": [token for token, _ in vocabulary.new_tokens],
        "tied": vocabulary.out_tied,
        "lines": describe(vocabulary),
        "models": models,
    }


def vocabulary_lines(report: dict[str, Any]) -> list[str]:
    """What the vocabulary setting will do, as plain lines (the CLI's check and the TUI's check
    step alike); none when there is no vocabulary to speak of."""
    return list((report.get("vocabulary") or {}).get("lines", []))


def layer_lines(report: dict[str, Any]) -> list[str]:
    """The output layer layout of a recipe of slices as plain lines (the CLI's check and the
    TUI's check step alike): ``layers 0-23 ← ./a 0-23``; none for whole models."""
    layers = report.get("layers") or []
    width = max((len(row["output"]) for row in layers), default=0)
    return [f"layers {row['output']:<{width}} ← {row['from']}" for row in layers]


def plan_event(plan: MergePlan, *, dry_run: bool = False) -> PlanEvent:
    """The ``plan`` event of ``mergetui run --json``: the figures a progress display needs up
    front, and the whole report (warnings included) for scripts."""
    return PlanEvent(
        method=plan.method.name,
        device=plan.device,
        output=str(plan.recipe.output_dir),
        tensors_total=len(plan.tensors),
        bytes_to_read=plan.bytes_to_read,
        ok=not plan.errors,
        dry_run=dry_run,
        report=plan_report(plan),
    )
