"""``mergetui lora merge``: several PEFT LoRA adapters of one base combined into one adapter, as
PEFT's ``PeftModel.add_weighted_adapter`` combines them, without reading the base's weights.

:func:`plan_adapter_merge` opens the adapters from their configs and tensor headers and checks
everything before any tensor is read (the options, each adapter, the adapters against each other,
against the base's headers when one is given, and the output location); :func:`run_adapter_merge`
then streams module by module — read that module's A and B from each adapter, combine them
(:mod:`mergetui.methods.lora_combine`), append them to the output file — and writes a standard PEFT
adapter folder (``adapter_config.json``, ``adapter_model.safetensors`` with PEFT's key names, a
model card) that ``PeftModel.from_pretrained`` loads. As for a model merge, the output is built in a
hidden sibling folder and renamed into place only when complete; a failure, Ctrl-C or cancel
removes it, and the adapters are only ever read.

The output's scale is 1 everywhere (``lora_alpha = r``, per module through ``rank_pattern`` and
``alpha_pattern`` where the ranks differ), as in PEFT. Unlike PEFT, a single adapter is combined
by the type asked for (PEFT silently switches to ``linear``), and the output never keeps rsLoRA
(PEFT copies ``use_rslora`` from the first adapter, which scales its combined adapter by
``sqrt(r)`` when set).

This module imports no torch at import time (the CLI lists the combination types from it). The
table of combination types is :mod:`mergetui.recipe.adapters`' (re-exported here), because the
validation of adapter-merge recipes reads it too and the recipe layer cannot import the engine.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergetui import __version__
from mergetui.engine.executor import check_output_folder, discard_partial, publish_output
from mergetui.engine.plan import resolve_device
from mergetui.engine.progress import (
    ProgressCallback,
    current_rss,
    gpu_devices,
    gpu_memory,
    peak_rss,
)
from mergetui.engine.writer import OutputTensor, ShardedWriter
from mergetui.errors import (
    CompatibilityError,
    MergeCancelled,
    MergeFailed,
    MergeTuiError,
    SourceError,
    UsageError,
)
from mergetui.events import DoneEvent, PhaseEvent, TensorEvent
from mergetui.pauses import pause_point
from mergetui.recipe.adapters import COMBINATIONS as COMBINATIONS
from mergetui.recipe.adapters import SIGN_METHODS as SIGN_METHODS
from mergetui.recipe.adapters import SVD_DRIVERS as SVD_DRIVERS
from mergetui.recipe.adapters import CombinationInfo as CombinationInfo
from mergetui.sources.checkpoint import open_checkpoint, read_json_object
from mergetui.sources.lora import LoraAdapter, LoraTarget, open_lora

if TYPE_CHECKING:
    import torch

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
#: The recipe that asked for the merge (``mergetui run``), saved beside the card to replay it.
RECIPE_FILE = "mergetui.toml"


@dataclass(frozen=True)
class AdapterMergeRequest:
    """What to combine and how; ``weights`` None means 1.0 for each adapter."""

    adapters: tuple[Path, ...]
    output: Path
    combination: str = "svd"
    weights: tuple[float, ...] | None = None
    density: float | None = None
    majority_sign_method: str | None = None  # None: "total" (for the types that elect a sign)
    rank: int | None = None  # svd types; None: the largest rank among the adapters (PEFT's)
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    seed: int = 0
    device: str = "cpu"
    base: Path | None = None  # checked against from its headers when given
    #: the recipe's TOML when ``mergetui run`` asked for this merge: written as mergetui.toml
    #: inside the output, so it is published (or discarded) with the adapter
    recipe_text: str | None = None


@dataclass(frozen=True)
class ModulePlan:
    """One module of the output: where its factors come from and what it becomes."""

    module: str
    a_name: str  # output tensor names (PEFT's keys)
    b_name: str
    rank: int
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    inputs: tuple[LoraTarget, ...]  # per adapter, in order


@dataclass
class AdapterMergePlan:
    """A checked adapter merge: every module's shapes and the output config, nothing read yet."""

    request: AdapterMergeRequest
    adapters: list[LoraAdapter]
    weights: tuple[float, ...]
    rank: int | None  # the svd types' output rank (given or PEFT's default)
    device: str
    dtype: str  # of the output tensors
    modules: list[ModulePlan]
    config: dict[str, Any]
    bytes_to_read: int
    #: tensors every adapter saves whole, identically (the base's embedding that PEFT saves with
    #: an adapter of it, modules_to_save): copied from the first adapter
    copies: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return self.request.output.expanduser().resolve()

    @property
    def tensors_total(self) -> int:
        return 2 * len(self.modules) + len(self.copies)

    def close(self) -> None:
        for adapter in self.adapters:
            adapter.close()


@dataclass
class AdapterMergeResult:
    output_dir: Path
    files: list[Path]
    modules: int
    rank: int  # the output config's r
    bytes_read: int
    bytes_written: int
    elapsed_s: float
    peak_rss_bytes: int
    gpu_peak_bytes: int | None = None


# -- planning and validation ---------------------------------------------------------------------
def plan_adapter_merge(request: AdapterMergeRequest, *, force: bool = False) -> AdapterMergePlan:
    """Open and check everything (options, adapters, base, output) from configs and headers;
    raise a :class:`MergeTuiError` that names the adapter and the fix on the first problem."""
    info = _check_options(request)
    device = _device(request.device)
    weights = request.weights or tuple(1.0 for _ in request.adapters)
    adapters = [_open_adapter(path) for path in request.adapters]
    try:
        _check_together(adapters, request, info)
        if request.base is not None:
            _check_base(adapters, request.base)
        rank = None
        if info.svd:
            rank = request.rank or max(_config_rank(a.config) for a in adapters)
        modules = _plan_modules(adapters, request.combination, info, rank)
        check_output(request, force)
        copies = _check_saved_whole(adapters)
    except BaseException:
        for adapter in adapters:
            adapter.close()
        raise
    bytes_to_read = sum(
        a.tensors[t.pieces[piece]].nbytes
        for m in modules
        for a, t in zip(adapters, m.inputs, strict=True)
        for piece in ("A", "B")
    ) + sum(adapters[0].tensors[name].nbytes for name in copies)
    return AdapterMergePlan(
        request=request,
        adapters=adapters,
        weights=tuple(weights),
        rank=rank,
        device=device,
        dtype=_output_dtype(adapters, modules),
        modules=modules,
        config=_output_config(adapters, modules),
        bytes_to_read=bytes_to_read,
        copies=copies,
    )


def _check_options(request: AdapterMergeRequest) -> CombinationInfo:
    kind = request.combination
    info = COMBINATIONS.get(kind)
    if info is None:
        raise UsageError(
            f"unknown combination type {kind!r}; choose one of {', '.join(COMBINATIONS)}"
        )
    count = len(request.adapters)
    if count == 0:
        raise UsageError("give the adapter folders to combine (at least one)")
    if request.weights is not None:
        if len(request.weights) != count:
            example = ",".join(["1.0"] * count)
            raise UsageError(
                f"{len(request.weights)} weight(s) for {count} adapter(s); give one weight per "
                f"adapter, in the adapters' order (e.g. --weights {example})"
            )
        if not all(math.isfinite(w) for w in request.weights):
            raise UsageError(f"the weights must be finite numbers, got {list(request.weights)}")
    using = [name for name, other in COMBINATIONS.items() if other.density]
    if info.density:
        if request.density is None:
            raise UsageError(
                f"the {kind} combination needs --density: the fraction of each adapter's entries "
                "it keeps, in (0, 1] (e.g. --density 0.5)"
            )
        if not 0 < request.density <= 1:
            raise UsageError(
                f"--density must be in (0, 1] (the fraction of entries kept), got {request.density}"
            )
    elif request.density is not None:
        raise UsageError(
            f"--density has no effect with {kind}; it is for {', '.join(using)} — drop it or "
            "choose one of those"
        )
    method = request.majority_sign_method
    if method is not None:
        if method not in SIGN_METHODS:
            raise UsageError(
                f"unknown majority sign method {method!r}; use {' or '.join(SIGN_METHODS)}"
            )
        if not info.sign:
            electing = [name for name, other in COMBINATIONS.items() if other.sign]
            raise UsageError(
                f"--majority-sign has no effect with {kind}; it is for {', '.join(electing)}"
            )
    svd_types = [name for name, other in COMBINATIONS.items() if other.svd]
    if not info.svd:
        for given, option in (
            (request.rank is not None, "--rank"),
            (request.svd_clamp is not None, "--svd-clamp"),
            (request.svd_driver is not None, "--svd-driver"),
        ):
            if given:
                made = "the sum of the adapters' ranks" if kind == "cat" else "the adapters' rank"
                raise UsageError(
                    f"{option} is for the SVD types ({', '.join(svd_types)}); {kind} makes an "
                    f"adapter of {made}"
                )
    if request.rank is not None and request.rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {request.rank}")
    if request.svd_clamp is not None and not 0 < request.svd_clamp <= 1:
        raise UsageError(
            f"--svd-clamp is a quantile in (0, 1] (e.g. 0.99), got {request.svd_clamp}"
        )
    if request.svd_driver is not None:
        if request.svd_driver not in SVD_DRIVERS:
            raise UsageError(
                f"unknown --svd-driver {request.svd_driver!r}; use one of {', '.join(SVD_DRIVERS)}"
            )
        if not request.device.startswith("cuda"):
            raise UsageError("--svd-driver picks a cuSOLVER routine: it needs --device cuda")
    return info


def _device(requested: str) -> str:
    if not re.fullmatch(r"cpu|auto|mps|cuda(:\d+)?", requested):
        raise UsageError(f"unknown --device {requested!r}; use cpu, cuda, cuda:N or auto")
    try:
        return resolve_device(requested)
    except MergeTuiError:
        raise UsageError(
            f"--device {requested}: no CUDA device is available here; use --device cpu or auto"
        ) from None


def _open_adapter(path: Path) -> LoraAdapter:
    """One adapter from its config and header, refused when it holds anything but LoRA pairs of
    matrices (DoRA, saved modules, biases, convolutions) — those have no combination rule."""
    directory = path.expanduser()
    label = str(path)
    if not directory.is_dir():
        raise SourceError(f"LoRA adapter {label}: folder not found; check the path")
    config = read_json_object(
        directory / CONFIG_FILE,
        f"LoRA adapter {label}: no {CONFIG_FILE} in that folder; give folders saved by PEFT's "
        "save_pretrained",
    )
    if config.get("use_dora"):
        raise SourceError(
            f"LoRA adapter {label} is a DoRA adapter (use_dora = true): DoRA's magnitude vectors "
            "have no combination rule; fold it into its base with PEFT's merge_and_unload (or "
            "`mergetui run` with lora = ...) and merge the models instead"
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(("pissa", "olora", "corda", "loftq")):
        raise SourceError(
            f"LoRA adapter {label} was initialised with init_lora_weights = {init}, which also "
            "changes the base model's weights; only adapters of the unchanged base can be "
            "combined — save it with PEFT's path_initial_model_for_weight_conversion to turn it "
            "into a plain LoRA first"
        )
    if config.get("target_parameters"):
        raise SourceError(
            f"LoRA adapter {label} targets parameters (target_parameters), not modules; only "
            "adapters of modules can be combined (PEFT's add_weighted_adapter refuses them too)"
        )
    adapter = open_lora(directory, label)
    problems = []
    for module, target in sorted(adapter.targets.items()):
        pieces = target.pieces
        if "B_bias" in pieces:
            problems.append(
                f"has a LoRA bias for {module} (lora_bias = true); it cannot be combined"
            )
            break
        if "A" not in pieces or "B" not in pieces:
            problems.append(f"has only half of the LoRA pair for {module}; the file is incomplete")
            break
        shapes = [adapter.tensors[pieces[p]].shape for p in ("A", "B")]
        if any(len(shape) != 2 for shape in shapes):
            problems.append(
                f"adapts {module} with {len(shapes[0])}-D factors (a convolution?); only linear "
                "and embedding layers can be combined"
            )
            break
    if not adapter.targets:
        problems.append("holds no LoRA pairs")
    if problems:
        adapter.close()
        raise SourceError(f"LoRA adapter {label} " + "; it also ".join(problems))
    return adapter


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _same_base(first: str, other: str) -> bool:
    if first == other:
        return True
    a, b = Path(first).expanduser(), Path(other).expanduser()
    try:
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    except OSError:
        return False


def _rank_of(adapter: LoraAdapter, target: LoraTarget) -> int:
    return adapter.tensors[target.pieces["A"]].shape[0]


def _delta_shape(adapter: LoraAdapter, target: LoraTarget) -> tuple[int, int]:
    """(rows of B, columns of A): the shape of ``B @ A`` as the adapter stores its factors."""
    return adapter.tensors[target.pieces["B"]].shape[0], adapter.tensors[target.pieces["A"]].shape[
        1
    ]


def _check_together(
    adapters: list[LoraAdapter], request: AdapterMergeRequest, info: CombinationInfo
) -> None:
    """The adapters against the first: one base, the same modules, the same shapes, and for the
    types that combine A and B entry by entry the same rank."""
    first = adapters[0]
    base = first.base_model_name
    for other in adapters[1:]:
        other_base = other.base_model_name
        if base and other_base and not _same_base(base, other_base):
            raise CompatibilityError(
                f"the adapters were trained on different bases: {first.label} on {base!r}, "
                f"{other.label} on {other_base!r}; only adapters of one base can be combined "
                "(if both name the same model, say a local copy and its Hub id, make "
                "base_model_name_or_path in their adapter_config.json agree)"
            )
    for other in adapters[1:]:
        lacking = sorted(set(first.targets) - set(other.targets))
        extra = sorted(set(other.targets) - set(first.targets))
        if lacking or extra:
            parts = []
            if extra:
                parts.append(f"{other.label} adapts {_names(extra)}, which {first.label} does not")
            if lacking:
                parts.append(f"{other.label} lacks {_names(lacking)}, which {first.label} adapts")
            raise CompatibilityError(
                "the adapters target different modules: "
                + "; ".join(parts)
                + "; combine adapters trained with the same target_modules (and layers)"
            )
        for module, target in first.targets.items():
            theirs = other.targets[module]
            mine, shape = _delta_shape(first, target), _delta_shape(other, theirs)
            if mine != shape or target.embedding != theirs.embedding:
                raise CompatibilityError(
                    f"{module}: {first.label} changes a {list(mine)} weight and {other.label} a "
                    f"{list(shape)} one: the adapters were trained on different bases"
                )
    if not info.same_rank:
        return
    for module in first.targets:
        ranks = [_rank_of(a, a.targets[module]) for a in adapters]
        if len(set(ranks)) > 1:
            odd = next(a for a, r in zip(adapters, ranks, strict=True) if r != ranks[0])
            cat_rank = sum(ranks)
            raise CompatibilityError(
                f"{request.combination} combines the adapters' A and B factors entry by entry, so "
                f"they need the same rank, but {module} has rank {ranks[0]} in {first.label} and "
                f"rank {_rank_of(odd, odd.targets[module])} in {odd.label}; use --combination cat "
                f"(exact, rank {cat_rank} there) or svd (cut to --rank, by default the largest)"
            )


def _check_saved_whole(adapters: list[LoraAdapter]) -> list[str]:
    """The tensors the adapters save whole (PEFT saves the base's embedding with an adapter
    that targets it; ``modules_to_save``): every adapter must save the same ones with the same
    values, which the output then keeps. These are read (and compared) here, before any output
    is made."""
    import torch

    first = adapters[0]
    names = sorted(first.replacements.values())
    for other in adapters[1:]:
        theirs = sorted(other.replacements.values())
        if theirs != names:
            only = sorted(set(names) ^ set(theirs))
            raise CompatibilityError(
                f"{first.label} and {other.label} do not save the same whole tensors "
                f"({_names(only)} in only one of them: modules_to_save, or an embedding one "
                "of them resized); only adapters that save the same ones can be combined"
            )
        for name in names:
            mine, spec = first.tensors[name], other.tensors[name]
            same = (mine.shape, mine.dtype) == (spec.shape, spec.dtype) and torch.equal(
                first.read_tensor(name), other.read_tensor(name)
            )
            if not same:
                raise CompatibilityError(
                    f"{first.label} and {other.label} save {name} whole with different values "
                    "(modules_to_save trained in each, or embeddings resized differently); "
                    "such tensors cannot be combined — fold each adapter into the base with "
                    "`mergetui run` and merge the models instead"
                )
    return names


def _check_base(adapters: list[LoraAdapter], base: Path) -> None:
    """Each adapter against the base's tensor headers (no weight is read)."""
    directory = base.expanduser()
    if (
        not (directory / "model.safetensors").is_file()
        and not (directory / "model.safetensors.index.json").is_file()
    ):
        raise SourceError(
            f"--base {base}: no safetensors weights there; the base is checked from safetensors "
            "headers only (a .bin checkpoint would have to be loaded) — drop --base or convert it"
        )
    checkpoint = open_checkpoint(directory, str(base))
    try:
        for adapter in adapters:
            problems = adapter.check_against(checkpoint)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise CompatibilityError(
                    f"LoRA adapter {adapter.label} does not fit the base {base}: it "
                    f"{problems[0]}{more}"
                )
    finally:
        checkpoint.close()


def _config_rank(config: dict[str, Any]) -> int:
    """PEFT's rank of an adapter: ``r``, or the largest of it and its ``rank_pattern``."""
    pattern = config.get("rank_pattern") or {}
    return max([int(config.get("r", 8)), *(int(v) for v in pattern.values())])


def _plan_modules(
    adapters: list[LoraAdapter], kind: str, info: CombinationInfo, svd_rank: int | None
) -> list[ModulePlan]:
    first = adapters[0]
    modules = []
    for module in sorted(first.targets, key=_natural):
        inputs = tuple(a.targets[module] for a in adapters)
        ranks = [_rank_of(a, t) for a, t in zip(adapters, inputs, strict=True)]
        if info.svd:
            assert svd_rank is not None
            rank = svd_rank
        elif kind == "cat":
            rank = sum(ranks)
        else:
            rank = ranks[0]
        out_rows, in_columns = _delta_shape(first, inputs[0])
        target = inputs[0]
        modules.append(
            ModulePlan(
                module=module,
                a_name=target.pieces["A"],
                b_name=target.pieces["B"],
                rank=rank,
                a_shape=(rank, in_columns),
                b_shape=(out_rows, rank),
                inputs=inputs,
            )
        )
    return modules


def _natural(name: str) -> list[Any]:
    """Layer numbers in numeric order (``layers.2`` before ``layers.10``), as a model lists them."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _output_dtype(adapters: list[LoraAdapter], modules: list[ModulePlan]) -> str:
    """The adapters' dtype when they agree (and it is a float type PEFT keeps), else float32."""
    stored = {
        a.tensors[t.pieces[p]].dtype
        for m in modules
        for a, t in zip(adapters, m.inputs, strict=True)
        for p in ("A", "B")
    }
    if len(stored) == 1 and (dtype := stored.pop()) in ("float32", "float16", "bfloat16"):
        return dtype
    return "float32"


_SELECTION_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def _output_config(adapters: list[LoraAdapter], modules: list[ModulePlan]) -> dict[str, Any]:
    """The first adapter's config with PEFT's changes: the rank, ``lora_alpha = r`` (scale 1),
    the union of the target modules; per-module ranks in ``rank_pattern`` (with the same
    ``alpha_pattern``) where they differ from ``r``."""
    config = dict(adapters[0].config)
    ranks = Counter(m.rank for m in modules)
    r = max(ranks, key=lambda rank: (ranks[rank], rank))  # the most common, the larger on a tie
    patterns = {re.escape(m.module): m.rank for m in modules if m.rank != r}
    config.update(
        r=r,
        lora_alpha=r,
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        use_rslora=False,
        use_dora=False,
        lora_bias=False,
        target_modules=_target_modules(adapters, modules),
        inference_mode=True,
    )
    config.pop("trainable_token_indices", None)
    return config


def _target_modules(adapters: list[LoraAdapter], modules: list[ModulePlan]) -> Any:
    """PEFT's union: the lists joined, or the regular expressions alternated. When the adapters
    select layers differently, or mix lists and expressions, the modules by their full names."""
    values = [a.config.get("target_modules") for a in adapters]
    same_selection = all(
        a.config.get(key) == adapters[0].config.get(key)
        for a in adapters
        for key in _SELECTION_KEYS
    )
    lists = [v for v in values if isinstance(v, list)]
    texts = [v for v in values if isinstance(v, str)]
    if same_selection and len(lists) == len(values):
        return sorted({name for value in lists for name in value})
    if same_selection and len(texts) == len(values):
        distinct = list(dict.fromkeys(texts))
        return distinct[0] if len(distinct) == 1 else "|".join(f"({v})" for v in distinct)
    return [m.module for m in modules]


def check_output(request: AdapterMergeRequest, force: bool) -> None:
    """Refuse an output that exists (without ``force``), overlaps an adapter or the base, or
    cannot be written."""
    inputs = [("the input adapter", folder) for folder in request.adapters]
    if request.base is not None:
        inputs.append(("the input base", request.base))
    check_output_folder(request.output, inputs, force, option="output folder")


# -- running -------------------------------------------------------------------------------------
def merge_adapters(
    request: AdapterMergeRequest,
    *,
    force: bool = False,
    on_event: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> AdapterMergeResult:
    """Plan, check and run in one call."""
    plan = plan_adapter_merge(request, force=force)
    return run_adapter_merge(plan, force=force, on_event=on_event, cancel=cancel)


def run_adapter_merge(
    plan: AdapterMergePlan,
    *,
    force: bool = False,
    on_event: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> AdapterMergeResult:
    """Combine and write the planned adapter, publish it, and return what was done; a failure
    raises :class:`MergeFailed` (exit code 1), a cancel :class:`MergeCancelled`, and in both
    cases nothing is left behind."""
    try:
        check_output(plan.request, force)
    except BaseException:
        plan.close()
        raise
    out = plan.output_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.mergetui-partial-{os.getpid()}"
    stop = cancel or threading.Event()
    run = _Run(plan, partial, on_event or (lambda event: None), stop)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        files = run.stream()
        run.emit(PhaseEvent(**run.progress(), message="writing adapter_config.json and model card"))
        files += _write_support_files(plan, partial)
        pause_point("publish", stop)
        if stop.is_set():
            raise MergeCancelled("adapter merge cancelled; the partial output was removed")
        publish_output(partial, out)
    except KeyboardInterrupt:
        discard_partial(partial)
        raise MergeCancelled(
            f"adapter merge interrupted; the partial output was removed and {out} was left as it was"
        ) from None
    except MergeCancelled:
        discard_partial(partial)
        raise
    except Exception as exc:
        discard_partial(partial)
        where = f" at {run.current}" if run.current else ""
        detail = str(exc) if isinstance(exc, MergeTuiError) else f"{type(exc).__name__}: {exc}"
        raise MergeFailed(
            f"adapter merge failed{where}: {detail}; the partial output was removed"
        ) from exc
    finally:
        plan.close()
    result = AdapterMergeResult(
        output_dir=out,
        files=[out / f.name for f in files],
        modules=len(plan.modules),
        rank=int(plan.config["r"]),
        bytes_read=run.bytes_read,
        bytes_written=run.bytes_written,
        elapsed_s=time.perf_counter() - run.started,
        peak_rss_bytes=peak_rss(),
        gpu_peak_bytes=gpu_memory(plan.device)[1],
    )
    run.current = ""
    run.emit(DoneEvent(**run.progress(), output=str(out)))
    pause_point("done", stop)
    return result


class _Run:
    """One streaming run: module after module, and the counters behind its events."""

    def __init__(
        self,
        plan: AdapterMergePlan,
        directory: Path,
        emit: ProgressCallback,
        cancel: threading.Event,
    ) -> None:
        self.plan = plan
        self.directory = directory
        self.emit = emit
        self.cancel = cancel
        self.started = time.perf_counter()
        self.bytes_read = 0
        self.bytes_written = 0
        self.done = 0
        self.current = ""

    def progress(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        throughput = self.bytes_read / elapsed if elapsed > 0 else 0.0
        remaining = self.plan.bytes_to_read - self.bytes_read
        eta = remaining / throughput if throughput > 0 and self.done else None
        gpu_now, gpu_peak = gpu_memory(self.plan.device)
        return {
            "tensors_done": self.done,
            "tensors_total": self.plan.tensors_total,
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
            "gpus": gpu_devices(self.plan.device),
        }

    def stream(self) -> list[Path]:
        import torch

        from mergetui.methods.lora_combine import Combination, LoraFactors, combine_lora

        plan = self.plan
        request = plan.request
        how = Combination(
            kind=request.combination,
            weights=plan.weights,
            density=request.density,
            majority_sign_method=request.majority_sign_method or "total",
            rank=plan.rank,
            svd_clamp=request.svd_clamp,
            svd_full_matrices=request.svd_full_matrices,
            svd_driver=request.svd_driver,
            seed=request.seed,
        )
        outputs = []
        for m in plan.modules:
            outputs.append(OutputTensor(m.a_name, plan.dtype, m.a_shape))
            outputs.append(OutputTensor(m.b_name, plan.dtype, m.b_shape))
        first = plan.adapters[0]
        for name in plan.copies:
            spec = first.tensors[name]
            outputs.append(OutputTensor(name, spec.dtype, spec.shape))
        writer = ShardedWriter(self.directory, outputs, shard_size=1 << 62)
        dtype = getattr(torch, plan.dtype)
        try:
            with torch.inference_mode():
                for index, module in enumerate(plan.modules, start=1):
                    if self.cancel.is_set():
                        raise MergeCancelled(
                            "adapter merge cancelled; the partial output was removed"
                        )
                    self.current = module.module
                    factors = [
                        LoraFactors(
                            a=self._read_piece(adapter, target.pieces["A"]),
                            b=self._read_piece(adapter, target.pieces["B"]),
                            scale=target.scale,
                        )
                        for adapter, target in zip(plan.adapters, module.inputs, strict=True)
                    ]
                    a, b = combine_lora(module.module, factors, how)
                    del factors
                    for name, tensor in ((module.a_name, a), (module.b_name, b)):
                        if not bool(torch.isfinite(tensor).all()):
                            raise MergeFailed(
                                f"{name} has NaN or infinite values after the "
                                f"{request.combination} combination; check the adapters (a "
                                "corrupt file?) and the weights"
                            )
                        writer.write(name, tensor.to(device="cpu", dtype=dtype, copy=True))
                        self.bytes_written = writer.bytes_written
                        self.done += 1
                        self.current = name
                        self.emit(TensorEvent(**self.progress()))
                        self.current = module.module
                    del a, b
                    pause_point("tensor", self.cancel, index)
                for name in plan.copies:
                    self.current = name
                    stored = getattr(torch, first.tensors[name].dtype)
                    self.bytes_read += first.tensors[name].nbytes
                    writer.write(name, first.read_tensor(name).to(stored))  # read on the CPU
                    self.bytes_written = writer.bytes_written
                    self.done += 1
                    self.emit(TensorEvent(**self.progress()))
            files = writer.close()
        finally:
            writer.abort()
        self.current = ""
        adapter_file = self.directory / ADAPTER_FILE
        os.replace(files[0], adapter_file)  # one shard, named as PEFT names it
        return [adapter_file]

    def _read_piece(self, adapter: LoraAdapter, name: str) -> torch.Tensor:
        tensor = adapter.read_tensor(name)  # float32, on the CPU
        self.bytes_read += adapter.tensors[name].nbytes
        return tensor.to(self.plan.device)


def _write_support_files(plan: AdapterMergePlan, directory: Path) -> list[Path]:
    config_path = directory / CONFIG_FILE
    config_path.write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n", "utf-8")
    card_path = directory / "README.md"
    card_path.write_text(adapter_card(plan), encoding="utf-8")
    written = [config_path, card_path]
    if plan.request.recipe_text is not None:
        recipe_path = directory / RECIPE_FILE
        recipe_path.write_text(plan.request.recipe_text, encoding="utf-8")
        written.append(recipe_path)
    return written


def adapter_card(plan: AdapterMergePlan) -> str:
    """A model card: what was combined, how, and the command that does it again."""
    request = plan.request
    base = plan.adapters[0].base_model_name
    front = ["---"]
    if base:
        front.append(f"base_model: {base}")
    front += ["library_name: peft", "tags:", "- lora", "- mergetui", f"- {request.combination}"]
    front += ["---", ""]
    info = COMBINATIONS[request.combination]
    lines = [
        f"# Combined LoRA adapter ({request.combination})",
        "",
        f"Made with mergetui {__version__} from {len(plan.adapters)} LoRA adapter(s) of "
        f"`{base or 'one base'}`, as PEFT's `add_weighted_adapter` with combination_type "
        f"`{request.combination}`: {info.summary}. No weight of the base was read.",
        "",
        "| adapter | weight | rank | lora_alpha |",
        "| --- | --- | --- | --- |",
    ]
    for adapter, weight in zip(plan.adapters, plan.weights, strict=True):
        config = adapter.config
        lines.append(
            f"| `{adapter.directory.resolve()}` | {weight} | {config.get('r')} | "
            f"{config.get('lora_alpha')} |"
        )
    parameters = [f"rank {plan.config['r']} (lora_alpha = r: scale 1)"]
    if request.density is not None:
        parameters.append(f"density {request.density}")
    if info.sign:
        parameters.append(f"majority sign {request.majority_sign_method or 'total'}")
    if info.svd and request.svd_clamp is not None:
        parameters.append(f"svd clamp {request.svd_clamp}")
    if info.random:
        parameters.append(
            f"seed {request.seed} (each tensor's random mask comes from the seed and its name)"
        )
    lines += ["", "Parameters: " + "; ".join(parameters) + ".", ""]
    lines += [
        "Load it with `PeftModel.from_pretrained(base_model, path)`. Made again with:",
        "",
        "```",
        _command(plan),
        "```",
        "",
    ]
    return "\n".join(front + lines)


def _command(plan: AdapterMergePlan) -> str:
    request = plan.request
    words = ["mergetui lora merge", *(str(a.directory.resolve()) for a in plan.adapters)]
    words += ["--combination", request.combination]
    words += ["--weights", ",".join(str(w) for w in plan.weights)]
    if request.density is not None:
        words += ["--density", str(request.density)]
    if request.majority_sign_method is not None:
        words += ["--majority-sign", request.majority_sign_method]
    if request.rank is not None:
        words += ["--rank", str(request.rank)]
    if request.svd_clamp is not None:
        words += ["--svd-clamp", str(request.svd_clamp)]
    if not request.svd_full_matrices and COMBINATIONS[request.combination].svd:
        words.append("--svd-reduced")
    if COMBINATIONS[request.combination].random:
        words += ["--seed", str(request.seed)]
    words += ["-o", str(plan.output_dir)]
    return " ".join(words)
