"""Philox4x32-10, the counter-based stream of DARE's and DELLA's drops (:mod:`mergetui.methods.philox`
in torch ops, ``mt_philox_*`` / ``mt_dare_drop`` / ``mt_della_rows`` in the C loops):

- the published known answers (Random123's ``kat_vectors``, the three philox4x32 10 lines, also in
  TensorFlow's and Random123-Boost's Philox tests), and a scalar pure-Python reference written from
  the paper's round function, so the torch ops and the C loops are checked against the algorithm,
  not just against each other;
- the torch path and the C loops give the same bits on odd ranges, unaligned starts (i % 4 != 0),
  counters past 2³², any split into pieces and any number of worker threads;
- any piece of a tensor drawn at its offset equals the same piece of the whole (no state carried);
- the uniforms are uniform: exact multiples of 2⁻²⁴ in [0, 1), mean and a histogram within sound
  bounds on 2²⁰ draws (a fixed key, so the test is deterministic, not flaky).
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import pytest
import torch

from mergetui.methods import native, philox
from mergetui.methods.inputs import tensor_seed
from mergetui.methods.task_arithmetic import della_rows_, drop_at_random_

#: Random123's kat_vectors for philox4x32 10: counter (4 words), key (2 words), expected output.
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),  # the digits of pi
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
KEY = tensor_seed(11, "model.layers.7.mlp.gate_proj.weight", 2)


def reference_block(counter: tuple[int, ...], key: tuple[int, int]) -> list[int]:
    """Philox4x32-10 on Python ints, straight from the round function: a 32x32-bit product's high
    and low words, the xors with the other words and the key, the key bumped by the Weyl
    constants between rounds."""
    mask = 0xFFFFFFFF
    c = list(counter)
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & mask, (p0 >> 32) ^ c[3] ^ k1, p0 & mask]
    return c


def reference_uniform(key: int, index: int) -> float:
    """The documented uniform of flat index ``index``: word index % 4 of counter index // 4."""
    counter = index // 4
    words = reference_block(
        (counter & 0xFFFFFFFF, counter >> 32, 0, 0), (key & 0xFFFFFFFF, key >> 32)
    )
    return (words[index % 4] >> 8) * 2.0**-24


def c_library() -> Any:
    library = native.library()
    if library is None:
        pytest.skip("no C compiler here")
    return library


def c_uniform(library: Any, key: int, start: int, count: int, pieces: list[int]) -> torch.Tensor:
    """The C loop's uniforms, made in the given pieces (as threads would split the range)."""
    out = torch.full((count,), -1.0)
    bounds = [0, *pieces, count]
    for begin, end in zip(bounds, bounds[1:], strict=False):
        library.mt_philox_uniform(out.data_ptr(), key, start, begin, end)
    return out


# --- the algorithm ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("counter", "key", "expected"), KATS)
def test_the_torch_rounds_give_the_published_known_answers(
    counter: tuple[int, ...], key: tuple[int, int], expected: tuple[int, ...]
) -> None:
    assert reference_block(counter, key) == list(expected)
    out = philox.block(torch.tensor([counter], dtype=torch.int64), key)
    assert out[0].tolist() == list(expected)


@pytest.mark.parametrize(("counter", "key", "expected"), KATS)
def test_the_c_rounds_give_the_published_known_answers(
    counter: tuple[int, ...], key: tuple[int, int], expected: tuple[int, ...]
) -> None:
    library = c_library()
    words = (ctypes.c_uint32 * 4)(*counter)
    library.mt_philox4x32_10(words, key[0] | (key[1] << 32))
    assert list(words) == list(expected)


@pytest.mark.parametrize(
    ("key", "start", "count"),
    [
        (0, 0, 9),
        (KEY, 3, 14),
        ((1 << 64) - 1, 1, 5),  # both key words all ones
        (KEY, 4 * (1 << 32) - 6, 13),  # counters crossing 2^32: the second counter word in use
        (KEY, (1 << 40) + 2, 7),
    ],
)
def test_uniforms_follow_the_documented_stream(key: int, start: int, count: int) -> None:
    expected = [reference_uniform(key, start + t) for t in range(count)]
    assert philox.uniform(key, start, count).tolist() == expected
    library = native.library()
    if library is not None:
        assert c_uniform(library, key, start, count, []).tolist() == expected


def test_different_keys_give_different_streams() -> None:
    """The whole 64-bit key counts: keys differing only in the high word differ too."""
    base = philox.uniform(KEY, 0, 64)
    for other in (
        KEY ^ 1,
        KEY ^ (1 << 40),
        tensor_seed(11, "model.layers.7.mlp.gate_proj.weight", 3),
    ):
        assert not torch.equal(base, philox.uniform(other, 0, 64))


# --- the same bits however the range is cut --------------------------------------------------------


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4097, (1 << 33) + 3])
def test_any_piece_drawn_at_its_offset_is_that_piece_of_the_whole(start: int) -> None:
    whole = philox.uniform(KEY, start, 5003)
    for begin, end in ((0, 1), (1, 2), (3, 4100), (5, 5003), (4998, 5003), (2, 2)):
        assert torch.equal(philox.uniform(KEY, start + begin, end - begin), whole[begin:end])
    # and past the torch path's internal piece of 2^18 counters
    long = philox.uniform(KEY, start, (1 << 20) + 9)
    assert torch.equal(long[-5003:], philox.uniform(KEY, start + (1 << 20) + 9 - 5003, 5003))


@pytest.mark.parametrize("start", [0, 1, 3, 6, 4 * 12345 + 2])
@pytest.mark.parametrize("count", [1, 3, 1023, 1025, 70001])
def test_the_c_loops_give_the_torch_bits_in_any_pieces(start: int, count: int) -> None:
    library = c_library()
    expected = philox.uniform(KEY, start, count)
    assert torch.equal(c_uniform(library, KEY, start, count, []), expected)
    cuts = sorted({1, count // 3, count // 3 + 1, count // 2 + 5, count - 1} & set(range(count)))
    assert torch.equal(c_uniform(library, KEY, start, count, cuts), expected)


@pytest.mark.parametrize("workers", ["many_workers", "one_worker"])
@pytest.mark.parametrize(("start", "count"), [(0, 100_003), (5, 3 * 4096 + 7), (4 * 999 + 3, 1)])
def test_dare_drop_gives_the_same_bits_in_c_and_torch_on_any_thread_count(
    workers: str,
    start: int,
    count: int,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fused C drop (no buffer of uniforms) and the torch path's chunked mask multiply alike,
    signs of the zeros and NaNs included, on the threads' ranges and at an unaligned start."""
    c_library()
    request.getfixturevalue(workers)
    generator = torch.Generator().manual_seed(count)
    delta = torch.randn(count, generator=generator)
    delta[::7] = -delta[::7].abs()
    delta[::101] = float("nan")
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv("MERGETUI_NATIVE", mode)
        out = delta.clone()
        drop_at_random_(out, 0.3, KEY, start)
        results.append(out.view(torch.int32))
    assert torch.equal(results[0], results[1])
    expected = delta * (philox.uniform(KEY, start, count) < 0.3)
    assert torch.equal(results[0], expected.view(torch.int32))


@pytest.mark.parametrize("mode", ["1", "0"])
def test_dare_drop_of_an_empty_tensor_is_a_no_op(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGETUI_NATIVE", mode)
    empty = torch.empty(0)
    drop_at_random_(empty, 0.5, KEY, 3)
    assert empty.numel() == 0


@pytest.mark.parametrize("mode", ["1", "0"])
def test_dare_drop_in_pieces_at_their_offsets_equals_the_whole(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counter-based: a block starting anywhere draws its own uniforms, no state from before."""
    monkeypatch.setenv("MERGETUI_NATIVE", mode)
    delta = torch.randn(50_001, generator=torch.Generator().manual_seed(3))
    whole = delta.clone()
    drop_at_random_(whole, 0.6, KEY)
    pieces = delta.clone()
    for begin, end in ((0, 7), (7, 4099), (4099, 30_000), (30_000, 50_001)):
        drop_at_random_(pieces[begin:end], 0.6, KEY, begin)
    assert torch.equal(whole.view(torch.int32), pieces.view(torch.int32))


@pytest.mark.parametrize("workers", ["many_workers", "one_worker"])
def test_della_rows_give_the_same_bits_in_c_and_torch_and_in_pieces(
    workers: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELLA's C loop makes each row's uniforms at the row's flat index: the torch path's bits,
    whole or from any row on."""
    c_library()
    request.getfixturevalue(workers)
    rows = torch.randn(53, 37, generator=torch.Generator().manual_seed(8)).bfloat16().float()
    results = []
    for mode in ("1", "0"):
        monkeypatch.setenv("MERGETUI_NATIVE", mode)
        whole = rows.clone()
        della_rows_(whole, 0.4, 0.2, KEY)
        pieces = rows.clone()
        for begin, end in ((0, 1), (1, 20), (20, 53)):
            della_rows_(pieces[begin:end], 0.4, 0.2, KEY, None, begin * 37)
        assert torch.equal(whole.view(torch.int32), pieces.view(torch.int32))
        results.append(whole.view(torch.int32))
    assert torch.equal(results[0], results[1])


# --- the distribution ------------------------------------------------------------------------------


def test_the_uniforms_are_uniform() -> None:
    """2²⁰ draws: exact multiples of 2⁻²⁴ in [0, 1); the mean within 5σ of 1/2 (σ = 1/√(12N));
    16 equal bins with a chi-square below 50 on 15 degrees of freedom (exceeded with probability
    1.2·10⁻⁵ by a true uniform; the key is fixed, so this is deterministic)."""
    count = 1 << 20
    draws = philox.uniform(KEY, 0, count)
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    scaled = draws.double() * 2**24
    assert torch.equal(scaled, scaled.floor())
    sigma = 1 / math.sqrt(12 * count)
    assert abs(float(draws.double().mean()) - 0.5) < 5 * sigma
    counts = torch.histc(draws, bins=16, min=0.0, max=1.0).double()
    expected = count / 16
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 50, counts.tolist()
    # and the low bits too: the last byte of the 24 kept bits spreads over 16 bins alike
    low = (scaled.long() & 0xFF) >> 4
    low_counts = torch.bincount(low, minlength=16).double()
    assert float(((low_counts - expected) ** 2 / expected).sum()) < 50
