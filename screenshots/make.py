"""Render the README's screenshots: one SVG per step of the TUI, at 120×36.

    python screenshots/make.py [--size 120x36] [--demo DIR] [SCENE ...]

Without SCENE every scene is rendered; with some (``2-check-vocabulary``), only those.

The scenes are the snapshot tests' (``tests/snapshot_scenes.py``): tiny random models built
here (a few seconds, cached under ``screenshots/.work/``, which git ignores), a recipe that names
them relatively, and a recorded merge, so the pictures are the same on every machine.

The compare step is pictured with the demo's trained models instead (random ones answer
gibberish): ``mergetui demo --dir DIR`` is run first when DIR has no demo yet (about two minutes
on two cores), then a prompt from the math task is answered and both task files are scored.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from snapshot_scenes import SCENES, build_models, pin_environment, prepare, scene_app  # noqa: E402


async def _until(pilot: Any, status: Any, prefix: str) -> None:
    for _ in range(2400):
        if str(status.render()).startswith(prefix):
            return
        await pilot.pause(0.05)
    raise RuntimeError(f"the compare step never got to {prefix!r}: {status.render()}")


async def demo_compare(demo: Path, size: tuple[int, int]) -> str:
    """The compare step on the demo: the merge, the base and both specialists answer a sum, and
    the eval table shows what the merge kept of each specialist's score."""
    from textual.widgets import Input, Static

    from mergetui.recipe import load_recipe
    from mergetui.tui.app import create_app
    from mergetui.tui.state import RecipeDraft

    app = create_app(draft=RecipeDraft.from_recipe(load_recipe(demo / "demo-ties.toml")))
    async with app.run_test(size=size) as pilot:
        app.action_compare()
        await pilot.pause()
        screen = app.screen
        status = screen.query_one("#compare-status", Static)
        await _until(pilot, status, "4 model(s)")
        screen.query_one("#prompt", Input).value = "12+34="
        screen.query_one("#max-tokens", Input).value = "8"
        screen.action_generate()
        await _until(pilot, status, "done")
        screen.query_one("#tasks", Input).value = "math=tasks/math.jsonl code=tasks/code.jsonl"
        screen.score()
        await _until(pilot, status, "scored")
        await pilot.pause(0.3)
        return app.export_screenshot(title="mergetui · 5-compare (the demo's models)")


async def render(scene: str, workspace: Path, state: Path, size: tuple[int, int]) -> str:
    kind, run_before = SCENES[scene]
    app = scene_app(kind, workspace, state)
    async with app.run_test(size=size) as pilot:
        await run_before(pilot)
        await pilot.pause(0.3)
        return app.export_screenshot(title=f"mergetui · {scene}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="120x36", help="terminal size, COLUMNSxROWS")
    parser.add_argument("--demo", type=Path, default=HERE / ".work" / "demo", help="demo folder")
    parser.add_argument("scenes", nargs="*", help=f"of {', '.join(SCENES)} (default: all)")
    args = parser.parse_args()
    unknown = [scene for scene in args.scenes if scene not in SCENES]
    if unknown:
        parser.error(f"no scene {', '.join(unknown)}; the scenes: {', '.join(SCENES)}")
    columns, rows = (int(n) for n in args.size.split("x"))
    work = HERE / ".work"
    models = build_models(work / "models")
    workspace = prepare(work / "workspace", models)
    scenes = args.scenes or list(SCENES)
    if "5-compare" in scenes and not (args.demo / "merged" / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "mergetui", "demo", "--dir", str(args.demo)], check=True
        )
    for scene in scenes:
        with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as state:
            pin_environment(patch, Path(state))
            if scene == "5-compare":
                svg = asyncio.run(demo_compare(args.demo, (columns, rows)))
            else:
                svg = asyncio.run(render(scene, workspace, Path(state), (columns, rows)))
        target = HERE / f"{scene}.svg"
        target.write_text(svg, encoding="utf-8")
        print(f"wrote {target.relative_to(HERE.parent)} ({len(svg) // 1024} KiB)")


if __name__ == "__main__":
    main()
