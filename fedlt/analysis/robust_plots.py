"""Robustness, label-noise and open-set figures of ``fedlt plot``: ``robust``, ``noise`` and ``ood``.

Records carry these metric families only when a scenario asks for them (``[eval.attack]``:
``robust_*``; ``[noise]``: ``noise_memorised`` / ``noise_corrected``; ``[eval.ood]``: ``ood_*``), so
each figure is drawn only when some run has its metrics. The same drawing serves single runs (one
line per run) and groups of runs (mean over seeds with the 95% band of ``fedlt compare``): the
callers in :mod:`fedlt.analysis.plotting` hand over :class:`Source` objects, each a label, a colour
and how to read its curves and final per-class accuracies; nothing here reads run folders.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from fedlt.analysis.figure_kit import _figure, _marker, _num

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "STUDY_FIGURES",
    "Curve",
    "Source",
    "StudyFigure",
    "band_alpha",
    "draw_study_figure",
    "legend_columns",
    "mean_per_class",
    "noise_figure",
    "ood_figure",
    "robust_figure",
    "skip_note",
]


class StudyFigure(NamedTuple):
    """One figure of this module: what it shows, and when there is something to draw."""

    #: What the figure shows (as :data:`fedlt.analysis.plotting.FIGURE_FILES` says it).
    what: str
    #: The metric some run must have recorded for the figure to be drawn.
    metric: str
    #: The scenario table that makes runs record it.
    table: str


#: The figures of this module, by file name.
STUDY_FIGURES: dict[str, StudyFigure] = {
    "robust": StudyFigure(
        "[eval.attack] runs: clean vs robust accuracy (all, head, medium, tail, disparity) and final "
        "per-class accuracy",
        "robust_accuracy",
        "[eval.attack]",
    ),
    "noise": StudyFigure(
        "[noise] runs: shares of noisy training samples memorised and corrected", "noise_memorised", "[noise]"
    ),
    "ood": StudyFigure(
        "[eval.ood] runs: OOD AUROC, AUPRC, FPR at 95% TPR (and AUROC per shot group)",
        "ood_auroc",
        "[eval.ood]",
    ),
}

#: Top-row panels of the robust figure: (clean metric, robust metric, title).
ROBUST_PANELS: tuple[tuple[str, str, str], ...] = (
    ("accuracy", "robust_accuracy", "Accuracy"),
    ("head_accuracy", "robust_head_accuracy", "Head accuracy"),
    ("medium_accuracy", "robust_medium_accuracy", "Medium accuracy"),
    ("tail_accuracy", "robust_tail_accuracy", "Tail accuracy"),
    ("accuracy_disparity", "robust_accuracy_disparity", "Disparity (head - tail)"),
)

NOISE_PANELS: tuple[tuple[str, str], ...] = (
    ("noise_memorised", "Memorised: predicted as their noisy label"),
    ("noise_corrected", "Corrected: predicted as their clean label"),
)

OOD_PANELS: tuple[tuple[str, str], ...] = (
    ("ood_auroc", "OOD AUROC"),
    ("ood_auprc", "OOD AUPRC (in-distribution positive)"),
    ("ood_fpr_at_95_tpr", "FPR at 95% TPR (lower is better)"),
)

#: Line style of each shot group in the OOD figure's per-group AUROC panel.
GROUP_STYLES: dict[str, str] = {"head": "-", "medium": "--", "tail": ":"}


@dataclass(frozen=True)
class Curve:
    """Points of one metric over rounds; ``low``/``high`` the 95% band (None: a single run)."""

    xs: list[float]
    ys: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


@dataclass
class Source:
    """One line of every panel: a run, or a group of runs (its seeds).

    Attributes
    ----------
    label, color :
        Legend label and colour (the same in every figure of one ``fedlt plot``).
    curve : callable
        Metric name → its :class:`Curve` over rounds (empty when never recorded).
    per_class : callable
        Metric name (a per-class list, e.g. ``robust_per_class_accuracy``) → its final values as a
        float array (NaN where absent; mean over seeds for a group), or None when not recorded.
    final : dict
        The final record of the run (a group: of its first run), for the attack and OOD score names.
    """

    label: str
    color: Any
    curve: Callable[[str], Curve]
    per_class: Callable[[str], np.ndarray | None]
    final: Mapping[str, Any] = field(default_factory=dict)


def mean_per_class(rows: Sequence[Sequence[Any] | None]) -> np.ndarray | None:
    """Per class, the mean over the rows that have a number there (NaN where none has); None when
    no row is a list. Rows of different lengths are padded with NaN."""
    arrays = [np.array([_num(v) for v in r], dtype=float) for r in rows if isinstance(r, list) and r]
    if not arrays:
        return None
    width = max(len(a) for a in arrays)
    grid = np.full((len(arrays), width), np.nan)
    for i, a in enumerate(arrays):
        grid[i, : len(a)] = a
    seen = ~np.isnan(grid)
    counts = seen.sum(axis=0)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.where(seen, grid, 0.0).sum(axis=0) / counts, np.nan)


def _has(source: Source, key: str) -> bool:
    return any(not math.isnan(y) for y in source.curve(key).ys)


def band_alpha(n_sources: int, dashed: bool = False) -> float:
    """Opacity of a 95% band: that of the other group figures (0.2) for up to 3 groups, fainter
    beyond, so overlapping bands of many groups still show the lines; dashed curves' bands are
    fainter still (a panel holds a solid and a dashed band per group)."""
    alpha = 0.2 * min(1.0, 3 / max(n_sources, 1))
    return round(alpha * (0.75 if dashed else 1.0), 4)


def _draw(ax: Axes, source: Source, key: str, ls: str = "-", suffix: str = "", n_sources: int = 1) -> None:
    """The source's curve of ``key`` (labelled ``label`` + ``suffix``) and its band, if any."""
    c = source.curve(key)
    ax.plot(c.xs, c.ys, color=source.color, ls=ls, label=source.label + suffix, **_marker(len(c.xs)))
    if c.low is not None and c.high is not None and any(not math.isnan(v) for v in c.low):
        alpha = band_alpha(n_sources, dashed=ls != "-")
        ax.fill_between(c.xs, c.low, c.high, color=source.color, alpha=alpha, lw=0)


def _legend(fig: Figure, sources: Sequence[Source], extra: Sequence[Any] = ()) -> None:
    """One legend below the panels, in as many columns as the longest label leaves room for
    (group labels such as ``plugins=[srat(eps=0.3,...)]`` run to 100 characters and more)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=s.color, lw=2, label=s.label) for s in sources] + list(extra)
    ncols = legend_columns(fig.get_figwidth(), [h.get_label() for h in handles], 4)
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)


def legend_columns(width: float, labels: Sequence[str], most: int) -> int:
    """How many legend columns of these labels fit across ``width`` inches (at most ``most``, at
    least 1): ~0.075 inch a character at 10 pt, plus the handle and the gap."""
    longest = max((len(x) for x in labels), default=1)
    return max(1, min(len(labels), most, int(width // (0.075 * longest + 0.7))))


def _round_axis(ax: Axes, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="round")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _title(parts: Sequence[str | None]) -> str:
    return "\n".join(p for p in parts if p)


def _same(sources: Sequence[Source], key: str) -> str | None:
    """``key`` of the sources' final records when they all agree, else None."""
    values = {str(s.final.get(key)) for s in sources if s.final.get(key) is not None}
    return values.pop() if len(values) == 1 else None


def _per_class_panel(ax: Axes, sources: Sequence[tuple[Source, np.ndarray, np.ndarray]]) -> None:
    """Per class, per source: a solid clean bar beside a light robust bar (no hatching: it
    triples the PNG's size)."""
    width = 0.8 / len(sources)
    n_classes = max(max(len(c), len(r)) for _, c, r in sources)
    for i, (s, clean, robust) in enumerate(sources):
        x = np.arange(n_classes) + (i - (len(sources) - 1) / 2) * width
        clean = np.pad(clean, (0, n_classes - len(clean)), constant_values=np.nan)
        robust = np.pad(robust, (0, n_classes - len(robust)), constant_values=np.nan)
        ax.bar(x - width / 4, clean, width / 2, color=s.color, label=f"{s.label} (clean)")
        ax.bar(
            x + width / 4,
            robust,
            width / 2,
            color=s.color,
            alpha=0.4,
            edgecolor=s.color,
            lw=0.8,
            label=f"{s.label} (robust)",
        )
    ax.set_xticks(range(n_classes), [str(c) for c in range(n_classes)])
    ax.set(xlabel="class", ylabel="final accuracy", ylim=(0, 1.05))
    ax.set_title("Per-class accuracy at the final round: clean (solid) and robust (light)")
    ax.grid(alpha=0.3, axis="y")


def robust_figure(sources: Sequence[Source], subtitle: str | None = None) -> Figure | None:
    """Clean (solid) against robust (dashed) accuracy over rounds, overall, per shot group and
    their head - tail disparity, and a final per-class bar panel; None when no source has
    ``robust_accuracy``. Sources without it are left out."""
    shown = [s for s in sources if _has(s, "robust_accuracy")]
    if not shown:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    bars = []
    for s in shown:
        clean, robust = s.per_class("per_class_accuracy"), s.per_class("robust_per_class_accuracy")
        if clean is not None and robust is not None:
            bars.append((s, clean, robust))
    fig = _figure(15, 7.8 if bars else 4.4)
    grid = fig.add_gridspec(2 if bars else 1, len(ROBUST_PANELS))
    for j, (clean_key, robust_key, title) in enumerate(ROBUST_PANELS):
        ax = fig.add_subplot(grid[0, j])
        for s in shown:
            _draw(ax, s, clean_key, "-", " (clean)", len(shown))
            _draw(ax, s, robust_key, "--", " (robust)", len(shown))
        _round_axis(ax, title)
        if j == 0:
            ax.set_ylabel("accuracy")
    if bars:
        _per_class_panel(fig.add_subplot(grid[1, :]), bars)
    extra = [
        Line2D([], [], color="0.3", ls="-", label="clean test set"),
        Line2D([], [], color="0.3", ls="--", label="attacked test set (robust)"),
    ]
    if bars:
        extra.append(Patch(facecolor="0.75", edgecolor="0.3", lw=0.8, label="robust (light bars)"))
    _legend(fig, shown, extra)
    attack = _same(shown, "attack")
    fig.suptitle(_title([f"Clean and robust accuracy; attack: {attack}" if attack else None, subtitle]))
    return fig


def _panels_figure(
    sources: Sequence[Source],
    panels: Sequence[tuple[str, str]],
    ylabel: str,
    title: str | None,
    extra_panels: int = 0,
) -> tuple[Figure, list[Axes]]:
    """One panel per metric of ``panels`` (one line per source), and ``extra_panels`` empty axes
    after them for the caller."""
    n = len(panels) + extra_panels
    cols = n if n <= 3 else 2  # four panels as 2 x 2, not one strip 19 inches wide
    rows = math.ceil(n / cols)
    fig = _figure(4.6 * cols + 0.8, 3.8 * rows + 0.6)
    axes = list(np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel())
    for ax, (key, panel_title) in zip(axes, panels, strict=False):
        for s in sources:
            _draw(ax, s, key, n_sources=len(sources))
        _round_axis(ax, panel_title)
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title)
    return fig, axes


def noise_figure(sources: Sequence[Source], subtitle: str | None = None) -> Figure | None:
    """Shares of the noisy training samples (label flipped) that the global model predicts as their
    noisy label (memorised) and as their clean label (corrected), over rounds; None when no source
    has ``noise_memorised``."""
    shown = [s for s in sources if _has(s, "noise_memorised") or _has(s, "noise_corrected")]
    if not shown:
        return None
    head = "Noisy training samples (label differs from the clean one), all clients pooled"
    fig, _ = _panels_figure(shown, NOISE_PANELS, "share of noisy training samples", _title([head, subtitle]))
    _legend(fig, shown)
    return fig


def ood_figure(sources: Sequence[Source], subtitle: str | None = None) -> Figure | None:
    """OOD AUROC, AUPRC and FPR at 95% TPR over rounds, and, when recorded, the AUROC of each shot
    group's in-distribution samples against all OOD samples (``ood_head_auroc``...: where a score
    confuses the tail with the unknown); None when no source has ``ood_auroc``."""
    shown = [s for s in sources if any(_has(s, k) for k, _ in OOD_PANELS)]
    if not shown:
        return None
    from matplotlib.lines import Line2D

    by_group = any(_has(s, f"ood_{g}_auroc") for s in shown for g in GROUP_STYLES)
    scores = sorted({str(s.final["ood_score"]) for s in shown if s.final.get("ood_score")})
    head = "Open-set detection, score: " + ", ".join(scores) if scores else "Open-set detection"
    fig, axes = _panels_figure(shown, OOD_PANELS, "metric", _title([head, subtitle]), int(by_group))
    extra = []
    if by_group:
        for s in shown:
            for group, ls in GROUP_STYLES.items():
                _draw(axes[-1], s, f"ood_{group}_auroc", ls, f" ({group})", len(shown))
        _round_axis(axes[-1], "AUROC of each shot group's samples vs OOD")
        extra = [Line2D([], [], color="0.3", ls=ls, label=f"{g} classes") for g, ls in GROUP_STYLES.items()]
    _legend(fig, shown, extra)
    return fig


def draw_study_figure(name: str, sources: Sequence[Source], subtitle: str | None = None) -> Figure | None:
    """The figure ``name`` (a key of :data:`STUDY_FIGURES`) of ``sources``, or None when none of
    them recorded its metrics."""
    draw = {"robust": robust_figure, "noise": noise_figure, "ood": ood_figure}[name]
    return draw(sources, subtitle)


def skip_note(name: str) -> str:
    """Why the figure ``name`` was not drawn (it is drawn whenever some run has its metric)."""
    figure = STUDY_FIGURES[name]
    return f"no run has {figure.metric} in metrics.jsonl (a scenario without {figure.table})"
