"""Plan a merge from headers alone: open every source, check compatibility, lay out the output.

Everything the user needs to decide whether to start is computed here without reading a weight: the
per-model summary, every problem (architecture, tensor sets, shapes, vocabularies, LoRA targets), the
output layout, and estimates of output size, free disk space and peak memory.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.engine.blocks import MemoryPlan, minimum_budget, peak_bytes, plan_memory
from mergetui.engine.chat_templates import resolve_chat_template
from mergetui.engine.layout import (
    LayerOrigin,
    Layout,
    PlannedTensor,
    layout_models,
    layout_slices,
    out_element_size,
)
from mergetui.engine.vocabulary import (
    VocabularyPlan,
    apply_to_layout,
    check_template_tokens,
    plan_vocabulary,
)
from mergetui.errors import MergeTuiError, SourceError
from mergetui.methods.registry import MethodSpec, get_method
from mergetui.recipe.schema import Recipe
from mergetui.recipe.vocab import model_index
from mergetui.sources.checkpoint import Checkpoint
from mergetui.sources.lora import LoraAdapter, open_lora
from mergetui.sources.refs import ModelRef, parse_ref
from mergetui.sources.resolve import DownloadCallback, open_model, resolve_dir
from mergetui.units import format_bytes


@dataclass
class Problem:
    """Something wrong with the inputs. Errors block the merge; warnings are shown."""

    severity: str  # "error" | "warning"
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.message}"


@dataclass
class Source:
    """One input model as the plan sees it. ``role`` is ``base``, ``models[i]`` or
    ``slices[i].sources[j]`` (where a model first appears); ``lora_ref`` is the adapter reference
    as the recipe writes it, so a slice source finds its Source by ``(model, lora)``."""

    role: str
    ref: ModelRef
    checkpoint: Checkpoint
    lora: LoraAdapter | None = None
    lora_ref: str | None = None

    @property
    def label(self) -> str:
        return f"{self.role} ({self.ref.text})"


@dataclass
class Estimates:
    output_bytes: int
    input_bytes: int
    disk_free_bytes: int | None
    peak_ram_bytes: int
    peak_vram_bytes: int | None
    largest_tensor: str


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    sources: list[Source]
    reference: Source  # decides the tensor set and the order
    files_from: Source  # config, tokenizer and chat template come from here
    tensors: list[PlannedTensor]
    out_dtype: str
    device: str
    problems: list[Problem] = field(default_factory=list)
    estimates: Estimates | None = None
    #: config.json changes (layer count, per-layer lists) for an output made of slices
    config_updates: dict[str, Any] = field(default_factory=dict)
    #: where each output layer comes from, for an output made of slices
    layers: list[LayerOrigin] = field(default_factory=list)
    #: the chat template to write (``merge.chat_template``); None keeps the copied one
    chat_template: str | None = None
    #: the output vocabulary and how each model's rows map to it (None: not planned)
    vocabulary: VocabularyPlan | None = None
    #: the memory budget and the tensors merged in blocks to keep it
    memory: MemoryPlan | None = None

    @property
    def bytes_to_read(self) -> int:
        """Every input byte the merge reads (each input's copy of each tensor, once per pass)."""
        return sum(t.bytes_in * t.passes for t in self.tensors)

    def source(self, role: str) -> Source:
        return next(s for s in self.sources if s.role == role)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def close(self) -> None:
        for source in self.sources:
            source.checkpoint.close()
            if source.lora is not None:
                source.lora.close()


def resolve_device(requested: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``. Imports torch only for auto/cuda."""
    if requested == "cpu":
        return "cpu"
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MergeTuiError(
            f"merge.device is {requested!r} but no CUDA device is available; "
            'use device = "cpu" or "auto"'
        )
    return requested


def open_sources(
    recipe: Recipe, *, fetch: bool = True, on_download: DownloadCallback | None = None
) -> list[Source]:
    """Resolve and open every model of the recipe from its headers (no weights read).

    ``fetch``: download Hub models that are not in the cache (with progress to ``on_download``).
    Without it, such models are opened from their config.json and safetensors headers on the Hub,
    enough to check and plan; LoRA adapters are always fetched (they are small).
    """
    sources: list[Source] = []

    def open_one(role: str, model: str, lora_text: str | None = None) -> Source:
        ref = parse_ref(model, recipe.base_dir)
        checkpoint = open_model(ref, f"{role} ({ref})", fetch=fetch, on_download=on_download)
        lora = None
        if lora_text:
            lora_ref = parse_ref(lora_text, recipe.base_dir)
            try:
                lora = open_lora(resolve_dir(lora_ref, on_download), f"{role}.lora ({lora_ref})")
            except BaseException:
                checkpoint.close()
                raise
        return Source(role, ref, checkpoint, lora, lora_text)

    try:
        if recipe.base:
            sources.append(open_one("base", recipe.base))
        for index, entry in enumerate(recipe.models):
            sources.append(open_one(f"models[{index}]", entry.model, entry.lora))
        # a model shared by several slices (or the base among them) is opened once
        seen: set[tuple[str, str | None]] = {(recipe.base, None)} if recipe.base else set()
        for index, piece in enumerate(recipe.slices):
            for number, item in enumerate(piece.sources):
                if (item.model, item.lora) not in seen:
                    seen.add((item.model, item.lora))
                    role = f"slices[{index}].sources[{number}]"
                    sources.append(open_one(role, item.model, item.lora))
    except BaseException:
        for source in sources:
            source.checkpoint.close()
        raise
    return sources


def build_plan(
    recipe: Recipe,
    *,
    device: str | None = None,
    fetch: bool = True,
    on_download: DownloadCallback | None = None,
) -> MergePlan:
    """Open the sources and build the plan; problems are collected in ``plan.problems``.

    With ``fetch`` off (``check``, ``--dry-run``) no weight is downloaded: Hub models missing from
    the cache are checked from their headers on the Hub, and such a plan cannot be run.
    """
    method = get_method(recipe.method)
    assert method is not None  # guaranteed by recipe validation
    sources = open_sources(recipe, fetch=fetch, on_download=on_download)
    reference = sources[0]
    problems: list[Problem] = []
    vocabulary: VocabularyPlan | None = None
    try:
        vocabulary = plan_vocabulary(recipe, sources)
        problems += [Problem(severity, message) for severity, message in vocabulary.problems]
        problems += [Problem("warning", note) for note in vocabulary.notes]
    except SourceError as exc:
        problems.append(Problem("error", str(exc)))
    files_from = reference
    if vocabulary is not None:
        files_from = next(s for s in sources if s.role == vocabulary.tokenizer_from)
    problems = (
        check_compatibility(sources, same_depth=not recipe.slices, vocabulary=vocabulary) + problems
    )
    out_dtype = recipe.dtype or reference.checkpoint.storage_dtype
    if out_dtype not in ("float32", "float16", "bfloat16"):
        out_dtype = "float32"
    plan = MergePlan(
        recipe=recipe,
        method=method,
        sources=sources,
        reference=reference,
        files_from=files_from,
        tensors=[],
        out_dtype=out_dtype,
        device=device or resolve_device(recipe.device),
        problems=problems,
        vocabulary=vocabulary,
    )
    try:
        plan.chat_template, notes = resolve_chat_template(recipe, sources)
        plan.problems += [Problem("warning", note) for note in notes]
    except (OSError, UnicodeDecodeError) as exc:
        plan.problems.append(
            Problem(
                "error",
                f"merge.chat_template: cannot read {recipe.chat_template}: {exc}; fix the path "
                "(relative to the recipe's folder)",
            )
        )
    except ValueError as exc:
        plan.problems.append(Problem("error", str(exc)))
    _check_template_tokens(plan)
    layout = _layout(plan)
    plan.tensors = layout.tensors
    if vocabulary is not None and not any(p.severity == "error" for p in plan.problems):
        by_role = {s.role: s for s in sources}
        out_size = out_element_size(out_dtype)
        plan.tensors = apply_to_layout(
            vocabulary, plan.tensors, by_role, out_size, base_holds=not recipe.slices
        )
    plan.config_updates = layout.config_updates
    if vocabulary is not None:
        plan.config_updates.update(vocabulary_config(vocabulary, files_from))
    plan.layers = layout.layers
    plan.problems += [Problem(severity, message) for severity, message in layout.problems]
    plan.memory = plan_memory(
        plan.tensors,
        method,
        out_element_size(out_dtype),
        recipe.max_memory,
        {s.role for s in sources if s.lora is not None},
        lambda tensor: _stored_rows_bytes(tensor, plan),
    )
    plan.estimates = estimate(plan)
    plan.problems += _budget_problems(plan)
    if plan.estimates.disk_free_bytes is not None and (
        plan.estimates.output_bytes > plan.estimates.disk_free_bytes
    ):
        plan.problems.append(
            Problem(
                "error",
                f"not enough disk space for the output: it needs about "
                f"{format_bytes(plan.estimates.output_bytes)}, {recipe.output_dir.parent} has "
                f"{format_bytes(plan.estimates.disk_free_bytes)} free; free space or change "
                "output.path",
            )
        )
    return plan


def _layout(plan: MergePlan) -> Layout:
    """Output tensors with their inputs and resolved parameters (see :mod:`engine.layout`)."""
    recipe = plan.recipe
    if not recipe.slices:
        return layout_models(recipe, plan.method, plan.reference, plan.sources, plan.out_dtype)
    if any(p.severity == "error" and "different architectures" in p.message for p in plan.problems):
        return Layout([], [])  # nothing to lay out across architectures; already reported
    by_key: dict[tuple[str, str | None], Source] = {}
    for source in plan.sources:
        by_key.setdefault((source.ref.text, source.lora_ref), source)

    def source_of(model: str, lora: str | None) -> Source:
        return by_key[(model, lora)]

    names: frozenset[str] = frozenset()
    if plan.vocabulary is not None:
        names = frozenset(n for m in plan.vocabulary.models.values() for n in m.tensors)
    return layout_slices(
        recipe, plan.method, source_of, plan.out_dtype, plan.files_from.checkpoint.config, names
    )


def vocabulary_config(vocabulary: VocabularyPlan, files_from: Source) -> dict[str, Any]:
    """config.json changes for the output vocabulary: ``vocab_size`` when the rows changed, and
    ``tie_word_embeddings`` when the recipe changes it."""
    updates: dict[str, Any] = {}
    config = files_from.checkpoint.config
    if vocabulary.tokens and vocabulary.rows and config.get("vocab_size") != vocabulary.rows:
        updates["vocab_size"] = vocabulary.rows
    if vocabulary.tied_changed:
        updates["tie_word_embeddings"] = vocabulary.out_tied
    return updates


def _check_turn_end(plan: MergePlan, vocabulary: VocabularyPlan) -> None:
    """A chat template taken from a model whose eos_token is not the output's: generation would
    not stop at the end of a turn (a classic of merged chat models)."""
    setting = plan.recipe.chat_template
    if setting is None or not (setting == "base" or model_index(setting) is not None):
        return
    role = "base" if setting == "base" else setting
    donor = vocabulary.models.get(role)
    output = vocabulary.models.get(vocabulary.tokenizer_from)
    if donor is None or output is None or donor.vocabulary is None or output.vocabulary is None:
        return
    theirs = donor.vocabulary.special.get("eos_token")
    ours = output.vocabulary.special.get("eos_token")
    if theirs and ours and theirs != ours:
        plan.problems.append(
            Problem(
                "warning",
                f"merge.chat_template = {setting}: {donor.label} ends a turn with its eos_token "
                f"{theirs!r}, the output's eos_token is {ours!r} (from {output.label}), so "
                f"generation may not stop after a reply; set tokenizer = {role!r} to take its "
                f"tokenizer whole, or set eos_token to {theirs!r} in the output's "
                "tokenizer_config.json and generation_config.json after the merge",
            )
        )


def _check_template_tokens(plan: MergePlan) -> None:
    """Warn when the chat template the output gets names special tokens the output lacks."""
    from mergetui.sources.chat_template import template_of

    vocabulary = plan.vocabulary
    if vocabulary is None:
        return
    template = plan.chat_template
    if template is None and not plan.files_from.checkpoint.remote:
        template = template_of(plan.files_from.checkpoint.directory)
    if not template:
        return
    _check_turn_end(plan, vocabulary)
    missing = check_template_tokens(template, vocabulary)
    if missing:
        holders = [
            m.role
            for m in vocabulary.models.values()
            if m.vocabulary is not None and all(t in m.vocabulary.ids for t in missing)
        ]
        fix = (
            f'tokenizer = "union" (or "{holders[0]}") brings them in'
            if holders
            else "add them with [merge.tokens] (a row from a model, or zero)"
        )
        plan.problems.append(
            Problem(
                "warning",
                f"the output's chat template uses {', '.join(map(repr, missing))}, which the "
                f"output vocabulary lacks: each would be split into several tokens; {fix}",
            )
        )


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_compatibility(
    sources: list[Source], same_depth: bool = True, vocabulary: VocabularyPlan | None = None
) -> list[Problem]:
    """Every reason these models cannot be merged, from config.json and headers only: each model
    against the first (the reference), then each LoRA adapter against its model.

    ``same_depth`` off (an output made of slices): models may differ in depth, so only the
    architecture is compared here; the layout checks each slice's tensors.
    """
    reference = sources[0]
    problems = _custom_code_warnings(sources)
    for source in sources[1:]:
        if same_depth:
            problems += _compare_with_reference(reference, source, vocabulary)
        else:
            problems += _architecture_problem(reference, source)
    problems += _adapter_problems(sources)
    return problems


def _custom_code_warnings(sources: list[Source]) -> list[Problem]:
    """One warning per model whose config names custom code (said once, however many pairs)."""
    return [
        Problem(
            "warning",
            f"{source.label}: config.json names custom code (auto_map); mergetui never runs it "
            "(no trust_remote_code) and merges the weights as they are; loading the output "
            "needs trust_remote_code, or an architecture transformers knows",
        )
        for source in sources
        if source.checkpoint.config.get("auto_map")
    ]


def _architecture_problem(reference: Source, source: Source) -> list[Problem]:
    ref_ckpt, ckpt = reference.checkpoint, source.checkpoint
    if ckpt.architecture != ref_ckpt.architecture or ckpt.model_type != ref_ckpt.model_type:
        return [
            Problem(
                "error",
                f"different architectures: {reference.label} is {ref_ckpt.architecture} "
                f"({ref_ckpt.model_type}), {source.label} is {ckpt.architecture} ({ckpt.model_type}); "
                "only fine-tunes of one base model can be merged",
            )
        ]
    return []


def _compare_with_reference(
    reference: Source, source: Source, vocabulary: VocabularyPlan | None
) -> list[Problem]:
    """Architecture, depth, tensor names and shapes, vocabulary: ``source`` against the reference."""
    ref_ckpt, ckpt = reference.checkpoint, source.checkpoint
    different = _architecture_problem(reference, source)
    if different:
        return different  # nothing else is worth comparing
    problems = []
    ref_layers = ref_ckpt.config_value("num_hidden_layers", "n_layer", "num_layers")
    layers = ckpt.config_value("num_hidden_layers", "n_layer", "num_layers")
    if ref_layers != layers:
        problems.append(
            Problem(
                "error",
                f"different depth: {reference.label} has {ref_layers} layers, {source.label} has "
                f"{layers}; merge models of one depth, or take layer ranges of each with "
                "[[slices]] (recipe version 2)",
            )
        )
    if not (ckpt.shapes_known and ref_ckpt.shapes_known):
        unknown = source if not ckpt.shapes_known else reference
        problems.append(
            Problem(
                "warning",
                f"{unknown.label} has only .bin weights on the Hub, whose shapes cannot be "
                "read without downloading them; tensor names and shapes will be checked "
                "when `mergetui run` has downloaded it",
            )
        )
        return problems
    return (
        problems
        + _tensor_name_problems(reference, source, vocabulary)
        + _shape_problems(reference, source, vocabulary)
    )


def _tensor_name_problems(
    reference: Source, source: Source, vocabulary: VocabularyPlan | None
) -> list[Problem]:
    ref_tensors, tensors = reference.checkpoint.tensors, source.checkpoint.tensors
    # a tied model stores no head: the vocabulary plan takes its embedding as its head
    head = vocabulary.head_name if vocabulary is not None else None
    missing = [n for n in ref_tensors if n not in tensors and n != head]
    extra = [n for n in tensors if n not in ref_tensors and n != head]
    problems = []
    if missing:
        problems.append(
            Problem(
                "error",
                f"{source.label} lacks {len(missing)} tensor(s) that {reference.label} has: "
                f"{_names(missing)}",
            )
        )
    if extra:
        problems.append(
            Problem(
                "error",
                f"{source.label} has {len(extra)} tensor(s) that {reference.label} lacks: "
                f"{_names(extra)}",
            )
        )
    return problems


def _shape_problems(
    reference: Source, source: Source, vocabulary: VocabularyPlan | None
) -> list[Problem]:
    """Shapes that differ, outside the vocabulary-indexed tensors (whose rows the vocabulary plan
    aligns, or says why it cannot)."""
    ref_ckpt, ckpt = reference.checkpoint, source.checkpoint
    indexed: set[str] = set()
    if vocabulary is not None:
        for role in (reference.role, source.role):
            model = vocabulary.models.get(role)
            indexed |= set(model.tensors) if model is not None else set()
    problems = []
    for name, spec in ref_ckpt.tensors.items():
        other = ckpt.tensors.get(name)
        if other is None or other.shape == spec.shape:
            continue
        if name in indexed and other.shape[1:] == spec.shape[1:]:
            continue
        problems.append(
            Problem(
                "error",
                f"shape mismatch in {name}: {reference.label} has {list(spec.shape)}, "
                f"{source.label} has {list(other.shape)}",
            )
        )
    return problems


def _adapter_problems(sources: list[Source]) -> list[Problem]:
    """Each LoRA adapter against the model it is folded into."""
    problems = []
    for source in sources:
        if source.lora is None:
            continue
        for text in source.lora.check_against(source.checkpoint):
            problems.append(Problem("error", f"LoRA adapter {source.lora.label} {text}"))
        adapter_base = source.lora.base_model_name
        if adapter_base and not _same_model(adapter_base, source):
            problems.append(
                Problem(
                    "warning",
                    f"LoRA adapter {source.lora.label} was trained on {adapter_base!r}, applied here to "
                    f"{source.ref.text!r}; shapes match, so it is applied — check that this is intended",
                )
            )
    return problems


def _same_model(adapter_base: str, source: Source) -> bool:
    if source.ref.repo_id is not None:
        return adapter_base == source.ref.repo_id
    try:
        return Path(adapter_base).expanduser().resolve() == source.checkpoint.directory.resolve()
    except OSError:
        return False


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (where it would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _stored_rows_bytes(tensor: PlannedTensor, plan: MergePlan) -> int:
    """float32 bytes of a realigned tensor's stored rows, held beside the aligned ones for a
    moment."""
    if tensor.vocabulary is None:
        return 0
    by_role = {s.role: s for s in plan.sources}
    return 4 * sum(
        math.prod(spec.shape)
        for read in tensor.reads
        if (spec := by_role[read.role].checkpoint.tensors.get(read.name)) is not None
    )


def _budget_problems(plan: MergePlan) -> list[Problem]:
    """The budget cannot be kept: too small to run at all, or a tensor merged whole does not
    fit. An error when the user set the budget, a warning under the default."""
    memory, estimates = plan.memory, plan.estimates
    assert memory is not None and estimates is not None
    severity = "error" if memory.explicit else "warning"
    how = "merge.max_memory" if memory.explicit else "the default memory budget"
    if memory.max_memory < minimum_budget():
        return [
            Problem(
                severity,
                f"{how} {format_bytes(memory.max_memory)} is below what the merge process needs "
                f"to run ({format_bytes(minimum_budget())}); raise it",
            )
        ]
    if not memory.over_budget:
        return []
    name, why = memory.over_budget[0]
    more = len(memory.over_budget) - 1
    others = f" (and {more} more)" if more else ""
    peak = max(estimates.peak_ram_bytes, estimates.peak_vram_bytes or 0)
    return [
        Problem(
            severity,
            f"{how} {format_bytes(memory.max_memory)} cannot be kept: {name}{others} {why}, so "
            f"the merge needs ≈ {format_bytes(peak)}; set max_memory to at least that ([merge] "
            "max_memory or --max-memory)",
        )
    ]


def estimate(plan: MergePlan) -> Estimates:
    """Output size, free disk and peak memory for the chosen device.

    Peak memory is set by the largest piece merged at once (a whole tensor, or a block of rows of
    one merged in blocks): float32 copies of every input (plus any full-size work buffers a method
    declares) on the compute device, for it and for the next piece being read as far as the
    budget allows, and the output piece three times on the host (being converted, queued and
    written), on top of the process baseline and the fixed staging buffers
    (:func:`mergetui.engine.blocks.peak_bytes`). The bench measures it as an upper bound.
    """
    on_cpu = plan.device == "cpu"
    memory = plan.memory
    assert memory is not None
    peak_host, peak_device = peak_bytes(memory, on_cpu)
    try:
        free = shutil.disk_usage(existing_ancestor(plan.recipe.output_dir)).free
    except OSError:
        free = None
    return Estimates(
        output_bytes=sum(t.bytes_out for t in plan.tensors),
        input_bytes=plan.bytes_to_read,
        disk_free_bytes=free,
        peak_ram_bytes=peak_host,
        peak_vram_bytes=peak_device,
        largest_tensor=memory.largest_piece,
    )
