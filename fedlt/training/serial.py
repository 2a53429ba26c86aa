"""One client's step on one model: autograd, then the local optimizer.

The :class:`~fedlt.training.round.Update` of the serial engine and of every worker (Ray actors,
Flower nodes). Everything else about the client-round is :mod:`fedlt.training.round`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.hooks.context import ClientContext
from fedlt.hooks.dispatch import ClientHooks
from fedlt.hooks.recipe import LocalTraining
from fedlt.training.loss import batch_loss
from fedlt.training.optim import make_local_optimizer
from fedlt.training.round import ClientRound, TrainingSetup, Update, drive

__all__ = ["SerialUpdate", "train_alone"]


class SerialUpdate(Update):
    """Steps of one client on ``model``: forward and loss (under autocast when ``engine.dtype``
    asks, one step at a time), backward, ``client_after_backward``, clipping, the optimizer.

    Parameters
    ----------
    model : nn.Module
        The resident model, holding the client's weights.
    client : ClientRound
        The begun client-round.
    trainable : list of Tensor
        The model's trainable parameters (the client's extra tensors are added).
    """

    def __init__(self, model: nn.Module, client: ClientRound, trainable: Sequence[torch.Tensor]) -> None:
        r = client.recipe
        self.model = model
        self.params = [*trainable, *client.extras]
        self.opt = make_local_optimizer(r.optimizer, self.params, r.lr, r.momentum, r.weight_decay)
        self.clip = r.max_grad_norm
        self.after_backward = client.hooks.client_after_backward or None
        setup = client.setup
        self.autocast = setup.autocast if setup.dtype is not None else None

    def step(self, clients: Sequence[ClientRound], batches: Sequence[torch.Tensor], s: int) -> None:
        c = clients[0]
        x, y = c.inputs(batches[0])
        if self.autocast is None:
            loss = batch_loss(self.model, c.hooks, c.ctx, x, y)
        else:
            with self.autocast():  # per step: autocast's weight cache must not outlive the step
                loss = batch_loss(self.model, c.hooks, c.ctx, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(model=self.model, ctx=c.ctx)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        c.total += loss.detach()

    @contextmanager
    def model_of(self, client: ClientRound) -> Iterator[nn.Module]:
        yield self.model


def train_alone(
    model: nn.Module,
    ctx: ClientContext,
    hooks: ClientHooks,
    recipe: LocalTraining,
    trainable: Sequence[torch.Tensor],
    stream_labels: np.ndarray | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """One client-round on ``model`` for a context and hooks built by the caller (tests, tools):
    the round's start, steps and end, exactly as an engine runs them.

    Returns the summed step loss (a tensor), the number of steps and the ``client_end`` payloads.
    """
    client = ClientRound(TrainingSetup(None, None, None, ctx.device, recipe, dtype))
    client.start(model, ctx, hooks, stream_labels)
    drive([client], SerialUpdate(model, client, trainable))
    return client.total, len(client.plan), client.end(model)
