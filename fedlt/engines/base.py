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


#: What each engine needs beyond fedlt's core dependencies: (module to find, extra that installs it).
_ENGINE_NEEDS = {"ray": ("ray", "ray"), "flower": ("flwr", "flower")}


def check_engine_available(kind: str) -> None:
    """Fail before any work when the engine's optional dependencies are missing (nothing imported)."""
    import importlib.util

    if kind not in _ENGINE_NEEDS:
        return
    module, extra = _ENGINE_NEEDS[kind]
    if importlib.util.find_spec(module) is None:
        raise ScenarioError(
            "engine.kind",
            kind,
            "an engine whose dependencies are installed ('serial' always is)",
            hint=f"Install the extra: pip install 'fedlt[{extra}]' (the '{module}' package is missing).",
        )


def make_engine(scenario: Any, data: FederatedData, hooks: HookSet, device: torch.device) -> Engine:
    """The engine the scenario's ``[engine] kind`` names (imported only when asked for)."""
    kind = scenario.engine.kind
    check_engine_available(kind)
    if kind == "ray":
        from fedlt.engines.ray_engine import RayEngine as engine_cls
    elif kind == "flower":
        from fedlt.engines.flower_engine import FlowerEngine as engine_cls
    else:
        from fedlt.engines.serial import SerialEngine as engine_cls
    return engine_cls(scenario, data, hooks, device)
