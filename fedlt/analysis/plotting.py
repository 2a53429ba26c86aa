"""Pictures of runs: learning curves, the head/tail trade-off, per-class accuracy, client partitions.

A table of final numbers hides *how* a remedy behaves on a long tail: whether tail accuracy rises
at the cost of the head, whether it is still climbing, which classes it confuses. The figures here
overlay several run folders (one colour per run, the same colour in every figure) so runs can be
read against each other.

matplotlib is optional (``pip install matplotlib``, or the ``plot`` extra) and imported only inside
the functions that draw; importing this module does not import it. Figures are drawn on
``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so plotting changes no global
backend or state (safe from notebooks, threads and servers). Callers check first with
:func:`require_matplotlib`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlt.analysis.compare import (
    IGNORED_KEYS,
    Group,
    RunRecord,
    Stat,
    check_out_path,
    collect_runs,
    group_runs,
    load_run,
    metric_bounds,
    summarize,
)
from fedlt.analysis.figure_kit import _figure, _marker, _num, _run_legend, require_matplotlib
from fedlt.analysis.robust_plots import (
    STUDY_FIGURES,
    Curve,
    Source,
    draw_study_figure,
    legend_columns,
    mean_per_class,
    skip_note,
)
from fedlt.analysis.timeline import client_timeline_figure, staleness_figure, virtual_time_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from fedlt.data.federated import FederatedData

__all__ = [
    "FIGURE_FILES",
    "FORMATS",
    "GROUP_FIGURES",
    "PlotFiles",
    "build_figures",
    "build_group_figures",
    "client_counts_figure",
    "plot_client_class_counts",
    "plot_groups",
    "plot_runs",
    "plot_stream_timeline",
    "require_matplotlib",
    "stream_labels",
    "stream_timeline_figure",
]


log = logging.getLogger(__name__)

#: The figures :func:`plot_runs` can write, by name, with what each shows.
FIGURE_FILES: dict[str, str] = {
    "accuracy": "accuracy and balanced accuracy over rounds",
    "shot_accuracy": "head / medium / tail accuracy over rounds",
    "per_class_vs_count": "final per-class accuracy against training samples per class",
    "head_vs_tail": "head against tail accuracy, one path per run (the trade-off curve)",
    "confusion_matrix": "confusion matrix of the last evaluation (when recorded)",
    "anytime_accuracy": "continual runs: anytime accuracy with task boundaries",
    "task_class_accuracy": "continual runs: accuracy per task and class (when recorded)",
    "virtual_time_accuracy": "accuracy and head / medium / tail accuracy against virtual time",
    "client_timeline": "the first run's clients on the virtual clock: training, dropped, late, offline",
    "staleness": "asynchronous runs: how stale the arriving updates were",
    **{name: figure.what for name, figure in STUDY_FIGURES.items()},
}

#: File formats the figures can be written in (matplotlib's names; the file suffix).
FORMATS: tuple[str, ...] = ("png", "pdf", "svg")

#: The figures :func:`plot_groups` can write: per figure, its panels as (metric, panel title).
#: It also writes the figures of :data:`fedlt.analysis.robust_plots.STUDY_FIGURES` (robust, noise,
#: ood) when the runs recorded their metrics.
GROUP_FIGURES: dict[str, tuple[tuple[str, str], ...]] = {
    "accuracy": (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy")),
    "shot_accuracy": (
        ("head_accuracy", "Head accuracy"),
        ("medium_accuracy", "Medium accuracy"),
        ("tail_accuracy", "Tail accuracy"),
    ),
    "anytime_accuracy": (("anytime_accuracy", "Anytime accuracy"),),
}


def _colors(n: int) -> list[Any]:
    """``n`` distinct colours: tab10, then tab20, then evenly spaced on a perceptual map."""
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)]


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _check_output(fmt: str, dpi: int) -> None:
    """Refuse a format or resolution matplotlib would choke on, before anything is drawn."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 1:
        raise ValueError(f"dpi must be an integer >= 1, got {dpi!r}")


# --------------------------------------------------------------------------- runs


@dataclass
class _Run:
    """A run as the figures use it: its label, colour, records and final metrics."""

    label: str
    color: Any
    record: RunRecord

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record.history()

    def full(self) -> list[dict[str, Any]]:
        """Evaluations on the whole test set (continual runs also log anytime-only ones)."""
        return [h for h in self.history if h.get("accuracy") is not None]

    def final(self) -> dict[str, Any]:
        """``summary["final"]``, or the last full evaluation of a run still in progress."""
        if self.record.final:
            return self.record.final
        full = self.full()
        return full[-1] if full else {}


def _labels(paths: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    """The given labels, or folder names (with their parent where names repeat)."""
    if labels is not None:
        if len(labels) != len(paths):
            raise ValueError(f"got {len(labels)} labels for {len(paths)} runs")
        return [str(x) for x in labels]
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]
    out, used = [], set()
    for name in names:
        label, k = name, 2
        while label in used:
            label, k = f"{name} ({k})", k + 1
        used.add(label)
        out.append(label)
    return out


def _series(records: Sequence[Mapping[str, Any]], key: str, x: str = "round") -> tuple[list[float], ...]:
    """(x, y) of the records that have ``key``."""
    pts = [(_num(r.get(x)), _num(r.get(key))) for r in records if r.get(key) is not None]
    return tuple(map(list, zip(*pts, strict=True))) if pts else ([], [])


def _integer_x(ax: Axes) -> None:
    """Rounds are whole numbers: no 1.25 ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------------- the figures


def _fig_accuracy(runs: Sequence[_Run]) -> Figure | None:
    if not any(r.full() for r in runs):
        return None
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    titles = {
        "accuracy": "Accuracy (balanced test set)",
        "balanced_accuracy": "Balanced accuracy (mean per-class recall)",
    }
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for r in runs:
            xs, ys = _series(r.full(), key)
            ax.plot(xs, ys, color=r.color, label=r.label, **_marker(len(xs)))
        ax.set(title=title, xlabel="round")
        ax.grid(alpha=0.3)
        _integer_x(ax)
    axes[0].set_ylabel("accuracy")
    _run_legend(fig, runs)
    return fig


def _shot_classes(runs: Sequence[_Run]) -> dict[str, list[int]] | None:
    """The head / medium / tail class lists if every run uses the same ones."""
    splits = []
    for r in runs:
        rule = r.final().get("shot_rule")
        if isinstance(rule, Mapping):
            splits.append({g: list(rule.get(g) or []) for g in ("head", "medium", "tail")})
    if splits and all(s == splits[0] for s in splits):
        return splits[0]
    return None


def _class_list(ids: Sequence[int]) -> str:
    if len(ids) > 6:
        return f"{len(ids)} classes"
    return "class " + ", ".join(map(str, ids)) if len(ids) == 1 else "classes " + ", ".join(map(str, ids))


def _fig_shot(runs: Sequence[_Run]) -> Figure | None:
    keys = ("head_accuracy", "medium_accuracy", "tail_accuracy")
    if not any(h.get(k) is not None for r in runs for h in r.full() for k in keys):
        return None
    fig = _figure(12, 4.2)
    axes = fig.subplots(1, 3, sharey=True)
    classes = _shot_classes(runs)
    for ax, key in zip(axes, keys, strict=True):
        group = key.split("_")[0]
        for r in runs:
            xs, ys = _series(r.full(), key)
            ax.plot(xs, ys, color=r.color, label=r.label, **_marker(len(xs)))
        title = f"{group.capitalize()} accuracy"
        if classes is not None:
            title += f"\n({_class_list(classes[group])})" if classes[group] else "\n(no classes)"
        ax.set(title=title, xlabel="round")
        ax.grid(alpha=0.3)
        _integer_x(ax)
    axes[0].set_ylabel("mean per-class accuracy")
    rule = next((r.final().get("shot_rule") for r in runs if r.final().get("shot_rule")), None)
    if isinstance(rule, Mapping):
        fig.suptitle(f"Classes split by the {rule.get('rule')} rule, thresholds {rule.get('thresholds')}")
    _run_legend(fig, runs)
    return fig


class _CountCache:
    """Training samples per class of each run, rebuilt from its scenario when not recorded."""

    def __init__(self) -> None:
        self._by_data: dict[str, np.ndarray | None] = {}
        self.failures: list[str] = []

    def __call__(self, run: _Run) -> np.ndarray | None:
        recorded = run.final().get("train_class_counts")
        if isinstance(recorded, list) and recorded:
            return np.asarray(recorded, dtype=float)
        scenario = run.record.scenario
        if not scenario:
            return None
        # The counts depend only on the seed and how the data is loaded and long-tailed.
        key = json.dumps(
            {k: scenario.get(k) for k in ("seed", "data", "long_tail", "partition", "stream")},
            sort_keys=True,
            default=str,
        )
        if key not in self._by_data:
            self._by_data[key] = self._rebuild(run)
        return self._by_data[key]

    def _rebuild(self, run: _Run) -> np.ndarray | None:
        from fedlt.data.federated import build_federated_data
        from fedlt.scenario.config import load_scenario

        try:
            data = build_federated_data(load_scenario(run.record.path / "scenario.toml"))
        except Exception as exc:  # any failure to load data only costs this one figure
            self.failures.append(f"{run.label}: {type(exc).__name__}: {exc}")
            return None
        return np.asarray(data.train_class_counts, dtype=float)


def _group_bounds(counts: np.ndarray, classes: Mapping[str, list[int]]) -> list[float]:
    """Where (on the log count axis) one shot group ends and the next begins."""
    out = []
    present = [g for g in ("tail", "medium", "head") if classes.get(g)]
    for lower, upper in itertools.pairwise(present):
        hi = max(counts[c] for c in classes[lower])
        lo = min(counts[c] for c in classes[upper])
        if hi < lo:
            out.append(math.sqrt(max(hi, 0.8) * lo))
    return out


def _log_count_axis(ax: Axes) -> None:
    """A log axis labelled 1, 2, 5, 10, 20, 50, ... in plain numbers (not 2×10¹)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _fig_per_class(runs: Sequence[_Run], counts_of: _CountCache) -> tuple[Figure | None, str | None]:
    pts = []
    for r in runs:
        acc = r.final().get("per_class_accuracy")
        if not isinstance(acc, list):
            continue
        counts = counts_of(r)
        if counts is None or len(counts) != len(acc):
            continue
        pts.append((r, counts, [_num(a) for a in acc]))
    if not pts:
        why = "no run has both final per-class accuracy and training class counts"
        if counts_of.failures:
            why += " (rebuilding counts failed: " + "; ".join(counts_of.failures) + ")"
        return None, why
    fig = _figure(8, 5)
    ax = fig.subplots()
    for r, counts, acc in pts:
        order = np.argsort(counts, kind="stable")
        x = np.maximum(counts[order], 0.8)  # a class with no training sample still shows on a log axis
        y = np.asarray(acc)[order]
        keep = ~np.isnan(y)
        ax.plot(x[keep], y[keep], color=r.color, lw=1, alpha=0.6)
        ax.scatter(x[keep], y[keep], color=r.color, s=22, label=r.label, zorder=3)
    _log_count_axis(ax)
    ax.set(
        xlabel="training samples of the class (log scale)",
        ylabel="final accuracy on the class",
        title="Per-class accuracy against training count",
    )
    ax.set_ylim(-0.04, 1.1)
    ax.grid(alpha=0.3, which="both")
    same = all(np.array_equal(c, pts[0][1]) for _, c, _ in pts)
    classes = _shot_classes([r for r, _, _ in pts])
    counts0 = pts[0][1]
    if same and classes is not None:
        for x in _group_bounds(counts0, classes):
            ax.axvline(x, color="0.5", ls=":", lw=1)
        for group in ("tail", "medium", "head"):
            ids = classes.get(group) or []
            if ids:
                xs = np.maximum(counts0[ids], 0.8)
                ax.text(
                    math.sqrt(xs.min() * xs.max()),
                    1.06,
                    group,
                    ha="center",
                    va="center",
                    color="0.35",
                    fontsize=9,
                )
    if same and len(counts0) <= 20:
        # Class ids on top, so a point can be traced to its class.
        top = ax.secondary_xaxis("top")
        top.set_xscale("log")
        xs = np.maximum(counts0, 0.8)
        order = np.argsort(xs, kind="stable")
        keep = [i for k, i in enumerate(order) if k == 0 or xs[i] > xs[order[k - 1]] * 1.08]
        top.set_xticks(xs[keep], [str(i) for i in keep])
        top.set_xticks([], minor=True)
        top.set_xlabel("class", fontsize=9)
    _run_legend(fig, [r for r, _, _ in pts])
    return fig, None


def _fig_head_tail(runs: Sequence[_Run]) -> Figure | None:
    paths = []
    for r in runs:
        pts = [
            (_num(h.get("head_accuracy")), _num(h.get("tail_accuracy")))
            for h in r.full()
            if h.get("head_accuracy") is not None and h.get("tail_accuracy") is not None
        ]
        if pts:
            paths.append((r, np.asarray(pts)))
    if not paths:
        return None
    from matplotlib.lines import Line2D

    fig = _figure(7, 6.2)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=1, zorder=0)
    for r, xy in paths:
        ax.plot(xy[:, 0], xy[:, 1], color=r.color, lw=1.3, label=r.label, **_marker(len(xy)))
        ax.plot(*xy[0], "s", ms=9, mfc="white", mec=r.color, mew=2, zorder=4)
        ax.plot(*xy[-1], "*", ms=15, color=r.color, mec="black", mew=0.6, zorder=5)
    # Zoom to the paths (tail accuracy often stays low), never beyond [0, 1].
    every = np.concatenate([xy for _, xy in paths])
    limits = []
    for lo, hi in zip(np.nanmin(every, axis=0), np.nanmax(every, axis=0), strict=True):
        pad = max(0.04, 0.08 * (hi - lo))
        limits.append((max(lo - pad, -0.02), min(hi + pad, 1.02)))
    ax.set(
        xlim=limits[0],
        ylim=limits[1],
        xlabel="head-class accuracy",
        ylabel="tail-class accuracy",
        title="Head against tail accuracy over rounds",
    )
    ax.grid(alpha=0.3)
    extra = [
        Line2D([], [], ls="", marker="s", ms=8, mfc="white", mec="0.3", mew=2, label="first evaluation"),
        Line2D([], [], ls="", marker="*", ms=12, color="0.3", label="last evaluation"),
        Line2D([], [], color="0.7", ls="--", lw=1, label="head = tail"),
    ]
    _run_legend(fig, [r for r, _ in paths], extra)
    return fig


def _confusion(run: _Run) -> np.ndarray | None:
    for h in reversed(run.history):
        if h.get("confusion_matrix") is not None:
            return np.asarray(h["confusion_matrix"], dtype=float)
    m = run.final().get("confusion_matrix")
    return None if m is None else np.asarray(m, dtype=float)


def _annotate(ax: Axes, values: np.ndarray, shown: np.ndarray, fmt: str, shade: np.ndarray) -> None:
    """Write ``values`` into heatmap cells, white on dark cells (``shade`` in [0, 1])."""
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            color = "white" if shade[i, j] > 0.55 else "black"
            ax.text(j, i, format(shown[i, j], fmt), ha="center", va="center", fontsize=7, color=color)


def _fig_confusion(runs: Sequence[_Run]) -> Figure | None:
    mats = [(r, m) for r in runs if (m := _confusion(r)) is not None and m.ndim == 2]
    if not mats:
        return None
    n = len(mats)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    c = max(m.shape[0] for _, m in mats)
    side = 3.4 if c <= 12 else 4.2
    fig = _figure(side * cols + 0.8, side * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for ax, (r, m) in zip(axes, mats, strict=False):
        totals = m.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(totals > 0, m / totals, np.nan)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        if m.shape[0] <= 12:
            _annotate(ax, share, m.astype(int), "d", np.nan_to_num(share))
        ax.set_title(r.label, color=r.color, fontsize=10)
        ax.set(xlabel="predicted class", ylabel="true class")
        if m.shape[0] <= 20:
            ax.set_xticks(range(m.shape[1]))
            ax.set_yticks(range(m.shape[0]))
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes[:n].tolist(), shrink=0.8, label="share of the true class (row)")
    fig.suptitle("Confusion matrix of the last evaluation (cell text: counts)")
    return fig


def _fig_anytime(runs: Sequence[_Run]) -> Figure | None:
    # Continual panels (the A_auc points, task ends apart, clients, memory): their own module.
    from fedlt.analysis.continual_plots import continual_figure

    return continual_figure(runs)


def _fig_task_class(runs: Sequence[_Run]) -> Figure | None:
    mats = []
    for r in runs:
        m = r.final().get("task_class_accuracy")
        if isinstance(m, list) and m:
            mats.append((r, np.array([[_num(v) for v in row] for row in m], dtype=float)))
    if not mats:
        return None
    n = len(mats)
    t, c = max(m.shape[0] for _, m in mats), max(m.shape[1] for _, m in mats)
    width = min(max(0.45 * c + 1.5, 4.0), 9.0)
    fig = _figure(width, (0.45 * t + 1.4) * n + 0.6)
    axes = np.atleast_1d(fig.subplots(n, 1, squeeze=False)).ravel()
    image = None
    for ax, (r, m) in zip(axes, mats, strict=True):
        image = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        if m.size <= 150:
            _annotate(ax, m, np.nan_to_num(m), ".2f", 1 - np.nan_to_num(m))
        ax.set_title(r.label, color=r.color, fontsize=10)
        ax.set(xlabel="class", ylabel="after task")
        ax.set_yticks(range(m.shape[0]))
        if m.shape[1] <= 20:
            ax.set_xticks(range(m.shape[1]))
    fig.colorbar(image, ax=axes.tolist(), label="accuracy", shrink=0.9)
    fig.suptitle("Accuracy per class at each task end (blank: class not yet seen)")
    return fig


def _run_source(run: _Run) -> Source:
    """A run as the robust / noise / OOD figures read it: its full evaluations, its final record."""
    return Source(
        run.label,
        run.color,
        lambda key: Curve(*_series(run.full(), key)),
        lambda key: mean_per_class([run.final().get(key)]),
        run.final(),
    )


def build_figures(
    run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None
) -> tuple[dict[str, Figure], list[str]]:
    """The figures of :func:`plot_runs`, not yet written (for notebooks, or to restyle before saving).

    Returns
    -------
    figures : dict
        Name (a key of :data:`FIGURE_FILES`) → ``matplotlib.figure.Figure``, for the figures the
        runs have data for.
    notes : list of str
        One line per figure left out, saying why.
    """
    require_matplotlib()
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("no run folders to plot")
    records = [load_run(p, require_summary=False) for p in paths]
    names = _labels(paths, labels)
    runs = [_Run(n, c, rec) for n, c, rec in zip(names, _colors(len(paths)), records, strict=True)]
    for r in runs:
        if not r.history:
            log.info("%s: no evaluations in metrics.jsonl", r.label)
    figures: dict[str, Figure] = {}
    notes: list[str] = []
    why = {
        "accuracy": "no run has an evaluation in metrics.jsonl",
        "shot_accuracy": "no run has head/medium/tail accuracy",
        "head_vs_tail": "no run has both head and tail accuracy (a split without tail classes?)",
        "confusion_matrix": "no run recorded a confusion_matrix",
        "anytime_accuracy": "no continual run (no anytime_accuracy in metrics.jsonl)",
        "task_class_accuracy": "no run recorded task_class_accuracy in summary.json",
        "virtual_time_accuracy": "no run has virtual_time in metrics.jsonl (written before fedlt 0.3)",
        "client_timeline": "no run has events.jsonl (log.events = false, or written before fedlt 0.3)",
        "staleness": "no run had a stale update (synchronous rounds only)",
        **{name: skip_note(name) for name in STUDY_FIGURES},
    }
    sources = [_run_source(r) for r in runs]
    counts = _CountCache()
    builders = {
        "accuracy": lambda: (_fig_accuracy(runs), None),
        "shot_accuracy": lambda: (_fig_shot(runs), None),
        "per_class_vs_count": lambda: _fig_per_class(runs, counts),
        "head_vs_tail": lambda: (_fig_head_tail(runs), None),
        "confusion_matrix": lambda: (_fig_confusion(runs), None),
        "anytime_accuracy": lambda: (_fig_anytime(runs), None),
        "task_class_accuracy": lambda: (_fig_task_class(runs), None),
        "virtual_time_accuracy": lambda: (virtual_time_figure(runs), None),
        "client_timeline": lambda: (next(filter(None, map(client_timeline_figure, runs)), None), None),
        "staleness": lambda: (staleness_figure(runs), None),
        **{name: (lambda name=name: (draw_study_figure(name, sources), None)) for name in STUDY_FIGURES},
    }
    for name, build in builders.items():
        fig, reason = build()
        if fig is None:
            notes.append(f"{name}.png skipped: {reason or why[name]}")
        else:
            figures[name] = fig
    return figures, notes


class PlotFiles(list[Path]):
    """The paths written, as a list, with ``notes``: one line per figure skipped and why."""

    notes: list[str]

    def __init__(self, paths: Sequence[Path] = (), notes: Sequence[str] = ()) -> None:
        super().__init__(paths)
        self.notes = list(notes)


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    dpi: int = 100,
    fmt: str = "png",
) -> PlotFiles:
    """Draw several runs overlaid, one colour per run, and write the figures (PNG by default).

    Parameters
    ----------
    run_dirs : sequence of paths
        Run folders (finished or in progress: ``metrics.jsonl`` is read as it stands).
    out_dir : path
        Folder for the PNGs, created if needed; files are named after :data:`FIGURE_FILES`. A file
        there (or above it) is refused before anything is read or drawn.
    labels : sequence of str, optional
        Legend label per run; default its folder name.
    dpi : int, default=100
        Resolution of PNGs (and of anything rasterised inside a PDF or SVG).
    fmt : {"png", "pdf", "svg"}, default="png"
        File format (and suffix) of the figures.

    Returns
    -------
    PlotFiles
        The paths written (a list), with ``.notes`` naming each figure skipped for lack of data
        (confusion matrix, continual figures, per-class counts that could not be rebuilt).
    """
    _check_output(fmt, dpi)
    out = check_out_path(out_dir, "out_dir", folder=True)
    figures, notes = build_figures(run_dirs, labels)
    paths = [_save(fig, out / f"{name}.{fmt}", dpi) for name, fig in figures.items()]
    for note in notes:
        log.info(note)
    return PlotFiles(paths, notes)


# --------------------------------------------------------------------------- groups of runs


def group_curve(group: Group, key: str, x: str = "round") -> tuple[list[float], list[Stat]]:
    """Per evaluation point, the :class:`Stat` of ``key`` over the group's runs (its seeds).

    The points are those every run of the group evaluated (runs of one group may differ in
    ``federation.eval_every``, which does not split groups); the interval is the one ``fedlt
    compare`` prints (Student t, clipped to the metric's range).
    """
    per_run = []
    for run in group.runs:
        points = {_num(h.get(x)): _num(h.get(key)) for h in run.history() if h.get(key) is not None}
        per_run.append({k: v for k, v in points.items() if not (math.isnan(k) or math.isnan(v))})
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    bounds = metric_bounds(key)
    return common, [summarize((p[c] for p in per_run), bounds) for c in common]


def _band(ax: Axes, xs: Sequence[float], stats: Sequence[Stat], color: Any, label: str) -> None:
    """The mean curve and, where two or more runs give an interval, the shaded 95% band."""
    ax.plot(xs, [st.mean for st in stats], color=color, label=label, **_marker(len(xs)))
    low = [math.nan if st.ci_low is None else st.ci_low for st in stats]
    high = [math.nan if st.ci_high is None else st.ci_high for st in stats]
    if any(not math.isnan(v) for v in low):
        ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)


def _fig_group(name: str, groups: Sequence[Group], colors: Sequence[Any]) -> Figure | None:
    panels = GROUP_FIGURES[name]
    curves = [
        [(g, c, *group_curve(g, key)) for g, c in zip(groups, colors, strict=True)] for key, _ in panels
    ]
    if not any(xs for panel in curves for _, _, xs, _ in panel):
        return None
    fig = _figure(4.6 * len(panels) + 0.8, 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True, squeeze=False)).ravel()
    for ax, (_, title), panel in zip(axes, panels, curves, strict=True):
        for g, color, xs, stats in panel:
            if xs:
                _band(ax, xs, stats, color, g.label)
        ax.set(title=title, xlabel="round")
        ax.grid(alpha=0.3)
        _integer_x(ax)
    axes[0].set_ylabel(panels[0][0] if len(panels) == 1 else "accuracy")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, label=g.label) for g, c in zip(groups, colors, strict=True)]
    ncols = legend_columns(fig.get_figwidth(), [g.label for g in groups], 3)
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)
    fig.suptitle(_group_title(groups))
    return fig


def _group_title(groups: Sequence[Group]) -> str:
    sizes = sorted({len(g.runs) for g in groups})
    runs = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return f"Mean over {runs} runs per group; band: 95% t-interval of the mean (as fedlt compare)"


def _group_source(group: Group, color: Any) -> Source:
    """A group as the robust / noise / OOD figures read it: mean and band per evaluation point,
    final per-class values averaged over its runs (seeds)."""

    def curve(key: str) -> Curve:
        xs, stats = group_curve(group, key)
        return Curve(
            xs,
            [_num(st.mean) for st in stats],
            [_num(st.ci_low) for st in stats],
            [_num(st.ci_high) for st in stats],
        )

    return Source(
        group.label,
        color,
        curve,
        lambda key: mean_per_class([run.final.get(key) for run in group.runs]),
        group.runs[0].final if group.runs else {},
    )


def build_group_figures(
    paths: Sequence[str | Path], ignore: Sequence[str] = IGNORED_KEYS
) -> tuple[dict[str, Figure], list[str], list[Group]]:
    """The figures of :func:`plot_groups`, not yet written.

    Returns
    -------
    figures : dict
        Name (a key of :data:`GROUP_FIGURES` or of :data:`~fedlt.analysis.robust_plots.STUDY_FIGURES`)
        → figure, for the figures some group has data for.
    notes : list of str
        One line per figure left out, saying why.
    groups : list of Group
        The groups drawn, as ``fedlt compare`` forms and labels them.
    """
    require_matplotlib()
    groups = group_runs(collect_runs(paths), ignore)
    colors = _colors(len(groups))
    figures: dict[str, Figure] = {}
    notes = []
    for name in GROUP_FIGURES:
        fig = _fig_group(name, groups, colors)
        if fig is None:
            keys = ", ".join(k for k, _ in GROUP_FIGURES[name])
            notes.append(f"{name} skipped: no run has {keys} in metrics.jsonl")
        else:
            figures[name] = fig
    sources = [_group_source(g, c) for g, c in zip(groups, colors, strict=True)]
    title = _group_title(groups) if groups else None
    for name in STUDY_FIGURES:
        fig = draw_study_figure(name, sources, title)
        if fig is None:
            notes.append(f"{name} skipped: {skip_note(name)}")
        else:
            figures[name] = fig
    return figures, notes, groups


def plot_groups(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    fmt: str = "png",
    dpi: int = 100,
    ignore: Sequence[str] = IGNORED_KEYS,
) -> PlotFiles:
    """Draw finished runs grouped as ``fedlt compare`` groups them: per group the mean curve over
    its seeds and the band of its 95% interval, labelled by the settings in which groups differ.

    Parameters
    ----------
    paths : sequence of paths
        Run folders or folders holding them (a sweep's ``--out``), searched as
        :func:`fedlt.analysis.compare.collect_runs` does (finished runs only).
    out_dir : path
        Folder for the figures, created if needed; files are named after :data:`GROUP_FIGURES` and
        :data:`~fedlt.analysis.robust_plots.STUDY_FIGURES`. A
        file there (or above it) is refused before anything is read or drawn.
    fmt : {"png", "pdf", "svg"}, default="png"
    dpi : int, default=100
        Resolution of PNGs (and of anything rasterised in PDF and SVG).
    ignore : sequence of str
        Scenario keys that do not split groups (as for ``fedlt compare``).

    Returns
    -------
    PlotFiles
        The paths written, with ``.notes`` naming each figure skipped for lack of data.
    """
    _check_output(fmt, dpi)
    out = check_out_path(out_dir, "out_dir", folder=True)
    figures, notes, _ = build_group_figures(paths, ignore)
    written = [_save(fig, out / f"{name}.{fmt}", dpi) for name, fig in figures.items()]
    for note in notes:
        log.info(note)
    return PlotFiles(written, notes)


# --------------------------------------------------------------------------- data pictures


def client_counts_figure(counts: np.ndarray, class_names: Sequence[str] | None = None) -> Figure:
    """Heatmap of samples per client (rows) and class (columns); see :func:`plot_client_class_counts`."""
    from matplotlib.colors import LogNorm, Normalize

    m = np.asarray(counts, dtype=float)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"counts must be a non-empty clients x classes array, got shape {m.shape}")
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError("counts must be finite and >= 0")
    k, c = m.shape
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"got {len(class_names)} class names for {c} classes")
    fig = _figure(min(max(0.55 * c + 2.6, 5.0), 16.0), min(max(0.32 * k + 1.8, 3.2), 14.0))
    ax = fig.subplots()
    shown = np.ma.masked_equal(m, 0)
    positive = m[m > 0]
    lo, hi = (positive.min(), positive.max()) if positive.size else (1.0, 1.0)
    norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.01)) if hi / lo >= 20 else Normalize(vmin=0, vmax=max(hi, 1))
    cmap = _cmap_with_bad("viridis", "0.93")
    image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if k * c <= 200:
        # viridis is dark at the low end: white text there.
        shade = 1 - np.asarray(norm(np.where(m > 0, m, lo)), dtype=float)
        _annotate(ax, np.where(m > 0, m, np.nan), m.astype(int), "d", shade)
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if c <= 30:
        ax.set_xticks(range(c), names, rotation=0 if max(map(len, names)) <= 3 else 45, ha="center")
    if k <= 40:
        ax.set_yticks(range(k), [f"{i}  (n={int(m[i].sum())})" for i in range(k)])
    ax.set(xlabel="class", ylabel="client (total samples)")
    ax.set_title("Training samples per client and class (grey: none)")
    bar = fig.colorbar(image, ax=ax, label="samples" + (" (log scale)" if isinstance(norm, LogNorm) else ""))
    if isinstance(norm, LogNorm):
        from matplotlib.ticker import FuncFormatter, LogLocator

        bar.ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    return fig


def _cmap_with_bad(name: str, bad: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def plot_client_class_counts(
    counts: np.ndarray, out: str | Path, class_names: Sequence[str] | None = None, dpi: int = 100
) -> Path:
    """Write a clients x classes heatmap of training sample counts (how the split skews clients).

    Parameters
    ----------
    counts : (K, C) array of int
        Samples of each class held by each client, e.g. ``FederatedData.client_counts``.
    out : path
        The PNG to write.
    class_names : sequence of str, optional
        Column labels; default class ids.

    Returns
    -------
    Path
        ``out``. Zero cells are grey; colours are on a log scale when counts span 20x or more;
        cells hold their counts when the grid is small enough to read (at most 200 cells).
    """
    return _save(client_counts_figure(counts, class_names), Path(out), dpi)


def stream_labels(data: FederatedData) -> tuple[list[np.ndarray], list[list[int]]]:
    """The input of :func:`plot_stream_timeline` for a continual run's data.

    Returns
    -------
    labels : list of (L_k,) int arrays
        Each client's training labels in stream order.
    task_ends : list of list of int
        Each client's cumulative task end offsets into its stream.
    """
    if data.streams is None:
        raise ValueError("the data has no streams (the scenario has no [stream] kind)")
    y = data.y_train_np
    return [y[s.indices] for s in data.streams], [list(s.boundaries) for s in data.streams]


def stream_timeline_figure(
    labels: Sequence[Sequence[int] | np.ndarray],
    task_ends: Sequence[Sequence[int]] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Per client a horizontal strip of its stream coloured by class; see :func:`plot_stream_timeline`."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    seqs = [np.asarray(s, dtype=int).ravel() for s in labels]
    if not seqs:
        raise ValueError("no client streams to draw")
    if task_ends is not None and len(task_ends) != len(seqs):
        raise ValueError(f"got task ends for {len(task_ends)} clients and labels for {len(seqs)}")
    top = max((int(s.max()) for s in seqs if s.size), default=0)
    c = num_classes if num_classes is not None else top + 1
    if top >= c or any(s.size and s.min() < 0 for s in seqs):
        raise ValueError(f"labels must lie in [0, {c}), got up to {top}")
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"got {len(class_names)} class names for {c} classes")
    k, length = len(seqs), max(max(s.size for s in seqs), 1)
    grid = np.full((k, length), np.nan)
    for i, s in enumerate(seqs):
        grid[i, : s.size] = s
    cmap = ListedColormap(_colors(c)).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(-0.5, c + 0.5), cmap.N)
    fig = _figure(11, min(max(0.38 * k + 1.9, 2.8), 14.0))
    ax = fig.subplots()
    ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=cmap,
        norm=norm,
        aspect="auto",
        interpolation="nearest",
        extent=(0, length, k - 0.5, -0.5),
    )
    if task_ends is not None:
        from matplotlib import patheffects

        halo = [patheffects.withStroke(linewidth=4.5, foreground="white")]
        for i, ends in enumerate(task_ends):
            inner = [e for e in ends if 0 < e < seqs[i].size]
            ax.vlines(inner, i - 0.5, i + 0.5, color="black", lw=2, path_effects=halo)
    if k <= 40:
        ax.set_yticks(range(k), [f"client {i}" for i in range(k)])
    ax.set(xlabel="position in the client's stream (samples)", xlim=(0, length))
    title = "Each client's stream, coloured by class"
    ax.set_title(title + (" (black bars: task ends)" if task_ends is not None else ""))
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if c <= 20:
        handles = [Patch(color=cmap(i), label=names[i]) for i in range(c)]
        fig.legend(handles=handles, loc="outside right upper", title="class", frameon=False)
    else:
        import matplotlib.cm

        ticks = np.unique(np.linspace(0, c - 1, min(c, 11)).round().astype(int))
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="class")
        bar.set_ticks(ticks, labels=[names[i] for i in ticks])
        bar.minorticks_off()
    return fig


def plot_stream_timeline(
    labels: Sequence[Sequence[int] | np.ndarray],
    out: str | Path,
    task_ends: Sequence[Sequence[int]] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    dpi: int = 100,
) -> Path:
    """Write, per client, a horizontal timeline of its continual stream coloured by class.

    Shows how blurry a stream is: disjoint classes appear as solid blocks within one task, blurry
    classes as specks spread over all tasks.

    Parameters
    ----------
    labels : sequence (one per client) of int sequences
        Each client's training labels in the order its stream visits them; :func:`stream_labels`
        gives them for a ``FederatedData``.
    out : path
        The PNG to write.
    task_ends : sequence (one per client) of int sequences, optional
        Cumulative end offset of each task in that client's stream (``ClientStream.boundaries``);
        drawn as black bars.
    num_classes : int, optional
        C; default the largest label + 1.
    class_names : sequence of str, optional
        Legend labels; default class ids.

    Returns
    -------
    Path
        ``out``.
    """
    return _save(stream_timeline_figure(labels, task_ends, num_classes, class_names), Path(out), dpi)
