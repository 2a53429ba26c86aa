"""The steps of a client-round: which samples each optimizer step trains on, decided up front.

Offline, a sampler's order (``client_select_indices``) or a fresh permutation per local epoch,
cut into batches; in a stream, the round's slice in stream order, each batch repeated
``online_iter`` times. Everything here draws from the client's own generator, so a plan depends
only on (seed, round, client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlt.hooks.context import ClientContext

__all__ = ["Step", "default_order", "plan_steps"]


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


def _check_order(order: torch.Tensor, ctx: ClientContext, hooks: Any) -> None:
    """A sampler may only draw from the client's own samples."""
    if order.numel() and not bool(torch.isin(order.to(ctx.indices.device), ctx.indices).all()):
        hook = hooks.client_select_indices
        raise hook.error(
            hook.plugin_names[0] if len(hook.plugin_names) == 1 else "/".join(hook.plugin_names),
            "returned indices that are not the client's own samples (draw from ctx.indices)",
        )


def plan_steps(ctx: ClientContext, hooks: Any, stream_labels: np.ndarray | None) -> list[Step]:
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
