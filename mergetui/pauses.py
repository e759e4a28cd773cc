"""Named moments of a command where a test can hold it and send it a signal, deterministically.

Whether Ctrl-C or SIGTERM leaves a clean exit depends on where the process is when the signal
lands: building the plan, starting the worker threads, in the middle of a shard, writing the
tokenizer, renaming the output into place. A test that signals "soon after the first tensor" only
hits those places by luck, and on a fast machine the merge may be over first. So the engine and
the CLI call :func:`pause_point` at each such moment; with ``MERGETUI_PAUSE_AT=MOMENT`` (or
``MOMENT:N``, the N-th time that moment comes, counting from 1) the process stops there, says
``mergetui: paused at MOMENT`` on stderr, and waits until ``resume`` is set (the merge's cancel
flag, which a signal sets) or a signal's exception interrupts the wait, or :data:`MAX_PAUSE_S`
pass (a hang detector, not a timing). Unset, a pause point costs one dictionary lookup.

``MERGETUI_PAUSE_RELEASE=FILE`` also ends the pause once FILE exists, for a test that holds a
merge while it does something else (detaches the UI, kills the terminal) and then lets it finish.

Moments: ``before-plan``, ``plan``, ``threads-started``, ``tensor:N`` (after the N-th tensor's
event), ``write:N`` (the writer thread, after the N-th tensor is in its shard), ``support-files``
(config written, tokenizer and card not yet), ``publish`` (complete, not yet renamed into
place), ``done`` (after the ``done`` event), ``trial-merged:N`` (a sweep's trial number N-1 is
merged, not yet scored).
"""

from __future__ import annotations

import os
import sys
import threading
import time

ENV = "MERGETUI_PAUSE_AT"
RELEASE_ENV = "MERGETUI_PAUSE_RELEASE"
MAX_PAUSE_S = 120.0


def pause_point(moment: str, resume: threading.Event | None = None, occurrence: int = 1) -> None:
    """Hold here if ``MERGETUI_PAUSE_AT`` names this moment (and occurrence); else return."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != moment or occurrence != (int(count) if count else 1):
        return
    sys.stderr.write(f"mergetui: paused at {wanted}\n")
    sys.stderr.flush()
    release = os.environ.get(RELEASE_ENV)
    deadline = time.monotonic() + MAX_PAUSE_S
    while time.monotonic() < deadline:
        if resume is not None and resume.is_set():
            return
        if release and os.path.exists(release):
            return
        time.sleep(0.02)  # a signal's handler runs (and may raise) between these sleeps
