"""The float64 chunk sums behind DARE's, DELLA's and breadcrumbs' rescale and SCE's weights.

The C loop and the torch path must give the same float (the lanes' order, documented in
``mergetui.methods.sums``), on any number of worker threads, and blocks of whole chunks added in
order must give the whole tensor's total. A chunk is a row chunk of the whole tensor: whole rows,
about ``CHUNK`` entries, so that blocks of whole chunks stay small at any row width.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergetui.methods import native, sums


def sample(count: int, seed: int) -> torch.Tensor:
    """Values spread over many binades (so the order of the additions shows in the last bits),
    with negative zeros and exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(count, generator=generator) * torch.exp(
        torch.randn(count, generator=generator) * 6
    )
    values[::13] = -0.0
    values[::29] = 0.0
    return values


def total_of(values: torch.Tensor, squares: bool, chunk: int = sums.CHUNK) -> object:
    return sums.add_squares(0, values, chunk) if squares else sums.add_l1(0, values, chunk)


def torch_total(
    values: torch.Tensor, squares: bool, monkeypatch: pytest.MonkeyPatch, chunk: int = sums.CHUNK
) -> float:
    monkeypatch.setenv("MERGETUI_NATIVE", "0")
    total = float(total_of(values, squares, chunk))
    monkeypatch.delenv("MERGETUI_NATIVE")
    return total


def lanes_reference(values: torch.Tensor, squares: bool, size: int = sums.CHUNK) -> float:
    """The documented order, written out with Python floats (IEEE doubles)."""
    total = 0.0
    for chunk in values.split(size):
        terms = (chunk.square() if squares else chunk.abs()).tolist()
        lanes = [0.0] * sums.LANES
        for index, term in enumerate(terms):
            lanes[index % sums.LANES] += term
        chunk_total = lanes[0]
        for lane in lanes[1:]:
            chunk_total += lane
        total += chunk_total
    return total


@pytest.mark.parametrize("squares", [False, True])
@pytest.mark.parametrize("workers", ["many_workers", "one_worker"])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 4099, sums.CHUNK, 3 * sums.CHUNK + 5])
def test_c_and_torch_give_the_same_float_on_any_thread_count(
    squares: bool,
    workers: str,
    count: int,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if native.library() is None:
        pytest.skip("no C compiler here")
    request.getfixturevalue(workers)
    values = sample(count, seed=count)
    c_total = total_of(values, squares)
    assert isinstance(c_total, float), "float32 CPU tensors are summed by the C loop"
    assert c_total == torch_total(values, squares, monkeypatch)
    exact = math.fsum((values.square() if squares else values.abs()).double().tolist())
    assert c_total == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("squares", [False, True])
def test_the_sum_follows_the_documented_lanes(squares: bool) -> None:
    values = sample(sums.CHUNK + 1001, seed=5)
    assert float(total_of(values, squares)) == lanes_reference(values, squares)


@pytest.mark.parametrize("squares", [False, True])
def test_row_chunks_of_an_odd_width_on_both_paths(
    squares: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """5376 entries a row (a 21B model's hidden size): 195 rows a chunk, which starts lanes anew
    at entry 1048320, where a 1M-entry chunk would not."""
    chunk = sums.chunk_elements((600, 5376))
    assert chunk == 195 * 5376
    values = sample(600 * 5376, seed=11)
    total = float(total_of(values, squares, chunk))
    assert total == lanes_reference(values, squares, chunk)
    assert total == torch_total(values, squares, monkeypatch, chunk)


def test_chunk_elements_are_whole_rows_near_chunk() -> None:
    assert sums.chunk_elements((4096,)) == sums.chunk_elements(()) == sums.CHUNK
    assert sums.chunk_elements((256000, 2048)) == sums.CHUNK
    assert sums.chunk_elements((256000, 5376)) == 195 * 5376
    assert sums.chunk_elements((10, 3000)) == 348 * 3000  # pairs of rows: 64-byte aligned
    assert sums.chunk_elements((3, 1 << 21)) == 1 << 21  # a row wider than a chunk


@pytest.mark.parametrize("mode", ["1", "0"])
def test_blocks_of_whole_chunks_add_up_to_the_whole(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGETUI_NATIVE", mode)
    values = sample(5 * sums.CHUNK + 77, seed=9)
    whole = sums.add_l1(0, values, sums.CHUNK)
    in_blocks: object = 0
    for block in values.split(2 * sums.CHUNK):
        in_blocks = sums.add_l1(in_blocks, block, sums.CHUNK)
    assert float(in_blocks) == float(whole)


@pytest.mark.parametrize("mode", ["1", "0"])
def test_nan_and_empty(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGETUI_NATIVE", mode)
    assert sums.add_l1(2.5, torch.empty(0), sums.CHUNK) == 2.5
    values = sample(100, seed=1)
    values[40] = float("nan")
    assert math.isnan(float(sums.add_squares(0, values, sums.CHUNK)))
