"""One client's step on one model: autograd, then the local optimizer.

The :class:`~fedlt.training.round.Update` of the serial engine and of every worker (Ray actors,
Flower nodes). Everything else about the client-round is :mod:`fedlt.training.round`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
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
    asks, one step at a time), backward, ``client_after_backward``, ``client_step_gradients``
    (which may evaluate the batch's gradient again at perturbed weights), clipping, the optimizer.

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
        self.step_gradients = client.hooks.client_step_gradients or None
        #: the model's trained parameters by name: what client_step_gradients sees (only built
        #: when a plugin implements it: this runs once per client)
        self.named: list[tuple[str, nn.Parameter]] = []
        if self.step_gradients is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            self.named = [(names[id(p)], p) for p in trainable if id(p) in names]
        setup = client.setup
        self.autocast = setup.autocast if setup.dtype is not None else None

    def _loss(self, c: ClientRound, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.autocast is None:
            return batch_loss(self.model, c.hooks, c.ctx, x, y)
        with self.autocast():  # per step: autocast's weight cache must not outlive the step
            return batch_loss(self.model, c.hooks, c.ctx, x, y)

    def step(self, clients: Sequence[ClientRound], batches: Sequence[torch.Tensor], s: int) -> None:
        c = clients[0]
        x, y = c.inputs(batches[0])
        loss = self._loss(c, x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(model=self.model, ctx=c.ctx)
        if self.step_gradients is not None:
            self._rewrite_gradients(c, x, y)
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        c.total += loss.detach()

    @contextmanager
    def model_of(self, client: ClientRound) -> Iterator[nn.Module]:
        yield self.model

    def _rewrite_gradients(self, c: ClientRound, x: torch.Tensor, y: torch.Tensor) -> None:
        """``client_step_gradients``: the plugins' chain replaces the ``.grad`` of the parameters
        that received one; ``regrad`` evaluates this batch's gradient at perturbed weights."""
        live = [(n, p) for n, p in self.named if p.grad is not None]
        weights = {n: p.detach() for n, p in live}

        def regrad(offsets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return self._regrad(c, x, y, live, offsets)

        out = self.step_gradients(
            grads={n: p.grad for n, p in live}, weights=weights, regrad=regrad, model=self.model, ctx=c.ctx
        )
        for n, p in live:
            p.grad = out[n].detach().to(p.grad.dtype)

    def _regrad(
        self,
        c: ClientRound,
        x: torch.Tensor,
        y: torch.Tensor,
        live: list[tuple[str, torch.Tensor]],
        offsets: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The gradient of the batch loss at ``weights + offsets``; weights and buffers restored."""
        moved = [(n, p) for n, p in live if n in offsets]
        unknown = sorted(set(offsets) - {n for n, _ in live})
        if unknown:
            raise ValueError(
                f"regrad: offsets for {unknown[:3]}, which are not among this step's weights "
                f"(the trained parameters that received a gradient)"
            )
        buffers = list(self.model.buffers())
        saved = [p.detach().clone() for _, p in moved], [b.detach().clone() for b in buffers]
        params = [p for _, p in live]
        try:
            with torch.no_grad():
                for n, p in moved:
                    p.add_(offsets[n].to(p.dtype))
            grads = torch.autograd.grad(self._loss(c, x, y), params, allow_unused=True)
        finally:
            with torch.no_grad():
                for (_, p), w in zip(moved, saved[0], strict=True):
                    p.copy_(w)
                for b, v in zip(buffers, saved[1], strict=True):
                    b.copy_(v)
        return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(live, grads, strict=True)}


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
