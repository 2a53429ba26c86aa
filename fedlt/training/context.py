"""The contexts training builds: a client-round's :class:`ClientContext`, a model build's
:class:`SetupContext`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlt.base.seeding import torch_generator
from fedlt.hooks.context import ClientContext, SetupContext
from fedlt.hooks.recipe import LocalTraining

__all__ = ["client_context", "setup_context"]


def setup_context(
    scenario: Any, data: Any, device: torch.device, run_dir: Path | None = None
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
        recipe=LocalTraining.from_scenario(scenario),
    )


def client_context(
    scenario: Any,
    data: Any,
    task: Any,
    device: torch.device,
    recipe: LocalTraining,
    streaming: bool | None = None,
    purpose: str = "client",
) -> ClientContext:
    """The context of one client-round; its generator is seeded from (seed, ``purpose``, round, client).

    ``task.indices`` (a stream slice, or what a client has read so far for personalisation)
    replaces the client's full index set when given; ``streaming`` says whether the round reads
    a stream (default: when ``task.indices`` is given and the scenario has a stream).
    ``purpose`` names the generator's stream: ``"client"`` for training, another name (e.g.
    ``"personalize"``) where the same client and round must not replay training's draws.
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
        generator=torch_generator(
            scenario.seed,
            purpose,
            task.round,
            task.client_id,
            *(("dispatch", task.dispatch) if task.dispatch else ()),
        ),
        online_iter=scenario.stream.online_iter if streaming else None,
        dispatch=task.dispatch,
    )
