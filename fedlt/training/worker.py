"""A client trainer with a resident model: what every engine runs, in-process or on a worker.

The model is built once and reused for every client: the global weights are copied into it in
place, never re-constructed, and the weights it returns are its live tensors. The plugins' client
side is a fresh instance per client-round (:meth:`HookSet.for_client`), so a client trained here
behaves exactly as one trained on any other engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.base.seeding import seed_torch, torch_generator
from fedlt.data.federated import FederatedData
from fedlt.hooks.context import ClientContext, SetupContext
from fedlt.hooks.dispatch import HookSet
from fedlt.hooks.recipe import LocalTraining
from fedlt.models import build_model
from fedlt.training.client import ClientResult, ClientTask, train_client

__all__ = ["ClientTrainer", "aggregated_keys", "build_run_model", "client_context", "setup_context"]


def setup_context(
    scenario: Any, data: FederatedData, device: torch.device, run_dir: Path | None = None
) -> SetupContext:
    return SetupContext(
        seed=scenario.seed,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        n_clients=data.n_clients,
        n_rounds=scenario.federation.rounds,
        device=device,
        global_class_counts=data.train_class_counts,
        generator=torch_generator(scenario.seed, "configure-model"),
        run_dir=run_dir,
    )


def client_context(
    scenario: Any,
    data: FederatedData,
    task: ClientTask,
    device: torch.device,
    recipe: LocalTraining,
    streaming: bool | None = None,
) -> ClientContext:
    """The context of one client-round; its generator is seeded from (seed, round, client).

    ``task.indices`` (a stream slice, or what a client has read so far for personalisation)
    replaces the client's full index set when given; ``streaming`` says whether the round reads
    a stream (default: when ``task.indices`` is given and the scenario has a stream).
    """
    if task.indices is not None:
        idx = torch.as_tensor(task.indices, dtype=torch.long, device=data.x_train.device)
        counts = np.array(task.seen_counts, dtype=np.int64, copy=True)
    else:
        idx = data.client_tensor(task.client_id)
        counts = data.client_counts[task.client_id].copy()
    if streaming is None:
        streaming = task.indices is not None and scenario.stream.kind != "none"
    return ClientContext(
        client_id=task.client_id,
        round=task.round,
        n_rounds=scenario.federation.rounds,
        seed=scenario.seed,
        num_classes=data.num_classes,
        config=task.config,
        local_class_counts=counts,
        global_class_counts=data.train_class_counts,
        indices=idx,
        labels=data.y_train.index_select(0, idx),
        x_train=data.x_train,
        y_train=data.y_train,
        batch_size=recipe.batch_size,
        local_epochs=recipe.local_epochs,
        local_steps=recipe.local_steps,
        device=device,
        generator=torch_generator(scenario.seed, "client", task.round, task.client_id),
        online_iter=scenario.stream.online_iter if streaming else None,
    )


def build_run_model(scenario: Any, data: FederatedData, hooks: HookSet, device: torch.device) -> nn.Module:
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
    """Trains any client of the run on one resident model."""

    def __init__(self, scenario: Any, data: FederatedData, hooks: HookSet, device: torch.device) -> None:
        self.scenario = scenario
        self.data = data
        self.hooks = hooks
        self.device = device
        self.recipe = LocalTraining.from_scenario(scenario)
        self.model = build_run_model(scenario, data, hooks, device)
        self.keys = aggregated_keys(self.model)
        state = self.model.state_dict()
        self._targets = [state[k] for k in self.keys]
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]

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
        ``on_step(done, total)`` reports progress inside the client-round (see ``train_client``)."""
        self.load_global(global_state)
        seed_torch(self.scenario.seed, "torch", task.round, task.client_id)
        ctx = client_context(self.scenario, self.data, task, self.device, self.recipe)
        hooks = self.hooks.for_client(task.client_id, task.round, task.states)
        stream_labels = self.data.y_train_np[task.indices] if ctx.online_iter is not None else None
        total, n_steps, payloads = train_client(
            self.model, ctx, hooks, self.recipe, self._trainable, stream_labels, on_step
        )
        # One host sync per client-round. Adding 0 * (sum of the new weights) makes the loss
        # non-finite when the weights diverged after the last step, so the run stops either way.
        weight_sum = torch.stack([t.sum() for t in self._targets]).sum()
        loss = float(total + 0.0 * weight_sum) / max(n_steps, 1)
        weights = dict(zip(self.keys, self._targets, strict=True))
        return ClientResult(task.client_id, weights, ctx.n_samples, loss, n_steps, payloads, task.states)
