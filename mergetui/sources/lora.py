"""PEFT LoRA adapters, folded into a model tensor by tensor while streaming.

For each target tensor W the adapter adds ``scale · B @ A`` (transposed for embeddings and
``fan_in_fan_out`` layers), where ``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), with per-module
``rank_pattern``/``alpha_pattern`` overrides as PEFT applies them. Tensors the adapter saved whole
(``modules_to_save``, resized embeddings) replace the model's. Only the adapter's small tensors are read
up front; the model's own tensors stream as usual, so no merged copy of the model is ever materialised.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergetui.errors import SourceError
from mergetui.sources.checkpoint import (
    TensorSpec,
    load_bin_state,
    read_json_object,
    read_safetensors_header,
    read_spec,
)

if TYPE_CHECKING:
    import torch

    from mergetui.sources.checkpoint import Checkpoint

_PREFIX = "base_model.model."
_PIECES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".base_layer.weight": "replace_weight",
    ".base_layer.bias": "replace_bias",
}


@dataclass
class LoraTarget:
    """The adapter's contribution to one module (``module`` is e.g. ``model.layers.0.self_attn.q_proj``)."""

    module: str
    scale: float
    embedding: bool = False
    pieces: dict[str, str] = field(default_factory=dict)  # piece kind → adapter tensor name


@dataclass
class LoraAdapter:
    """An adapter folder opened from its config and header; tensors are read on demand."""

    label: str
    directory: Path
    config: dict[str, Any]
    tensors: dict[str, TensorSpec]
    targets: dict[str, LoraTarget]  # keyed by module name
    replacements: dict[str, str]  # model tensor name → adapter tensor name (saved whole)
    _state: dict[str, Any] | None = None
    _fd: int | None = None

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def check_against(self, model: Checkpoint) -> list[str]:
        """Problems applying this adapter to ``model``: missing target tensors, shape mismatches."""
        problems = []
        for module, target in self.targets.items():
            weight = model.tensors.get(f"{module}.weight")
            if weight is None:
                problems.append(f"targets {module}.weight, which {model.label} does not have")
                continue
            if "A" not in target.pieces or "B" not in target.pieces:
                if "replace_weight" not in target.pieces:
                    problems.append(f"has only half of the LoRA pair for {module}")
                continue
            a_shape = self.tensors[target.pieces["A"]].shape
            b_shape = self.tensors[target.pieces["B"]].shape
            expected = _delta_shape(target, a_shape, b_shape, self.config)
            if tuple(weight.shape) != expected:
                problems.append(
                    f"LoRA for {module}.weight gives a delta of shape {list(expected)} but "
                    f"{model.label} has {list(weight.shape)}: the adapter was trained on another base"
                )
        for name, source in self.replacements.items():
            weight = model.tensors.get(name)
            if weight is None:
                problems.append(f"saves {name} whole, but {model.label} has no such tensor")
            elif tuple(weight.shape) != self.tensors[source].shape:
                problems.append(
                    f"saves {name} with shape {list(self.tensors[source].shape)}, "
                    f"{model.label} has {list(weight.shape)}"
                )
        return problems

    def read_tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One of the adapter's tensors (or its rows ``[start, end)``) in float32 on the CPU:
        folding reads A and B this way, and so does ``lora merge``."""
        import torch

        if self._state is not None:
            whole = self._state[name]
            return (whole if rows is None else whole[rows[0] : rows[1]]).to(torch.float32)
        spec = self.tensors[name]
        if self._fd is None:  # one open file for the whole merge, read by offset from the header
            self._fd = os.open(spec.file, os.O_RDONLY)
        return read_spec(spec, self._fd, rows).to(torch.float32)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def apply(self, name: str, tensor: torch.Tensor, start_row: int = 0) -> torch.Tensor:
        """Return ``tensor`` (float32, model tensor ``name``, or its rows from ``start_row`` on
        when the tensor is merged in blocks) with the adapter folded in."""
        rows = (start_row, start_row + tensor.shape[0]) if tensor.dim() > 1 else None
        replacement = self.replacements.get(name)
        if replacement is not None:
            tensor = self.read_tensor(replacement, rows).to(tensor.device)
        module, _, leaf = name.rpartition(".")
        target = self.targets.get(module)
        if target is None:
            return tensor
        if leaf == "weight" and "A" in target.pieces and "B" in target.pieces:
            a = self.read_tensor(target.pieces["A"]).to(tensor.device)
            b = self.read_tensor(target.pieces["B"]).to(tensor.device)
            transposed = target.embedding or self.config.get("fan_in_fan_out", False)
            _add_product_rows_(tensor, b, a, transposed, target.scale, start_row)
        elif leaf == "bias" and "B_bias" in target.pieces:
            bias = self.read_tensor(target.pieces["B_bias"]).to(tensor.device)
            tensor = tensor.add_(bias, alpha=target.scale)
        return tensor


def product_rows(width: int) -> int:
    """Rows of ``B @ A`` made by one matrix product: as many as fit a 64K-entry temporary (small,
    so that blocks aligned to it still fit a tight budget). Every product covers the same rows
    (counted from the tensor's first) whether the tensor is merged whole or in blocks of a
    multiple of these rows, so both add the same bits."""
    return max(1, (1 << 16) // max(width, 1))


def _add_product_rows_(
    tensor: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    transposed: bool,
    scale: float,
    start_row: int,
) -> None:
    """``tensor += scale · (B @ A)`` (its transpose when ``transposed``) for the tensor's rows,
    which are the delta's rows from ``start_row`` on, one :func:`product_rows` group at a time:
    a bounded temporary, and the same products whether merged whole or in blocks."""
    height, width = tensor.shape[0], tensor.shape[-1]
    step = product_rows(width)
    for first in range(0, height, step):
        lo, hi = start_row + first, start_row + min(height, first + step)
        delta = (b @ a[:, lo:hi]).T if transposed else b[lo:hi] @ a
        tensor[first : first + hi - lo].add_(delta, alpha=scale)


def _delta_shape(
    target: LoraTarget, a_shape: tuple[int, ...], b_shape: tuple[int, ...], config: dict[str, Any]
) -> tuple[int, ...]:
    shape = (b_shape[0], a_shape[-1])
    if target.embedding or config.get("fan_in_fan_out", False):
        shape = (shape[1], shape[0])
    return shape


def _split_piece(short_name: str) -> tuple[str, str] | None:
    """``(module, piece kind)`` for a LoRA tensor name, None for a tensor saved whole."""
    for suffix, kind in _PIECES.items():
        if short_name.endswith(suffix):
            return short_name[: -len(suffix)], kind
    return None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module name that ends with it at a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def open_lora(directory: Path, label: str | None = None) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder from its config and tensor header."""
    label = label or str(directory)
    config_path = directory / "adapter_config.json"
    if not directory.is_dir():
        raise SourceError(f"LoRA adapter {label}: folder not found: {directory}")
    config = read_json_object(
        config_path,
        f"LoRA adapter {label}: no adapter_config.json in {directory}; "
        "point `lora` to a folder saved by PEFT's save_pretrained",
    )
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise SourceError(
            f"LoRA adapter {label}: peft_type is {peft_type}; only LORA adapters can be folded in"
        )
    if config.get("use_dora"):
        raise SourceError(
            f"LoRA adapter {label}: DoRA adapters (use_dora=true) are not supported "
            "yet; merge it with PEFT's merge_and_unload and use the result as a model"
        )

    st_file = directory / "adapter_model.safetensors"
    bin_file = directory / "adapter_model.bin"
    state = None
    if st_file.is_file():
        tensors, _ = read_safetensors_header(st_file)
    elif bin_file.is_file():
        state = load_bin_state(bin_file)
        tensors = {
            name: TensorSpec(name, str(v.dtype).removeprefix("torch."), tuple(v.shape), bin_file)
            for name, v in state.items()
        }
    else:
        raise SourceError(f"LoRA adapter {label}: no adapter_model.safetensors in {directory}")

    default_r = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", default_r))
    targets: dict[str, LoraTarget] = {}
    replacements: dict[str, str] = {}
    for name in tensors:
        if "lora_magnitude_vector" in name:
            raise SourceError(f"LoRA adapter {label}: {name} is a DoRA magnitude; not supported")
        short = name.removeprefix(_PREFIX)
        piece = _split_piece(short)
        if piece is None:
            replacements[short] = name  # saved whole (modules_to_save)
            continue
        module, kind = piece
        if kind.startswith("replace_"):
            replacements[f"{module}.{kind.removeprefix('replace_')}"] = name
        target = targets.get(module)
        if target is None:
            r = int(_pattern_value(config.get("rank_pattern") or {}, module, default_r))
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, default_alpha))
            scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            target = targets[module] = LoraTarget(module, scale)
        target.pieces[kind] = name
        if "embedding" in name:
            target.embedding = True
    return LoraAdapter(label, directory, config, tensors, targets, replacements, state)
