"""Resource readings for the merge's progress events, and the callback type that receives them.

The events themselves are the typed contract in :mod:`mergetui.events`: the engine builds them,
the CLI renders them with rich or prints them as JSON lines (``--json``), and the TUI reads those
lines back from a background job's ``events.jsonl``.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import psutil

from mergetui.events import Event, GpuUse

#: Receives every event of a merge, in order, on the merge's thread.
ProgressCallback = Callable[[Event], None]

_PROCESS = psutil.Process()


def current_rss() -> int:
    """Resident memory of this process, in bytes."""
    return int(_PROCESS.memory_info().rss)


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def gpu_memory(device: str) -> tuple[int | None, int | None]:
    """(allocated, peak allocated) bytes on a CUDA device, or (None, None) elsewhere."""
    if not device.startswith("cuda"):
        return None, None
    import torch

    return int(torch.cuda.memory_allocated(device)), int(torch.cuda.max_memory_allocated(device))


def gpu_devices(device: str) -> list[GpuUse] | None:
    """Used and total memory of the merge's GPU as the driver sees it (so other processes and the
    CUDA context count too), or None when the merge is not on CUDA. Only the merge's own device is
    asked: asking another would create a CUDA context there, taking memory other jobs may need
    (the TUI reads every GPU through NVML when it can)."""
    if not device.startswith("cuda"):
        return None
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free, total = torch.cuda.mem_get_info(index)
    return [
        GpuUse(
            index=index,
            name=torch.cuda.get_device_name(index),
            used_bytes=int(total - free),
            total_bytes=int(total),
        )
    ]
