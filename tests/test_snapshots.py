"""Snapshots of every step at 80×24 and 120×36 (pytest-textual-snapshot), from deterministic
scenes (``snapshot_scenes.py``). After an intended change of the UI, look at the report and
accept with ``pytest tests/test_snapshots.py --snapshot-update``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from snapshot_scenes import SCENES, pin_environment, prepare, scene_app


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Path:
    """The scenes' workspace, linking the session's tiny models under fixed names."""
    zoo = {"base": models["base"], "ft-code": models["ft_a"], "ft-math": models["ft_c"]}
    return prepare(tmp_path_factory.mktemp("scenes") / "work", zoo)


@pytest.mark.parametrize("size", [(80, 24), (120, 36)], ids=["80x24", "120x36"])
@pytest.mark.parametrize("scene", list(SCENES))
def test_step(
    scene: str,
    size: tuple[int, int],
    workspace: Path,
    snap_compare: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    pin_environment(monkeypatch, state)
    kind, run_before = SCENES[scene]
    app = scene_app(kind, workspace, state)
    assert snap_compare(app, run_before=run_before, terminal_size=size)
