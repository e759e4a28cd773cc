"""Human-friendly sizes and durations."""

from __future__ import annotations

import pytest

from mergetui.units import format_bytes, format_count, format_duration, parse_size

# --- parse_size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GB", 2_000_000_000),
        ("500MiB", 500 * 1024**2),
        ("1.5GB", 1_500_000_000),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("1k", 1000),
        ("3 mb", 3_000_000),
        ("  4 GiB  ", 4 * 1024**3),
        ("2 G", 2_000_000_000),
        ("1TB", 1000**4),
        ("1TiB", 1024**4),
        ("123B", 123),
        ("123", 123),
        ("1.9B", 1),  # fractions of a byte are dropped
        (1, 1),
        (5_000_000_000, 5_000_000_000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    value = parse_size(text)
    assert value == expected
    assert type(value) is int


def test_decimal_and_binary_units_differ() -> None:
    assert parse_size("1GB") == 10**9 < parse_size("1GiB") == 2**30


@pytest.mark.parametrize(
    "text",
    [
        "",
        "GB",
        "2 gigs",
        "2XB",
        "two GB",
        "-1GB",
        "2e9",
        "1,000",
        "1.GB",
        ".5GB",
        "2 G B",
        "1/2GB",
    ],
)
def test_unreadable_sizes(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    message = str(info.value)
    assert message == f"cannot read size {text!r}: use a number with B, KB, MB, GB, MiB or GiB"


@pytest.mark.parametrize("value", [0, -1, -(2**40), "0", "0GB", "0.0MiB", "0.5B", "0.4"])
def test_zero_and_negative_sizes(value: str | int) -> None:
    with pytest.raises(ValueError, match="^a size must be positive$"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_sizes(value: bool) -> None:
    with pytest.raises(ValueError, match="expected a size such as '2GB' or '500MiB'"):
        parse_size(value)


# --- format_bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**2, "1.0 MiB"),
        (500 * 1024**2, "500.0 MiB"),
        (1.5 * 1024**3, "1.5 GiB"),
        (2_000_000_000, "1.9 GiB"),
        (5 * 1024**4, "5.0 TiB"),
        (2**60, "1048576.0 TiB"),  # TiB is the largest unit
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(count: float, expected: str) -> None:
    assert format_bytes(count) == expected


def test_format_bytes_round_trips_binary_sizes() -> None:
    assert format_bytes(parse_size("500MiB")) == "500.0 MiB"
    assert format_bytes(parse_size("4GiB")) == "4.0 GiB"


# --- format_duration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (None, "--"),
        (float("nan"), "--"),
        (-1, "--"),
        (-0.001, "--"),
        (0, "0.0s"),
        (0.04, "0.0s"),
        (12.345, "12.3s"),
        (59.94, "59.9s"),
        (60, "1m00s"),
        (61, "1m01s"),
        (125, "2m05s"),
        (3599, "59m59s"),
        (3599.6, "1h00m"),  # rounds up into the next unit instead of showing 60m00s
        (3600, "1h00m"),
        (3725, "1h02m"),
        (2 * 86400, "48h00m"),
    ],
)
def test_format_duration(seconds: float | None, expected: str) -> None:
    assert format_duration(seconds) == expected


def test_format_duration_just_under_a_minute() -> None:
    assert format_duration(59.96) == "1m00s"


def test_format_duration_of_an_infinite_eta() -> None:
    assert format_duration(float("inf")) == "--"


# --- format_count --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1.0K"),
        (1500, "1.5K"),
        (350_000_000, "350.0M"),
        (1_200_000_000, "1.2B"),
        (7e12, "7.0T"),
    ],
)
def test_format_count(count: float, expected: str) -> None:
    assert format_count(count) == expected
