#!/usr/bin/env python3
"""What DARE's and DELLA's random draws cost: ``torch.rand`` against Philox4x32-10.

Prints, on this machine's CPU threads (and on CUDA when there is one):

- 100M float32 uniforms from ``torch.rand`` with a seeded CPU generator (what DARE drew before),
  from :func:`mergetui.methods.philox.uniform` (the torch rounds, the path for CUDA and for
  non-float32 tensors) and from the C loop ``mt_philox_uniform`` on every thread;
- ``random_drop_`` (rescale on) on a 64M-entry float32 task vector: before (``torch.rand`` chunk
  by chunk from a generator, the uniforms then compared and multiplied, as the code was) and
  after (the fused C drop, and the torch path with ``MERGETUI_NATIVE=0``).

    python bench/bench_random.py [--uniforms 100_000_000] [--entries 67_108_864] [--repeats 3]

Figures are the best of ``--repeats`` runs, in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergetui.methods import native, philox  # noqa: E402
from mergetui.methods.inputs import tensor_generator, tensor_seed  # noqa: E402
from mergetui.methods.task_arithmetic import CHUNK, _l1, random_drop_, rescale_l1_  # noqa: E402

SEED, NAME = 0, "model.embed_tokens.weight"


def best(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return min(times)


def drop_before(delta: torch.Tensor, density: float) -> None:
    """random_drop_ as it was: chunked ``torch.rand`` from the tensor's CPU generator."""
    flat = delta.view(-1)
    generator = tensor_generator(SEED, NAME, 0)
    l1_before = _l1(flat)
    for chunk in flat.split(CHUNK):
        uniform = torch.rand(chunk.numel(), generator=generator, dtype=torch.float32)
        chunk.mul_(uniform.lt_(density).to(chunk.device))
    rescale_l1_(delta, l1_before, _l1(flat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uniforms", type=int, default=100_000_000)
    parser.add_argument("--entries", type=int, default=64 << 20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    key = tensor_seed(SEED, NAME, 0)
    count = args.uniforms
    print(f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")

    generator = torch.Generator().manual_seed(key)
    rand_s = best(lambda: torch.rand(count, generator=generator), args.repeats)
    print(f"{count:,} uniforms: torch.rand            {rand_s:7.3f} s")
    philox_s = best(lambda: philox.uniform(key, 0, count), args.repeats)
    print(f"{count:,} uniforms: philox (torch ops)    {philox_s:7.3f} s")
    library = native.library()
    if library is not None:
        out = torch.empty(count)

        def c_loop() -> None:
            native.parallel(
                lambda s, e: library.mt_philox_uniform(out.data_ptr(), key, 0, s, e), count
            )

        c_s = best(c_loop, args.repeats)
        print(f"{count:,} uniforms: philox (C, all threads) {c_s:5.3f} s")
    if torch.cuda.is_available():
        philox.uniform(key, 0, 1 << 20, "cuda")  # warm up
        cuda_s = best(lambda: philox.uniform(key, 0, count, "cuda"), args.repeats)
        print(f"{count:,} uniforms: philox (torch ops, CUDA) {cuda_s:5.3f} s")

    delta = torch.randn(args.entries, generator=torch.Generator().manual_seed(1))
    work = torch.empty_like(delta)

    def timed(call: Callable[[torch.Tensor], object]) -> float:
        def once() -> None:
            work.copy_(delta)
            call(work)

        copy_s = best(lambda: work.copy_(delta), args.repeats)
        return best(once, args.repeats) - copy_s

    before_s = timed(lambda d: drop_before(d, 0.3))
    print(f"random_drop_ on {args.entries:,} entries, before (torch.rand)   {before_s:7.3f} s")
    after_s = timed(lambda d: random_drop_(d, 0.3, True, key))
    print(f"random_drop_ on {args.entries:,} entries, after (C loops)       {after_s:7.3f} s")
    previous = os.environ.get("MERGETUI_NATIVE")
    os.environ["MERGETUI_NATIVE"] = "0"
    try:
        torch_s = timed(lambda d: random_drop_(d, 0.3, True, key))
    finally:
        if previous is None:
            del os.environ["MERGETUI_NATIVE"]
        else:
            os.environ["MERGETUI_NATIVE"] = previous
    print(f"random_drop_ on {args.entries:,} entries, after (torch ops)     {torch_s:7.3f} s")


if __name__ == "__main__":
    main()
