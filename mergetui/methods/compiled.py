"""Optional ``torch.compile`` for element-wise kernels on the CPU.

Op by op, a TIES chunk reads and writes every element some thirty times; compiled, the same ops run as
one fused, vectorised loop, about ten times faster. Compiling needs a C++ compiler and takes a few
seconds the first time (inductor caches the result on disk), so it is used only for tensors large
enough to pay for it, and any failure falls back to the op-by-op kernels for the rest of the run.

``MERGETUI_COMPILE``: ``auto`` (default: compile CPU tensors of at least ``MIN_ELEMENTS``), ``1``
(compile whatever the size: the tests use it) or ``0`` (never).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Below this many elements a tensor merges faster op by op than it takes to load a compiled kernel.
MIN_ELEMENTS = 1 << 20
_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
_disabled: list[str] = []


def _mode() -> str:
    return os.environ.get("MERGETUI_COMPILE", "auto").strip().lower()


def disable_compiled(reason: BaseException) -> None:
    """Stop compiling for the rest of this process, saying why (once)."""
    if not _disabled:
        log.warning(
            "torch.compile is unavailable (%s); merging op by op, which is slower",
            f"{type(reason).__name__}: {reason}".splitlines()[0],
        )
    _disabled.append(type(reason).__name__)


def compiled_kernel(function: Callable[..., Any], like: torch.Tensor) -> Callable[..., Any] | None:
    """``function`` compiled for tensors like ``like``, or None when op by op is the better choice."""
    mode = _mode()
    if mode in ("0", "off", "false", "no") or _disabled or like.device.type != "cpu":
        return None
    if mode == "auto" and like.numel() < MIN_ELEMENTS:
        return None
    compiled = _compiled.get(function)
    if compiled is None:
        import torch

        compiled = _compiled[function] = torch.compile(function, dynamic=True)
    return compiled


def accelerated(function: Callable[..., Any], like: torch.Tensor) -> Callable[..., Any]:
    """A callable that runs ``function`` compiled when that pays off, else as it is.

    ``function`` must be pure (no in-place writes): if compiling fails on a call, compiling is
    switched off for the process and the same call runs uncompiled, with the same result.
    """
    compiled = compiled_kernel(function, like)
    if compiled is None:
        return function

    def call(*args: Any) -> Any:
        if _disabled:
            return function(*args)
        try:
            return compiled(*args)
        except Exception as exc:  # no C++ compiler, unsupported platform, ...
            disable_compiled(exc)
            return function(*args)

    return call
