"""Pictures of a federation on its virtual clock: accuracy against virtual time, a timeline of
clients (training, dropped, late, offline) and the staleness of the updates that arrived.

They read a run folder's ``metrics.jsonl`` (``virtual_time`` in every record), ``events.jsonl``
(:mod:`fedlt.store.events`) and ``system.npz`` (the simulated devices, to redraw when each client
was offline). :mod:`fedlt.analysis.plotting` adds them to ``fedlt plot``'s figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlt.store.events import read_events

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["client_timeline_figure", "staleness_figure", "virtual_time_figure"]

SYSTEM = "system.npz"

#: Colours of the timeline's states.
STATES = {"training": "tab:green", "dropped": "tab:red", "late": "tab:orange", "offline": "0.82"}


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _legend(fig: Figure, runs: Sequence[Any]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=r.color, lw=2, label=r.label) for r in runs]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)


def virtual_time_figure(runs: Sequence[Any]) -> Figure | None:
    """Accuracy and head / medium / tail accuracy against virtual seconds, one colour per run."""
    keys = {
        "accuracy": "Accuracy",
        "head_accuracy": "Head",
        "medium_accuracy": "Medium",
        "tail_accuracy": "Tail",
    }
    if not any(h.get("virtual_time") is not None for r in runs for h in r.full()):
        return None
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2, sharex=True, sharey=True).ravel()
    for ax, (key, title) in zip(axes, keys.items(), strict=True):
        for r in runs:
            pts = [
                (h["virtual_time"], h[key])
                for h in r.full()
                if h.get(key) is not None and h.get("virtual_time") is not None
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs, ys, color=r.color, label=r.label, marker="o" if len(xs) <= 40 else None, markersize=3
                )
        ax.set(title=title)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("virtual time (s)")
    for ax in axes[::2]:
        ax.set_ylabel("accuracy")
    _legend(fig, runs)
    return fig


def staleness_figure(runs: Sequence[Any]) -> Figure | None:
    """How stale the updates were when they arrived: a histogram per run (side by side)."""
    counts = {r.label: Counter(e["staleness"] for e in read_events(r.record.path) if e["event"] == "arrive")
              for r in runs}  # fmt: skip
    if not any(sum(v for k, v in c.items() if k > 0) for c in counts.values()):
        return None  # only synchronous runs: every update fresh
    fig = _figure(10, 4.2)
    ax = fig.subplots()
    top = max(max(c, default=0) for c in counts.values())
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        c = counts[r.label]
        total = sum(c.values()) or 1
        xs = np.arange(top + 1)
        ax.bar(
            xs + (i - (len(runs) - 1) / 2) * width, [c.get(x, 0) / total for x in xs], width, color=r.color
        )
        if total > 1:
            mean = sum(k * v for k, v in c.items()) / total
            ax.axvline(mean, color=r.color, ls="--", lw=1)
    ax.set(
        xlabel="staleness (server updates between a client's start and its arrival)",
        ylabel="share of updates",
        title="Staleness of arriving updates (dashed: mean)",
    )
    ax.grid(alpha=0.3, axis="y")
    _legend(fig, runs)
    return fig


def _intervals(events: list[dict[str, Any]]) -> dict[int, list[tuple[float, float, str]]]:
    """Per client, (start, end, state) of every client-round: training, dropped or late."""
    started: dict[int, float] = {}
    out: dict[int, list[tuple[float, float, str]]] = {}
    for e in events:
        c = e.get("client")
        if e["event"] == "start":
            started[c] = e["t"]
        elif e["event"] in ("arrive", "drop", "late") and c in started:
            state = {"arrive": "training", "drop": "dropped", "late": "late"}[e["event"]]
            out.setdefault(c, []).append((started.pop(c), e["t"], state))
    return out


def _offline(
    run_dir: Path, scenario: dict[str, Any], clients: Sequence[int], t0: float, t1: float
) -> dict[int, list]:
    """When each client was offline in [t0, t1], redrawn from the run's devices (empty if always online)."""
    system = scenario.get("system") or {}
    if system.get("availability", "always") == "always" or not (run_dir / SYSTEM).is_file():
        return {}
    from fedlt.scenario.config import SystemConfig
    from fedlt.system.devices import Devices

    devices = Devices.load(run_dir / SYSTEM, SystemConfig(**system), int(scenario.get("seed", 0)))
    times = np.linspace(t0, t1, 400)
    out: dict[int, list] = {}
    for c in clients:
        online = np.array([devices.available(c, t, 1) for t in times])
        spans, start = [], None
        for t, on in zip(times, online, strict=True):
            if not on and start is None:
                start = t
            elif on and start is not None:
                spans.append((start, t - start))
                start = None
        if start is not None:
            spans.append((start, t1 - start))
        out[c] = spans
    return out


def client_timeline_figure(run: Any, max_clients: int = 24, share: float = 0.25) -> Figure | None:
    """One run's clients over the first ``share`` of its virtual time: training (green), dropped (red),
    late (orange), offline (grey); clients sorted by their share of tail samples (most at the bottom)."""
    events = read_events(run.record.path)
    spans = _intervals(events)
    if not spans:
        return None
    end = max(e["t"] for e in events)
    t1 = max(end * share, min(s for v in spans.values() for s, _, _ in v) + 1e-9)
    tail = None
    if (run.record.path / SYSTEM).is_file():
        with np.load(run.record.path / SYSTEM) as saved:
            tail = saved["tail_share"]
    busiest = sorted(spans, key=lambda c: (-len(spans[c]), c))[:max_clients]
    order = sorted(busiest, key=lambda c: (float(tail[c]) if tail is not None else 0.0, c))
    offline = _offline(run.record.path, run.record.scenario, order, 0.0, t1)
    fig = _figure(11, 0.28 * len(order) + 1.8)
    ax = fig.subplots()
    for row, c in enumerate(order):
        if offline.get(c):
            ax.broken_barh(offline[c], (row - 0.4, 0.8), color=STATES["offline"])
        for state in ("training", "dropped", "late"):
            bars = [(s, e - s) for s, e, st in spans[c] if st == state and s < t1]
            if bars:
                ax.broken_barh(bars, (row - 0.3, 0.6), color=STATES[state])
    labels = [f"{c}" + (f" ({tail[c]:.0%} tail)" if tail is not None else "") for c in order]
    ax.set_yticks(range(len(order)), labels, fontsize=7)
    ax.set(xlim=(0, t1), xlabel="virtual time (s)", ylabel="client",
           title=f"{run.label}: clients over the first {share:.0%} of the run (idle: blank)")  # fmt: skip
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=v, label=k) for k, v in STATES.items()], loc="outside lower center",
               ncols=4, frameon=False)  # fmt: skip
    return fig
