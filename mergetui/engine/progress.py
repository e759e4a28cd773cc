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
