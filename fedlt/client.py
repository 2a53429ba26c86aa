"""Local training of one client for one round: the per-batch hot path.

Everything that can be settled per client-round is settled before the batch loop (which hooks
are implemented, the optimizer, the sample order), so the loop body is one line per step and
calls a hook only when some plugin implements it. The only host sync is at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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

    order = hooks.client_select_indices.first(ctx=ctx, states=states) if hooks.client_select_indices else None
    if order is None:
        order = default_order(ctx)
    bs = recipe.batch_size
    n_steps = -(-order.numel() // bs)
    if recipe.local_steps is not None:
        n_steps = min(n_steps, recipe.local_steps)

    # Settle per-batch dispatch once: a None means "no plugin implements it".
    forward = hooks.client_forward or None
    transform = hooks.client_transform_logits or None
    loss_hook = hooks.client_loss or None
    weights_hook = hooks.client_sample_weights or None
    extra_hook = hooks.client_extra_losses or None
    after_backward = hooks.client_after_backward or None
    augment = recipe.augment == "crop-flip"
    x_all, y_all = ctx.x_train, ctx.y_train
    total = torch.zeros((), device=ctx.device)

    n_local = max(ctx.n_samples, 1)
    for step in range(n_steps):
        ctx.step, ctx.epoch = step, step * bs // n_local
        idx = order[step * bs : (step + 1) * bs]
        x, y = x_all[idx], y_all[idx]
        if augment:
            x = crop_flip(x, ctx.generator)
        # forward: features and logits
        out = forward.first(model=model, x=x, ctx=ctx, states=states) if forward else None
        if out is None:
            h = model.features(x)
            z = model.head(h)
        else:
            h, z = out
        if transform:
            z = transform.chain("logits", logits=z, features=h, y=y, ctx=ctx, states=states)
        # loss: per-sample loss x per-sample weights, plus extra losses
        if loss_hook:
            per_sample = loss_hook.first(logits=z, y=y, features=h, ctx=ctx, states=states)
            if per_sample is None:
                per_sample = F.cross_entropy(z, y, reduction="none")
            if weights_hook:
                w = weights_hook.product(logits=z, y=y, features=h, ctx=ctx, states=states)
                per_sample = per_sample if w is None else per_sample * w
            loss = per_sample.mean()
        elif weights_hook:
            w = weights_hook.product(logits=z, y=y, features=h, ctx=ctx, states=states)
            per_sample = F.cross_entropy(z, y, reduction="none")
            loss = (per_sample if w is None else per_sample * w).mean()
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

    payloads: dict[str, Any] = {}
    if hooks.client_end:
        for name, payload in hooks.client_end.all(model=model, ctx=ctx, states=states):
            if payload is not None:
                payloads[name] = payload
    return total, n_steps, payloads
