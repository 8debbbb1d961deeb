"""Checks for what a callback receives: anything a browser sends can be forged, so each value is
checked for its type, size and allowed values, and what does not pass becomes a default.

A callback reads its inputs through these and answers a message or `no_update` for what it
cannot use; none raises on bad input.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: Vertices of a lasso outline kept from a selection or a link (Plotly sends one per mouse move).
MAX_VERTICES = 2000
#: Values chosen in one multi-value menu.
MAX_CHOSEN = 200
#: Characters of a free text (a search) the server reads.
MAX_TEXT = 200


def one_of(value: object, allowed: Collection[T], default: T) -> T:
    """The value if it is one of `allowed` (hashable and present), else the default."""
    try:
        return value if value in allowed else default  # type: ignore[return-value]
    except TypeError:
        return default


def number(value: object, low: float, high: float, default: float | None) -> float | None:
    """A finite number in [low, high] (bools and text are not numbers), else the default."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value) if math.isfinite(value) and low <= value <= high else default


def integer(value: object, low: int, high: int, default: int | None) -> int | None:
    """An integer in [low, high] (also given as a whole float or as digits), else the default."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
        value = int(value)
    found = number(value, low, high, None)
    return int(found) if found is not None and found == int(found) else default


def text(value: object, limit: int = MAX_TEXT) -> str:
    """A string cut to `limit` characters; anything else is the empty string."""
    return value[:limit] if isinstance(value, str) else ""


def chosen(value: object, allowed: Collection[str] | None = None,
           limit: int = MAX_CHOSEN) -> list[str]:
    """The strings of a multi-value menu, at most `limit`, only `allowed` ones where given."""
    if not isinstance(value, list):
        return []
    out = [v for v in value[:limit] if isinstance(v, str)]
    return [v for v in out if v in allowed] if allowed is not None else out


def mapping(value: object) -> dict[str, Any]:
    """The value if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def first_point(event: object) -> dict[str, Any]:
    """The first point of a Plotly hover or click event, or {}."""
    points = mapping(event).get("points")
    return mapping(points[0]) if isinstance(points, list) and points else {}


def numbers(value: object, count: int | None = None,
            limit: int = MAX_VERTICES) -> list[float] | None:
    """A list of finite numbers (exactly `count` of them where given, at most `limit`), or None."""
    if not isinstance(value, list) or not value or len(value) > limit:
        return None
    if count is not None and len(value) != count:
        return None
    out = [number(v, -math.inf, math.inf, None) for v in value]
    return None if any(v is None for v in out) else out  # type: ignore[return-value]


def region(value: object) -> dict[str, list[float]] | None:
    """A map region as the app stores it: a box {"x": [x0, x1], "y": [y0, y1]} or a lasso
    {"lasso_x": [...], "lasso_y": [...]} of 3 to MAX_VERTICES vertices; None otherwise."""
    value = mapping(value)
    if "lasso_x" in value or "lasso_y" in value:
        xs, ys = numbers(value.get("lasso_x")), numbers(value.get("lasso_y"))
        if xs is None or ys is None or len(xs) != len(ys) or len(xs) < 3:
            return None
        return {"lasso_x": xs, "lasso_y": ys}
    xs, ys = numbers(value.get("x"), 2), numbers(value.get("y"), 2)
    return None if xs is None or ys is None else {"x": xs, "y": ys}


def years(value: object, first: int, last: int) -> tuple[int, int]:
    """A year range slider's [low, high] within [first, last], else the whole span."""
    found = numbers(value, 2)
    if found is None:
        return first, last
    low, high = sorted(min(max(int(v), first), last) for v in found)
    return low, high


def ids(value: object, known: Sequence[str] | Collection[str], limit: int) -> list[str]:
    """Known image ids from a list, at most `limit` of them."""
    return chosen(value, known, limit)
