"""Extract a PEFT LoRA adapter from a fine-tune: ``B @ A ≈ W_model − W_base`` for its linear layers.

What goes where follows mergekit's ``mergekit-extract-lora`` (0.1.5), decided here from the two
checkpoints' headers alone:

- a 2-D weight inside or outside the layers (an ``nn.Linear``) becomes a LoRA target: its difference
  is factorised (:mod:`mergetui.methods.lora_extract`) into ``lora_A``/``lora_B``, and a bias that
  changed is stored as ``lora_B.bias`` (as mergekit stores it);
- the embedding and the output head are saved whole (``modules_to_save``), or, with
  ``embeddings``, factorised too (``lora_embedding_A``/``_B`` for the embedding); when the two
  vocabularies differ they are saved whole whatever is asked, as mergekit does;
- anything else with a weight (the norms) is saved whole, unless ``skip_undecomposable``;
- ``save_modules`` are saved whole whatever they are; ``include``/``exclude`` regexes (searched in
  module names) choose the modules, the embedding and head excepted: those are saved whole unless
  an ``exclude`` matches them (mergekit's rule).

Unlike mergekit, a module saved whole that equals the base's is left out (its copy would change
nothing), and so is a LoRA target whose difference is exactly zero.

Everything is checked before any weight is read (missing tensors, shapes, options, regexes that
match nothing, the output location). The modules then stream one at a time in the fine-tune's
file order: both weights read into float32 on ``device``, subtracted, decomposed, the factors
appended to ``adapter_model.safetensors``. The file's header is reserved up front at its largest
possible size (ranks are only known after each SVD when a cut-off is used) and rewritten with the
actual shapes at the end. The adapter is built in a hidden sibling folder and renamed into place
only when complete, as merges are (:func:`mergetui.engine.executor.publish_output`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mergetui import __version__
from mergetui.engine.executor import check_output_folder, discard_partial, publish_output
from mergetui.engine.layers import is_pre_weight, layer_index
from mergetui.engine.progress import (
    ProgressCallback,
    current_rss,
    gpu_devices,
    gpu_memory,
    peak_rss,
)
from mergetui.engine.writer import OutputTensor
from mergetui.errors import (
    CompatibilityError,
    MergeCancelled,
    MergeFailed,
    MergeTuiError,
    UsageError,
)
from mergetui.events import DoneEvent, ExtractedEvent, ExtractedModule, PhaseEvent, TensorEvent
from mergetui.pauses import pause_point
from mergetui.sources.checkpoint import TORCH_TO_SAFETENSORS, Checkpoint, Staging, open_checkpoint

if TYPE_CHECKING:
    import torch

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_PREFIX = "base_model.model."
_STAGING_BYTES = 8 << 20
#: Architectures whose 2-D weights are transformers' ``Conv1D`` (stored ``(in, out)``), which
#: neither mergekit nor this extraction factorises correctly.
_CONV1D_MODEL_TYPES = ("gpt2", "imagegpt", "decision_transformer")


@dataclass(frozen=True)
class ExtractOptions:
    """What to extract. ``rank`` is the largest rank of a LoRA (None: only the cut-offs limit it);
    ``rel_cutoff`` keeps the singular values above ``rel_cutoff · σ_max``, ``sv_epsilon`` those
    above that absolute value (mergekit's ``--sv-epsilon``)."""

    rank: int | None = None
    rel_cutoff: float | None = None
    sv_epsilon: float = 0.0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: bool = False
    save_modules: tuple[str, ...] = ()
    skip_undecomposable: bool = False
    distribute_scale: bool = True
    device: str = "cpu"


@dataclass(frozen=True)
class PlannedModule:
    """One module of the fine-tune and what the adapter will hold for it."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    action: str  # "lora", "lora_embedding" or "whole"
    weight: str | None  # tensor names in both checkpoints
    bias: str | None
    shape: tuple[int, ...]  # the weight's, in the fine-tune
    max_rank: int = 0  # for a LoRA: the largest rank it can get (clamped to its smaller side)
    clamped: bool = False  # the requested rank was larger than the smaller side
    forced: bool = False  # a --save-module: saved whole even when unchanged
    out_dtype: str = "float32"  # the factors' dtype (whole tensors keep the fine-tune's)

    @property
    def key(self) -> str:
        return self.module.rsplit(".", 1)[-1]


@dataclass
class ExtractPlan:
    """The checked extraction: both checkpoints open, every module's action, the output."""

    model: Checkpoint
    base: Checkpoint
    output: Path
    options: ExtractOptions
    modules: list[PlannedModule]
    warnings: list[str] = field(default_factory=list)
    bytes_to_read: int = 0

    def close(self) -> None:
        self.model.close()
        self.base.close()


@dataclass
class ExtractResult:
    output_dir: Path
    modules: list[ExtractedModule]
    rank: int
    target_modules: list[str]
    modules_to_save: list[str]
    adapter_bytes: int
    bytes_read: int
    elapsed_s: float
    peak_rss_bytes: int
    warnings: list[str]


# -- planning (headers only) -------------------------------------------------------------------------


def _check_options(options: ExtractOptions) -> ExtractOptions:
    """``options`` checked, with ``device`` resolved (``auto`` → ``cuda`` when one is visible)."""
    if options.rank is None and options.rel_cutoff is None and options.sv_epsilon <= 0:
        raise UsageError("give the adapter's rank with --rank R (e.g. --rank 64), or --rel-cutoff")
    if options.rank is not None and options.rank < 1:
        raise UsageError(f"--rank must be at least 1, got {options.rank}")
    if options.rel_cutoff is not None and not 0 < options.rel_cutoff < 1:
        raise UsageError(
            f"--rel-cutoff must be between 0 and 1 (a share of the largest singular value), "
            f"got {options.rel_cutoff}"
        )
    if options.sv_epsilon < 0:
        raise UsageError(f"--sv-epsilon must be 0 or more, got {options.sv_epsilon}")
    for flag, patterns in (("--include", options.include), ("--exclude", options.exclude)):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"{flag} {pattern!r} is not a valid regex: {exc}") from None
    device = options.device
    if device not in ("cpu", "auto") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} but no CUDA device is available; use --device cpu")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return dataclasses.replace(options, device=device)


def check_output(output: Path, sources: list[Checkpoint], force: bool) -> Path:
    """The output folder, resolved; refused when it exists (without ``force``), overlaps a
    source, or cannot be written."""
    inputs = [(source.label, source.directory) for source in sources]
    return check_output_folder(output, inputs, force, option="-o/--output")


def _vocab_rows(checkpoint: Checkpoint) -> int | None:
    rows = checkpoint.config_value("vocab_size")
    if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0:
        return rows
    for name, spec in checkpoint.tensors.items():
        if layer_index(name) is None and len(spec.shape) == 2 and is_pre_weight(name):
            return spec.shape[0]
    return None


def _kind(name: str, shape: tuple[int, ...], vocab_rows: int | None) -> str:
    """``embedding``, ``head``, ``linear`` or ``other`` for a module's weight, from its name and
    shape: outside the layers, a 2-D weight named like an embedding is one, and one as long as
    the vocabulary is the head."""
    if len(shape) != 2:
        return "other"
    if layer_index(name) is None:
        if is_pre_weight(name):
            return "embedding"
        if vocab_rows is not None and shape[0] == vocab_rows:
            return "head"
    return "linear"


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def plan_extraction(
    model_dir: Path,
    base_dir: Path,
    output: Path,
    options: ExtractOptions,
    *,
    force: bool = False,
) -> ExtractPlan:
    """Open both checkpoints from their headers and check everything; read no weight."""
    options = _check_options(options)
    model = open_checkpoint(Path(model_dir).expanduser(), f"model {model_dir}")
    try:
        base = open_checkpoint(Path(base_dir).expanduser(), f"base {base_dir}")
    except BaseException:
        model.close()
        raise
    try:
        out = check_output(output, [model, base], force)
        modules, warnings = _plan_modules(model, base, options)
    except BaseException:
        model.close()
        base.close()
        raise
    plan = ExtractPlan(model, base, out, options, modules, warnings)
    plan.bytes_to_read = sum(_bytes_to_read(plan, m) for m in modules)
    return plan


def _bytes_to_read(plan: ExtractPlan, module: PlannedModule) -> int:
    total = 0
    for name in (module.weight, module.bias):
        if name is None:
            continue
        total += plan.model.tensors[name].nbytes
        if not module.forced:
            total += plan.base.tensors[name].nbytes
    return total


def _plan_modules(
    model: Checkpoint, base: Checkpoint, options: ExtractOptions
) -> tuple[list[PlannedModule], list[str]]:
    if model.model_type in _CONV1D_MODEL_TYPES:
        raise CompatibilityError(
            f"{model.label} is a {model.model_type} model, whose layers are transformers' Conv1D "
            "(weights stored transposed); LoRA extraction supports models built of nn.Linear layers "
            "(Llama, Mistral, Qwen, Gemma, Phi-3, ...)"
        )
    warnings: list[str] = []
    floats = {n: s for n, s in model.tensors.items() if s.is_float}
    base_floats = {n: s for n, s in base.tensors.items() if s.is_float}
    missing = sorted(set(floats) - set(base_floats))
    extra = sorted(set(base_floats) - set(floats))
    if missing or extra:
        found = []
        if missing:
            found.append(f"{len(missing)} tensor(s) only in {model.label}: {_names(missing)}")
        if extra:
            found.append(f"{len(extra)} only in {base.label}: {_names(extra)}")
        raise CompatibilityError(
            "; ".join(found) + " — the model is not a fine-tune of this base (same architecture, "
            "same tensors); check --base"
        )
    # modules: prefixes of weights and biases, in the fine-tune's file order (sequential reads)
    modules: dict[str, dict[str, str]] = {}
    ignored: list[str] = []
    order = sorted(floats, key=lambda n: (str(floats[n].file), floats[n].offset))
    for name in order:
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("weight", "bias") and prefix:
            modules.setdefault(prefix, {})[leaf] = name
        else:
            ignored.append(name)
    if ignored:
        warnings.append(
            f"{len(ignored)} tensor(s) that are neither a module's weight nor its bias are not in "
            f"the adapter: {_names(ignored)}"
        )
    module_names = list(modules)
    include = [re.compile(p) for p in options.include]
    exclude = [re.compile(p) for p in options.exclude]
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for pattern in patterns:
            if not any(pattern.search(n) for n in module_names):
                raise UsageError(
                    f"{flag} {pattern.pattern!r} matches no module of {model.label} (module names "
                    f"look like {_names(module_names, 3)})"
                )
    keys = {n.rsplit(".", 1)[-1] for n in module_names}
    for asked in options.save_modules:
        if asked not in keys and asked not in modules:
            raise UsageError(
                f"--save-module {asked!r} names no module of {model.label}; give a module name "
                f"(e.g. {module_names[0] if module_names else 'lm_head'}) or its last part (e.g. "
                f"{sorted(keys)[0] if keys else 'lm_head'})"
            )

    model_vocab = _vocab_rows(model)
    embeddings = options.embeddings
    planned: list[PlannedModule] = []
    shape_problems: list[str] = []
    for module, parts in modules.items():
        weight, bias = parts.get("weight"), parts.get("bias")
        first_name = weight or bias or ""
        shape = floats[first_name].shape
        kind = _kind(module, shape, model_vocab) if weight else "other"
        key = module.rsplit(".", 1)[-1]
        excluded = any(p.search(module) for p in exclude)
        wanted = not excluded and (not include or any(p.search(module) for p in include))
        differs = [n for n in parts.values() if floats[n].shape != base_floats[n].shape]
        vocab_kind = kind in ("embedding", "head")
        if module in options.save_modules or key in options.save_modules:
            action, forced = "whole", True
        elif vocab_kind and not excluded and (not embeddings or differs):
            action, forced = "whole", False
        elif not wanted:
            continue
        elif kind in ("linear", "head"):
            action, forced = "lora", False
        elif kind == "embedding":
            action, forced = "lora_embedding", False
        elif options.skip_undecomposable:
            continue
        else:
            action, forced = "whole", False
        if differs and not (action == "whole" and vocab_kind):
            for name in differs:
                shape_problems.append(
                    f"{name}: {list(floats[name].shape)} in {model.label}, "
                    f"{list(base_floats[name].shape)} in {base.label}"
                )
            continue
        if differs:
            rows = (floats[first_name].shape[0], base_floats[first_name].shape[0])
            warnings.append(
                f"{module}: the vocabularies differ ({rows[0]} rows in {model.label}, {rows[1]} in "
                f"{base.label}), so it is saved whole"
                + (" instead of as a LoRA (as mergekit does)" if embeddings else "")
                + f"; resize the base's embeddings to {rows[0]} rows (resize_token_embeddings) "
                "before loading the adapter"
            )
        out_dtype = floats[first_name].dtype
        if action != "whole":  # the factors: in the dtype of model − base (mergekit's)
            out_dtype = _promoted(out_dtype, base_floats[first_name].dtype)
        max_rank, clamped = 0, False
        if action.startswith("lora"):
            side = min(shape)
            max_rank = side if options.rank is None else min(options.rank, side)
            clamped = options.rank is not None and options.rank > side
            if action == "lora_embedding":
                bias = None  # embeddings have none; never a lora bias
        planned.append(
            PlannedModule(module, action, weight, bias, shape, max_rank, clamped, forced, out_dtype)
        )
    if shape_problems:
        raise CompatibilityError(
            f"{len(shape_problems)} tensor(s) have different shapes in the model and the base, so "
            f"the model is not a fine-tune of this base: {'; '.join(shape_problems[:5])}"
            + (f" and {len(shape_problems) - 5} more" if len(shape_problems) > 5 else "")
            + " — check --base, or leave those modules out with --exclude REGEX"
        )
    if not any(m.action.startswith("lora") for m in planned):
        raise UsageError(
            f"no module of {model.label} is left to extract as a LoRA with these options "
            "(--include/--exclude/--save-module); the adapter would hold no LoRA"
        )
    over = [m for m in planned if m.clamped]
    if over:
        warnings.append(
            f"--rank {options.rank} is more than the smaller side of {len(over)} module(s) "
            f"({_names([f'{m.module} {list(m.shape)}' for m in over], 3)}); their rank is "
            "clamped to it (a full-rank LoRA), as mergekit does"
        )
    return planned, warnings


def _promoted(a: str, b: str) -> str:
    """The dtype ``model − base`` has in torch (mergekit stores the factors in it)."""
    if a == b:
        return a
    order = ["float8_e4m3fn", "float8_e5m2", "float16", "bfloat16", "float32", "float64"]
    if {a, b} == {"float16", "bfloat16"}:
        return "float32"
    return max(a, b, key=lambda d: order.index(d) if d in order else len(order))


# -- the adapter file ---------------------------------------------------------------------------------


def _header_json(entries: list[tuple[str, str, tuple[int, ...], int, int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, begin, end in entries:
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[dtype],
            "shape": list(shape),
            "data_offsets": [begin, end],
        }
    return json.dumps(header, separators=(",", ":")).encode()


class AdapterWriter:
    """``adapter_model.safetensors`` written tensor by tensor.

    Which tensors come, and their largest shapes, are known up front, but not their final shapes
    (a cut-off chooses each rank after its SVD) nor which modules turn out unchanged. So the
    header is reserved at the size of the largest possible one (every planned tensor, at its
    largest shape, at the largest offset) and rewritten at the end with what was written, padded
    with spaces (JSON whitespace, as the reference writer pads) to the reserved size.
    """

    def __init__(self, path: Path, planned: list[OutputTensor]) -> None:
        bound = sum(t.nbytes for t in planned)
        longest = _header_json([(t.name, t.dtype, t.shape, bound, bound) for t in planned])
        self.reserved = len(longest) + (-len(longest) % 8)
        self.path = path
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self.offset = 0
        self._planned = {t.name: t for t in planned}
        self._handle: BinaryIO | None = path.open("wb")
        self._handle.write(struct.pack("<Q", self.reserved) + b" " * self.reserved)

    @property
    def nbytes(self) -> int:
        return 8 + self.reserved + self.offset

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append one tensor (on the CPU, in its planned dtype); returns its bytes."""
        import torch

        planned = self._planned[name]
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = tuple(tensor.shape)
        fits = len(shape) == len(planned.shape) and all(
            s <= p for s, p in zip(shape, planned.shape, strict=True)
        )
        if dtype != planned.dtype or not fits:
            raise RuntimeError(
                f"adapter writer: {name} {list(shape)} {dtype} does not fit its planned "
                f"{list(planned.shape)} {planned.dtype}"
            )
        assert self._handle is not None
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._handle.write(data.numpy().data)
        size = int(data.numel())
        self.entries.append((name, dtype, shape, self.offset, self.offset + size))
        self.offset += size
        return size

    def close(self) -> None:
        """Rewrite the header with the tensors written, and close the file."""
        assert self._handle is not None
        header = _header_json(self.entries)
        if len(header) > self.reserved:  # cannot happen: every value is at most its bound
            raise RuntimeError("adapter writer: the header outgrew its reserved space")
        self._handle.seek(8)
        self._handle.write(header + b" " * (self.reserved - len(header)))
        self._handle.flush()
        self._handle.close()
        self._handle = None

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _planned_outputs(module: PlannedModule, model: Checkpoint) -> list[OutputTensor]:
    """Every tensor the adapter may hold for ``module``, at its largest shape."""
    stem = _PREFIX + module.module
    dtype = module.out_dtype
    if module.action == "whole":  # the fine-tune's tensors as they are stored
        names = [n for n in (module.weight, module.bias) if n is not None]
        specs = [model.tensors[n] for n in names]
        return [OutputTensor(_PREFIX + s.name, s.dtype, s.shape) for s in specs]
    out_features, in_features = module.shape
    r = module.max_rank
    if module.action == "lora_embedding":  # (vocab, hidden) stored; A (r, vocab), B (hidden, r)
        return [
            OutputTensor(f"{stem}.lora_embedding_A", dtype, (r, out_features)),
            OutputTensor(f"{stem}.lora_embedding_B", dtype, (in_features, r)),
        ]
    outputs = [
        OutputTensor(f"{stem}.lora_A.weight", dtype, (r, in_features)),
        OutputTensor(f"{stem}.lora_B.weight", dtype, (out_features, r)),
    ]
    if module.bias is not None:
        outputs.append(OutputTensor(f"{stem}.lora_B.bias", dtype, (out_features,)))
    return outputs


# -- running ------------------------------------------------------------------------------------------


class _Extraction:
    """The state of one run: counters for progress events, the writer, the report."""

    def __init__(self, plan: ExtractPlan, emit: ProgressCallback, cancel: threading.Event) -> None:
        self.plan = plan
        self.emit = emit
        self.cancel = cancel
        self.started = time.perf_counter()
        self.bytes_read = 0
        self.bytes_written = 0
        self.done = 0
        self.current = ""
        self.reports: list[ExtractedModule] = []
        self.ranks: dict[str, int] = {}  # written LoRA modules → rank
        self.lora_biases = 0
        self.staging = Staging(_STAGING_BYTES, plan.options.device)

    def progress(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        throughput = self.bytes_read / elapsed if elapsed > 0 else 0.0
        remaining = self.plan.bytes_to_read - self.bytes_read
        eta = remaining / throughput if throughput > 0 and self.done else None
        device = self.plan.options.device
        gpu_now, gpu_peak = gpu_memory(device)
        return {
            "tensors_done": self.done,
            "tensors_total": len(self.plan.modules),
            "tensor_name": self.current,
            "bytes_read": self.bytes_read,
            "bytes_to_read": self.plan.bytes_to_read,
            "bytes_written": self.bytes_written,
            "elapsed_s": round(elapsed, 3),
            "throughput_bytes_s": round(throughput, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "rss_bytes": current_rss(),
            "peak_rss_bytes": peak_rss(),
            "gpu_bytes": gpu_now,
            "gpu_peak_bytes": gpu_peak,
            "gpus": gpu_devices(device),
        }

    def _read_float(self, checkpoint: Checkpoint, name: str) -> torch.Tensor:
        import torch

        spec = checkpoint.tensors[name]
        out = torch.empty(spec.shape, dtype=torch.float32, device=self.plan.options.device)
        self.bytes_read += checkpoint.read_into(name, out, self.staging)
        return out

    def _difference(self, name: str) -> torch.Tensor:
        """``model − base`` for tensor ``name``, float32 on the device."""
        delta = self._read_float(self.plan.model, name)
        base = self._read_float(self.plan.base, name)
        delta.sub_(base)
        del base
        return delta

    def run(self, writer: AdapterWriter) -> None:
        import torch

        with torch.inference_mode():
            for module in self.plan.modules:
                if self.cancel.is_set():
                    raise MergeCancelled("extraction cancelled; the partial adapter was removed")
                self.current = module.weight or module.bias or module.module
                if module.action == "whole":
                    report = self._whole(module, writer)
                else:
                    report = self._lora(module, writer)
                self.reports.append(report)
                self.bytes_written = writer.nbytes
                self.done += 1
                self.emit(TensorEvent(**self.progress()))
                pause_point("tensor", self.cancel, self.done)
        self.current = ""

    def _whole(self, module: PlannedModule, writer: AdapterWriter) -> ExtractedModule:
        import torch

        plan = self.plan
        names = [n for n in (module.weight, module.bias) if n is not None]
        values = {}
        changed = module.forced
        for name in names:
            value = plan.model.read(name)
            self.bytes_read += value.numel() * value.element_size()
            if not changed:
                other = plan.base.read(name)
                self.bytes_read += other.numel() * other.element_size()
                if other.shape != value.shape:
                    changed = True
                elif other.dtype == value.dtype:
                    changed = not torch.equal(value, other)
                else:
                    changed = not torch.equal(value.float(), other.float())
            values[name] = value
        if not changed:
            return ExtractedModule(
                module=module.module, action="unchanged", rank=0, energy=None, nbytes=0
            )
        size = sum(writer.write(_PREFIX + name, value) for name, value in values.items())
        return ExtractedModule(
            module=module.module, action="whole", rank=0, energy=None, nbytes=size
        )

    def _lora(self, module: PlannedModule, writer: AdapterWriter) -> ExtractedModule:
        import torch

        from mergetui.methods.lora_extract import decompose

        assert module.weight is not None
        options = self.plan.options
        out_dtype = getattr(torch, module.out_dtype)
        delta = self._difference(module.weight)
        bias_delta = None
        if module.bias is not None:
            bias_delta = self._difference(module.bias)
            if not bool(bias_delta.any()):
                bias_delta = None
        if not bool(delta.any()) and bias_delta is None:
            return ExtractedModule(
                module=module.module, action="unchanged", rank=0, energy=None, nbytes=0
            )
        embedding = module.action == "lora_embedding"
        factors = decompose(
            delta.T if embedding else delta,
            module.max_rank,
            sv_epsilon=options.sv_epsilon,
            rel_cutoff=options.rel_cutoff,
            distribute_scale=options.distribute_scale,
        )
        del delta
        if not math.isfinite(factors.energy) or not bool(torch.isfinite(factors.a).all()):
            raise MergeFailed(
                f"{module.weight}: the difference has NaN or infinite values; is a source corrupt?"
            )
        if factors.rank == 0:
            return ExtractedModule(
                module=module.module, action="below_cutoff", rank=0, energy=0.0, nbytes=0
            )
        stem = _PREFIX + module.module
        names = (
            (f"{stem}.lora_embedding_A", f"{stem}.lora_embedding_B")
            if embedding
            else (f"{stem}.lora_A.weight", f"{stem}.lora_B.weight")
        )
        size = writer.write(names[0], factors.a.to(device="cpu", dtype=out_dtype))
        size += writer.write(names[1], factors.b.to(device="cpu", dtype=out_dtype))
        if bias_delta is not None:
            size += writer.write(
                f"{stem}.lora_B.bias", bias_delta.to(device="cpu", dtype=out_dtype)
            )
            self.lora_biases += 1
        self.ranks[module.module] = factors.rank
        return ExtractedModule(
            module=module.module,
            action=module.action,
            rank=factors.rank,
            energy=factors.energy,
            nbytes=size,
        )


def adapter_config(
    plan: ExtractPlan, ranks: dict[str, int], saved_whole: list[PlannedModule], lora_bias: bool
) -> dict[str, Any]:
    """``adapter_config.json``, as mergekit writes it: ``r`` (and ``lora_alpha``, so every scale
    is 1) the largest rank, ``rank_pattern``/``alpha_pattern`` the modules of another rank."""
    rank = max(ranks.values())
    others = {module: r for module, r in ranks.items() if r != rank}
    targets = sorted({module.rsplit(".", 1)[-1] for module in ranks})
    to_save: list[str] = []
    for module in saved_whole:
        name = module.module if module.module in plan.options.save_modules else module.key
        if name not in to_save:
            to_save.append(name)
    return {
        "base_model_name_or_path": str(plan.base.directory.resolve()),
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": targets,
        "modules_to_save": to_save or None,
        "rank_pattern": others,
        "alpha_pattern": others,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "bias": "none",
        "lora_bias": lora_bias,
        "inference_mode": True,
    }


def _card(plan: ExtractPlan, config: dict[str, Any], reports: list[ExtractedModule]) -> str:
    lines = [
        "---",
        "library_name: peft",
        "tags:",
        "- lora",
        "- mergetui",
        "---",
        "",
        "# LoRA adapter extracted from a fine-tune",
        "",
        f"Extracted with mergetui {__version__} (`mergetui lora extract`) from "
        f"`{plan.model.directory.resolve()}` against its base `{plan.base.directory.resolve()}`: "
        "for each linear layer, the best rank-r approximation (truncated SVD, float32) of the "
        "difference of the two weights.",
        "",
        f"- rank: {config['r']} (lora_alpha {config['lora_alpha']})"
        + (
            f", {len(config['rank_pattern'])} module(s) of lower rank"
            if config["rank_pattern"]
            else ""
        ),
        f"- target modules: {', '.join(config['target_modules'])}",
        f"- saved whole: {', '.join(config['modules_to_save'] or []) or 'none'}",
        "",
        "| module | kept | energy kept |",
        "| --- | --- | --- |",
    ]
    for report in reports:
        kept = f"rank {report.rank}" if report.rank else report.action
        energy = "" if report.energy is None else f"{report.energy:.4%}"
        lines.append(f"| {report.module} | {kept} | {energy} |")
    return "\n".join(lines) + "\n"


def run_extraction(
    plan: ExtractPlan,
    *,
    force: bool = False,
    on_event: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> ExtractResult:
    """Stream the modules into an adapter folder and publish it at ``plan.output``; raise a
    :class:`MergeTuiError` on failure, leaving nothing behind."""
    emit = on_event or (lambda event: None)
    stop = cancel or threading.Event()
    out = plan.output
    try:
        check_output(out, [plan.model, plan.base], force)  # again: time has passed since planning
        out.parent.mkdir(parents=True, exist_ok=True)
    except BaseException:
        plan.close()
        raise
    partial = out.parent / f".{out.name}.mergetui-partial-{os.getpid()}"
    discard_partial(partial)
    run = _Extraction(plan, emit, stop)
    writer: AdapterWriter | None = None
    try:
        partial.mkdir()
        planned = [t for m in plan.modules for t in _planned_outputs(m, plan.model)]
        writer = AdapterWriter(partial / ADAPTER_FILE, planned)
        run.run(writer)
        if not run.ranks:
            raise MergeFailed(
                "every selected linear module of the model equals the base's (or has no singular "
                "value above the cut-off): there is no LoRA to extract"
            )
        writer.close()
        emit(PhaseEvent(**run.progress(), message="writing adapter_config.json and README.md"))
        saved_whole = [
            m for m, r in zip(plan.modules, run.reports, strict=True) if r.action == "whole"
        ]
        lora_bias, bias_warning = _lora_bias(plan, run)
        warnings = plan.warnings + ([bias_warning] if bias_warning else [])
        config = adapter_config(plan, run.ranks, saved_whole, lora_bias)
        (partial / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (partial / "README.md").write_text(_card(plan, config, run.reports), encoding="utf-8")
        pause_point("publish", stop)
        if stop.is_set():
            raise MergeCancelled("extraction cancelled; the partial adapter was removed")
        adapter_bytes = (partial / ADAPTER_FILE).stat().st_size
        publish_output(partial, out)
    except KeyboardInterrupt:
        _abort(writer, partial)
        raise MergeCancelled(
            f"extraction interrupted; the partial adapter was removed and {out} was left as it was"
        ) from None
    except MergeCancelled:
        _abort(writer, partial)
        raise
    except Exception as exc:
        _abort(writer, partial)
        where = f" at {run.current}" if run.current else ""
        detail = str(exc) if isinstance(exc, MergeTuiError) else f"{type(exc).__name__}: {exc}"
        raise MergeFailed(
            f"extraction failed{where}: {detail}; the partial adapter was removed"
        ) from exc
    finally:
        plan.close()
    result = ExtractResult(
        output_dir=out,
        modules=run.reports,
        rank=int(config["r"]),
        target_modules=list(config["target_modules"]),
        modules_to_save=list(config["modules_to_save"] or []),
        adapter_bytes=adapter_bytes,
        bytes_read=run.bytes_read,
        elapsed_s=time.perf_counter() - run.started,
        peak_rss_bytes=peak_rss(),
        warnings=warnings,
    )
    emit(
        ExtractedEvent(
            output=str(out),
            rank=result.rank,
            target_modules=result.target_modules,
            modules_to_save=result.modules_to_save,
            adapter_bytes=adapter_bytes,
            modules=run.reports,
            warnings=warnings,
        )
    )
    run.bytes_written = adapter_bytes
    emit(DoneEvent(**run.progress(), output=str(out)))
    return result


def _lora_bias(plan: ExtractPlan, run: _Extraction) -> tuple[bool, str]:
    """PEFT reads ``lora_B.bias`` only with ``lora_bias: true``, which gives every targeted layer
    a bias, and then cannot merge into a layer without one. So it is set when some bias changed
    and every targeted layer has one; otherwise those changes are only in the file (mergetui's
    own LoRA loader applies them, PEFT drops them, as it does mergekit's)."""
    if not run.lora_biases:
        return False, ""
    targets = {module.rsplit(".", 1)[-1] for module in run.ranks}
    layers = {
        name.rpartition(".")[0]
        for name in plan.model.tensors
        if name.endswith(".weight") and name.rpartition(".")[0].rsplit(".", 1)[-1] in targets
    }
    if all(f"{layer}.bias" in plan.model.tensors for layer in layers):
        return True, ""
    return False, (
        f"the bias of {run.lora_biases} LoRA module(s) changed; it is stored as lora_B.bias, which "
        "PEFT ignores here (lora_bias needs a bias on every targeted layer) while mergetui's LoRA "
        "loader applies it"
    )


def _abort(writer: AdapterWriter | None, partial: Path) -> None:
    if writer is not None:
        writer.abort()
    discard_partial(partial)


def extract_lora(
    model_dir: Path,
    base_dir: Path,
    output: Path,
    options: ExtractOptions,
    *,
    force: bool = False,
    on_event: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> ExtractResult:
    """Plan (headers only, every check) and run an extraction."""
    plan = plan_extraction(model_dir, base_dir, output, options, force=force)
    return run_extraction(plan, force=force, on_event=on_event, cancel=cancel)
