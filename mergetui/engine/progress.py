"""Structured progress events and the resource readings that go into them.

The engine reports through a plain callback taking :class:`ProgressEvent`; the CLI renders events with
rich, ``--json`` prints them one per line, and the TUI reads those lines from a child process. Keeping
the event a flat dataclass of numbers and strings makes all three trivial.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psutil


@dataclass
class ProgressEvent:
    """One step of a merge.

    ``event`` is one of ``plan`` (before the first tensor), ``tensor`` (after each tensor), ``phase``
    (writing support files, finalising), ``done``, ``error`` or ``cancelled``.
    """

    event: str
    tensors_done: int = 0
    tensors_total: int = 0
    tensor_name: str = ""
    bytes_read: int = 0
    bytes_to_read: int = 0
    bytes_written: int = 0
    elapsed_s: float = 0.0
    throughput_bytes_s: float = 0.0
    eta_s: float | None = None
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    gpu_bytes: int | None = None
    gpu_peak_bytes: int | None = None
    #: the merge GPU's memory in use and total, from the CUDA runtime (what other processes hold
    #: counts too), when the merge runs on CUDA; None on CPU
    gpus: list[dict[str, Any]] | None = None
    message: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


ProgressCallback = Callable[[ProgressEvent], None]

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


def gpu_devices(device: str) -> list[dict[str, Any]] | None:
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
        {
            "index": index,
            "name": torch.cuda.get_device_name(index),
            "used_bytes": int(total - free),
            "total_bytes": int(total),
        }
    ]
