"""Run a planned merge: stream tensors through the kernel into shards, then publish atomically.

Three stages overlap so that disk and CPU/GPU stay busy together:

    loader thread ──(≤1 tensor ahead)──▶ merge (caller's thread) ──(≤1 output)──▶ writer thread

The loader reads the next tensor's inputs with positioned reads and converts them slice by slice into
reused float32 buffers (applying LoRA adapters), while the merge thread runs the kernel on the
current one and the writer appends the previous result to its shard. Memory stays within the
plan's budget (:mod:`mergetui.engine.blocks`): a tensor too large for it goes through the three
stages as blocks of rows — read, merged and appended to its shard block by block, in as many
reading passes as the method's statistics need — and the loader never reads ahead past the
budget. Rows realigned to another vocabulary are gathered block by block by the loader, which
also runs the passes for the alignment's means itself (:class:`~mergetui.engine.vocabulary
.RowAlignment`). The output is built in a hidden sibling
folder (``.NAME.mergetui-partial-PID``) and renamed into place only when everything, support files
included, is written; any error, Ctrl-C or cancel request removes that folder. Sources are only ever
opened for reading, and an output folder that overlaps a source is refused up front.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergetui.engine.blocks import OUTPUT_COPIES
from mergetui.engine.buffers import BufferPool, OutputPieces
from mergetui.engine.heap import give_back_freed, keep_heap_small
from mergetui.engine.layout import TensorInput
from mergetui.engine.outputs import write_support_files
from mergetui.engine.plan import MergePlan, PlannedTensor, existing_ancestor
from mergetui.engine.progress import (
    ProgressCallback,
    current_rss,
    gpu_devices,
    gpu_memory,
    peak_rss,
)
from mergetui.engine.report import plan_event
from mergetui.engine.vocabulary import RowAlignment, align_rows
from mergetui.engine.writer import OutputTensor, ShardedWriter
from mergetui.errors import (
    CompatibilityError,
    MergeCancelled,
    MergeFailed,
    MergeTuiError,
    OutputError,
)
from mergetui.events import DoneEvent, PhaseEvent, TensorEvent
from mergetui.methods.blocked import BlockKernel, TensorContext
from mergetui.methods.inputs import TensorInputs
from mergetui.pauses import pause_point
from mergetui.sources.checkpoint import Staging
from mergetui.sources.lora import product_rows

if TYPE_CHECKING:
    import torch

_LOAD_AHEAD = 1  # loaded tensors waiting for the merge thread
_WRITE_BEHIND = 1  # merged tensors waiting for the writer
_STAGING_BYTES = 8 << 20  # slice size when converting stored bytes to float32
_POLL_S = 0.2
_DONE = object()
log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    output_dir: Path
    files: list[Path]
    tensors: int
    bytes_read: int
    bytes_written: int
    elapsed_s: float
    peak_rss_bytes: int
    gpu_peak_bytes: int | None


def check_output_location(plan: MergePlan, force: bool) -> None:
    """Refuse outputs that exist (without ``force``), overlap a source, or cannot be written."""
    inputs = []
    for source in plan.sources:
        inputs.append((f"the source {source.label}", source.checkpoint.directory))
        if source.lora is not None:
            inputs.append((f"the source {source.label}", source.lora.directory))
    check_output_folder(plan.recipe.output_dir, inputs, force, option="output.path")


def check_output_folder(
    output: Path, inputs: Sequence[tuple[str, Path]], force: bool, *, option: str
) -> Path:
    """The output folder, resolved; refused when it overlaps an input folder (sources are never
    written to), exists (without ``force``), is a file, or cannot be created. One check for
    merges, adapter merges and extractions; ``option`` is what the user changes to fix it
    (``output.path``, ``-o/--output``), each input is (how to name it, its folder)."""
    out = output.expanduser().resolve()
    for label, directory in inputs:
        folder = directory.expanduser().resolve()
        if out == folder or out in folder.parents or folder in out.parents:
            raise OutputError(
                f"{option} {out} overlaps {label} at {folder}; sources are never written to — "
                f"choose another {option}"
            )
    if out.exists():
        if not force:
            raise OutputError(
                f"output {out} already exists; pass --force to replace it (the old "
                "one is removed only after the new one is complete)"
            )
        if not out.is_dir():
            raise OutputError(
                f"output {out} exists and is not a folder; remove it or change {option}"
            )
    probe = existing_ancestor(out.parent)
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write the output under {probe}: permission denied; choose a writable {option}"
        )
    return out


def run_merge(
    plan: MergePlan,
    *,
    force: bool = False,
    on_event: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> MergeResult:
    """Execute ``plan`` and publish the output folder; raise a :class:`MergeTuiError` on failure.

    ``cancel`` stops the merge at the next safe point (between tensors, before the output is put
    in place) with :class:`MergeCancelled`; once the output is in place it is ignored. A caller
    that handles signals should set it rather than raise from the handler: an exception raised at
    an arbitrary point of the main thread (say, while a worker thread is being started) is what
    once left a thread running into interpreter shutdown.
    """
    if plan.errors:
        raise CompatibilityError(
            "the models cannot be merged:\n" + "\n".join(f"  - {p.message}" for p in plan.errors)
        )
    remote = [s.label for s in plan.sources if s.checkpoint.remote is not None]
    if remote:
        raise OutputError(
            f"{', '.join(remote)} were checked from their headers on the Hub and are not "
            "downloaded; build the plan with fetch=True to merge"
        )
    check_output_location(plan, force)
    out = plan.recipe.output_dir.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.mergetui-partial-{os.getpid()}"
    emit = on_event or (lambda event: None)
    stop = cancel or threading.Event()
    keep_heap_small()
    run = _Run(plan, partial, emit, stop)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        files = run.stream()
        emit(PhaseEvent(**run.progress(), message="writing config, tokenizer and model card"))
        files += write_support_files(plan, partial, stop)
        pause_point("publish", stop)
        if stop.is_set():
            raise MergeCancelled("merge cancelled; the partial output was removed")
        publish_output(partial, out)
    except KeyboardInterrupt:
        discard_partial(partial)
        raise MergeCancelled(
            f"merge interrupted; the partial output was removed and {out} was left as it was"
        ) from None
    except MergeCancelled:
        discard_partial(partial)
        raise
    except Exception as exc:
        discard_partial(partial)
        where = f" at tensor {run.current}" if run.current else ""
        detail = str(exc) if isinstance(exc, MergeTuiError) else f"{type(exc).__name__}: {exc}"
        raise MergeFailed(f"merge failed{where}: {detail}; the partial output was removed") from exc
    finally:
        plan.close()
    files = [out / f.name for f in files]
    result = MergeResult(
        output_dir=out,
        files=files,
        tensors=len(plan.tensors),
        bytes_read=run.bytes_read,
        bytes_written=run.bytes_written,
        elapsed_s=time.perf_counter() - run.started,
        peak_rss_bytes=peak_rss(),
        gpu_peak_bytes=gpu_memory(plan.device)[1],
    )
    emit(DoneEvent(**run.progress(), output=str(out)))
    pause_point("done", stop)
    return result


def publish_output(partial: Path, out: Path) -> None:
    """Move the finished folder into place; an old output is removed only after the new one is in."""
    if out.exists():
        old = out.parent / f".{out.name}.mergetui-old-{os.getpid()}"
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out)


def discard_partial(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)


class _Run:
    """State of one streaming run: the three stages and the counters behind progress events."""

    def __init__(
        self,
        plan: MergePlan,
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
        self.bytes_to_read = plan.bytes_to_read
        self.done = 0
        self.current = ""
        self.kernel: Callable[[TensorInputs], Any] = plan.method.load_kernel()
        self.block_kernel: BlockKernel | None = None  # of the tensor being merged in blocks
        self.by_role = {s.role: s for s in plan.sources}
        assert plan.memory is not None  # build_plan sets it
        self.buffers = BufferPool(plan.memory.pool_bytes)
        self.output_pieces = OutputPieces(OUTPUT_COPIES * plan.memory.largest_output_bytes)

    def progress(self) -> dict[str, Any]:
        """The fields every progress event carries, as they stand now."""
        elapsed = time.perf_counter() - self.started
        throughput = self.bytes_read / elapsed if elapsed > 0 else 0.0
        remaining = self.bytes_to_read - self.bytes_read
        eta = remaining / throughput if throughput > 0 and self.done else None
        gpu_now, gpu_peak = gpu_memory(self.plan.device)
        return {
            "tensors_done": self.done,
            "tensors_total": len(self.plan.tensors),
            "tensor_name": self.current,
            "bytes_read": self.bytes_read,
            "bytes_to_read": self.bytes_to_read,
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

    # -- stage 1: loading ---------------------------------------------------------------------
    def _loader(self, out_queue: queue.Queue[Any]) -> None:
        """Load every tensor in plan order; an error goes down the queue to the merge thread, which
        reports it with its context."""
        import torch

        staging = Staging(_STAGING_BYTES, self.plan.device)
        name = ""
        try:
            with torch.inference_mode():  # thread-local: buffers are shared with the merge thread
                tensors = self.plan.tensors
                for index, tensor in enumerate(tensors):
                    name = tensor.name
                    if index + 1 < len(tensors):
                        self._will_need(tensors[index + 1])
                    alignment = _realignment(tensor)
                    statistics = () if alignment is None else alignment.statistics
                    for piece in _pieces(tensor, statistics):
                        if alignment is not None and piece is not None:
                            loaded = self._load_realigned(tensor, staging, piece, alignment)
                        else:
                            loaded = self._load(tensor, staging, piece)
                        if loaded is None:  # stopped while waiting for buffer budget
                            return
                        if piece is not None and piece.statistic is not None:
                            continue  # the loader gathered the alignment's statistic itself
                        _put(out_queue, loaded, self.cancel)
                        if self.cancel.is_set():
                            return
            _put(out_queue, _DONE, self.cancel)
        except BaseException as exc:
            _put(out_queue, _LoadFailed(name, exc), self.cancel)

    def _will_need(self, tensor: PlannedTensor) -> None:
        """Start the disk reads of the tensor after the one being loaded (a hint; errors are left
        for the real read to report with its context)."""
        for read in tensor.reads:
            try:
                self.by_role[read.role].checkpoint.will_need(read.name)
            except OSError:
                log.debug("read-ahead hint for %s failed", tensor.name, exc_info=True)

    def _load(
        self, tensor: PlannedTensor, staging: Staging, piece: _Piece | None = None
    ) -> _Loaded | None:
        """Read one tensor's inputs (or one block of rows of them): raw for a copied (integer)
        tensor, else float32 buffers."""
        if not tensor.merge:
            rows = None if piece is None else (piece.start, piece.end)
            raw = {
                read: self.by_role[read.role].checkpoint.read(read.name, rows)
                for read in tensor.reads
            }
            self.bytes_read += sum(t.numel() * t.element_size() for t in raw.values())
            return _Loaded(tensor, raw=raw, piece=piece)
        plan = self.plan
        if piece is None:
            shapes = [self._stored_shape(tensor, read) for read in tensor.reads]
            first = 0
        else:
            shapes = [(piece.end - piece.start, *tensor.shape[1:])] * len(tensor.reads)
            first = piece.first
        nbytes = sum(math.prod(shape) for shape in shapes) * 4
        if not self.buffers.reserve(nbytes, self.cancel):
            return None
        loaded = _Loaded(tensor, reserved_bytes=nbytes, piece=piece)
        values: dict[TensorInput, torch.Tensor] = {}
        for read, shape in zip(tensor.reads, shapes, strict=True):
            buffer = self.buffers.take(shape, plan.device)
            loaded.buffers.append(buffer)
            source = self.by_role[read.role]
            self.bytes_read += source.checkpoint.read_into(read.name, buffer, staging, first)
            if source.lora is not None:
                start_row = 0 if piece is None else piece.start
                buffer = source.lora.apply(read.name, buffer, start_row)
            values[read] = buffer
        if tensor.vocabulary is not None and piece is None:
            # rows in the output vocabulary's order: new tensors; the stored ones go back now
            # (a tensor in blocks keeps its stored rows: the plan checked that they are in order)
            aligned = align_rows(
                tensor.vocabulary, {read.role: values[read] for read in tensor.reads}, tensor.name
            )
            values = {read: aligned[read.role] for read in tensor.reads}
            self.buffers.release(loaded.buffers, loaded.reserved_bytes)
            loaded.buffers.clear()
            loaded.reserved_bytes = 0
        loaded.hand_over(values)
        return loaded

    def _load_realigned(
        self, tensor: PlannedTensor, staging: Staging, piece: _Piece, alignment: RowAlignment
    ) -> _Loaded | None:
        """Read one block of output rows of a tensor whose rows are realigned to the output
        vocabulary: each input's kept rows gathered from where they are stored (runs of
        consecutive rows), then the default and padding rows put in. A piece of a statistic's
        pass only adds to the alignment's sums: its buffers go back at once."""
        import torch

        shape = (piece.end - piece.start, *tensor.shape[1:])
        nbytes = math.prod(shape) * 4 * len(tensor.reads)
        if not self.buffers.reserve(nbytes, self.cancel):
            return None
        loaded = _Loaded(tensor, reserved_bytes=nbytes, piece=piece)
        reads = {read.role: read for read in tensor.reads}
        blocks: dict[str, torch.Tensor] = {}
        for read in tensor.reads:
            buffer = self.buffers.take(shape, self.plan.device)
            loaded.buffers.append(buffer)
            for at, row, count in alignment.runs(read.role, piece.start, piece.end):
                self._read_stored_rows(read, buffer[at : at + count], row, staging)
            blocks[read.role] = buffer

        def stored_row(role: str, row: int) -> torch.Tensor:
            out = torch.empty((1, *tensor.shape[1:]), dtype=torch.float32, device=self.plan.device)
            self._read_stored_rows(reads[role], out, row, staging)
            return out[0]

        if piece.statistic != "base_mean":
            alignment.fill(blocks, piece.start, stored_row)
        if piece.statistic is not None:
            alignment.observe(piece.statistic, blocks, piece.start)
            if piece.end == tensor.shape[0]:
                alignment.finish(piece.statistic, loaded.buffers[0])
            self._release(loaded)
            return loaded
        if "padding" in alignment.statistics:
            alignment.fill_padding(blocks, piece.start)
        loaded.hand_over({read: blocks[read.role] for read in tensor.reads})
        return loaded

    def _read_stored_rows(
        self, read: TensorInput, out: torch.Tensor, row: int, staging: Staging
    ) -> None:
        """Stored rows ``[row, row + len(out))`` of ``read`` into ``out`` (float32), with the
        source's LoRA adapter folded in exactly as into the whole tensor: its product is made in
        the same groups of stored rows (:func:`~mergetui.sources.lora.product_rows`), so the
        groups a run of rows starts or ends inside are read whole into a small temporary (about
        1M entries at a time) and only the run's rows are kept."""
        import torch

        source = self.by_role[read.role]
        width = math.prod(out.shape[1:])
        if source.lora is None:
            self.bytes_read += source.checkpoint.read_into(read.name, out, staging, row * width)
            return
        stored = source.checkpoint.tensors[read.name].shape[0]
        group = product_rows(width)
        rows_at_once = max(1, (1 << 20) // max(group * width, 1)) * group
        end = row + len(out)
        first = row // group * group
        while first < end:
            last = min(first + rows_at_once, stored)
            rows = torch.empty(
                (last - first, *out.shape[1:]), dtype=torch.float32, device=out.device
            )
            self.bytes_read += source.checkpoint.read_into(read.name, rows, staging, first * width)
            rows = source.lora.apply(read.name, rows, first)
            low, high = max(first, row), min(last, end)
            out[low - row : high - row] = rows[low - first : high - first]
            first = last

    def _stored_shape(self, tensor: PlannedTensor, read: TensorInput) -> tuple[int, ...]:
        """The shape ``read`` has on disk: the output's, except for rows not yet aligned."""
        if tensor.vocabulary is None:
            return tensor.shape
        return self.by_role[read.role].checkpoint.tensors[read.name].shape

    # -- stage 3: writing ----------------------------------------------------------------------
    def _writer(
        self,
        writer: ShardedWriter,
        in_queue: queue.Queue[Any],
        errors: list[BaseException],
        files: list[Path],
    ) -> None:
        try:
            for written, item in enumerate(_drain(in_queue, self.cancel), start=1):
                name, data, pooled, rows = item
                writer.write(name, data, rows)
                if pooled:  # written: the next piece of its size may reuse it
                    self.output_pieces.give_back(data)
                self.bytes_written = writer.bytes_written
                pause_point("write", self.cancel, written)
            if not self.cancel.is_set():  # the end marker arrived: every tensor is in
                files.extend(writer.close())
        except BaseException as exc:
            errors.append(exc)
            self.cancel.set()
        finally:
            writer.abort()

    # -- stage 2: computing (the caller's thread) ----------------------------------------------
    def stream(self) -> list[Path]:
        import torch

        plan = self.plan
        outputs = [OutputTensor(t.name, t.dtype, t.shape) for t in plan.tensors]
        writer = ShardedWriter(self.directory, outputs, plan.recipe.shard_size)
        write_queue: queue.Queue[Any] = queue.Queue(maxsize=_WRITE_BEHIND)
        writer_errors: list[BaseException] = []
        files: list[Path] = []
        stop = self.cancel
        load_queue: queue.Queue[Any] = queue.Queue(maxsize=_LOAD_AHEAD)
        loader = threading.Thread(
            target=self._loader, args=(load_queue,), name="mergetui-loader", daemon=True
        )
        writer_thread = threading.Thread(
            target=self._writer,
            args=(writer, write_queue, writer_errors, files),
            name="mergetui-writer",
            daemon=True,
        )
        self.emit(plan_event(plan))
        if plan.vocabulary is not None:
            plan.vocabulary.release_tables()
        give_back_freed()
        pause_point("plan", stop)
        started: list[threading.Thread] = []
        finished = False
        try:
            # Started inside the try: whatever is raised from here on (even while a thread is
            # being started), the finally stops and joins every thread that did start.
            for thread in (loader, writer_thread):
                thread.start()
                started.append(thread)
            pause_point("threads-started", stop)
            with torch.inference_mode():
                # _drain ends early when stop is set: cancelled, or the writer failed (it sets stop)
                for loaded in _drain(load_queue, stop):
                    if isinstance(loaded, _LoadFailed):
                        self.current = loaded.name
                        raise loaded.error
                    self.current = loaded.tensor.name
                    piece = loaded.piece
                    computed = self._compute(loaded)
                    if computed is not None:
                        rows = None if piece is None else (piece.start, piece.end)
                        _put(write_queue, (loaded.tensor.name, *computed, rows), stop)
                    del computed, loaded
                    whole = piece is None or piece.last  # the tensor is complete
                    self.done += whole
                    self.emit(TensorEvent(**self.progress()))
                    if whole:
                        pause_point("tensor", stop, self.done)
            _put(write_queue, _DONE, stop)
            finished = True
        finally:
            if not finished:
                stop.set()  # lets the writer and the loader end
            for thread in started:
                thread.join()
            self.buffers.clear()
        if writer_errors:
            raise writer_errors[0]
        if stop.is_set():
            raise MergeCancelled("merge cancelled; the partial output was removed")
        self.current = ""
        return files

    def _compute(self, loaded: _Loaded) -> tuple[torch.Tensor, bool] | None:
        """Merge and convert one loaded tensor, or block of one: the output and whether it came
        from the output-piece pool (the writer gives it back once written); None for a block that
        only feeds the statistics of a later pass."""
        import torch

        plan = self.plan
        tensor = loaded.tensor
        piece = loaded.piece
        if loaded.raw is not None:
            (first, reference), *others = loaded.raw.items()
            for read, other in others:
                if not torch.equal(other, reference):
                    raise MergeFailed(
                        f"tensor {tensor.name} ({tensor.dtype}) differs between "
                        f"{self.by_role[first.role].label} and {self.by_role[read.role].label}; "
                        "integer tensors cannot be merged — make them identical or drop that model"
                    )
            return reference, False  # an integer tensor, written as read
        if tensor.copy:
            result = loaded.models[0] if loaded.models else loaded.base
            assert result is not None  # a copied tensor has exactly one input
        else:
            inputs = TensorInputs(
                name=tensor.name,
                base=loaded.base,
                models=loaded.models,
                model_params=list(tensor.model_params),
                params=dict(tensor.params),
                seed=plan.recipe.seed,
            )
            if piece is None:
                result = self.kernel(inputs)
            else:
                result = self._merge_block(tensor, piece, inputs)
            del inputs
        if result is None:
            self._release(loaded)
            return None
        if not _all_finite(result):
            where = "" if piece is None else f" (rows {piece.start} to {piece.end - 1})"
            raise MergeFailed(
                f"tensor {tensor.name}{where} has NaN or infinite values after the "
                f"{plan.method.name} merge; check the inputs (a corrupt source?) and the "
                "parameters (huge weights?)"
            )
        # A copy in every case: the result may live in a buffer the loader reuses next.
        output = self.output_pieces.take(result.shape, getattr(torch, tensor.dtype))
        output.copy_(result)
        del result
        self._release(loaded)
        return output, True

    def _release(self, loaded: _Loaded) -> None:
        self.buffers.release(loaded.buffers, loaded.reserved_bytes)
        loaded.buffers.clear()
        loaded.base = None
        loaded.models.clear()

    def _merge_block(
        self, tensor: PlannedTensor, piece: _Piece, inputs: TensorInputs
    ) -> torch.Tensor | None:
        """One block of a tensor merged in blocks: a fresh block kernel at its first block, the
        statistics passes observed, the merging pass merged."""
        if piece.pass_index == 0 and piece.start == 0:
            context = TensorContext(
                name=tensor.name,
                shape=tensor.shape,
                params=dict(tensor.params),
                model_params=tuple(tensor.model_params),
                seed=self.plan.recipe.seed,
            )
            self.block_kernel = self.plan.method.load_block_kernel()(context)
        assert self.block_kernel is not None
        if not piece.merging:
            self.block_kernel.observe(piece.pass_index, inputs, piece.first)
            return None
        result = self.block_kernel.merge(inputs, piece.first)
        if piece.last:
            self.block_kernel = None
        return result


@dataclass(frozen=True)
class _Piece:
    """One block of rows of a tensor merged in blocks, in one reading pass."""

    pass_index: int  # the method's pass (0 for a pass of the vocabulary alignment's)
    start: int
    end: int
    first: int  # the block's first element, counted in the whole flat tensor
    last: bool  # the tensor's last block of its last pass
    merging: bool = True  # a block of the method's last pass, which merges
    #: the vocabulary alignment's statistic this pass gathers (the loader's own), else None
    statistic: str | None = None


def _pieces(tensor: PlannedTensor, statistics: tuple[str, ...] = ()) -> Iterator[_Piece | None]:
    """The pieces the loader reads for ``tensor``: None for the whole tensor, else its blocks of
    rows, pass after pass: first a pass per statistic of the vocabulary alignment, then the
    method's passes."""
    if tensor.block_rows is None:
        yield None
        return
    rows = tensor.shape[0]
    width = math.prod(tensor.shape[1:])
    blocks = [(s, min(rows, s + tensor.block_rows)) for s in range(0, rows, tensor.block_rows)]
    for statistic in statistics:
        for start, end in blocks:
            yield _Piece(0, start, end, start * width, False, False, statistic)
    passes = tensor.passes - len(statistics)
    for pass_index in range(passes):
        merging = pass_index == passes - 1
        for start, end in blocks:
            yield _Piece(pass_index, start, end, start * width, merging and end == rows, merging)


def _realignment(tensor: PlannedTensor) -> RowAlignment | None:
    """The row alignment of a tensor merged in blocks whose rows move to the output vocabulary;
    None when it is merged whole (aligned as it is read) or keeps its stored rows."""
    vocabulary = tensor.vocabulary
    if tensor.block_rows is None or vocabulary is None:
        return None
    roles = [read.role for read in tensor.reads]
    if vocabulary.keeps_stored_rows(roles):
        return None
    return RowAlignment(vocabulary, roles, tensor.name, tuple(tensor.shape[1:]))


@dataclass
class _Loaded:
    """One tensor's inputs (or a block of rows of them), as the loader hands them to the merge
    thread."""

    tensor: PlannedTensor
    piece: _Piece | None = None
    raw: dict[TensorInput, torch.Tensor] | None = None
    base: torch.Tensor | None = None
    models: list[torch.Tensor] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    reserved_bytes: int = 0

    def hand_over(self, values: dict[TensorInput, torch.Tensor]) -> None:
        """Give the kernel its inputs: the base, and the models in order (not what was read for
        the vocabulary alignment only)."""
        for read in self.tensor.reads:
            if read is self.tensor.base:
                self.base = values[read]
            elif read not in self.tensor.for_alignment:
                self.models.append(values[read])


@dataclass
class _LoadFailed:
    name: str
    error: BaseException


def _all_finite(tensor: torch.Tensor) -> bool:
    """Cheap first: a float32 sum is finite unless some entry is not (or the sum overflows, which a
    full check then rules out)."""
    import math

    import torch

    if math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _put(target: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    """Put with a timeout loop, so a cancelled or failed run never deadlocks on a full queue."""
    while True:
        try:
            target.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            if stop.is_set():
                return


def _drain(source: queue.Queue[Any], stop: threading.Event) -> Iterator[Any]:
    """Items until the end marker; returns early when ``stop`` is set."""
    while not stop.is_set():
        try:
            item = source.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if item is _DONE:
            return
        yield item
