"""The float64 chunk sums behind DARE's, DELLA's and breadcrumbs' rescale and SCE's weights.

The C loop and the torch path must give the same float (the lanes' order, documented in
``mergetui.methods.sums``), on any number of worker threads, and blocks of whole chunks added in
order must give the whole tensor's total.
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


def torch_total(values: torch.Tensor, squares: bool, monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setenv("MERGETUI_NATIVE", "0")
    total = float(sums.add_squares(0, values) if squares else sums.add_l1(0, values))
    monkeypatch.delenv("MERGETUI_NATIVE")
    return total


def lanes_reference(values: torch.Tensor, squares: bool) -> float:
    """The documented order, written out with Python floats (IEEE doubles)."""
    total = 0.0
    for chunk in values.split(sums.CHUNK):
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
    c_total = sums.add_squares(0, values) if squares else sums.add_l1(0, values)
    assert isinstance(c_total, float), "float32 CPU tensors are summed by the C loop"
    assert c_total == torch_total(values, squares, monkeypatch)
    exact = math.fsum((values.square() if squares else values.abs()).double().tolist())
    assert c_total == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("squares", [False, True])
def test_the_sum_follows_the_documented_lanes(squares: bool) -> None:
    values = sample(sums.CHUNK + 1001, seed=5)
    total = sums.add_squares(0, values) if squares else sums.add_l1(0, values)
    assert float(total) == lanes_reference(values, squares)


@pytest.mark.parametrize("mode", ["1", "0"])
def test_blocks_of_whole_chunks_add_up_to_the_whole(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGETUI_NATIVE", mode)
    values = sample(5 * sums.CHUNK + 77, seed=9)
    whole = sums.add_l1(0, values)
    in_blocks: object = 0
    for block in values.split(2 * sums.CHUNK):
        in_blocks = sums.add_l1(in_blocks, block)
    assert float(in_blocks) == float(whole)


@pytest.mark.parametrize("mode", ["1", "0"])
def test_nan_and_empty(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGETUI_NATIVE", mode)
    assert sums.add_l1(2.5, torch.empty(0)) == 2.5
    values = sample(100, seed=1)
    values[40] = float("nan")
    assert math.isnan(float(sums.add_squares(0, values)))
