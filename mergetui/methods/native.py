"""The fused C loops of ``native_kernels.c``: built on first use, cached on disk, run on all cores.

The library is compiled with the system C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/mergetui/native/`` (``~/.cache/...`` by default) under a name that hashes the source,
the flags and the machine, so an upgrade or another CPU builds its own copy and concurrent processes
never see a half-written file. Building takes well under a second; loading it afterwards is a
``dlopen``. When there is no compiler, or the build fails, mergetui logs why once and merges with the
op-by-op torch kernels, which give the same bits, only slower.

``MERGETUI_NATIVE``: ``1`` (default: use the C loops for every float32 CPU tensor) or ``0`` (never:
the op-by-op torch kernels, which the tests compare against).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergetui import logs

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Ranges handed to the threads are multiples of this many elements (whole cache lines and blocks).
_ALIGN = 4096
_SOURCE = Path(__file__).with_name("native_kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_I64 = ctypes.c_int64
_U64 = ctypes.c_uint64
_PTR = ctypes.c_void_p

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _mode() -> str:
    return os.environ.get("MERGETUI_NATIVE", "1").strip().lower()


def cache_dir() -> Path:
    return logs.cache_dir() / "native"


def _library_path(compiler: str) -> Path:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(_SOURCE.read_bytes())
    digest.update(" ".join([compiler, *_FLAGS, platform.machine(), platform.system()]).encode())
    return cache_dir() / f"mergetui-kernels-{digest.hexdigest()}.so"


def _build() -> ctypes.CDLL:
    """Compile (unless cached) and load the library; raise with the compiler's words on failure."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler found ({compiler!r} is not on PATH; set CC)")
    target = _library_path(compiler)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            done = subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", str(built)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:500]}")
            os.replace(built, target)  # atomic: another process sees the whole file or none
    library = ctypes.CDLL(str(target))
    _declare(library)
    return library


def _declare(library: ctypes.CDLL) -> None:
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "mt_subtract_and_sample": (None, [_PTR, _PTR, _I64, _I64, _I64, _PTR]),
        "mt_kth_largest_bits": (_I64, [_PTR, _I64, _I64]),
        "mt_count_pattern": (None, [_PTR, _I64, _I64, ctypes.c_uint32, _PTR]),
        "mt_top_histogram": (None, [_PTR, _I64, _I64, _PTR]),
        "mt_key_top_histogram": (None, [_PTR, _I64, _I64, _PTR]),
        "mt_key_bucket": (None, [_PTR, _I64, _I64, ctypes.c_uint32, _PTR]),
        "mt_zero_where_zero": (None, [_PTR, ctypes.c_int32, _PTR, _I64, _I64]),
        "mt_bucket": (None, [_PTR, _I64, _I64, ctypes.c_uint32, _PTR]),
        "mt_count_equal": (_I64, [_PTR, _I64, _I64, ctypes.c_uint32]),
        "mt_tie_cutoff": (_I64, [_PTR, _I64, _I64, ctypes.c_uint32, _I64]),
        "mt_della_rows": (
            _I64,
            [_PTR, _U64, _I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_float, ctypes.c_float],
        ),
        "mt_philox4x32_10": (None, [_PTR, _U64]),
        "mt_philox_uniform": (None, [_PTR, _U64, _I64, _I64, _I64]),
        "mt_dare_drop": (None, [_PTR, _U64, _I64, _I64, _I64, ctypes.c_float]),
        "mt_keep_window": (
            None, [_PTR, _I64, _I64, ctypes.c_uint32, ctypes.c_uint32, _I64, _I64, _I64, _I64],
        ),
        "mt_chunk_sums": (None, [_PTR, _I64, _I64, _I64, _I64, ctypes.c_int32, _PTR]),
        "mt_ties_elect": (
            None,
            [_PTR, _PTR, ctypes.c_int32, _I64, _I64, _PTR, _PTR, _PTR, ctypes.c_int32,
             ctypes.c_float],
        ),
    }  # fmt: skip
    for name, (result, arguments) in signatures.items():
        function = getattr(library, name)
        function.restype = result
        function.argtypes = arguments


def library() -> ctypes.CDLL | None:
    """The loaded library, building it on first call; None when it cannot be built (logged once)."""
    with _lock:
        if "library" not in _state:
            try:
                _state["library"] = _build()
            except Exception as exc:  # no compiler, read-only cache, unsupported platform, ...
                _state["library"] = None
                log.warning(
                    "the fused C kernels are unavailable (%s); merging with torch ops, which is "
                    "slower",
                    f"{type(exc).__name__}: {exc}".splitlines()[0],
                )
        return _state["library"]


def available_for(like: torch.Tensor) -> ctypes.CDLL | None:
    """The library when the C loops should handle tensors like ``like``, else None."""
    mode = _mode()
    if mode in ("0", "off", "false", "no") or like.device.type != "cpu":
        return None
    import torch

    if like.dtype != torch.float32:
        return None
    return library()


def _pool() -> tuple[ThreadPoolExecutor, int]:
    """The worker threads (one per torch thread) and how many there are."""
    with _lock:
        if "pool" not in _state:
            import torch

            workers = max(1, torch.get_num_threads())
            _state["workers"] = workers
            _state["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="mergetui-c")
        return _state["pool"], _state["workers"]


def ranges(count: int, align: int = _ALIGN) -> list[tuple[int, int]]:
    """[start, end) pieces of ``range(count)``, one per worker, aligned to ``align``."""
    _, workers = _pool()
    step = -(-count // workers)
    step = -(-step // align) * align
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def parallel(call: Callable[[int, int], Any], count: int, align: int = _ALIGN) -> list[Any]:
    """``call(start, end)`` for each piece of ``range(count)``, concurrently; results in order.
    ``align``: pieces start at multiples of it (elements: whole cache lines; rows: 1)."""
    pieces = ranges(count, align)
    if len(pieces) == 1:
        return [call(*pieces[0])]
    pool, _ = _pool()
    return list(pool.map(lambda piece: call(*piece), pieces))


def pointer_array(tensors: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
