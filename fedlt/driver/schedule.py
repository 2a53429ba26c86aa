"""When a round is evaluated, and how: the evaluation schedule of a run.

Offline: every ``federation.eval_every`` rounds and after the last. In a stream, an anytime
evaluation also after every round during which the federation's read-sample count reached a
multiple ``k P`` of the period ``P = stream.eval_period`` (one A_auc point per multiple reached:
the accuracy of the global model that round produced, the first one trained on sample ``k P``),
at the federation's task ends (by samples read), and when every stream is exhausted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlt.metrics.continual import auto_eval_period, crossed, periodic_points

__all__ = ["Due", "EvalSchedule", "memory_class_counts", "resolve_eval_period"]


@dataclass(frozen=True)
class Due:
    """An evaluation a round is due for.

    Attributes
    ----------
    full : bool
        The imbalance metrics on the whole test set (and personalised accuracy).
    anytime : bool
        The anytime accuracy on the classes exposed so far (streams).
    periodic : bool
        This anytime evaluation is one of the periodic ones (it counts in A_auc).
    points : list of int
        The multiples ``k P`` of the sample period the round reached (A_auc points; empty if none).
    task_end : list of int
        The federation's task ends the round crossed.
    last : bool
        The run's last evaluation (last round, or every stream exhausted).
    samples_seen : int
        Stream samples the federation had read after the round.
    """

    full: bool
    anytime: bool
    periodic: bool = False
    task_end: list[int] = field(default_factory=list)
    last: bool = False
    samples_seen: int = 0
    points: list[int] = field(default_factory=list)


class EvalSchedule:
    """Which rounds are evaluated, and how (see the module docstring).

    Parameters
    ----------
    scenario : Scenario
        Its ``federation.eval_every``, ``federation.rounds``, ``stream.eval_period``.
    task_ends : sequence of int
        The federation's task ends, in stream samples read (empty offline); the last is the
        length of the federation's whole stream, from which ``eval_period = "auto"`` is derived.
    streaming : bool
        Whether the run reads streams.

    Attributes
    ----------
    period : int or None
        The sample period ``P`` in force (``"auto"`` resolved; None offline).
    """

    def __init__(self, scenario: Any, task_ends: Sequence[int], streaming: bool) -> None:
        self.every = scenario.federation.eval_every
        self.rounds = scenario.federation.rounds
        self.task_ends = list(task_ends)
        self.streaming = streaming
        self.period = resolve_eval_period(scenario.stream.eval_period, self.task_ends) if streaming else None

    def due(self, round: int, before: int, after: int, exhausted: bool) -> Due | None:
        """The evaluation round ``round`` is due for (None: none); ``before`` / ``after`` are the
        stream samples the federation had read before and after it."""
        last = exhausted or round == self.rounds
        full = last or (self.every > 0 and round % self.every == 0)
        if not self.streaming:
            return Due(full, False, last=last) if full else None
        assert self.period is not None
        points = periodic_points(before, after, self.period)
        task_end = crossed(before, after, self.task_ends)
        anytime = bool(points) or bool(task_end) or last
        if not full and not anytime:
            return None
        return Due(full, anytime, bool(points), task_end, last, after, points)


def resolve_eval_period(eval_period: int | str, task_ends: Sequence[int]) -> int:
    """``stream.eval_period`` as a sample count: an int as given, ``"auto"``
    (:func:`~fedlt.metrics.continual.auto_eval_period`) from the federation's whole stream."""
    if eval_period == "auto":
        return auto_eval_period(task_ends[-1] if task_ends else 0)
    return int(eval_period)


def memory_class_counts(hooks: Any, client_states: Mapping[int, Mapping[str, Any]], num_classes: int) -> dict:
    """``{"memory_class_counts": {plugin: {client: counts}}}``: what each client's replay memory
    holds, per class, from the plugins implementing ``eval_client_memory`` (``{}`` when none does
    or no client has a memory yet). Recorded with every evaluation of a stream, so the memory's
    class make-up can be followed over time."""
    if not hooks.eval_client_memory:
        return {}
    out: dict[str, dict[str, list[int]]] = {}
    for client in sorted(client_states):
        found = hooks.eval_client_memory(state=client_states[client], num_classes=num_classes)
        for plugin, result in found.items():
            counts = [int(n) for n in result.get("class_counts") or []]
            if len(counts) != num_classes or min(counts, default=0) < 0:
                raise hooks.eval_client_memory.error(
                    plugin,
                    f"returned class_counts of length {len(counts)}; expected {num_classes} counts >= 0",
                )
            out.setdefault(plugin, {})[str(client)] = counts
    return {"memory_class_counts": out} if out else {}
