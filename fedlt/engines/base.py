"""The engine interface: train this round's clients from the global weights, yield results.

Results are yielded one at a time so the server aggregates while clients are still training
and memory does not grow with the number of clients per round. Engines yield in task order, so
floating-point aggregation order, and therefore results, do not depend on the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedlt.data.federated import FederatedData
from fedlt.hooks.dispatch import HookSet
from fedlt.prepare import Prepared
from fedlt.training.round import ClientResult, ClientTask

if TYPE_CHECKING:
    from fedlt.scenario.config import Scenario

__all__ = ["Engine"]


class Engine(ABC):
    """Trains clients. Built once per run from the run's :class:`~fedlt.prepare.Prepared` (its
    typed scenario, data, plugins and device); ``close`` releases workers."""

    name: str = ""
    #: Progress inside a round, ``on_step(task index, steps done, steps of that client)``: set by
    #: the runner when it shows a progress bar; engines that train in-process report through it.
    on_step: Callable[[int, int, int], None] | None = None

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.scenario: Scenario = prepared.scenario
        self.data: FederatedData = prepared.data
        self.hooks: HookSet = prepared.hooks
        self.device: torch.device = prepared.device

    @abstractmethod
    def train_round(
        self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        """Train each task's client from ``global_state`` (the entries clients train); yield results
        in task order.

        A result's ``weights`` may be live tensors valid only until the next result is requested.
        """

    def round_report(self) -> dict[str, Any]:
        """How the last round's clients were trained, for the run's summary: at least
        ``vectorized`` (bool) and ``why`` (the setting or the reason that decided it)."""
        return {"vectorized": False, "why": f"engine.kind = {self.name!r} trains one client per task"}

    def close(self) -> None:  # noqa: B027 - optional override; the serial engine holds nothing
        """Release workers and resources."""
