"""The local training recipe: how one client trains in one round (the scenario's ``[train]``).

A plugin changes it for one client-round through ``client_configure_training`` by returning
``recipe.replace(lr=...)``; the recipe is immutable so one client's change never leaks into
another's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["LocalTraining"]


@dataclass(frozen=True)
class LocalTraining:
    """The local optimisation recipe of a client-round.

    Attributes
    ----------
    local_epochs : int
        Passes over the client's data (ignored when ``local_steps`` is set).
    local_steps : int or None
        Exactly this many batches instead of epochs.
    batch_size : int
        Local batch size.
    optimizer : {"sgd", "adam"}
        A fresh optimizer per client-round.
    lr, momentum, weight_decay : float
        Learning rate, SGD momentum, L2 weight decay.
    max_grad_norm : float or None
        Clip the gradient norm to this value.
    augment : {"none", "crop-flip"}
        Training-time augmentation of image batches.
    """

    local_epochs: int
    local_steps: int | None
    batch_size: int
    optimizer: Literal["sgd", "adam"]
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

    def replace(self, **changes: Any) -> LocalTraining:
        """A copy with some fields changed (validated like the scenario's ``[train]``)."""
        new = dataclasses.replace(self, **changes)
        problems = []
        if (
            new.batch_size < 1
            or new.local_epochs < 1
            or (new.local_steps is not None and new.local_steps < 1)
        ):
            problems.append("batch_size, local_epochs and local_steps must be >= 1")
        if not new.lr > 0 or new.weight_decay < 0 or not 0 <= new.momentum < 1:
            problems.append("lr must be > 0, weight_decay >= 0 and 0 <= momentum < 1")
        if new.optimizer not in ("sgd", "adam"):
            problems.append(f"optimizer must be 'sgd' or 'adam', got {new.optimizer!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return new
