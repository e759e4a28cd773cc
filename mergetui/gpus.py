"""Every GPU's memory as the driver reports it, read with ``nvidia-smi`` (NVML underneath).

The TUI shows all GPUs of the server while a merge runs, not only the one the merge uses. Asking
CUDA for the others would create a context on each (hundreds of MiB taken from other jobs), and
the NVML bindings are not a dependency; ``nvidia-smi`` is installed with the driver, costs ~50 ms
per call, and is called from a worker about once a second. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger("mergetui.gpus")

QUERY = "index,name,memory.used,memory.total,utilization.gpu"


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    used_bytes: int
    total_bytes: int
    utilization_percent: int | None


def parse_nvidia_smi(text: str) -> list[GpuReading]:
    """Rows of ``nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits`` (MiB, percent)."""
    readings = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 5 or not fields[0].isdigit():
            continue
        index, name, used, total, utilization = fields
        readings.append(
            GpuReading(
                int(index),
                name,
                int(float(used) * 1024**2),
                int(float(total) * 1024**2),
                int(float(utilization)) if utilization.replace(".", "").isdigit() else None,
            )
        )
    return readings


def read_gpus(timeout_s: float = 2.0) -> list[GpuReading] | None:
    """Every GPU's reading, or None where there is no NVIDIA driver (or it does not answer)."""
    program = shutil.which("nvidia-smi")
    if program is None:
        return None
    try:
        done = subprocess.run(
            [program, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi did not answer: %s", exc)
        return None
    if done.returncode != 0:
        log.warning("nvidia-smi failed (exit %s): %s", done.returncode, done.stderr.strip())
        return None
    return parse_nvidia_smi(done.stdout)
