"""Reading stored tensors into float32 buffers through the staging slots.

The pipelined staging (two host slots and two device slots, the GPU path) is forced on the CPU
here: pinning and CUDA events are what a GPU adds (``tests/test_cuda.py`` and
``bench/gpu_check.py`` run it there); the slot rotation, the byte-level device copy and the
conversion are the same code, and must give the plain path's bits for any slice size and any
block of rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergetui.sources.checkpoint import Staging, open_checkpoint


@pytest.fixture(scope="module")
def mixed_dtypes(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny model (bf16, sharded) plus a shard of float16 and float32 tensors."""
    folder = tmp_path_factory.mktemp("staging") / "model"
    shutil.copytree(models["ft_b"], folder)
    generator = torch.Generator().manual_seed(7)
    save_file(
        {
            "extra.half": torch.randn(37, 13, generator=generator).to(torch.float16),
            "extra.single": torch.randn(29, 11, generator=generator),
        },
        folder / "extra.safetensors",
    )
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update(
        {"extra.half": "extra.safetensors", "extra.single": "extra.safetensors"}
    )
    index_path.write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("slot_bytes", [6, 1000, 8 << 20])
def test_pipelined_staging_gives_the_plain_bits_for_any_slice_and_block(
    mixed_dtypes: Path, slot_bytes: int
) -> None:
    checkpoint = open_checkpoint(mixed_dtypes)
    plain = Staging(8 << 20)
    pipelined = Staging(slot_bytes, "cpu", pipelined=True)
    assert not plain.pipelined and pipelined.pipelined
    dtypes = {spec.dtype for spec in checkpoint.tensors.values()}
    assert {"bfloat16", "float16", "float32"} <= dtypes
    with checkpoint:
        for name, spec in checkpoint.tensors.items():
            expected = checkpoint.read(name).to(torch.float32)
            whole = torch.empty(spec.shape, dtype=torch.float32)
            read = checkpoint.read_into(name, whole, pipelined)
            assert read == spec.nbytes
            assert torch.equal(whole, expected), name
            if len(spec.shape) == 2 and spec.shape[0] > 2:  # a block of rows from the middle
                rows = torch.empty((spec.shape[0] - 2, spec.shape[1]), dtype=torch.float32)
                checkpoint.read_into(name, rows, pipelined, start=spec.shape[1])
                reference = torch.empty_like(rows)
                checkpoint.read_into(name, reference, plain, start=spec.shape[1])
                assert torch.equal(rows, expected[1:-1]), name
                assert torch.equal(reference, rows), name


def test_staging_refuses_a_read_past_the_tensor(mixed_dtypes: Path) -> None:
    checkpoint = open_checkpoint(mixed_dtypes)
    with checkpoint, pytest.raises(ValueError, match="extra.half: elements"):
        checkpoint.read_into("extra.half", torch.empty(37, 13), Staging(64), start=1)
