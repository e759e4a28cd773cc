"""Parameter values as the method step's fields show and read them (no Textual here).

A numeric parameter has two fields: its **value**, a number or a gradient typed as a list
(``0, 0.5, 1`` or ``[0, 0.5, 1]``), and its **overrides**, per-tensor values typed as
``self_attn=0.3, mlp=[1, 0.5, 0]``. Together they make the recipe data the validator reads: a
scalar, a list, or a table of filters whose last entry, ``default``, is the value field (the first
filter found in a tensor's name wins, so ``default`` must come last).

Syntax is checked here (a clear message for the field); numbers and ranges are checked by the
recipe validator, which names the key (``merge.parameters.t.mlp[1]``) like ``mergetui run``.
"""

from __future__ import annotations

from typing import Any

from mergetui.methods.registry import ParamSpec
from mergetui.recipe.params import DEFAULT_FILTER, Gradient, sparkline

#: how many points of a gradient the curve beside its field shows (the layers are not known
#: before the check, and 16 show its shape)
CURVE_POINTS = 16


def parse_scalar(param: ParamSpec, text: str) -> Any:
    """The typed value of one item (the text itself when it is not one: the validator says why)."""
    text = text.strip()
    if param.kind is bool:
        lowered = text.lower()
        return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(
            lowered, text
        )
    try:
        return int(text) if param.kind is int else float(text)
    except ValueError:
        return text


def parse_value(param: ParamSpec, text: str) -> tuple[Any, str | None]:
    """``(value, syntax problem)`` for a value field: None when empty, a list for a gradient."""
    text = text.strip()
    if not text:
        return None, None
    if "[" in text or "]" in text or "," in text:
        opens, closes = text.count("["), text.count("]")
        if opens > closes:
            return None, "a [ without its ]"
        if closes > opens:
            return None, "a ] without its ["
        inner = text[1:-1] if opens and text.startswith("[") and text.endswith("]") else text
        if "[" in inner or "]" in inner:
            return None, "a gradient is one list of values: 0, 0.5, 1 or [0, 0.5, 1]"
        items = [item.strip() for item in inner.split(",")]
        if items and not items[-1]:  # a trailing comma, as TOML allows
            items.pop()
        if not items or any(not item for item in items):
            return None, "an empty value in the list: give numbers separated by commas"
        return [parse_scalar(param, item) for item in items], None
    return parse_scalar(param, text), None


def _split_top_level(text: str) -> tuple[list[str], str | None]:
    """``a=1, b=[1, 2]`` → ``["a=1", "b=[1, 2]"]`` (commas inside brackets kept)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "[":
            depth += 1
            if depth > 1:
                return [], "lists cannot be nested"
        elif char == "]":
            depth -= 1
            if depth < 0:
                return [], "a ] without its ["
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        return [], "a [ without its ]"
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()], None


def parse_overrides(param: ParamSpec, text: str) -> tuple[dict[str, Any], str | None]:
    """``(filter → value, syntax problem)`` for an overrides field, in the order typed."""
    if not text.strip():
        return {}, None
    parts, problem = _split_top_level(text)
    if problem:
        return {}, problem
    overrides: dict[str, Any] = {}
    for part in parts:
        pattern, equals, raw = part.partition("=")
        pattern = pattern.strip()
        if not equals:
            return {}, f"{part!r}: write filter=value, e.g. mlp=0.7 or self_attn=[0, 1]"
        if not pattern or any(c.isspace() for c in pattern):
            return {}, (
                f"{part!r}: a filter is part of a tensor name (self_attn, mlp, embed_tokens…), "
                "without spaces"
            )
        if pattern in overrides:
            return {}, f"{pattern} is given twice"
        value, problem = parse_value(param, raw)
        if problem:
            return {}, f"{pattern}: {problem}"
        if value is None:
            return {}, f"{pattern}: no value after ="
        overrides[pattern] = value
    return overrides, None


def combine(value: Any, overrides: dict[str, Any]) -> tuple[Any, str | None]:
    """The parameter's recipe data from its two fields (None: not set)."""
    if not overrides:
        return value, None
    if DEFAULT_FILTER in overrides and value is not None:
        return None, ("default is given twice: as the value (left) and in the overrides; keep one")
    if value is None:
        return dict(overrides), None
    return {**overrides, DEFAULT_FILTER: value}, None


def split(value: Any) -> tuple[Any, dict[str, Any]]:
    """The two fields of a parameter's recipe data: a filtered table whose last entry is
    ``default`` shows it as the value; any other order stays whole in the overrides (moving
    ``default`` would change which filter wins)."""
    if not isinstance(value, dict):
        return value, {}
    keys = list(value)
    if keys and keys[-1] == DEFAULT_FILTER:
        rest = {k: v for k, v in value.items() if k != DEFAULT_FILTER}
        return value[DEFAULT_FILTER], rest
    return None, dict(value)


def value_text(param: ParamSpec, value: Any) -> str:
    """A value as its field shows it (what :func:`parse_value` reads back)."""
    if value is None:
        return ""
    if isinstance(value, bool) and param.kind is bool:
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(value_text(param, item) for item in value) + "]"
    return str(value)


def number_text(value: float) -> str:
    """``1`` for 1.0, ``0.25`` for 0.25: the short form for labels."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def overrides_text(param: ParamSpec, overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={value_text(param, v)}" for k, v in overrides.items())


def curve(value: Any) -> str:
    """A gradient's curve across the layers (sampled at :data:`CURVE_POINTS` positions with
    mergekit's interpolation), "" for anything that is not a list of two numbers or more."""
    if (
        not isinstance(value, list)
        or len(value) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        return ""
    gradient = Gradient(tuple(float(v) for v in value))
    return sparkline([gradient.at(i / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)])
