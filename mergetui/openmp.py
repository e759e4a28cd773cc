"""How torch's OpenMP worker threads wait between parallel loops (GNU libgomp, Linux wheels).

A merge runs hundreds of thousands of short parallel torch ops, and its process has more threads
than cores (the loader and the writer convert tensors with their own OpenMP teams beside the
merge thread's). libgomp then counts the machine oversubscribed and lets an idle worker spin only
100 times before it sleeps on a futex, so nearly every op pays a sleep and a wake-up: on the 2-core
bench machine a quarter of Arcee fusion's time went to waking threads (``perf``). With
``OMP_WAIT_POLICY=ACTIVE`` the oversubscribed spin is 1000 turns, which is enough; measured on the
500M bench models (page cache warm): SCE 31 s → 21 s, Arcee fusion 35 s → 16 s, RAM 19 s → 14 s.
``GOMP_SPINCOUNT=300000`` keeps the spin of a machine that is not oversubscribed at libgomp's own
default (ACTIVE alone would spin for seconds there).

libgomp reads these once, when torch loads it, so :func:`tune_openmp_waits` runs first thing in
the entry point. A user's own setting of either variable is left as it is.
"""

from __future__ import annotations

import os

#: The variables set when the user has not set them.
OPENMP_WAITS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def tune_openmp_waits() -> None:
    """Set the OpenMP wait variables the user has not set (before torch is imported)."""
    if any(name in os.environ for name in OPENMP_WAITS):
        return  # the user tuned the waits: theirs stand together
    os.environ.update(OPENMP_WAITS)
