"""Checkpoints on disk: tensor names, shapes and dtypes from headers; tensors read one at a time.

Headers come first: opening a checkpoint reads ``config.json``, the shard index and each safetensors
header (a few KB), never a weight. The compatibility check and the merge plan are built from that.

Tensors are then read with positioned reads (``os.pread``) into fresh buffers rather than through a
memory map: a mapped file's touched pages count towards the process's resident memory until they are
evicted, which would make peak RSS grow with the model size. With plain reads the process holds only
the tensors it is working on, and the OS page cache (not counted as RSS) does the caching.

PyTorch ``.bin`` checkpoints are loaded with ``torch.load(weights_only=True, mmap=True)``: no
arbitrary code is unpickled and weights are paged in lazily.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergetui.errors import SourceError

if TYPE_CHECKING:
    import torch

#: safetensors dtype code → (torch dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
TORCH_TO_SAFETENSORS = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """What a header says about one tensor: enough to plan without reading it."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset in ``file`` (safetensors only)
    nbytes: int = 0

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Parse one safetensors file's header and check it against the file size.

    Returns the tensor specs and the ``__metadata__`` table. A truncated or corrupt file is reported
    here, naming the file, before any weight is read.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise SourceError(
                    f"{path}: not a safetensors file (only {size} bytes); re-download it"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise SourceError(
                    f"{path}: corrupt or truncated safetensors file (header length {header_len} "
                    f"does not fit in {size} bytes); re-download or re-save it"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(
            f"{path}: corrupt safetensors header ({exc}); re-download or re-save it"
        ) from exc
    if not isinstance(header, dict):
        raise SourceError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    specs: dict[str, TensorSpec] = {}
    data_end = 0
    for name, entry in header.items():
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SourceError(f"{path}: corrupt header entry for tensor {name!r}") from exc
        if code not in SAFETENSORS_DTYPES:
            raise SourceError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        dtype, itemsize = SAFETENSORS_DTYPES[code]
        spec = TensorSpec(name, dtype, shape, path, data_start + begin, end - begin)
        if end < begin or spec.nbytes != spec.numel * itemsize:
            raise SourceError(
                f"{path}: corrupt header: tensor {name!r} of shape {list(shape)} {dtype} "
                f"should take {spec.numel * itemsize} bytes, header says {end - begin}"
            )
        specs[name] = spec
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise SourceError(
            f"{path}: truncated: the header describes {data_start + data_end} bytes but the file "
            f"has {size}; the download or copy was cut short — re-download it"
        )
    return specs, metadata


@dataclass
class Checkpoint:
    """A model directory opened from its headers.

    ``label`` is how messages name the model (the reference from the recipe).
    """

    label: str
    directory: Path
    config: dict[str, Any]
    tensors: dict[str, TensorSpec]
    weight_files: list[Path]
    format: str  # "safetensors" or "bin"
    #: "org/name@commit" for a header-only view of a Hub model (checked, not merged), else None.
    remote: str | None = None
    #: Weight bytes when the files are not on this disk (from the Hub's listing).
    size_hint: int | None = None
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _bin_state: dict[Path, dict[str, Any]] = field(default_factory=dict, repr=False)

    # -- summaries from headers -----------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else "?"

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "?"))

    @property
    def parameter_count(self) -> int:
        return sum(spec.numel for spec in self.tensors.values())

    @property
    def size_on_disk(self) -> int:
        if self.remote is not None:
            return self.size_hint or 0
        return sum(path.stat().st_size for path in self.weight_files)

    @property
    def shapes_known(self) -> bool:
        """False for a remote model with only ``.bin`` weights: no header to read shapes from."""
        return self.remote is None or self.format == "safetensors"

    @property
    def storage_dtype(self) -> str:
        """The dtype of most floating-point parameters (by element count)."""
        counts: dict[str, int] = {}
        for spec in self.tensors.values():
            if spec.is_float:
                counts[spec.dtype] = counts.get(spec.dtype, 0) + spec.numel
        if not counts:
            return str(self.config.get("dtype") or self.config.get("torch_dtype") or "float32")
        return max(counts, key=counts.__getitem__)

    def config_value(self, *keys: str) -> Any:
        """The first of ``keys`` found in config.json (or its ``text_config``), else None."""
        for source in (self.config, self.config.get("text_config") or {}):
            for key in keys:
                if key in source:
                    return source[key]
        return None

    # -- reading ---------------------------------------------------------------------------------
    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or its rows ``[start, end)``) into a new CPU tensor in its storage
        dtype."""

        spec = self.tensors[name]
        if self.format == "bin":
            stored = self._bin_tensor(name)
            return (stored if rows is None else stored[rows[0] : rows[1]]).clone()
        return read_spec(spec, self._fd(spec.file), rows)

    def _bin_tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of a .bin checkpoint as unpickled (the file's state is kept once
        loaded: pickles cannot be read in part). To be read, not written."""
        spec = self.tensors[name]
        state = self._bin_state.get(spec.file)
        if state is None:
            state = self._bin_state[spec.file] = load_bin_state(spec.file)
        return state[name]

    def _fd(self, path: Path) -> int:
        with self._lock:  # the loader and the merge thread read from separate threads
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def read_into(self, name: str, out: torch.Tensor, staging: Staging, start: int = 0) -> int:
        """Read tensor ``name`` into ``out`` (any dtype and device), converting through
        ``staging`` one slice at a time; returns the bytes read.

        ``out`` receives ``out.numel()`` elements from element ``start`` of the stored tensor (in
        row-major order: a block of rows is one such range). Only ``staging.nbytes`` bytes of the
        stored dtype are held per slot, so no full-size copy of the tensor in its storage dtype
        exists next to the converted one.
        """
        import torch

        spec = self.tensors[name]
        flat = out.view(-1)
        wanted = flat.numel()
        if start < 0 or start + wanted > spec.numel:
            raise ValueError(
                f"{name}: elements [{start}, {start + wanted}) are outside its {spec.numel}"
            )
        itemsize = spec.nbytes // max(spec.numel, 1)
        if self.format == "bin" or spec.nbytes == 0:
            # no copy of the whole tensor per call: blocks and gathered rows read it many times
            stored = self._bin_tensor(name) if self.format == "bin" else self.read(name)
            flat.copy_(stored.reshape(-1)[start : start + wanted])
            return wanted * itemsize
        dtype = getattr(torch, spec.dtype)
        per_slice = max(1, staging.nbytes // itemsize)
        fd = self._fd(spec.file)
        for done in range(0, wanted, per_slice):
            count = min(per_slice, wanted - done)
            nbytes = count * itemsize
            offset = spec.offset + (start + done) * itemsize
            slot = staging.next_slot()
            _pread_exactly(fd, slot.view[:nbytes], offset, spec.file, name)
            staging.convert(slot, nbytes, dtype, flat[done : done + count])
        return wanted * itemsize

    def will_need(self, name: str) -> None:
        """Ask the OS to start reading a tensor's bytes into the page cache in the background
        (``POSIX_FADV_WILLNEED``), so that the read that follows finds them there. Only a hint:
        a no-op where the OS lacks it."""
        spec = self.tensors[name]
        if self.format == "bin" or spec.nbytes == 0 or not hasattr(os, "posix_fadvise"):
            return
        os.posix_fadvise(self._fd(spec.file), spec.offset, spec.nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin_state.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Slot:
    """One staging slot: host bytes (``view`` over ``host``), and for a pipelined staging the
    device bytes they are sent to and the event that says when they have left."""

    view: memoryview
    host: Any = None
    device: Any = None
    sent: Any = None


class Staging:
    """The memory stored bytes pass through on their way into a float32 (or other) buffer.

    On the CPU it is one host slot: a slice is read into it and converted into the buffer. For a
    buffer on a GPU that would be slow twice over: a copy from pageable memory blocks the thread,
    and torch converts a cross-device copy's dtype on the host, sending float32 (twice the bf16
    bytes) over the bus. So a *pipelined* staging keeps two pinned host slots and two device slots
    of the stored bytes: a slice is read into one host slot, sent without blocking to its device
    slot in the stored dtype, and converted on the device, while the next slice is read into the
    other host slot. A slot's host bytes are reused only once its transfer has finished (an event
    per slot). Everything goes on the device's current stream, the one the merge kernels use, so
    the buffer is complete before any kernel reads it.

    ``pipelined`` defaults to "the device is not the CPU"; the tests force it on the CPU, where
    pinning and events are skipped, to check the slot logic's bits.
    """

    def __init__(self, nbytes: int, device: str = "cpu", pipelined: bool | None = None) -> None:
        import torch

        self.nbytes = nbytes
        self.device = torch.device(device)
        self.pipelined = self.device.type != "cpu" if pipelined is None else pipelined
        self._cuda = self.device.type == "cuda"
        self._slots: list[_Slot] = []
        self._turn = 0
        if not self.pipelined:
            self._slots.append(_Slot(memoryview(bytearray(nbytes))))
            return
        for _ in range(2):
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._cuda)
            device_bytes = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._slots.append(_Slot(host.numpy().data, host, device_bytes))

    def next_slot(self) -> _Slot:
        """The slot to read the next slice into, once its previous transfer has left it."""
        slot = self._slots[self._turn]
        self._turn = (self._turn + 1) % len(self._slots)
        if slot.sent is not None:
            slot.sent.synchronize()
            slot.sent = None
        return slot

    def convert(self, slot: _Slot, nbytes: int, dtype: torch.dtype, out: torch.Tensor) -> None:
        """Convert the slot's first ``nbytes`` (stored as ``dtype``) into ``out``."""
        import torch

        if not self.pipelined:
            out.copy_(torch.frombuffer(slot.view[:nbytes], dtype=dtype))
            return
        device_bytes = slot.device[:nbytes]
        device_bytes.copy_(slot.host[:nbytes], non_blocking=self._cuda)
        out.copy_(device_bytes.view(dtype))
        if self._cuda:
            slot.sent = torch.cuda.Event()
            slot.sent.record(torch.cuda.current_stream(self.device))


def read_spec(spec: TensorSpec, fd: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read the safetensors tensor ``spec`` (or its rows ``[start, end)``) from the open file
    ``fd`` into a new CPU tensor."""
    import torch

    dtype = getattr(torch, spec.dtype)
    shape = spec.shape if rows is None else (rows[1] - rows[0], *spec.shape[1:])
    row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
    nbytes = spec.nbytes if rows is None else row_bytes * shape[0]
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    view = memoryview(bytearray(nbytes))
    offset = spec.offset + (0 if rows is None else rows[0] * row_bytes)
    _pread_exactly(fd, view, offset, spec.file, spec.name)
    return torch.frombuffer(view, dtype=dtype).reshape(shape)


def _pread_exactly(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            raise SourceError(f"{path}: unexpected end of file while reading {name!r}")
        done += count


def load_bin_state(path: Path) -> dict[str, Any]:
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise SourceError(
            f"{path}: cannot load this PyTorch checkpoint safely ({exc}); mergetui only loads plain "
            "tensors (weights_only=True) — convert it to safetensors"
        ) from exc
    if not isinstance(state, dict):
        raise SourceError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return state


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object from ``path``; ``missing`` is the whole error message when the file is absent."""
    if not path.is_file():
        raise SourceError(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{path}: {path.name} is not a JSON object")
    return data


def read_config(directory: Path, label: str) -> dict[str, Any]:
    """config.json as a dict, with errors that name the model and the fix."""
    return read_json_object(
        directory / "config.json",
        f"{label}: no config.json in {directory}; point to a Hugging Face model folder "
        "(saved with save_pretrained)",
    )


def _read_index(index_path: Path, label: str) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SourceError(f"{index_path}: unreadable shard index ({exc}); re-download it") from exc
    if not isinstance(weight_map, dict):
        raise SourceError(f"{index_path}: weight_map is not a JSON object")
    return weight_map


def open_checkpoint(directory: Path, label: str | None = None) -> Checkpoint:
    """Open a model folder from its headers (config.json, index, safetensors headers)."""
    label = label or str(directory)
    if not directory.exists():
        raise SourceError(f"{label}: model folder not found: {directory}; check the path")
    if not directory.is_dir():
        raise SourceError(f"{label}: {directory} is a file; point to the model's folder instead")
    config = read_config(directory, label)

    st_index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    bin_index = directory / "pytorch_model.bin.index.json"
    single_bin = directory / "pytorch_model.bin"
    if st_index.is_file() or single.is_file():
        return _open_safetensors(directory, label, config, st_index if st_index.is_file() else None)
    if bin_index.is_file() or single_bin.is_file():
        return _open_bin(directory, label, config, bin_index if bin_index.is_file() else None)
    raise SourceError(
        f"{label}: no weights in {directory} (looked for model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin); is the download complete?"
    )


def _shard_files(
    directory: Path, label: str, index: Path | None, default: str
) -> tuple[list[Path], dict[str, str] | None]:
    if index is None:
        return [directory / default], None
    weight_map = _read_index(index, label)
    files = [directory / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SourceError(
            f"{label}: {index.name} lists shard(s) missing from {directory}: {', '.join(missing)}; "
            "the download is incomplete"
        )
    return files, weight_map


def _open_safetensors(
    directory: Path, label: str, config: dict[str, Any], index: Path | None
) -> Checkpoint:
    files, weight_map = _shard_files(directory, label, index, "model.safetensors")
    tensors: dict[str, TensorSpec] = {}
    for file in files:
        specs, _ = read_safetensors_header(file)
        for name, spec in specs.items():
            if name in tensors:
                raise SourceError(
                    f"{label}: tensor {name!r} appears in two shards ({file.name} and "
                    f"{tensors[name].file.name})"
                )
            tensors[name] = spec
    if weight_map is not None:
        for name, file_name in weight_map.items():
            mapped = tensors.get(name)
            if mapped is None or mapped.file.name != file_name:
                raise SourceError(
                    f"{label}: the shard index maps {name!r} to {file_name}, but that "
                    "file does not hold it; re-download the model"
                )
    return Checkpoint(label, directory, config, tensors, files, "safetensors")


def _open_bin(
    directory: Path, label: str, config: dict[str, Any], index: Path | None
) -> Checkpoint:
    files, _ = _shard_files(directory, label, index, "pytorch_model.bin")
    tensors: dict[str, TensorSpec] = {}
    checkpoint = Checkpoint(label, directory, config, tensors, files, "bin")
    for file in files:
        state = checkpoint._bin_state[file] = load_bin_state(file)
        for name, value in state.items():
            if not hasattr(value, "shape"):
                continue
            dtype = str(value.dtype).removeprefix("torch.")
            nbytes = value.numel() * value.element_size()
            tensors[name] = TensorSpec(name, dtype, tuple(value.shape), file, 0, nbytes)
    return checkpoint
