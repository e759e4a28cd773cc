"""Human-friendly sizes: parse "2GB" / "500MiB", format byte counts."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``"2GB"``, ``"500MiB"`` or ``1000000`` into bytes.

    Decimal units (KB, MB, GB) are powers of 1000 and binary units (KiB, MiB, GiB) powers of 1024,
    as on the Hugging Face Hub. Raises ValueError with the accepted forms on anything else.
    """
    if isinstance(text, bool):
        raise ValueError("expected a size such as '2GB' or '500MiB'")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError("a size must be positive")
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: use a number with B, KB, MB, GB, MiB or GiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError("a size must be positive")
    return value


def format_size(count: int) -> str | int:
    """A byte count as a recipe writes it, read back exactly by :func:`parse_size`: ``"4GiB"`` or
    ``"512MiB"`` when it is a whole number of them, else the bare number of bytes."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count % size == 0:
            return f"{count // size}{unit}"
    return count


def format_bytes(count: float) -> str:
    """Format a byte count with a binary unit, e.g. ``1.5 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_count(count: float) -> str:
    """Format a parameter count, e.g. ``1.2B`` or ``350.0M``."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(int(count))


def format_duration(seconds: float | None) -> str:
    """Format seconds as ``1h02m``, ``3m05s`` or ``12.3s``; ``--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_score(metric: str, value: float) -> str:
    """An evaluation score as shown: accuracy as a percentage, perplexity with two decimals."""
    return f"{value:.1%}" if metric == "accuracy" else f"{value:.2f}"
