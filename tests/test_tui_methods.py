"""The method step's form for the methods added after the first seven (model_stock, karcher,
breadcrumbs_ties, sce, nearswap): each shows the fields its registry entry declares, validates them as
typed, and previews the recipe."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_tui import _method_step
from textual.widgets import Input, Select, Static

from mergetui.tui.app import create_app


def test_forms_of_the_newer_methods(tmp_path: Path, models: dict[str, Path]) -> None:
    asyncio.run(_forms(tmp_path, models))


async def _forms(tmp_path: Path, models: dict[str, Path]) -> None:
    app = create_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        screen = await _method_step(pilot, app, models)
        problems = screen.query_one("#problems", Static)
        preview = screen.query_one("#preview", Static)

        screen.query_one("#method", Select).value = "model_stock"
        await pilot.pause()
        assert screen.query_one("#g-filter_wise")
        assert "valid recipe" in str(problems.render())
        assert 'method = "model_stock"' in str(preview.render())

        screen.query_one("#method", Select).value = "karcher"
        await pilot.pause()
        max_iter = screen.query_one("#g-max_iter", Input)
        max_iter.value = "0"
        await pilot.pause()
        assert "merge.parameters.max_iter: must be in [1, inf)" in str(problems.render())
        max_iter.value = "25"
        await pilot.pause()
        assert "valid recipe" in str(problems.render())
        assert "max_iter = 25" in str(preview.render())

        screen.query_one("#method", Select).value = "breadcrumbs_ties"
        await pilot.pause()
        gamma = screen.query_one("#m1-gamma", Input)  # per model, beside weight and density
        gamma.value = "1.5"
        await pilot.pause()
        assert "models[1].gamma: must be in [0, 1]" in str(problems.render())
        gamma.value = "0.05"
        await pilot.pause()
        assert "valid recipe" in str(problems.render())
        assert "gamma = 0.05" in str(preview.render())

        screen.query_one("#method", Select).value = "sce"
        await pilot.pause()
        screen.query_one("#g-select_topk", Input).value = "0.25"
        await pilot.pause()
        assert "valid recipe" in str(problems.render())
        assert "select_topk = 0.25" in str(preview.render())

        screen.query_one("#method", Select).value = "nearswap"
        await pilot.pause()
        t = screen.query_one("#g-t", Input)
        t.value = "0.001"
        await pilot.pause()
        # two fine-tunes are chosen; nearswap takes exactly one besides the base
        assert "nearswap takes exactly 1" in str(problems.render())
        assert "t = 0.001" in str(preview.render())
