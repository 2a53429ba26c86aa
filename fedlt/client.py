"""Local training of one client for one round: the per-batch hot path.

Everything that can be settled per client-round is settled before the batch loop (which hooks
are implemented, the optimizer, the sample order), so the loop body is one line per step and
calls a hook only when some plugin implements it. The only host sync is at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.augment import crop_flip
from fedlt.context import ClientContext
from fedlt.pluginmanager import HookSet

__all__ = ["ClientResult", "ClientTask", "LocalTraining", "train_client"]


@dataclass
class ClientTask:
    """What an engine needs to train one client in one round (picklable)."""

    client_id: int
    round: int
    config: Mapping[str, Any]
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Continual scenarios: this round's slice of the client's stream, and the class counts it
    #: has seen so far (this slice included). ``None`` offline.
    indices: np.ndarray | None = None
    seen_counts: np.ndarray | None = None


@dataclass
class ClientResult:
    """What comes back: weights to aggregate, sample count, payloads, the client's new state."""

    client_id: int
    weights: Mapping[str, torch.Tensor]
    n_samples: int
    loss: float
    n_steps: int
    payloads: dict[str, Any]
    states: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class LocalTraining:
    """The local optimisation recipe, from the scenario's ``[train]`` table."""

    local_epochs: int
    local_steps: int | None
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    max_grad_norm: float | None
    augment: str

    @classmethod
    def from_scenario(cls, scenario: Any) -> LocalTraining:
        t = scenario.train
        return cls(
            t.local_epochs,
            t.local_steps,
            t.batch_size,
            t.optimizer,
            t.lr,
            t.momentum,
            t.weight_decay,
            t.max_grad_norm,
            scenario.data.augment,
        )

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def default_order(ctx: ClientContext) -> torch.Tensor:
    """A fresh permutation of the client's indices per local epoch (or enough for ``local_steps``)."""
    n = ctx.indices.numel()
    if ctx.local_steps is not None:
        epochs = -(-ctx.local_steps * ctx.batch_size // max(n, 1))
    else:
        epochs = ctx.local_epochs
    perms = [
        ctx.indices[torch.randperm(n, generator=ctx.generator, device="cpu").to(ctx.indices.device)]
        for _ in range(epochs)
    ]
    return torch.cat(perms) if len(perms) > 1 else perms[0]


def _batch_plan(
    ctx: ClientContext, hooks: HookSet, recipe: LocalTraining, states
) -> list[tuple[torch.Tensor, bool]]:
    """The round's steps as (batch indices, ends a stream batch) pairs.

    Offline: consecutive batches of the sampler's order (``client_select_indices`` or a fresh
    permutation per epoch), at most ``local_steps``. Stream: the round's chunk in stream order,
    each batch repeated ``online_iter`` times; the last repeat ends the batch (memory update).
    """
    bs = recipe.batch_size
    if ctx.online_iter is not None:
        chunk = ctx.indices
        plan = []
        for start in range(0, chunk.numel(), bs):
            batch = chunk[start : start + bs]
            plan.extend((batch, i == ctx.online_iter - 1) for i in range(ctx.online_iter))
        return plan
    order = hooks.client_select_indices.first(ctx=ctx, states=states) if hooks.client_select_indices else None
    if order is None:
        order = default_order(ctx)
    n_steps = -(-order.numel() // bs)
    if recipe.local_steps is not None:
        n_steps = min(n_steps, recipe.local_steps)
    return [(order[i * bs : (i + 1) * bs], False) for i in range(n_steps)]


def train_client(
    model: nn.Module,
    ctx: ClientContext,
    hooks: HookSet,
    recipe: LocalTraining,
    states: dict[str, dict[str, Any]],
    trainable: list[torch.Tensor],
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Train ``model`` in place on the client described by ``ctx``.

    Returns the summed loss (a tensor, not synced), the number of optimizer steps, and the
    plugins' ``client_end`` payloads by plugin name.
    """
    model.train()
    if hooks.client_start:
        hooks.client_start.all(model=model, ctx=ctx, states=states)
    params = list(trainable)
    if hooks.client_trainable_parameters:
        for _, extra in hooks.client_trainable_parameters.all(model=model, ctx=ctx, states=states):
            params.extend(extra or ())
    opt = recipe.make_optimizer(params)
    plan = _batch_plan(ctx, hooks, recipe, states)

    # Settle per-batch dispatch once: a None means "no plugin implements it".
    streaming = ctx.online_iter is not None
    replay = hooks.client_replay_indices if streaming and hooks.client_replay_indices else None
    update_memory = hooks.client_update_memory if streaming and hooks.client_update_memory else None
    forward = hooks.client_forward or None
    transform = hooks.client_transform_logits or None
    loss_hook = hooks.client_loss or None
    weights_hook = hooks.client_sample_weights or None
    extra_hook = hooks.client_extra_losses or None
    after_backward = hooks.client_after_backward or None
    augment = recipe.augment == "crop-flip"
    x_all, y_all = ctx.x_train, ctx.y_train
    total = torch.zeros((), device=ctx.device)
    n_local, bs = max(ctx.n_samples, 1), recipe.batch_size

    for step, (batch, ends_batch) in enumerate(plan):
        ctx.step, ctx.epoch = step, step * bs // n_local
        # data: the batch, plus replayed samples in a stream
        idx = batch
        if replay:
            extra_idx = replay.concat(batch=batch, ctx=ctx, states=states)
            if extra_idx is not None and extra_idx.numel():
                idx = torch.cat([batch, extra_idx.to(batch.device)])
        # index_select is several times faster than advanced indexing (x_all[idx]) for a row gather
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
        if augment:
            x = crop_flip(x, ctx.generator)
        # forward: features and logits
        out = forward.first(model=model, x=x, y=y, ctx=ctx, states=states) if forward else None
        if out is None:
            h = model.features(x)
            z = model.head(h)
        else:
            h, z = out
        if transform:
            z = transform.chain("logits", logits=z, features=h, y=y, model=model, ctx=ctx, states=states)
        # loss: per-sample loss x per-sample weights, plus extra losses
        if loss_hook or weights_hook:
            per_sample = (
                loss_hook.first(logits=z, y=y, features=h, ctx=ctx, states=states) if loss_hook else None
            )
            if per_sample is None:
                per_sample = F.cross_entropy(z, y, reduction="none")
            if weights_hook:
                w = weights_hook.product(logits=z, y=y, features=h, ctx=ctx, states=states)
                per_sample = per_sample if w is None else per_sample * w
            loss = per_sample.mean()
        else:
            loss = F.cross_entropy(z, y)
        if extra_hook:
            extra = extra_hook.sum(model=model, x=x, y=y, features=h, logits=z, ctx=ctx, states=states)
            if extra is not None:
                loss = loss + extra
        # backward and step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward:
            after_backward.all(model=model, ctx=ctx, states=states)
        if recipe.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        opt.step()
        total += loss.detach()
        # memory: a stream batch is consumed once its online_iter steps are done
        if ends_batch and update_memory:
            update_memory.all(batch=batch, ctx=ctx, states=states)

    payloads: dict[str, Any] = {}
    if hooks.client_end:
        for name, payload in hooks.client_end.all(model=model, ctx=ctx, states=states):
            if payload is not None:
                payloads[name] = payload
    return total, len(plan), payloads
