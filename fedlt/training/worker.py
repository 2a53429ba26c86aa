"""A client trainer with a resident model: what every engine runs, in-process or on a worker.

The model is built once and reused for every client: the global weights are copied into it in
place, never re-constructed, and the weights it returns are its live tensors. Each client is one
:class:`~fedlt.training.round.ClientRound` (fresh plugin instances, seeded generator) driven by a
:class:`~fedlt.training.serial.SerialUpdate`, so a client trained here behaves exactly as one
trained on any other engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fedlt.base.seeding import seed_torch
from fedlt.hooks.dispatch import HookSet
from fedlt.hooks.recipe import LocalTraining
from fedlt.models import build_model
from fedlt.training.context import setup_context
from fedlt.training.round import ClientResult, ClientRound, ClientTask, TrainingSetup, drive
from fedlt.training.serial import SerialUpdate

__all__ = ["DTYPES", "ClientTrainer", "aggregated_keys", "build_run_model", "engine_dtype"]

#: ``engine.dtype``: the autocast dtype of each training step ("float32": no autocast).
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def engine_dtype(scenario: Any) -> torch.dtype | None:
    """``engine.dtype`` as the autocast dtype of training steps (None: float32, no autocast)."""
    return DTYPES[scenario.engine.dtype]


def build_run_model(scenario: Any, data: Any, hooks: HookSet, device: torch.device) -> nn.Module:
    """The scenario's model, initialised from the seed and configured by the plugins.

    Every process builds the identical model, so frozen parameters agree without being sent.
    """
    seed_torch(scenario.seed, "model-init")
    model = build_model(scenario.model.name, data.input_shape, data.num_classes, **scenario.model.params())
    model.to(device)
    if hooks.configure_model:
        hooks.configure_model(model=model, ctx=setup_context(scenario, data, device))
    return model


def aggregated_keys(model: nn.Module) -> list[str]:
    """State entries that training changes: trainable parameters and floating-point buffers."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return [k for k, v in model.state_dict().items() if k not in frozen and v.is_floating_point()]


class ClientTrainer:
    """Trains any client of the run on one resident model (``model``, or one built here)."""

    def __init__(
        self, scenario: Any, data: Any, hooks: HookSet, device: torch.device, model: nn.Module | None = None
    ) -> None:
        self.scenario = scenario
        self.data = data
        self.hooks = hooks
        self.device = device
        recipe = LocalTraining.from_scenario(scenario)
        self.setup = TrainingSetup(scenario, data, hooks, device, recipe, engine_dtype(scenario))
        self.model = build_run_model(scenario, data, hooks, device) if model is None else model
        self.keys = aggregated_keys(self.model)
        state = self.model.state_dict()
        self._targets = [state[k] for k in self.keys]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

    @property
    def recipe(self) -> LocalTraining:
        """The run's local recipe (before any plugin's ``client_configure_training``)."""
        return self.setup.recipe

    @recipe.setter
    def recipe(self, recipe: LocalTraining) -> None:
        self.setup = dataclasses.replace(self.setup, recipe=recipe)

    @torch.no_grad()
    def load_global(self, global_state: Mapping[str, torch.Tensor]) -> None:
        for dst, key in zip(self._targets, self.keys, strict=True):
            dst.copy_(global_state[key])

    def run(
        self,
        task: ClientTask,
        global_state: Mapping[str, torch.Tensor],
        on_step: Callable[[int, int], None] | None = None,
    ) -> ClientResult:
        """Train one client from the global weights; the returned weights are live tensors.
        ``on_step(done, total)`` reports progress inside the client-round (see :func:`drive`)."""
        self.load_global(global_state)
        client = ClientRound(self.setup, task)
        client.begin(self.model)
        drive([client], SerialUpdate(self.model, client, self.trainable), on_step)
        payloads = client.end(self.model)
        return client.result(
            dict(zip(self.keys, self._targets, strict=True)), self.finish_loss(client), payloads
        )

    def finish_loss(self, client: ClientRound) -> float:
        """The client's mean step loss: one host sync per client-round. Adding 0 * (sum of the new
        weights) makes it non-finite when the weights diverged after the last step, so the run
        stops either way."""
        weight_sum = torch.stack([t.sum() for t in self._targets]).sum()
        return float(client.total + 0.0 * weight_sum) / max(len(client.plan), 1)
