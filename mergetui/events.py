"""The JSON event contract: one dataclass per event kind, used by every writer and every reader.

``mergetui run --json``, ``mergetui hub download --json`` and ``mergetui compare --json`` print one
JSON object per line, and that stream is both the scripting API and how the TUI follows a
background merge (:mod:`mergetui.jobs` keeps it in ``events.jsonl``). So the shapes live here and
nowhere else: the engine and the CLI build these objects and call :meth:`Event.to_json`; the job
reader, the TUI and ``mergetui jobs`` get them back with :func:`parse_event`. A renamed or removed
field then fails in one place (the round-trip test, and the README's list that a test compares with
these classes) instead of as a silent ``KeyError`` in a reader.

Every stream starts with :class:`StartEvent`, which carries :data:`SCHEMA_VERSION`, and ends with
exactly one terminal event: ``done`` (merge), ``downloaded``, ``compared``, ``swept``, or ``cancelled`` /
``error`` (with the process's exit code). Readers ignore fields they do not know, so adding a field
is compatible; removing or changing one bumps the schema version.

This module imports nothing heavy (no torch, no Textual): every layer may use it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: Bumped when a field is removed or changes meaning (adding one is compatible).
SCHEMA_VERSION = 1

_KINDS: dict[str, type[Event]] = {}


class EventFormatError(ValueError):
    """A line that is not a mergetui event of this schema (unknown kind, missing field)."""


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event; ``kind`` is the value of the ``"event"`` key in JSON."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind:
            if kind in _KINDS:
                raise TypeError(f"two event classes for kind {kind!r}")
            _KINDS[kind] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        """One line of JSON, compact (a merge writes one per tensor)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))


@dataclass(frozen=True, kw_only=True)
class StartEvent(Event):
    """First line of every stream: which schema the lines follow, and who wrote them."""

    kind: ClassVar[str] = "start"
    schema: int = SCHEMA_VERSION
    version: str
    command: str


@dataclass(frozen=True, kw_only=True)
class DownloadEvent(Event):
    """Bytes of one Hub model fetched so far (files download in parallel: one model, one bar)."""

    kind: ClassVar[str] = "download"
    repo_id: str
    bytes_done: int
    bytes_total: int
    files_total: int
    elapsed_s: float
    eta_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class DownloadedEvent(Event):
    """``hub download`` finished: the snapshot folder in the HF cache."""

    kind: ClassVar[str] = "downloaded"
    repo_id: str
    path: str


@dataclass(frozen=True, kw_only=True)
class GpuUse:
    """One GPU's memory as the CUDA runtime sees it (other processes' use counts too)."""

    index: int
    name: str
    used_bytes: int
    total_bytes: int


@dataclass(frozen=True, kw_only=True)
class PlanEvent(Event):
    """The merge is planned and checked; nothing is read yet. ``report`` is the compatibility
    report (the same object ``mergetui check --json`` prints), ``ok`` whether it has no error.
    With ``--dry-run`` this is the last line (``dry_run`` true)."""

    kind: ClassVar[str] = "plan"
    method: str
    device: str
    output: str
    tensors_total: int
    bytes_to_read: int
    ok: bool
    dry_run: bool = False
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ProgressEvent(Event):
    """Where a running merge stands (the fields shared by ``tensor``, ``phase`` and ``done``)."""

    tensors_done: int
    tensors_total: int
    tensor_name: str = ""
    bytes_read: int
    bytes_to_read: int
    bytes_written: int
    elapsed_s: float
    throughput_bytes_s: float
    eta_s: float | None = None
    rss_bytes: int
    peak_rss_bytes: int
    #: bytes this merge holds on its CUDA device now and at most (None on the CPU)
    gpu_bytes: int | None = None
    gpu_peak_bytes: int | None = None
    #: the merge's GPU as the driver sees it (None on the CPU)
    gpus: list[GpuUse] | None = None


@dataclass(frozen=True, kw_only=True)
class TensorEvent(ProgressEvent):
    """One more tensor merged (one line per tensor)."""

    kind: ClassVar[str] = "tensor"


@dataclass(frozen=True, kw_only=True)
class PhaseEvent(ProgressEvent):
    """A step that is not a tensor: writing config, tokenizer and model card."""

    kind: ClassVar[str] = "phase"
    message: str


@dataclass(frozen=True, kw_only=True)
class DoneEvent(ProgressEvent):
    """The merge is complete and in place at ``output`` (last line; exit code 0)."""

    kind: ClassVar[str] = "done"
    output: str


@dataclass(frozen=True, kw_only=True)
class EndingEvent(Event):
    """How a command that did not finish ended: the one-line message and the exit code."""

    message: str
    exit_code: int


@dataclass(frozen=True, kw_only=True)
class CancelledEvent(EndingEvent):
    """Stopped by Ctrl-C, SIGTERM or a cancel; nothing half-written is left (exit code 130)."""

    kind: ClassVar[str] = "cancelled"


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(EndingEvent):
    """The command failed (last line): 2 invalid input, nothing written; 1 the merge failed and
    its partial output was removed. ``message`` is the one-line error; details go to the log."""

    kind: ClassVar[str] = "error"


@dataclass(frozen=True, kw_only=True)
class TokenEvent(Event):
    """``compare``: a piece of one model's answer to one prompt (index into the prompts)."""

    kind: ClassVar[str] = "token"
    model: str
    prompt: int
    text: str


@dataclass(frozen=True, kw_only=True)
class AnswerSummary:
    """``compare``: one model's whole answer to one prompt."""

    model: str
    prompt: int
    text: str
    new_tokens: int
    tokens_per_s: float
    stopped_on_eos: bool


@dataclass(frozen=True, kw_only=True)
class ComparedEvent(Event):
    """``compare`` finished (last line): every answer, whole."""

    kind: ClassVar[str] = "compared"
    models: list[str]
    prompts: list[str]
    answers: list[AnswerSummary]


@dataclass(frozen=True, kw_only=True)
class TrialEvent(Event):
    """``sweep``: one trial is over. ``values`` are its swept values by recipe key, ``scores``
    the merge's score per task, ``objective`` what the sweep maximises (None when the trial
    failed, with ``message`` saying why); ``best`` is the best trial's number so far."""

    kind: ClassVar[str] = "trial"
    number: int
    trials_total: int
    values: dict[str, Any]
    scores: dict[str, float]
    objective: float | None
    merge_s: float
    eval_s: float
    best: int | None
    best_objective: float | None
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class TrialProgressEvent(Event):
    """``sweep``: what a trial in flight is doing (``trial`` None: scoring the parents), for live
    displays; ``fraction`` of that step done (0-1, None when unknown). Sent at most a few times a
    second per trial; a reader that only wants results can ignore it."""

    kind: ClassVar[str] = "trial_progress"
    trial: int | None
    what: str
    fraction: float | None


@dataclass(frozen=True, kw_only=True)
class SweptEvent(Event):
    """``sweep`` finished (last line): the best trial, its objective and recipe file."""

    kind: ClassVar[str] = "swept"
    trials_done: int
    best: int | None
    best_objective: float | None
    best_recipe: str | None
    output: str


@dataclass(frozen=True, kw_only=True)
class ExtractedModule:
    """``lora extract``: what the adapter holds for one module of the fine-tune. ``action`` is
    ``lora`` (``lora_A``/``lora_B``), ``lora_embedding``, ``whole`` (saved whole, in
    ``modules_to_save``), ``unchanged`` (equal to the base: left out) or ``below_cutoff`` (no
    singular value above the cut-off: left out); ``energy`` is the share of the difference's
    energy (Σσ² kept / Σσ²) the rank keeps, None unless a LoRA."""

    module: str
    action: str
    rank: int
    energy: float | None
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class ExtractedEvent(Event):
    """``lora extract``: the adapter is written and in place (just before ``done``): its
    ``adapter_config.json`` rank and modules, its size, and one entry per module."""

    kind: ClassVar[str] = "extracted"
    output: str
    rank: int
    target_modules: list[str]
    modules_to_save: list[str]
    adapter_bytes: int
    modules: list[ExtractedModule]
    warnings: list[str] = field(default_factory=list)


#: Nested dataclass fields, rebuilt from their dicts by :func:`parse_event`.
_NESTED: dict[str, type] = {"gpus": GpuUse, "answers": AnswerSummary, "modules": ExtractedModule}


def event_kinds() -> dict[str, type[Event]]:
    """Every event kind and its class (for documentation and tests)."""
    return dict(_KINDS)


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """``cls`` from ``data``: unknown keys ignored, a missing required field an error."""
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        if spec.name in data:
            value = data[spec.name]
            nested = _NESTED.get(spec.name)
            if nested is not None and value is not None:
                if not isinstance(value, list):
                    raise EventFormatError(f"{where}: {spec.name} must be a list, not {value!r}")
                value = [_build(nested, item, f"{where}.{spec.name}") for item in value]
            values[spec.name] = value
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise EventFormatError(f"{where}: the {spec.name!r} field is missing")
    return cls(**values)


def parse_event(data: Mapping[str, Any]) -> Event:
    """The event a decoded JSON object describes; :class:`EventFormatError` if it is none."""
    kind = data.get("event")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventFormatError(f"unknown event kind {kind!r}; known: {', '.join(_KINDS)}")
    event: Event = _build(cls, data, f"{kind} event")
    return event


def parse_event_line(line: str | bytes) -> Event:
    """One line of a ``--json`` stream back into its event."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise EventFormatError(f"not JSON: {line[:80]!r}") from exc
    if not isinstance(data, dict):
        raise EventFormatError(f"not a JSON object: {line[:80]!r}")
    return parse_event(data)
