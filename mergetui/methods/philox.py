"""Counter-based uniforms for DARE's and DELLA's random drops: Philox4x32-10, in torch ops.

Why a counter-based generator: the draw for entry i of a task vector is a pure function of
``(key, i)``, so any piece of a tensor (a chunk, a block of rows, one worker thread's range) draws
its uniforms without carrying generator state from the pieces before it, every thread count gives
the same bits, and the CUDA device draws the same bits as the CPU without a CPU→GPU copy. A
sequential generator (``torch.rand`` with a ``torch.Generator``) gives none of that and dominated
the time of a DARE merge.

The stream, shared with the C loops of ``native_kernels.c`` (which must give the same bits):

- key: the 64-bit :func:`~mergetui.methods.inputs.tensor_seed` of (seed, tensor name, model index),
  split into two 32-bit words, low word first;
- counter: ``i // 4`` as the low 64 bits of the 128-bit counter (low word first, high words 0);
- the uniform for flat index ``i`` is output word ``i % 4`` of Philox4x32-10 (Salmon et al., SC'11,
  as Random123 implements it), as ``(word >> 8) · 2⁻²⁴`` in float32: exact, in ``[0, 1)``.

The rounds are written in int64 tensor arithmetic so they run on any device with identical bits
(see :func:`block` for the 32×32-bit products). On the CPU the C loops make the same draws some
hundred times faster; this path serves CUDA (where it is fast) and runs without a C compiler.
"""

from __future__ import annotations

import torch

#: Philox4x32's round multipliers and Weyl key increments (Random123's PHILOX_M4x32_*, _W32_*).
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF
#: Counters per piece of work: bounds the int64 temporaries (a few MiB) whatever the count.
_PIECE = 1 << 18
_SCALE = 2.0**-24


def key_words(key: int) -> tuple[int, int]:
    """The two 32-bit key words of a 64-bit key, low word first."""
    return key & MASK32, (key >> 32) & MASK32


def block(counter: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of each row of ``counter`` (int64, shape ``(n, 4)``, words below 2³²,
    low word first) under ``key`` (two 32-bit words): the four output words per row, int64.

    Each round's two 32×32-bit products are int64 products: one at or above 2⁶³ wraps to a
    negative number with the same low 64 bits (two's complement, as CPU and CUDA integer
    multiplies do; the all-ones known answer checks it), so ``p & 0xFFFFFFFF`` is the low word and
    ``(p >> 32) & 0xFFFFFFFF`` the high one (the mask drops the arithmetic shift's sign bits)."""
    c0, c1, c2, c3 = (counter[:, word].clone() for word in range(4))
    return _rounds(c0, c1, c2, c3, key)


def _rounds(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, key: tuple[int, int]
) -> torch.Tensor:
    """The ten rounds on four word tensors (consumed), stacked into ``(n, 4)`` words."""
    k0, k1 = key
    for round_index in range(ROUNDS):
        if round_index:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        product0 = c0.mul_(M0)
        product1 = c2.mul_(M1)
        new0 = product1.bitwise_right_shift(32).bitwise_and_(MASK32).bitwise_xor_(c1)
        new2 = product0.bitwise_right_shift(32).bitwise_and_(MASK32).bitwise_xor_(c3)
        c0 = new0.bitwise_xor_(k0)
        c1 = product1.bitwise_and_(MASK32)
        c2 = new2.bitwise_xor_(k1)
        c3 = product0.bitwise_and_(MASK32)
    return torch.stack((c0, c1, c2, c3), dim=1)


def words(key: int, first: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32-bit outputs (int64) for counters ``first .. first + count - 1`` under a 64-bit key,
    flattened: element ``4·t + w`` is word w of counter ``first + t``."""
    counters = torch.arange(first, first + count, dtype=torch.int64, device=device)
    low = counters.bitwise_and(MASK32)
    high = counters.bitwise_right_shift_(32)
    zeros = torch.zeros_like(low)
    return _rounds(low, high, zeros, zeros.clone(), key_words(key)).view(-1)


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 uniforms in ``[0, 1)`` for flat indices ``start .. start + count - 1`` of the
    stream ``key``: the same bits for any split of the indices and on any device."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    done = 0
    while done < count:
        index = start + done
        skip = index % 4
        take = min(count - done, _PIECE * 4 - skip)
        first = index // 4
        bits = words(key, first, -(-(skip + take) // 4), device)[skip : skip + take]
        out[done : done + take] = bits.bitwise_right_shift_(8).to(torch.float32).mul_(_SCALE)
        done += take
    return out
