"""Typed context objects handed to hooks: the facts a plugin may use, not engine internals."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

__all__ = ["ClientContext", "EvalContext", "RoundContext", "SetupContext"]


@dataclass(frozen=True, slots=True)
class SetupContext:
    """Run-level facts, available when models and plugins are set up.

    ``global_class_counts`` are the true training counts over all clients: privileged
    information a real federation does not have, so plugins must say when they use it.
    """

    seed: int
    num_classes: int
    input_shape: tuple[int, ...]
    n_clients: int
    device: torch.device
    global_class_counts: np.ndarray
    generator: torch.Generator


@dataclass(frozen=True, slots=True)
class RoundContext:
    """One server round: its index, the selected clients and the round config built so far."""

    round: int
    seed: int
    num_classes: int
    selected: tuple[int, ...]
    config: Mapping[str, Any]
    global_class_counts: np.ndarray
    client_class_counts: np.ndarray


@dataclass(slots=True)
class ClientContext:
    """One client in one round, wherever it is trained.

    ``indices`` are the client's rows of the (device-resident) training tensors ``x_train`` /
    ``y_train``; ``labels`` are their labels. ``generator`` is seeded from (seed, round, client)
    and is the only source of randomness a plugin should use here. ``extra`` is scratch space
    for this client-round (discarded at its end): compute per-round constants there once.

    In a continual scenario (``online_iter`` is set) ``indices`` are this round's slice of the
    client's stream and ``local_class_counts`` count what the client has seen so far.
    """

    client_id: int
    round: int
    seed: int
    num_classes: int
    config: Mapping[str, Any]
    local_class_counts: np.ndarray
    global_class_counts: np.ndarray
    indices: torch.Tensor
    labels: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    batch_size: int
    local_epochs: int
    local_steps: int | None
    device: torch.device
    generator: torch.Generator
    online_iter: int | None = None
    step: int = 0
    epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.indices.numel())

    @property
    def seen_classes(self) -> np.ndarray:
        """Boolean (C,) mask of the classes in the client's data (seen so far, in a stream)."""
        return self.local_class_counts > 0

    def class_counts(self, prior: str) -> np.ndarray:
        """Class counts by source: ``"local"`` (this client's) or ``"global"`` (privileged)."""
        if prior == "local":
            return self.local_class_counts
        if prior == "global":
            return self.global_class_counts
        raise ValueError(f"prior must be 'local' or 'global', got {prior!r}")


@dataclass(frozen=True, slots=True)
class EvalContext:
    """One evaluation: the global test set (``client_id is None``) or a client's local view."""

    round: int
    num_classes: int
    client_id: int | None
    local_class_counts: np.ndarray | None
    global_class_counts: np.ndarray


def frozen_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view, so hooks cannot change the config other clients receive."""
    return MappingProxyType(dict(config))
