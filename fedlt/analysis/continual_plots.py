"""Continual runs in ``fedlt plot``: the anytime curve and what lies under it.

``anytime_accuracy.png`` (:func:`continual_figure`) stacks up to four panels, each drawn only when
some run recorded its data:

1. the **anytime curve**: the accuracy at the A_auc points ``k P`` only (the fixed-period points
   A_auc averages), with the task-end evaluations marked apart (crosses, dashed lines) and the
   final evaluation (a star), so the curve's spacing is the metric's;
2. **each client's anytime curve**: its mean per-class accuracy on its local view over the
   classes it has read (``anytime_client_per_class``), one thin line per client;
3. the **replay memory's class make-up** over samples read, summed over clients, one panel per
   run and memory plugin (``memory_class_counts``);
4. **each client's forgetting** (``client_f_last`` of summary.json), one bar per run.

Reads only what metrics.jsonl and summary.json hold; runs written before a record existed simply
lack that panel. Imported by :mod:`fedlt.analysis.plotting` when it draws; the helpers both use
are in :mod:`fedlt.analysis.figure_kit`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlt.analysis.figure_kit import _figure, _marker, _num, _run_legend

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["anytime_points", "client_curves", "continual_figure", "memory_make_up", "task_end_points"]

Record = Mapping[str, Any]


def _x(record: Record, by_samples: bool) -> float:
    return _num(record.get("samples_seen" if by_samples else "round"))


def anytime_points(history: Sequence[Record], by_samples: bool = True) -> list[tuple[float, float]]:
    """``(k P, accuracy)`` per A_auc point: a record once per entry of its ``eval_points`` (a
    record written before them: once, at its ``samples_seen``); by round when ``by_samples`` is
    False (records without sample counts)."""
    out = []
    for h in history:
        acc = h.get("anytime_accuracy")
        if acc is None or not h.get("periodic"):
            continue
        xs = (h.get("eval_points") or [h.get("samples_seen")]) if by_samples else [h.get("round")]
        out += [(_num(x), float(acc)) for x in xs]
    return out


def _ended(h: Record) -> list[int]:
    t = h.get("task_end")
    return [] if t is None else [int(x) for x in (t if isinstance(t, list) else [t])]


def task_end_points(
    history: Sequence[Record], by_samples: bool = True
) -> list[tuple[float, float, list[int]]]:
    """``(x, accuracy, tasks ended)`` of the evaluations at the federation's task ends."""
    return [
        (_x(h, by_samples), _num(h.get("anytime_accuracy")), _ended(h))
        for h in history
        if _ended(h) and h.get("anytime_accuracy") is not None
    ]


def client_curves(history: Sequence[Record], by_samples: bool = True) -> dict[str, list[tuple[float, float]]]:
    """Per client, ``(x, mean per-class accuracy)`` on its local view over the classes it had read,
    from every record with ``anytime_client_per_class`` (a client with no such class: no point)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for h in history:
        for client, accs in (h.get("anytime_client_per_class") or {}).items():
            values = [float(a) for a in accs if a is not None and math.isfinite(float(a))]
            if values:
                out.setdefault(str(client), []).append((_x(h, by_samples), float(np.mean(values))))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def memory_make_up(
    history: Sequence[Record], by_samples: bool = True
) -> dict[str, tuple[list[float], np.ndarray]]:
    """Per memory plugin, the x of each record with ``memory_class_counts`` and a ``(records, C)``
    array of its items per class summed over clients."""
    out: dict[str, tuple[list[float], list[np.ndarray]]] = {}
    for h in history:
        for plugin, per_client in (h.get("memory_class_counts") or {}).items():
            if not per_client:
                continue
            total = np.sum([np.asarray(c, dtype=float) for c in per_client.values()], axis=0)
            xs, rows = out.setdefault(plugin, ([], []))
            xs.append(_x(h, by_samples))
            rows.append(total)
    width = {p: max(len(r) for r in rows) for p, (_, rows) in out.items()}
    return {
        p: (xs, np.array([np.pad(r, (0, width[p] - len(r))) for r in rows])) for p, (xs, rows) in out.items()
    }


def _by_samples(runs: Sequence[Any]) -> bool:
    anytime = [h for r in runs for h in r.history if h.get("anytime_accuracy") is not None]
    return all(h.get("samples_seen") is not None for h in anytime)


def _curve_panel(ax: Axes, runs: Sequence[Any], by_samples: bool) -> None:
    for r in runs:
        pts = anytime_points(r.history, by_samples)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=r.color, label=r.label, **_marker(len(xs)))
        for x, y, _ in task_end_points(r.history, by_samples):
            ax.axvline(x, color=r.color, ls="--", lw=0.8, alpha=0.5)
            ax.plot([x], [y], marker="X", ms=7, color=r.color, mec="k", mew=0.5, ls="none")
        last = next(
            (h for h in reversed(r.history) if h.get("final") and h.get("anytime_accuracy") is not None), None
        )
        if last is not None:
            ax.plot(
                [_x(last, by_samples)],
                [last["anytime_accuracy"]],
                marker="*",
                ms=10,
                color=r.color,
                ls="none",
            )
    ax.set(ylabel="anytime accuracy", title="Anytime accuracy at the A_auc points (exposed classes)")
    ax.grid(alpha=0.3)


def _client_panel(ax: Axes, runs: Sequence[Any], by_samples: bool) -> None:
    for r in runs:
        for pts in client_curves(r.history, by_samples).values():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, color=r.color, lw=0.9, alpha=0.55)
    ax.set(
        ylabel="client accuracy", title="Each client's anytime accuracy (its local view, classes it has read)"
    )
    ax.grid(alpha=0.3)


def _memory_panel(ax: Axes, label: str, xs: list[float], counts: np.ndarray) -> None:
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if counts.shape[1] <= 20 else "turbo"]
    colors = [
        cmap(i / max(counts.shape[1] - 1, 1)) if counts.shape[1] > 20 else cmap(i)
        for i in range(counts.shape[1])
    ]
    ax.stackplot(xs, counts.T, colors=colors, labels=[str(c) for c in range(counts.shape[1])], step="post")
    ax.set(ylabel="items in memory", title=f"Replay memory by class, all clients: {label}")
    if counts.shape[1] <= 20:
        ax.legend(title="class", fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _forgetting_panel(ax: Axes, runs: Sequence[Any]) -> None:
    rows = [(r, r.final().get("client_f_last") or {}) for r in runs]
    rows = [(r, f) for r, f in rows if any(v is not None for v in f.values())]
    clients = sorted({int(c) for _, f in rows for c in f})
    width = 0.8 / max(len(rows), 1)
    for i, (r, f) in enumerate(rows):
        ys = [_num(f.get(str(c))) for c in clients]
        ax.bar(np.arange(len(clients)) + (i - (len(rows) - 1) / 2) * width, ys, width, color=r.color)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(clients)), [str(c) for c in clients], fontsize=7)
    ax.set(xlabel="client", ylabel="F_last", title="Each client's forgetting (F_last on its local view)")
    ax.grid(alpha=0.3, axis="y")


def continual_figure(runs: Sequence[Any]) -> Figure | None:
    """The continual runs' panels (see the module docstring); None when no run has an anytime
    evaluation. ``runs`` are :mod:`fedlt.analysis.plotting`'s runs (label, colour, records)."""
    series = [r for r in runs if any(h.get("anytime_accuracy") is not None for h in r.history)]
    if not series:
        return None
    from matplotlib.lines import Line2D

    by_samples = _by_samples(series)
    clients = any(client_curves(r.history, by_samples) for r in series)
    memories = [(r, p, xs, c) for r in series for p, (xs, c) in memory_make_up(r.history, by_samples).items()]
    forgetting = any(
        any(v is not None for v in (r.final().get("client_f_last") or {}).values()) for r in series
    )
    n = 1 + clients + len(memories) + forgetting
    fig = _figure(9, 3.6 * n + 0.8)
    axes = list(np.atleast_1d(fig.subplots(n, 1, squeeze=False)).ravel())
    xlabel = "training samples seen" if by_samples else "round"  # by the federation
    _curve_panel(axes[0], series, by_samples)
    k = 1
    if clients:
        _client_panel(axes[k], series, by_samples)
        k += 1
    for r, plugin, xs, counts in memories:
        _memory_panel(axes[k], f"{r.label} ({plugin})", xs, counts)
        k += 1
    for ax in axes[:k]:
        ax.set_xlabel(xlabel)
    if forgetting:
        _forgetting_panel(axes[k], series)
    extra = [
        Line2D([], [], color="0.3", marker="X", ls="--", lw=0.8, label="task end (A_avg, F_last rows)"),
        Line2D([], [], color="0.3", marker="*", ls="none", label="final evaluation"),
    ]
    _run_legend(fig, series, extra)
    return fig
