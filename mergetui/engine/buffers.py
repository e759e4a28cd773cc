"""Float32 input buffers shared by the loader thread and the merge thread, within a byte budget.

Fresh memory is paid for with a page fault per 4 KiB on first touch, which for large tensors costs
several times the arithmetic done on it, so buffers are reused from one tensor to the next. The
loader takes a tensor's (or block's) buffers while the previous one is still being merged; the
budget, the plan's share of the memory budget for buffers (:mod:`mergetui.engine.blocks`), stops it
from reading ahead past that.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class BufferPool:
    """Thread-safe pool of flat float32 buffers with a cap on the bytes handed out at once."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._free: list[torch.Tensor] = []
        self._lent_bytes = 0
        self._held_bytes = 0  # every buffer this pool made and still keeps or lends
        self._changed = threading.Condition()

    def reserve(self, nbytes: int, stop: threading.Event, poll_s: float = 0.2) -> bool:
        """Wait until ``nbytes`` more fit in the budget (or nothing is lent: a single tensor may
        exceed it), then count them as lent. False when ``stop`` was set while waiting."""
        with self._changed:
            while self._lent_bytes and self._lent_bytes + nbytes > self.budget_bytes:
                if stop.is_set():
                    return False
                self._changed.wait(poll_s)
            self._lent_bytes += nbytes
            return True

    def take(self, shape: Sequence[int], device: Any = "cpu") -> torch.Tensor:
        """A float32 tensor of ``shape``: the smallest free buffer that fits without wasting more
        than a fifth of it, else a new one (after dropping free buffers that would keep the pool
        above its budget, largest first). A small tensor never settles in a large buffer, and the
        part of a reused buffer it does not use counts as lent (the reservation was for its own
        size), so what the pool holds stays within what it lends and its budget."""
        import torch

        numel = math.prod(shape)
        wanted = torch.device(device)
        with self._changed:
            fits = [
                i
                for i, b in enumerate(self._free)
                if numel <= b.numel() <= numel * 5 // 4 and b.device == wanted
            ]
            if fits:  # by index: tensors do not compare with ==
                buffer = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                self._lent_bytes += (buffer.numel() - numel) * 4
                return buffer[:numel].view(shape)
            self._free.sort(key=lambda b: b.numel())
            while self._free and self._held_bytes + numel * 4 > self.budget_bytes:
                self._held_bytes -= self._free.pop().numel() * 4
            self._held_bytes += numel * 4
        return torch.empty(numel, dtype=torch.float32, device=device).view(shape)

    def release(self, buffers: Sequence[torch.Tensor], nbytes: int) -> None:
        """Give buffers back (their whole storage) and free ``nbytes`` of the budget."""
        import torch

        with self._changed:
            unused = 0  # of reused buffers, counted as lent by take()
            for buffer in buffers:
                storage = buffer.untyped_storage()
                whole = torch.empty(0, dtype=torch.float32, device=buffer.device)
                whole.set_(storage, 0, (storage.nbytes() // 4,), (1,))
                self._free.append(whole)
                unused += storage.nbytes() - buffer.numel() * 4
            self._lent_bytes = max(0, self._lent_bytes - nbytes - unused)
            self._free.sort(key=lambda b: b.numel())
            while self._free and self._held_bytes > self.budget_bytes:
                self._held_bytes -= self._free.pop().numel() * 4
            self._changed.notify_all()

    def clear(self) -> None:
        with self._changed:
            self._held_bytes -= sum(b.numel() * 4 for b in self._free)
            self._free.clear()


class OutputPieces:
    """Host tensors the merge converts its results into, handed back by the writer once written.

    A fresh tensor per output piece is memory faulted in page by page: for a 500M merge, 1 GB and
    about 250K page faults, in every merge. Shapes repeat from layer to layer, so a piece that has
    been written is reused for the next of its dtype and size. What the pool holds, lent and free
    together, stays within ``cap_bytes`` (the output copies the memory plan already counts): free
    pieces are dropped, largest first, to make room for a size that is not free.
    """

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self._free: dict[tuple[Any, int], list[torch.Tensor]] = {}
        self._held_bytes = 0
        self._lock = threading.Lock()

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor of ``shape`` and ``dtype`` (contents undefined)."""
        import torch

        numel = math.prod(shape)
        with self._lock:
            free = self._free.get((dtype, numel))
            if free:
                return free.pop().view(tuple(shape))
            nbytes = numel * dtype.itemsize
            self._drop_free(self.cap_bytes - nbytes)
            self._held_bytes += nbytes
        return torch.empty(tuple(shape), dtype=dtype)

    def give_back(self, piece: torch.Tensor) -> None:
        """A piece from :meth:`take`, written and no longer used."""
        with self._lock:
            self._free.setdefault((piece.dtype, piece.numel()), []).append(piece.reshape(-1))
            self._drop_free(self.cap_bytes)

    def _drop_free(self, limit: int) -> None:
        while self._held_bytes > limit:
            sizes = [(key[1] * key[0].itemsize, key) for key, free in self._free.items() if free]
            if not sizes:
                return  # the lent pieces alone are above the limit
            nbytes, key = max(sizes, key=lambda size: size[0])
            self._free[key].pop()
            self._held_bytes -= nbytes
