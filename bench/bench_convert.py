"""The CPU cost of a merge's element-wise work, without any I/O: bf16 → float32, a float32
multiply-add, float32 → bf16, over 268M values (what a linear merge does to every value it
reads), on all of torch's threads. Prints billions of values per second, best of 3.

    python bench/bench_convert.py

Divide a merge's value count by these rates and compare with its wall time and I/O floor
(bench_merge.py) to see whether it is bound by the CPU or by the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

VALUES = 1 << 28  # 512 MiB in bf16, 1 GiB in float32


def best_seconds(step: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    stored = torch.randn(VALUES // 8).repeat(8).to(torch.bfloat16)
    upcast = torch.empty(VALUES, dtype=torch.float32)
    total = torch.zeros(VALUES, dtype=torch.float32)
    output = torch.empty(VALUES, dtype=torch.bfloat16)
    rates = {
        "bf16 -> float32": best_seconds(lambda: upcast.copy_(stored)),
        "float32 multiply-add": best_seconds(lambda: total.add_(upcast, alpha=0.5)),
        "float32 -> bf16": best_seconds(lambda: output.copy_(total)),
    }
    print(f"{torch.get_num_threads()} threads, {VALUES / 1e9:.2f}G values:")
    for step, seconds in rates.items():
        print(f"  {step:22s} {VALUES / 1e9 / seconds:6.2f} G values/s")


if __name__ == "__main__":
    main()
