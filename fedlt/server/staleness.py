"""Staleness weights s(x) of an update x server versions old (Xie, Koyejo, Gupta 2019)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["STALENESS", "staleness_weight"]

#: The named functions, for the docs: s(x), x >= 0 the update's staleness.
STALENESS = {
    "constant": "s(x) = 1",
    "polynomial": "s(x) = (x + 1)^(-a)",
    "hinge": "s(x) = 1 if x <= b else 1 / (a (x - b) + 1)",
}


def staleness_weight(kind: str, a: float = 0.5, b: float = 4.0) -> Callable[[int], float]:
    """The function ``s`` named ``kind`` with parameters ``a`` and ``b`` (see :data:`STALENESS`)."""
    if kind == "constant":
        return lambda x: 1.0
    if kind == "polynomial":
        return lambda x: float((x + 1) ** (-a))
    if kind == "hinge":
        return lambda x: 1.0 if x <= b else 1.0 / (a * (x - b) + 1.0)
    raise ValueError(f"staleness must be one of {', '.join(map(repr, STALENESS))}, got {kind!r}")
