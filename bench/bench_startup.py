"""How long ``mergetui`` takes to show a usable first screen, in a real terminal (tmux).

    python bench/bench_startup.py [--runs 7]

Launches the app in a detached 80×24 tmux session and polls the pane until step 1's title is
drawn; prints each time and the median. Also prints the modules loaded at that point (torch and
transformers must not be among them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True)


def one_run(socket: str, state: str) -> float:
    command = f"exec env MERGETUI_LOG_DIR={state} {sys.executable} -m mergetui"
    started = time.perf_counter()
    tmux(socket, "new-session", "-d", "-s", "bench", "-x", "80", "-y", "24", command)
    try:
        while time.perf_counter() - started < 30:
            if "1 · Models" in tmux(socket, "capture-pane", "-p", "-t", "bench").stdout:
                return time.perf_counter() - started
            time.sleep(0.01)
        raise RuntimeError("the first screen never appeared")
    finally:
        tmux(socket, "kill-server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    socket = f"mergetui-bench-{os.getpid()}"
    with tempfile.TemporaryDirectory() as state:
        one_run(f"{socket}-warm", state)  # warm the OS caches; not counted
        # a fresh tmux server each time: one just killed may still hold its socket
        times = [one_run(f"{socket}-{run}", state) for run in range(args.runs)]
    print("first screen (s):", " ".join(f"{t:.2f}" for t in times))
    print(f"median {statistics.median(times):.2f} s, best {min(times):.2f} s over {args.runs} runs")
    probe = (
        "import sys, asyncio\n"
        "from mergetui.tui.app import create_app\n"
        "async def main():\n"
        "    async with create_app().run_test() as pilot:\n"
        "        await pilot.pause()\n"
        "    print(len(sys.modules), [m for m in ('torch', 'transformers') if m in sys.modules])\n"
        "asyncio.run(main())\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    print("modules loaded with the first screen up, heavy ones among them:", loaded.stdout.strip())


if __name__ == "__main__":
    main()
