"""Write safetensors shards incrementally, one tensor at a time.

The plan knows every output tensor's name, dtype and shape before the first one is computed, so each
shard's header (and so every byte offset) is written up front, and tensors are appended in plan order
as they are produced. Nothing larger than one tensor is ever held for writing.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mergetui.sources.checkpoint import SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * SAFETENSORS_DTYPES[TORCH_TO_SAFETENSORS[self.dtype]][1]


def plan_shards(tensors: list[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a larger tensor alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_bytes(shard: list[OutputTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in shard:
        header[tensor.name] = {
            "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes the planned tensors, in order, into shards in ``directory``."""

    def __init__(self, directory: Path, tensors: list[OutputTensor], shard_size: int) -> None:
        self.directory = directory
        self.shards = plan_shards(tensors, shard_size)
        self.names = shard_names(len(self.shards))
        self.bytes_written = 0
        self._shard_index = -1
        self._position = 0
        self._rows_done = 0  # of the tensor at _position, when it comes in blocks
        self._handle: BinaryIO | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard)

    def _next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._shard_index += 1
        self._position = 0
        path = self.directory / self.names[self._shard_index]
        self._handle = path.open("wb")
        header = _header_bytes(self.shards[self._shard_index])
        self._handle.write(header)
        self.bytes_written += len(header)

    def write(self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Append the next tensor; it must be the next one planned, with the planned dtype and shape.

        ``rows=(start, end)``: ``tensor`` is only those rows of it (a tensor merged in blocks);
        blocks must come in order, and the tensor is complete with the one that ends at its last
        row.
        """
        while self._handle is None or self._position >= len(self.shards[self._shard_index]):
            if self._shard_index + 1 >= len(self.shards):
                raise RuntimeError(f"writer: unexpected tensor {name!r} after the last planned one")
            self._next_shard()
        expected = self.shards[self._shard_index][self._position]
        start, end = rows if rows is not None else (0, expected.shape[0] if expected.shape else 0)
        shape = expected.shape if rows is None else (end - start, *expected.shape[1:])
        actual_dtype = str(tensor.dtype).removeprefix("torch.")
        if (
            expected.name != name
            or tuple(tensor.shape) != shape
            or actual_dtype != expected.dtype
            or start != self._rows_done
        ):
            got = f"{name} {list(tensor.shape)} {actual_dtype}"
            if rows is not None:
                got += f" rows [{start}, {end})"
            raise RuntimeError(
                f"writer: expected {expected.name} {list(shape)} {expected.dtype} from row "
                f"{self._rows_done}, got {got}"
            )
        if tensor.numel():
            import torch

            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            assert self._handle is not None
            self._handle.write(data.numpy().data)
            self.bytes_written += data.numel()
        if rows is not None and expected.shape and end < expected.shape[0]:
            self._rows_done = end
            return
        self._rows_done = 0
        self._position += 1

    def close(self) -> list[Path]:
        """Finish the last shard, write the index when sharded, and return the files written."""
        if self._handle is not None:
            self._handle.flush()
            self._handle.close()
            self._handle = None
        planned = sum(len(s) for s in self.shards)
        written = sum(len(s) for s in self.shards[: self._shard_index]) + self._position
        if written != planned:
            raise RuntimeError(f"writer: {written} of {planned} planned tensors were written")
        files = [self.directory / name for name in self.names]
        if len(self.shards) > 1:
            weight_map = {
                t.name: file
                for file, shard in zip(self.names, self.shards, strict=True)
                for t in shard
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            files.append(self.directory / INDEX_NAME)
        return files

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
