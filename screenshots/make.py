"""Render the README's screenshots: one SVG per step of the TUI, at 120×36.

    python screenshots/make.py [--size 120x36]

The scenes are the snapshot tests' (``tests/snapshot_scenes.py``): tiny random models built
here (a few seconds, cached under ``screenshots/.work/``, which git ignores), a recipe that names
them relatively, and a recorded merge, so the pictures are the same on every machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from snapshot_scenes import SCENES, build_models, pin_environment, prepare, scene_app  # noqa: E402


async def answers(pilot: object) -> None:
    """The compare step with answers in (the snapshot stops before: tokens/s vary)."""
    from textual.widgets import Input, Static

    screen = pilot.app.screen  # type: ignore[attr-defined]
    screen.query_one("#prompt", Input).value = "12+34="
    screen.query_one("#max-tokens", Input).value = "16"
    screen.action_generate()
    status = screen.query_one("#compare-status", Static)
    for _ in range(600):
        if str(status.render()).startswith("done"):
            break
        await pilot.pause(0.05)  # type: ignore[attr-defined]


#: extra steps for the pictures, after the scene's own
SHOWCASE = {"5-compare": answers}


async def render(scene: str, workspace: Path, state: Path, size: tuple[int, int]) -> str:
    kind, run_before = SCENES[scene]
    app = scene_app(kind, workspace, state)
    async with app.run_test(size=size) as pilot:
        await run_before(pilot)
        if scene in SHOWCASE:
            await SHOWCASE[scene](pilot)
        await pilot.pause(0.3)
        return app.export_screenshot(title=f"mergetui · {scene}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="120x36", help="terminal size, COLUMNSxROWS")
    args = parser.parse_args()
    columns, rows = (int(n) for n in args.size.split("x"))
    work = HERE / ".work"
    models = build_models(work / "models")
    workspace = prepare(work / "workspace", models)
    for scene in SCENES:
        with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as state:
            pin_environment(patch, Path(state))
            svg = asyncio.run(render(scene, workspace, Path(state), (columns, rows)))
        target = HERE / f"{scene}.svg"
        target.write_text(svg, encoding="utf-8")
        print(f"wrote {target.relative_to(HERE.parent)} ({len(svg) // 1024} KiB)")


if __name__ == "__main__":
    main()
