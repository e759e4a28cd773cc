"""Parameter values that vary across the model: gradients over layers and per-tensor filters.

A recipe parameter is one of three things:

- a **scalar** (``t = 0.5``): the same everywhere;
- a :class:`Gradient` (``t = [0, 0.5, 1]``): anchor values spread evenly over the layers and
  interpolated linearly between them, exactly as mergekit does;
- a :class:`Filtered` value (``[merge.parameters.t]`` with ``self_attn = ...``, ``mlp = ...``,
  ``default = ...``): overrides for tensors whose name contains a filter, checked in order, the first
  match winning; ``default`` matches every tensor. Each entry is a scalar or a gradient.

Values are resolved per tensor by :func:`resolve_chain`, which walks the levels of precedence (a
slice source's own value, the slice's, the recipe's, the method default) and falls through a
:class:`Filtered` value that matches nothing, as mergekit's ``ConfigReader.parameter`` does.

Pure Python: the planner resolves every tensor's parameters before any weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: The key of a :class:`Filtered` entry that matches every tensor (mergekit: no filter, or ``*``).
DEFAULT_FILTER = "default"

Scalar = bool | int | float


@dataclass(frozen=True)
class Gradient:
    """Anchor values spread evenly across the layers of a slice (or of the whole model)."""

    anchors: tuple[float, ...]

    def at(self, position: float) -> float:
        """The value at ``position`` in [0, 1]: mergekit's piecewise-linear rule, in float64.

        ``x = position·(n−1)``, ``i = int(x)``, value ``= (1−f)·a[i] + f·a[min(n−1, i+1)]`` with
        ``f = x − i``.
        """
        count = len(self.anchors)
        scaled = position * (count - 1)
        low = int(scaled)
        high = min(count - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * self.anchors[low] + fraction * self.anchors[high]

    def to_data(self) -> list[float]:
        return list(self.anchors)

    def __str__(self) -> str:
        return "[" + ", ".join(_number(a) for a in self.anchors) + "]"


Entry = Scalar | Gradient


@dataclass(frozen=True)
class Filtered:
    """Per-tensor overrides: ``(filter, value)`` pairs checked in order; the filter ``default``
    matches every tensor, any other matches the tensors whose name contains it."""

    entries: tuple[tuple[str, Entry], ...]

    def match(self, tensor_name: str) -> Entry | None:
        for pattern, value in self.entries:
            if pattern_matches(pattern, tensor_name):
                return value
        return None

    @property
    def patterns(self) -> list[str]:
        return [pattern for pattern, _ in self.entries if pattern != DEFAULT_FILTER]

    def to_data(self) -> dict[str, Any]:
        return {pattern: _entry_data(value) for pattern, value in self.entries}

    def __str__(self) -> str:
        return "{" + ", ".join(f"{p}: {v}" for p, v in self.entries) + "}"


ParamValue = Scalar | Gradient | Filtered


def pattern_matches(pattern: str, tensor_name: str) -> bool:
    """mergekit's rule: ``default`` (its missing filter or ``*``) matches all, any other filter
    matches as a plain substring of the tensor name (not a regular expression)."""
    return pattern in (DEFAULT_FILTER, "*") or pattern in tensor_name


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _entry_data(value: Entry) -> Any:
    return value.to_data() if isinstance(value, Gradient) else value


def value_data(value: ParamValue) -> Any:
    """The value as TOML-ready data: a scalar, a list (gradient) or a table (filtered)."""
    if isinstance(value, (Gradient, Filtered)):
        return value.to_data()
    return value


def is_varying(value: Any) -> bool:
    """True for gradients and filtered values (anything that is not one scalar everywhere)."""
    return isinstance(value, (Gradient, Filtered))


def gradients_in(value: Any) -> list[Gradient]:
    """The gradients a value holds, directly or in its filtered entries."""
    if isinstance(value, Gradient):
        return [value]
    if isinstance(value, Filtered):
        return [v for _, v in value.entries if isinstance(v, Gradient)]
    return []


class Missing:
    """Nothing at any level matched (a required parameter that some tensor does not get)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = Missing()


def resolve_entry(value: Entry, position: float) -> Scalar:
    return value.at(position) if isinstance(value, Gradient) else value


def resolve_chain(
    levels: Iterable[tuple[ParamValue | None, str]], position: float
) -> Scalar | Missing:
    """The value of one parameter for one tensor.

    ``levels``: highest precedence first, each ``(value or None, the tensor name its filters are
    matched against)``; ``position``: the tensor's place in its slice, 0 for tensors outside the
    layers. A level that is unset, or filtered with no matching entry, falls through to the next.
    """
    for value, name in levels:
        if value is None:
            continue
        if isinstance(value, Filtered):
            matched = value.match(name)
            if matched is None:
                continue
            return resolve_entry(matched, position)
        return resolve_entry(value, position)
    return MISSING


def parse_value(
    raw: Any, *, numeric: bool, check: Any, where: str
) -> tuple[ParamValue | None, list[str]]:
    """Parse raw TOML data into a parameter value.

    ``numeric``: the parameter takes numbers (gradients allowed); ``check(value) -> (converted,
    problem)`` converts and range-checks one scalar. Returns the value and the problems, each naming
    ``where`` (``merge.parameters.t``) and the fix.
    """
    if isinstance(raw, dict):
        if not raw:
            return None, [
                f"{where}: an empty table; give filters and values, e.g. self_attn = 0.3, "
                "mlp = 0.7, default = 0.5"
            ]
        entries: list[tuple[str, Entry]] = []
        problems: list[str] = []
        for pattern, item in raw.items():
            if not isinstance(pattern, str) or not pattern.strip():
                problems.append(f"{where}: a filter must be a non-empty name part, not {pattern!r}")
                continue
            entry, entry_problems = _parse_entry(
                item, numeric=numeric, check=check, where=f"{where}.{pattern}"
            )
            problems += entry_problems
            if entry is not None:
                entries.append((pattern, entry))
        return (Filtered(tuple(entries)) if not problems else None), problems
    return _parse_entry(raw, numeric=numeric, check=check, where=where)


def _parse_entry(
    raw: Any, *, numeric: bool, check: Any, where: str
) -> tuple[Entry | None, list[str]]:
    if isinstance(raw, list):
        if not numeric:
            return None, [
                f"{where}: a gradient (a list of values across the layers) needs a parameter "
                "that takes numbers; this one does not: give one value"
            ]
        if not raw:
            return None, [f"{where}: an empty gradient; give at least one value, e.g. [0, 1]"]
        anchors: list[float] = []
        problems: list[str] = []
        for index, item in enumerate(raw):
            converted, problem = check(item)
            if problem:
                problems.append(f"{where}[{index}]: {problem}")
            else:
                anchors.append(float(converted))
        return (Gradient(tuple(anchors)) if not problems else None), problems
    if isinstance(raw, dict):
        return None, [f"{where}: filters cannot be nested; give a value or a gradient here"]
    converted, problem = check(raw)
    if problem:
        return None, [f"{where}: {problem}"]
    return converted, []


def sparkline(values: Sequence[float], width: int = 16) -> str:
    """A one-line picture of a curve (a gradient sampled across the layers), for the TUI and the
    plan report."""
    if not values:
        return ""
    bars = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    span = high - low
    if len(values) > width:
        step = (len(values) - 1) / (width - 1)
        values = [values[round(i * step)] for i in range(width)]
    if span <= 0 or not math.isfinite(span):
        return bars[3] * len(values)
    return "".join(bars[min(7, int((v - low) / span * 7 + 0.5))] for v in values)
