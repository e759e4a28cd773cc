"""Float64 sums of |x| or x² over a flat float32 tensor, chunk by chunk, in one fixed order.

DARE's and DELLA's rescale (L1 norms before and after the drop), breadcrumbs' rescale and SCE's
weights (sums of squares) need one float64 total per task vector. The total must be the same
float whether the tensor is merged whole or in blocks, so it is summed per chunk and the chunks'
sums are added in order; blocks hold whole chunks. A chunk is a row chunk
(:func:`chunk_elements`: whole rows, about ``CHUNK`` entries), not a fixed ``CHUNK`` entries, so
that blocks of whole chunks stay a few MiB at any width: at 5376 entries a row, whole 1M-entry
chunks would need blocks of 4096 rows, 88 MiB per input. Within a chunk the order is fixed too,
so that the C loops and torch give the same bits: entry j goes to lane ``j % LANES``, each lane
adds its terms in index order starting from 0, and the lanes are then added in order.

Why not ``chunk.abs().sum(dtype=torch.float64)``: its order is torch's own (it cannot be
reproduced in C), and it allocates two chunk-sized temporaries per call (the magnitudes and their
float64 copy). Measured on the 500M bench models, DARE-TIES made about 5,000 such 4-8 MiB
allocations, each mapped, faulted in page by page and unmapped: most of its 27 s of system time.
The C loop (``mt_chunk_sums``) reads the tensor once and allocates nothing; the torch path (other
devices, or ``MERGETUI_NATIVE=0``) emulates the lanes with a sequential ``cumsum``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mergetui.methods import native
from mergetui.methods.registry import rows_per_chunk

#: Entries per chunk (the kernels' ``CHUNK``; blocks of a tensor hold whole chunks).
CHUNK = 1 << 20
#: Entries per chunk, on the CPU, of loops that are element by element only (exact float32
#: arithmetic, masks and whole-number counts: any chunking gives the same bits). 512 KiB of float32 stays under
#: glibc's mmap threshold (1 MiB, set by ``engine.heap``), so their temporaries are taken from and
#: given back to the heap's free lists. At ``CHUNK`` entries each one was mapped, faulted in page
#: by page and unmapped: on the 500M bench, SCE made 9.6M page faults (25 s of system time in a
#: 38 s merge), breadcrumbs 17.7M, RAM 11.7M.
ELEMENTWISE_CHUNK = 1 << 17
#: Interleaved float64 accumulators per chunk (``SUM_LANES`` in native_kernels.c).
LANES = 8


def chunk_elements(shape: Sequence[int]) -> int:
    """Entries in one row chunk of a tensor of ``shape``: ``rows_per_chunk`` whole rows (a 1-D
    tensor's rows are its entries, so its chunks are ``CHUNK`` entries)."""
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows_per_chunk(width) * width


def elementwise_chunk(like: torch.Tensor) -> int:
    """Entries per chunk of an element-by-element loop over tensors like ``like``: small on the
    CPU (see ``ELEMENTWISE_CHUNK``), ``CHUNK`` elsewhere (a GPU's caching allocator reuses its
    blocks, and fewer chunks are fewer kernel launches)."""
    return ELEMENTWISE_CHUNK if like.device.type == "cpu" else CHUNK


def add_l1(total: Any, flat: torch.Tensor, chunk: int) -> Any:
    """``total`` plus the L1 norm of the flat tensor ``flat`` summed per ``chunk`` entries (a
    float, or a float64 tensor on ``flat``'s device). ``chunk``: :func:`chunk_elements` of the
    whole tensor's shape, whether ``flat`` is all of it or a block of whole chunks."""
    return _add_sums(total, flat, chunk, squares=False)


def add_squares(total: Any, flat: torch.Tensor, chunk: int) -> Any:
    """``total`` plus the sum of squares (each rounded to float32, as ``flat.square()``) of the
    flat tensor ``flat``, summed per ``chunk`` entries as :func:`add_l1`."""
    return _add_sums(total, flat, chunk, squares=True)


def _add_sums(total: Any, flat: torch.Tensor, chunk: int, squares: bool) -> Any:
    if flat.numel() == 0:
        return total
    library = native.available_for(flat)
    if library is not None and flat.is_contiguous():
        chunk_count = -(-flat.numel() // chunk)
        sums = torch.empty(chunk_count, dtype=torch.float64)
        pointer, count = flat.data_ptr(), flat.numel()
        native.parallel(
            lambda first, last: library.mt_chunk_sums(
                pointer, count, chunk, first, last, int(squares), sums.data_ptr()
            ),
            chunk_count,
            align=1,
        )
        for chunk_sum in sums.tolist():  # in chunk order, as the torch path adds them
            total = total + chunk_sum
        return total
    for piece in flat.split(chunk):
        total = total + chunk_sum_torch(piece, squares)
    return total


def chunk_sum_torch(chunk: torch.Tensor, squares: bool) -> torch.Tensor:
    """One chunk's sum in the lanes' order, with torch ops (a 0-d float64 tensor on the chunk's
    device). ``cumsum`` on CPU adds each column in index order, which is the lanes' order; padding
    with zeros leaves every lane's total as it is."""
    terms = chunk.square() if squares else chunk.abs()
    remainder = terms.numel() % LANES
    if remainder:
        terms = torch.cat([terms, terms.new_zeros(LANES - remainder)])
    lanes = terms.view(-1, LANES).to(torch.float64).cumsum(0)[-1]
    return lanes.cumsum(0)[-1]
