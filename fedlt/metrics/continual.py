"""Anytime-evaluation metrics of online continual learning (Si-Blurry / CLIB).

- ``A_auc``: mean of the anytime accuracies at every multiple ``k P`` of the sample period ``P``
  (``stream.eval_period``) that the federation's read-sample count reaches, on the test samples
  of the classes exposed so far. The points are equally spaced, so the mean is the area under the
  accuracy-vs-samples curve divided by its length (CLIB's ``sum_i f(i P) P``, normalised): it
  rewards a model that is good *throughout* the stream, not only at the end. A round that moves
  the count past several multiples gives one point per multiple (:func:`periodic_points`).
- ``A_last``: the anytime accuracy at the end of the run.
- ``A_avg``: mean of the end-of-task accuracies.
- ``F_last``: mean over classes of (best end-of-task accuracy before the final task - final
  accuracy), over the classes that were ever learned (best > 0).

Accuracies may be fractions or percentages; every metric is in the same unit as its input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "AUTO_EVAL_POINTS",
    "a_auc",
    "a_avg",
    "a_last",
    "auto_eval_period",
    "crossed",
    "f_last",
    "federation_task_ends",
    "periodic_due",
    "periodic_points",
]

#: ``stream.eval_period = "auto"`` places this many anytime points over the whole federation's
#: stream: MVP/Si-Blurry evaluate CIFAR-100 (50,000 stream samples) every 1,000 samples.
AUTO_EVAL_POINTS = 50


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if len(values) else None


def a_auc(anytime_accuracies: Sequence[float]) -> float | None:
    """``A_auc``: mean of the anytime accuracies, ``None`` before any evaluation."""
    return _mean(anytime_accuracies)


def a_last(anytime_accuracies: Sequence[float]) -> float | None:
    """``A_last``: the last anytime accuracy (after the last task), ``None`` if there is none."""
    return float(anytime_accuracies[-1]) if len(anytime_accuracies) else None


def a_avg(task_end_accuracies: Sequence[float]) -> float | None:
    """``A_avg``: mean of the end-of-task accuracies, ``None`` if no task has ended."""
    return _mean(task_end_accuracies)


def _present(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def f_last(per_class_task_end: Sequence[Sequence[float | None]]) -> float | None:
    """``F_last``: average forgetting of the classes learned before the final evaluation.

    ``F_last = mean_{c in C'} (max_{t<T} a_{t,c} - a_{T,c})`` where ``a_{T,c}`` is the last row and
    ``C'`` the classes whose best earlier accuracy is > 0 and that have a final value. Classes
    never learned are left out so that they do not dilute the forgetting of those that were.

    Parameters
    ----------
    per_class_task_end : sequence of sequences
        Row ``t`` holds the per-class accuracies at the end of task ``t`` (the last row is the
        final evaluation). ``None`` (or NaN) marks a class not yet exposed or absent from the test
        set; rows may be shorter than the last, missing columns counting as ``None``.

    Returns
    -------
    float or None
        ``None`` with fewer than two rows or when ``C'`` is empty.
    """
    rows = [list(r) for r in per_class_task_end]
    if len(rows) < 2:
        return None
    final = rows[-1]
    drops = []
    for c, last in enumerate(final):
        if not _present(last):
            continue
        earlier = [r[c] for r in rows[:-1] if c < len(r) and _present(r[c])]
        if earlier and max(earlier) > 0:
            drops.append(max(earlier) - last)
    return _mean(drops)


def federation_task_ends(boundaries: Sequence[Sequence[int]]) -> list[int]:
    """Stream samples the federation must have read for each task ``t = 0..T-1`` to have ended.

    Each client walks its own stream, whose tasks end at its own positions ``b_{k,t}`` (the
    cumulative task sizes). The federation's task ``t`` ends once it has read as many samples as
    all clients' tasks ``0..t`` hold together, ``E_t = sum_k b_{k,t}``: a definition by samples
    consumed (as CLIB/MVP evaluate at sample counts), so rounds that read nothing move no task
    boundary. ``E`` is non-decreasing; the last entry is the total stream length.
    """
    rows = [list(b) for b in boundaries]
    if not rows:
        return []
    n_tasks = len(rows[0])
    if any(len(r) != n_tasks for r in rows):
        raise ValueError("every client's stream must have the same number of tasks")
    return [int(sum(r[t] for r in rows)) for t in range(n_tasks)]


def crossed(before: int, after: int, thresholds: Sequence[int]) -> list[int]:
    """Indices ``t`` with ``before < thresholds[t] <= after``: task ends passed by a round that
    moved the federation's sample count from ``before`` to ``after``."""
    return [t for t, e in enumerate(thresholds) if before < e <= after]


def periodic_points(before: int, after: int, period: int) -> list[int]:
    """The multiples ``k * period`` (``k >= 1``) with ``before < k * period <= after``: the anytime
    points a round that moved the federation's sample count from ``before`` to ``after`` reached,
    none skipped however many it passed. Stateless, so a resumed run evaluates where an
    uninterrupted one would."""
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be an int >= 1, got {period!r}")
    return [k * period for k in range(before // period + 1, after // period + 1)]


def periodic_due(before: int, after: int, period: int) -> bool:
    """Whether the round reached at least one anytime point (:func:`periodic_points`)."""
    return bool(periodic_points(before, after, period))


def auto_eval_period(total_samples: int, points: int = AUTO_EVAL_POINTS) -> int:
    """``stream.eval_period = "auto"``: ``ceil(total_samples / points)`` (at least 1), so the
    federation's whole stream gives at most ``points`` anytime points (the samples after the
    last multiple are measured only by the final evaluation), whatever the dataset's size:
    MVP's 1,000 samples on CIFAR-100's 50,000, scaled."""
    return max(1, math.ceil(int(total_samples) / points))
