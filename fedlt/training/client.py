"""Local training of one client for one round: the per-batch hot path.

Everything that can be settled per client-round is settled before the batch loop (which hooks
are implemented, the recipe, the optimizer, the sample order), so the loop body is one line per
step and calls a hook only when some plugin implements it. The only host sync is at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.hooks.context import ClientContext
from fedlt.hooks.dispatch import ClientHooks, as_forward
from fedlt.hooks.recipe import LocalTraining
from fedlt.training.augment import crop_flip
from fedlt.training.optim import make_local_optimizer

__all__ = ["ClientResult", "ClientTask", "LocalTraining", "batch_loss", "default_order", "train_client"]


@dataclass
class ClientTask:
    """What an engine needs to train one client in one round (plain data, sent to workers).

    Attributes
    ----------
    client_id, round : int
        Who and when.
    config : Mapping
        The client's config: the round config merged with its per-client config.
    states : dict
        Each plugin's per-client state, by plugin name (updated in place by training).
    indices : np.ndarray or None
        Continual scenarios: this round's slice of the client's stream; ``None`` offline.
    seen_counts : np.ndarray or None
        Continual scenarios: class counts of what the client read *before* this slice.
    """

    client_id: int
    round: int
    config: Mapping[str, Any]
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
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


@dataclass(slots=True)
class Step:
    """One optimizer step of the plan: the batch, and where it stands in a stream."""

    batch: torch.Tensor
    #: Stream: the class counts of a batch that arrives at this step (its first step), else None.
    arrives: np.ndarray | None = None
    #: Stream: this is the batch's last step (its memory update follows).
    ends_batch: bool = False


def _check_order(order: torch.Tensor, ctx: ClientContext, hooks: ClientHooks) -> None:
    """A sampler may only draw from the client's own samples."""
    if order.numel() and not bool(torch.isin(order.to(ctx.indices.device), ctx.indices).all()):
        hook = hooks.client_select_indices
        raise hook.error(
            hook.plugin_names[0] if len(hook.plugin_names) == 1 else "/".join(hook.plugin_names),
            "returned indices that are not the client's own samples (draw from ctx.indices)",
        )


def plan_steps(ctx: ClientContext, hooks: ClientHooks, stream_labels: np.ndarray | None) -> list[Step]:
    """The round's steps.

    Offline: consecutive batches of the sampler's order (``client_select_indices`` or a fresh
    permutation per epoch), at most ``local_steps``. Stream: the round's slice in stream order,
    each batch repeated ``online_iter`` times; its first step says the batch arrives (with its
    class counts, from ``stream_labels``, the slice's labels on the host), its last ends it.
    """
    bs = ctx.batch_size
    if ctx.online_iter is not None:
        chunk = ctx.indices
        steps = []
        for start in range(0, chunk.numel(), bs):
            batch = chunk[start : start + bs]
            counts = np.bincount(stream_labels[start : start + bs], minlength=ctx.num_classes)
            for i in range(ctx.online_iter):
                steps.append(Step(batch, counts if i == 0 else None, i == ctx.online_iter - 1))
        return steps
    order = hooks.client_select_indices(ctx=ctx) if hooks.client_select_indices else None
    if order is None:
        order = default_order(ctx)
    else:
        _check_order(order, ctx, hooks)
    n_steps = -(-order.numel() // bs)
    if ctx.local_steps is not None:
        n_steps = min(n_steps, ctx.local_steps)
    return [Step(order[i * bs : (i + 1) * bs]) for i in range(n_steps)]


def batch_loss(model: nn.Module, hooks: Any, ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One batch's loss: forward (``client_forward`` or features then head), logit transforms,
    the per-sample loss times sample weights, class weights normalised by their sum, extra losses.

    The one definition of the training loss: ``train_client`` calls it per batch with a client's
    :class:`~fedlt.hooks.dispatch.ClientHooks`; the vectorized engine calls it under vmap (one client's
    slice of every tensor) with hooks bound to the group's stand-in plugin instances.
    ``hooks[name]`` gives each per-batch hook (falsy when no plugin implements it).
    """
    forward = hooks["client_forward"] or None
    transform = hooks["client_transform_logits"] or None
    loss_hook = hooks["client_loss"] or None
    sample_weights = hooks["sample_weights"] or None
    class_weights = hooks["class_weights"] or None
    extra_hook = hooks["client_extra_losses"] or None
    out = forward(model=model, x=x, y=y, ctx=ctx) if forward else None
    if out is None:
        h = head_in = model.features(x)
        z = model.head(h)
    else:
        h, z, head_in = as_forward(out)
    if transform:
        z = transform(logits=z, features=h, head_input=head_in, y=y, model=model, ctx=ctx)
    if loss_hook or sample_weights or class_weights:
        per_sample = None
        if loss_hook:
            per_sample = loss_hook(logits=z, y=y, features=h, head_input=head_in, model=model, ctx=ctx)
        if per_sample is None:
            per_sample = F.cross_entropy(z, y, reduction="none")
        if sample_weights:
            w = sample_weights(logits=z, y=y, features=h, head_input=head_in, model=model, ctx=ctx)
            if w is not None:
                per_sample = per_sample * w
        c = (
            class_weights(logits=z, y=y, features=h, head_input=head_in, model=model, ctx=ctx)
            if class_weights
            else None
        )
        if c is None:
            loss = per_sample.mean()
        else:
            loss = (per_sample * c).sum() / c.sum().clamp_min(torch.finfo(c.dtype).tiny)
    else:
        loss = F.cross_entropy(z, y)
    if extra_hook:
        extra = extra_hook(model=model, x=x, y=y, features=h, head_input=head_in, logits=z, ctx=ctx)
        if extra is not None:
            loss = loss + extra
    return loss


def train_client(
    model: nn.Module,
    ctx: ClientContext,
    hooks: ClientHooks,
    recipe: LocalTraining,
    trainable: list[torch.Tensor],
    stream_labels: np.ndarray | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """Train ``model`` in place on the client described by ``ctx``.

    Returns the summed loss (a tensor, not synced), the number of optimizer steps, and the
    plugins' ``client_end`` payloads by plugin name. ``on_step(done, total)`` (progress display)
    is called at most twice a second, and never when it is ``None``.
    """
    model.train()
    if hooks.client_start:
        hooks.client_start(model=model, ctx=ctx)
    if hooks.client_configure_training:
        recipe = hooks.client_configure_training(recipe=recipe, ctx=ctx)
        ctx.batch_size, ctx.local_epochs, ctx.local_steps = (
            recipe.batch_size,
            recipe.local_epochs,
            recipe.local_steps,
        )
    params = list(trainable)
    if hooks.client_trainable_parameters:
        params.extend(hooks.client_trainable_parameters(model=model, ctx=ctx))
    opt = make_local_optimizer(recipe.optimizer, params, recipe.lr, recipe.momentum, recipe.weight_decay)
    plan = plan_steps(ctx, hooks, stream_labels)

    # Settle per-batch dispatch once: a None means "no plugin implements it".
    streaming = ctx.online_iter is not None
    arrive = hooks.client_stream_batch if streaming and hooks.client_stream_batch else None
    replay = hooks.client_replay_indices if streaming and hooks.client_replay_indices else None
    update_memory = hooks.client_update_memory if streaming and hooks.client_update_memory else None
    after_backward = hooks.client_after_backward or None
    augment = recipe.augment == "crop-flip"
    clip = recipe.max_grad_norm
    x_all, y_all = ctx.x_train, ctx.y_train
    total = torch.zeros((), device=ctx.device)
    n_local, bs = max(ctx.n_samples, 1), ctx.batch_size

    next_report = time.monotonic() + 0.5 if on_step is not None else None
    for step_index, step in enumerate(plan):
        ctx.step, ctx.epoch = step_index, step_index * bs // n_local
        if next_report is not None and time.monotonic() >= next_report:
            on_step(step_index, len(plan))
            next_report = time.monotonic() + 0.5
        batch = step.batch
        # a stream batch arrives: it counts as seen before the first step trains on it
        if step.arrives is not None:
            ctx.local_class_counts += step.arrives
            if arrive:
                arrive(batch=batch, model=model, ctx=ctx)
        # data: the batch, plus replayed samples in a stream
        idx = batch
        if replay:
            extra_idx = replay(batch=batch, ctx=ctx)
            if extra_idx is not None and extra_idx.numel():
                idx = torch.cat([batch, extra_idx.to(batch.device)])
        # index_select is several times faster than advanced indexing (x_all[idx]) for a row gather
        x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
        if augment:
            x = crop_flip(x, ctx.generator)
        # forward, logit transforms, the loss (per-sample x weights, class weights normalised)
        loss = batch_loss(model, hooks, ctx, x, y)
        # backward and step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward:
            after_backward(model=model, ctx=ctx)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        total += loss.detach()
        # memory: a stream batch is consumed once its online_iter steps are done
        if step.ends_batch and update_memory:
            update_memory(batch=batch, ctx=ctx)

    payloads = hooks.client_end(model=model, ctx=ctx) if hooks.client_end else {}
    hooks.check_states()
    return total, len(plan), payloads
