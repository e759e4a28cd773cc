"""The loader's buffer pool: reuse, a cap on what it keeps, and read-ahead held back by the budget;
the output pieces' pool: reuse by dtype and size within its cap."""

from __future__ import annotations

import threading
import time

import torch

from mergetui.engine.buffers import BufferPool, OutputPieces


def test_released_buffers_are_reused_smallest_fit_first() -> None:
    pool = BufferPool(budget_bytes=1 << 20)
    small, large = pool.take((4, 8)), pool.take((64,))
    pool.release([small, large], 0)
    assert pool.reserve((28 + 52) * 4, threading.Event())
    again = pool.take((4, 7))
    assert again.data_ptr() == small.data_ptr()
    assert pool.take((52,)).data_ptr() == large.data_ptr()
    assert pool._lent_bytes == (28 + 52 + 4 + 12) * 4  # the unused ends count as lent
    pool.release([again], 28 * 4)
    assert pool._lent_bytes == (52 + 12) * 4
    assert pool.take((20,)).data_ptr() != small.data_ptr()  # would waste more than a fifth
    assert pool.take((8,)).data_ptr() not in {small.data_ptr(), large.data_ptr()}  # too small


def test_the_pool_drops_free_buffers_rather_than_grow_past_its_budget() -> None:
    pool = BufferPool(budget_bytes=1000 * 4)
    first = pool.take((600,))
    pool.release([first], 0)
    second = pool.take((700,))  # does not fit the free 600: that one is dropped, not kept beside it
    assert second.data_ptr() != first.data_ptr()
    assert pool._held_bytes == 700 * 4
    pool.release([second], 0)
    assert pool.take((600,)).data_ptr() == second.data_ptr()


def test_release_drops_free_buffers_beyond_the_budget() -> None:
    pool = BufferPool(budget_bytes=1000 * 4)
    stop = threading.Event()
    assert pool.reserve(1500 * 4, stop)  # one oversized tensor is granted
    buffers = [pool.take((750,)), pool.take((750,))]
    pool.release(buffers, 1500 * 4)
    assert pool._held_bytes <= 1000 * 4


def test_reserve_blocks_until_enough_is_released() -> None:
    pool = BufferPool(budget_bytes=100)
    stop = threading.Event()
    assert pool.reserve(80, stop)  # nothing lent yet: always granted
    granted: list[float] = []

    def second() -> None:
        granted.append(time.perf_counter() if pool.reserve(50, stop, poll_s=0.01) else -1.0)

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.1)
    assert not granted, "80 + 50 exceeds the budget of 100: the second reserve must wait"
    released_at = time.perf_counter()
    pool.release([], 80)
    waiter.join(timeout=5)
    assert granted and granted[0] >= released_at


def test_reserve_returns_false_when_stopped_while_waiting() -> None:
    pool = BufferPool(budget_bytes=100)
    stop = threading.Event()
    assert pool.reserve(90, stop)
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(pool.reserve(50, stop, poll_s=0.01)))
    waiter.start()
    time.sleep(0.05)
    stop.set()
    waiter.join(timeout=5)
    assert result == [False]


def test_a_single_tensor_larger_than_the_budget_is_still_granted() -> None:
    pool = BufferPool(budget_bytes=100)
    assert pool.reserve(1000, threading.Event())


def test_output_pieces_are_reused_by_dtype_and_size_within_the_cap() -> None:
    pieces = OutputPieces(cap_bytes=3 * 64 * 2)
    first = pieces.take((8, 8), torch.bfloat16)
    pieces.give_back(first)
    again = pieces.take((4, 16), torch.bfloat16)  # same dtype and size, another shape
    assert again.data_ptr() == first.data_ptr() and again.shape == (4, 16)
    other = pieces.take((64,), torch.float16)  # another dtype: a new piece
    assert other.data_ptr() != first.data_ptr()
    pieces.give_back(again)
    pieces.give_back(other)
    assert pieces._held_bytes == 2 * 64 * 2
    big = pieces.take((128,), torch.bfloat16)  # 256 bytes: free pieces are dropped for it
    assert pieces._held_bytes <= pieces.cap_bytes
    assert big.data_ptr() not in {first.data_ptr(), other.data_ptr()}
    lent = [pieces.take((128,), torch.bfloat16) for _ in range(3)]  # lent alone above the cap
    assert pieces._held_bytes == 4 * 256
    for piece in [*lent, big]:
        pieces.give_back(piece)
    assert pieces._held_bytes <= pieces.cap_bytes
