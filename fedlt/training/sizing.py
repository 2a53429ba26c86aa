"""How many clients fit in one vectorized group: a memory estimate per client and a budget.

A group holds, per client, its stacked parameters and buffers, their gradients, the optimizer's
state (none for plain SGD, momentum buffers, Adam's two moments), the plugins' extra tensors, and
the activations autograd saves for the backward pass of one batch. The activations are measured,
not guessed: one forward pass of the run's model on one batch of the recipe's size, counting the
bytes autograd saves (``torch.autograd.graph.saved_tensors_hooks``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedlt.hooks.recipe import LocalTraining

__all__ = ["MEMORY_SHARE", "activation_bytes", "client_bytes", "group_size_for"]

#: The share of the free memory a group may plan to use (the rest: the allocator's slack, the
#: evaluation, the batch and its augmentation).
MEMORY_SHARE = 0.6

#: Headroom over the measured per-client need: a vmapped step keeps some batched temporaries the
#: one-client forward does not.
_HEADROOM = 1.5


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one training forward of ``model`` on ``x``.

    The model's buffers (BatchNorm running statistics, which a training forward updates) are put
    back afterwards, so measuring changes nothing.
    """
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    buffers = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, old in zip(model.buffers(), buffers, strict=True):
                b.copy_(old)
    return sum(saved.values())


def client_bytes(model: nn.Module, recipe: LocalTraining, activations: int, extra_bytes: int = 0) -> int:
    """One client's share of a group: parameters and buffers, gradients, optimizer state, extra
    tensors and the activations of one batch, with headroom."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    states = 2 if recipe.optimizer == "adam" else int(recipe.momentum != 0)
    weights = trainable * (2 + states) + buffers + extra_bytes * (2 + states)
    return int(_HEADROOM * (weights + activations))


def group_size_for(per_client: int, free: int | None, n_clients: int) -> int:
    """Clients per group: as many as :data:`MEMORY_SHARE` of ``free`` bytes holds (at least one, at
    most ``n_clients``); all of them when the free memory is unknown."""
    if free is None or per_client <= 0:
        return max(n_clients, 1)
    return max(1, min(n_clients, math.floor(MEMORY_SHARE * free / per_client)))
