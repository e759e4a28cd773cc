"""GPU readings from the driver's tool. No GPU exists here: a stand-in ``nvidia-smi`` prints what
the real one prints for this query (the same columns, units and separators)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mergetui.gpus import GpuReading, parse_nvidia_smi, read_gpus

#: ``nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu
#: --format=csv,noheader,nounits`` on a two-GPU server, one of them busy
TWO_GPUS = "0, NVIDIA H200, 1024, 143771, 3\n1, NVIDIA H200, 80000, 143771, 97\n"


def fake_nvidia_smi(folder: Path, output: str, exit_code: int = 0) -> Path:
    """A stand-in for the driver's tool, first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "nvidia-smi"
    program.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {exit_code}\n")
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    return folder


def test_parse_the_driver_tools_rows() -> None:
    assert parse_nvidia_smi(TWO_GPUS) == [
        GpuReading(0, "NVIDIA H200", 1024 * 1024**2, 143771 * 1024**2, 3),
        GpuReading(1, "NVIDIA H200", 80000 * 1024**2, 143771 * 1024**2, 97),
    ]
    assert parse_nvidia_smi("0, Tesla T4, 10, 15360, [N/A]\n")[0].utilization_percent is None
    assert parse_nvidia_smi("No devices were found\n") == []


def test_read_gpus_without_a_driver_says_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert read_gpus() is None


def test_read_gpus_runs_the_tool_and_survives_its_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'ok', TWO_GPUS)}{os.pathsep}/bin")
    readings = read_gpus()
    assert readings is not None and [g.index for g in readings] == [0, 1]
    failing = fake_nvidia_smi(tmp_path / "bad", "NVIDIA-SMI has failed", exit_code=9)
    monkeypatch.setenv("PATH", f"{failing}{os.pathsep}/bin")
    assert read_gpus() is None
