"""The engine interface: train this round's clients from the global weights, yield results.

Results are yielded one at a time so the server aggregates while clients are still training
and memory does not grow with the number of clients per round. Engines yield in task order, so
floating-point aggregation order, and therefore results, do not depend on the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fedlt.client import ClientResult, ClientTask
from fedlt.data.federated import FederatedData
from fedlt.errors import ScenarioError
from fedlt.pluginmanager import HookSet

__all__ = ["Engine", "make_engine"]


class Engine(ABC):
    """Trains clients. Built once per run; ``close`` releases workers."""

    name: str = ""

    def __init__(self, scenario: Any, data: FederatedData, hooks: HookSet, device: torch.device) -> None:
        self.scenario = scenario
        self.data = data
        self.hooks = hooks
        self.device = device

    @abstractmethod
    def train_round(
        self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        """Train each task's client from ``global_state``; yield results in task order.

        A result's ``weights`` may be live tensors valid only until the next result is requested.
        """

    def close(self) -> None:  # noqa: B027 - optional override; the serial engine holds nothing
        """Release workers and resources."""


def make_engine(scenario: Any, data: FederatedData, hooks: HookSet, device: torch.device) -> Engine:
    """The engine the scenario's ``[engine] kind`` names."""
    kind = scenario.engine.kind
    if kind == "ray":
        try:
            from fedlt.engines.ray_engine import RayEngine
        except ImportError as exc:
            raise ScenarioError(
                "engine.kind",
                kind,
                "an engine whose dependencies are installed",
                hint="Install the extra: pip install 'fedlt[ray]'.",
            ) from exc
        return RayEngine(scenario, data, hooks, device)
    if kind == "flower":
        try:
            from fedlt.engines.flower_engine import FlowerEngine
        except ImportError as exc:
            raise ScenarioError(
                "engine.kind",
                kind,
                "an engine whose dependencies are installed",
                hint="Install the extra: pip install 'fedlt[flower]'.",
            ) from exc
        return FlowerEngine(scenario, data, hooks, device)
    from fedlt.engines.serial import SerialEngine

    return SerialEngine(scenario, data, hooks, device)
