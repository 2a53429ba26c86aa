"""The default engine: every client trained in this process on one resident model."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fedlt.base.allocator import keep_freed_memory
from fedlt.data.federated import FederatedData
from fedlt.engines.base import Engine
from fedlt.hooks.dispatch import HookSet
from fedlt.training.client import ClientResult, ClientTask
from fedlt.training.worker import ClientTrainer

__all__ = ["SerialEngine"]


class SerialEngine(Engine):
    """One process, one model reused for all clients, data resident on the device."""

    name = "serial"

    def __init__(self, scenario: Any, data: FederatedData, hooks: HookSet, device: torch.device) -> None:
        super().__init__(scenario, data, hooks, device)
        keep_freed_memory()
        if isinstance(scenario.engine.threads, int):
            torch.set_num_threads(scenario.engine.threads)
        self.trainer = ClientTrainer(scenario, data, hooks, device)

    def train_round(
        self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        for i, task in enumerate(tasks):
            report = None if self.on_step is None else functools.partial(self.on_step, i)
            yield self.trainer.run(task, global_state, report)
