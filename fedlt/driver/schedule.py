"""When a round is evaluated, and how: the evaluation schedule of a run.

Offline: every ``federation.eval_every`` rounds and after the last. In a stream, an anytime
evaluation also each time the federation has read another ``stream.eval_period`` samples, at
the federation's task ends (by samples read), and when every stream is exhausted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlt.metrics.continual import crossed, periodic_due

__all__ = ["Due", "EvalSchedule"]


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


class EvalSchedule:
    """Which rounds are evaluated, and how (see the module docstring).

    Parameters
    ----------
    scenario : Scenario
        Its ``federation.eval_every``, ``federation.rounds``, ``stream.eval_period``.
    task_ends : sequence of int
        The federation's task ends, in stream samples read (empty offline).
    streaming : bool
        Whether the run reads streams.
    """

    def __init__(self, scenario: Any, task_ends: Sequence[int], streaming: bool) -> None:
        self.every = scenario.federation.eval_every
        self.rounds = scenario.federation.rounds
        self.period = scenario.stream.eval_period
        self.task_ends = list(task_ends)
        self.streaming = streaming

    def due(self, round: int, before: int, after: int, exhausted: bool) -> Due | None:
        """The evaluation round ``round`` is due for (None: none); ``before`` / ``after`` are the
        stream samples the federation had read before and after it."""
        last = exhausted or round == self.rounds
        full = last or (self.every > 0 and round % self.every == 0)
        if not self.streaming:
            return Due(full, False, last=last) if full else None
        periodic = periodic_due(before, after, self.period)
        task_end = crossed(before, after, self.task_ends)
        anytime = periodic or bool(task_end) or last
        if not full and not anytime:
            return None
        return Due(full, anytime, periodic, task_end, last, after)
