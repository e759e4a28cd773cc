"""The method step's form for the methods added after the first seven (model_stock, karcher,
breadcrumbs_ties, sce, nearswap, della, nuslerp, multislerp, arcee_fusion, ram, ramplus_tl): each
shows the fields its registry entry declares, validates them as typed (rules across fields too),
and previews the recipe."""

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

        screen.query_one("#method", Select).value = "della"
        await pilot.pause()
        for index in (0, 1):  # per model: weight, density and DELLA's epsilon
            screen.query_one(f"#m{index}-weight", Input).value = "1.0"
        screen.query_one("#m0-density", Input).value = "0.5"
        epsilon = screen.query_one("#m0-epsilon", Input)
        epsilon.value = "0.6"
        await pilot.pause()
        # a rule across two fields: density ± epsilon must stay inside (0, 1)
        assert "models[0]: density 0.5 ± epsilon 0.6 spans" in str(problems.render())
        epsilon.value = "0.2"
        await pilot.pause()
        assert "valid recipe" in str(problems.render())
        assert "epsilon = 0.2" in str(preview.render())

        screen.query_one("#method", Select).value = "nuslerp"
        await pilot.pause()
        assert screen.query_one("#g-nuslerp_flatten")
        assert screen.query_one("#g-nuslerp_row_wise")
        for index, weight in ((0, "0.3"), (1, "0.7")):
            screen.query_one(f"#m{index}-weight", Input).value = weight
        await pilot.pause()
        assert "valid recipe" in str(problems.render())  # two models besides the base
        assert 'method = "nuslerp"' in str(preview.render())

        screen.query_one("#method", Select).value = "multislerp"
        await pilot.pause()
        assert screen.query_one("#g-normalize_weights")
        eps = screen.query_one("#g-eps", Input)
        eps.value = "-1"
        await pilot.pause()
        assert "merge.parameters.eps: must be in [0, inf)" in str(problems.render())
        eps.value = "1e-7"
        await pilot.pause()
        assert "valid recipe" in str(problems.render())

        screen.query_one("#method", Select).value = "arcee_fusion"
        await pilot.pause()
        assert "arcee_fusion takes exactly 1" in str(problems.render())

        for method in ("ram", "ramplus_tl"):
            screen.query_one("#method", Select).value = method
            await pilot.pause()
            screen.query_one("#g-epsilon", Input).value = "0.001"
            await pilot.pause()
            assert "valid recipe" in str(problems.render()), method
            assert "epsilon = 0.001" in str(preview.render()), method
        screen.query_one("#g-alpha", Input).value = "0.5"
        await pilot.pause()
        assert "alpha = 0.5" in str(preview.render())

        screen.query_one("#method", Select).value = "della_linear"
        for _ in range(600):  # a hang detector: the preview follows the form's rebuild
            await pilot.pause(0.05)
            if 'method = "della_linear"' in str(preview.render()):
                break
        assert screen.query_one("#m1-epsilon", Input)
        assert 'method = "della_linear"' in str(preview.render())
