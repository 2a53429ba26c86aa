"""The one definition of a training batch's loss, for one client or, under vmap, many.

``forward`` (``client_forward`` or features then head) → ``client_transform_logits`` → the
per-sample loss (``client_loss`` or cross-entropy) times the sample weights, normalised by the
class weights' sum (weighted cross-entropy) or the batch size → plus ``client_extra_losses``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.hooks.dispatch import as_forward

__all__ = ["batch_loss"]


def batch_loss(model: nn.Module, hooks: Any, ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One batch's loss.

    ``hooks[name]`` gives each per-batch hook (falsy when no plugin implements it):
    ``client_forward``, ``client_transform_logits``, ``client_loss``, ``client_sample_weights``,
    ``client_class_weights`` and ``client_extra_losses``. The serial step calls it with a client's
    :class:`~fedlt.hooks.dispatch.ClientHooks`; the vectorized step under vmap (one client's
    slice of every tensor) with the hooks of that call's plugin views.
    """
    forward = hooks["client_forward"] or None
    transform = hooks["client_transform_logits"] or None
    loss_hook = hooks["client_loss"] or None
    sample_weights = hooks["client_sample_weights"] or None
    class_weights = hooks["client_class_weights"] or None
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
