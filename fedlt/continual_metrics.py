"""Anytime-evaluation metrics of online continual learning (Si-Blurry / CLIB).

- ``A_auc``: mean of the anytime accuracies (evaluated every ``eval_period`` on the test samples
  of the classes exposed so far); the normalised area under the accuracy-vs-samples curve, so it
  rewards a model that is good *throughout* the stream, not only at the end.
- ``A_last``: the last anytime accuracy.
- ``A_avg``: mean of the end-of-task accuracies.
- ``F_last``: mean over classes of (best end-of-task accuracy before the final task - final
  accuracy), over the classes that were ever learned (best > 0).

Accuracies may be fractions or percentages; every metric is in the same unit as its input.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from fedlt.errors import ScenarioError

__all__ = ["a_auc", "a_avg", "a_last", "f_last", "task_end_rounds"]


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


def task_end_rounds(n_rounds: int, n_tasks: int) -> list[int]:
    """The (1-based) round at which each task ``t = 0..T-1`` is taken to end.

    In federated continual learning every client walks its own stream: tasks differ in size per
    client (Si-Blurry) and clients train in different rounds, so each crosses its task boundaries
    at a different round and no single round ends "task t" for everyone. End-of-task metrics
    (``A_avg``, ``F_last``) are therefore taken at a global schedule that splits the run into ``T``
    equal spans: task ``t`` ends at round ``ceil((t+1) n_rounds / T)``; the last is ``n_rounds``.

    With more tasks than rounds, several tasks end in the same round (the list is non-decreasing
    rather than strictly increasing); callers that need one row per task still get ``T`` entries.

    Raises
    ------
    ScenarioError
        ``federation.rounds`` or ``stream.n_tasks`` < 1.
    """
    if isinstance(n_rounds, bool) or not isinstance(n_rounds, numbers.Integral) or n_rounds < 1:
        raise ScenarioError("federation.rounds", n_rounds, "an int >= 1")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, numbers.Integral) or n_tasks < 1:
        raise ScenarioError("stream.n_tasks", n_tasks, "an int >= 1")
    return [-(-(t + 1) * int(n_rounds) // int(n_tasks)) for t in range(int(n_tasks))]
