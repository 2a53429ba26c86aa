"""How client updates combine on the server. Streaming, so memory does not grow with clients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Aggregator", "FedAvg"]


@runtime_checkable
class Aggregator(Protocol):
    """Receives client updates one at a time, then gives the new global weights.

    ``weights`` may be live tensors of a worker's model: copy what you keep, because they change
    once ``add`` returns.
    """

    def add(self, weights: Mapping[str, torch.Tensor], n_samples: int, client_id: int) -> None: ...

    def result(self) -> dict[str, torch.Tensor] | None: ...


class FedAvg:
    """Sample-weighted average, accumulated as updates arrive (McMahan et al. 2017).

    Parameters
    ----------
    like : mapping of str to Tensor
        The global weights; fixes which entries are averaged and their dtype/device.
        Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are not averaged.
    """

    def __init__(self, like: Mapping[str, torch.Tensor]) -> None:
        self._sums = {k: torch.zeros_like(v) for k, v in like.items() if v.is_floating_point()}
        self._total = 0

    def add(self, weights: Mapping[str, torch.Tensor], n_samples: int, client_id: int) -> None:
        if n_samples <= 0:
            return
        for key, acc in self._sums.items():
            acc.add_(weights[key], alpha=float(n_samples))
        self._total += n_samples

    def result(self) -> dict[str, torch.Tensor] | None:
        """The average, or ``None`` when no client contributed samples (keep the old model)."""
        if self._total == 0:
            return None
        return {k: v.div_(self._total) for k, v in self._sums.items()}
