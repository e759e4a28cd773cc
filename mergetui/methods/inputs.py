"""What a kernel receives for one output tensor, and the per-tensor random generator.

Kernels are pure functions ``kernel(inputs: TensorInputs) -> torch.Tensor``. They receive float32
tensors on the compute device, own them (they may modify them in place to save memory) and return a
float32 tensor of the same shape. Casting to the output dtype is the executor's job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class TensorInputs:
    """The inputs of one output tensor.

    ``models[i]`` belongs to the i-th ``[[models]]`` entry and ``model_params[i]`` holds that entry's
    resolved per-model parameters; ``params`` holds the method-wide ones, defaults filled in.
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    model_params: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def per_model(self, key: str) -> list[Any]:
        return [p[key] for p in self.model_params]

    def require_base(self) -> torch.Tensor:
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs a base tensor")
        return self.base


def tensor_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """A 63-bit seed derived from (seed, tensor name, model index).

    Deriving each tensor's random stream from its name (not from a global stream) makes randomised
    methods bit-reproducible whatever order tensors are processed in, how many threads run, or which
    device does the math. DARE and DELLA use it as the key of their counter-based Philox stream
    (:mod:`mergetui.methods.philox`), the dare types of ``lora merge`` to seed a generator.
    """
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{model_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, tensor_name: str, model_index: int) -> torch.Generator:
    """A CPU generator for one (tensor, model) pair; see :func:`tensor_seed`. Used by the dare
    types of ``lora merge``, which mirror PEFT's ``torch.rand`` draws (DARE and DELLA on whole
    models draw from :mod:`mergetui.methods.philox` instead).

    Random numbers are always drawn on the CPU and then moved, because CUDA and CPU generators give
    different streams for the same seed.
    """
    import torch

    generator = torch.Generator(device="cpu")
    generator.manual_seed(tensor_seed(seed, tensor_name, model_index))
    return generator
