"""Generation speed (tokens/s) of the compare step, headless and inside the TUI.

    python bench/bench_generation.py [MODEL_DIR ...] [--tokens 64] [--repeats 3] [--threads N]
    python bench/bench_generation.py --tui [MODEL_DIR ...]
    python bench/bench_generation.py --busy 1 [--tui]    # with one core kept busy meanwhile

Without folders it uses the demo models (``mergetui demo`` trains them; built here under
``--demo-root``, default /tmp/demo-models, in 1-3 minutes when missing). Each answer is
``--tokens`` long: the end-of-sequence token is ignored so short answers ("46") do not turn the
figure into a measure of the first token's latency.

- headless: ``mergetui.evaluate.compare.compare`` as ``mergetui compare`` calls it, in this
  process; ``--threads`` sets torch's CPU threads first (default: torch's own choice).
- ``--tui``: the real app, headless (Textual's ``run_test``), the prompt typed into step 5
  and Generate pressed; the figures are the ones the screen shows ("done: base 187 tok/s …").

``--busy N`` keeps N cores busy (a spinning process each) while it measures, as a test suite
or another job would: the figures that vary most with the machine's load are the ones it shows.
Prints each repeat and the median tokens/s per model; compare figures taken one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROMPT = "def add(a, b):"


def demo_models(root: Path) -> list[Path]:
    from mergetui.demo import build_demo_models

    return list(build_demo_models(root).values())


@contextmanager
def busy_cores(count: int) -> Any:
    """``count`` processes spinning on the CPU while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def ignore_eos() -> None:
    """Answers run to ``--tokens``: no end-of-sequence token is recognised."""
    import mergetui.evaluate.generation as generation

    generation._eos_ids = lambda loaded: set()


def headless(paths: list[Path], tokens: int, repeats: int, threads: int | None) -> dict[str, list]:
    import torch

    from mergetui.evaluate.compare import compare
    from mergetui.evaluate.generation import GenerationSettings

    if threads is not None:
        torch.set_num_threads(threads)
    print(f"headless, torch threads {torch.get_num_threads()}")
    names = [p.name for p in paths]
    speeds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        result = compare(names, paths, [PROMPT], GenerationSettings(tokens), device="cpu")
        for name in names:
            answer = result.answers[(name, 0)]
            speeds[name].append(answer.tokens_per_s)
        print(f"  {repeat}: " + ", ".join(f"{n} {speeds[n][-1]:.0f} tok/s" for n in names))
    return speeds


def in_tui(paths: list[Path], tokens: int, repeats: int) -> dict[str, list]:
    return asyncio.run(_tui(paths, tokens, repeats))


async def _tui(paths: list[Path], tokens: int, repeats: int) -> dict[str, list]:
    from textual.widgets import Input, Static

    from mergetui.tui.app import create_app
    from mergetui.tui.screens.compare import CompareScreen
    from mergetui.tui.state import ModelDraft, RecipeDraft

    draft = RecipeDraft(
        base=str(paths[0]),
        models=[ModelDraft(str(p)) for p in paths[1:]],
        method="linear",
        output=str(Path("/nonexistent") / "no-merge-yet"),
        device="cpu",
    )
    app = create_app(draft=draft)
    speeds: dict[str, list[float]] = {}
    async with app.run_test(size=(140, 44)) as pilot:
        app.action_compare()
        screen = app.screen
        assert isinstance(screen, CompareScreen)
        while not screen.names:
            await pilot.pause(0.05)
        print(f"in the TUI: {', '.join(screen.names)}")
        speeds = {name: [] for name in screen.names}
        status = screen.query_one("#compare-status", Static)
        for repeat in range(repeats):
            screen.query_one("#prompt", Input).value = PROMPT
            screen.query_one("#max-tokens", Input).value = str(tokens)
            screen.action_generate()  # what Enter or the Generate button do
            while screen.busy:
                await pilot.pause(0.05)
            await pilot.pause()
            text = str(status.render())
            print(f"  {repeat}: {text}")
            for part in text.removeprefix("done: ").split(", "):
                name, figure, _ = part.rsplit(" ", 2)
                speeds[name].append(float(figure))
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", type=Path, help="model folders (default: demo)")
    parser.add_argument("--demo-root", type=Path, default=Path("/tmp/demo-models"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (headless)")
    parser.add_argument("--tui", action="store_true", help="measure inside the TUI")
    parser.add_argument("--busy", type=int, default=0, help="cores kept busy meanwhile")
    args = parser.parse_args()
    paths = args.models or demo_models(args.demo_root)
    ignore_eos()
    started = time.perf_counter()
    with busy_cores(args.busy):
        speeds: dict[str, Any] = (
            in_tui(paths, args.tokens, args.repeats)
            if args.tui
            else headless(paths, args.tokens, args.repeats, args.threads)
        )
    print(
        f"median tokens/s, {args.tokens} tokens per answer ({time.perf_counter() - started:.0f} s):"
    )
    for name, figures in speeds.items():
        print(f"  {name}: {statistics.median(figures):.0f}")


if __name__ == "__main__":
    main()
