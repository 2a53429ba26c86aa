"""Small figure helpers shared by :mod:`fedlt.analysis.plotting` and
:mod:`fedlt.analysis.continual_plots` (in a module of their own, so neither imports the other)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["require_matplotlib"]

_INSTALL = "plotting needs matplotlib: pip install matplotlib (or pip install 'fedlt[plot]')"


def require_matplotlib() -> None:
    """Fail early, before any work, when matplotlib is missing.

    Raises
    ------
    ImportError
        With a message saying ``pip install matplotlib``.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc


def _figure(width: float, height: float) -> Figure:
    """A new figure on the Agg canvas, with constrained layout (nothing overlaps, legends fit)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _num(value: Any) -> float:
    """A JSON metric as a float, NaN for ``None`` (matplotlib leaves a gap there)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _marker(n_points: int) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3} if n_points <= 40 else {}


def _run_legend(fig: Figure, runs: Sequence[Any], extra: Sequence[Any] = ()) -> None:
    """One legend for the whole figure, below the panels, so it never covers data."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=r.color, lw=2, label=r.label) for r in runs] + list(extra)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
