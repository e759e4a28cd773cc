"""Keep memory the merge frees from staying in the process (glibc's malloc).

By default glibc raises its mmap threshold up to 32 MiB as large blocks are freed, so the blocks
and output pieces of a merge end up on the heap, and every thread that allocates gets its own
arena; freed memory then stays resident, and a budgeted merge measured 200-400 MiB above what it
holds. Fixing the threshold at 1 MiB (large allocations are mapped and unmapped), capping the
arenas, and trimming after planning keeps resident memory at what is in use. Elsewhere (musl,
macOS) these calls do not exist and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import Any

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_state: dict[str, Any] = {}


def _libc() -> Any:
    if "libc" not in _state:
        try:
            library = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _state["libc"] = library if hasattr(library, "mallopt") else None
        except OSError:
            _state["libc"] = None
    return _state["libc"]


def keep_heap_small() -> None:
    """Set glibc's malloc to return large freed blocks at once (idempotent)."""
    libc = _libc()
    if libc is None or _state.get("tuned"):
        return
    for option, value in (
        (_M_MMAP_THRESHOLD, 1 << 20),
        (_M_TRIM_THRESHOLD, 4 << 20),
        (_M_ARENA_MAX, 2),
    ):
        if libc.mallopt(option, value) != 1:
            log.debug("mallopt(%d, %d) was refused", option, value)
    _state["tuned"] = True


def give_back_freed() -> None:
    """Collect garbage and hand freed heap pages back to the system."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
