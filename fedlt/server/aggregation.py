"""How client updates combine on the server. Streaming, so memory does not grow with clients."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["Aggregator", "FedAsync", "FedAvg", "FedBuff"]


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


class FedAsync:
    """FedAsync's mixing (Xie, Koyejo, Gupta 2019): per arriving model ``x_new`` of staleness ``x``,
    ``global = (1 - a) global + a x_new`` with ``a = alpha * s(x)``; the default in ``async`` mode.

    Parameters
    ----------
    like : mapping of str to Tensor
        The current global weights.
    alpha : float
        The mixing weight.
    weight : callable
        The staleness weight ``s``.
    arrivals : sequence of Arrival
        The updates, in the order ``add`` receives them (``RoundContext.arrivals``).
    in_place : bool, default=False
        Mix into ``like`` itself when :meth:`result` is called (fedlt's server passes the model's
        own weights: one pass over the model instead of two); otherwise into new tensors.
    """

    def __init__(
        self,
        like: Mapping[str, torch.Tensor],
        alpha: float,
        weight: Callable[[int], float],
        arrivals: Sequence[Any],
        in_place: bool = False,
    ) -> None:
        self._like = {k: v for k, v in like.items() if v.is_floating_point()}
        self._alpha, self._weight, self._arrivals, self._in_place = alpha, weight, arrivals, in_place
        self._mixes: list[tuple[Mapping[str, torch.Tensor], float]] = []

    def add(self, weights: Mapping[str, torch.Tensor], n_samples: int, client_id: int) -> None:
        arrival = self._arrivals[len(self._mixes)]
        a = self._alpha * self._weight(arrival.staleness) if n_samples > 0 else 0.0
        self._mixes.append((weights, a))

    def result(self) -> dict[str, torch.Tensor] | None:
        if not any(a for _, a in self._mixes):
            return None
        x = self._like if self._in_place else {k: v.clone() for k, v in self._like.items()}
        targets = list(x.values())
        for weights, a in self._mixes if targets else ():  # lerp: x + a (x_new - x), one call a mix
            torch._foreach_lerp_(targets, [weights[k].to(v.dtype) for k, v in x.items()], a)
        return x


class FedBuff:
    """FedBuff's server step (Nguyen et al. 2022): ``global += eta * sum_k s(x_k) delta_k / K`` over
    the ``K`` buffered deltas ``delta_k = x_k - base_k``; the default in ``buffered`` mode.

    Parameters
    ----------
    like : mapping of str to Tensor
        The current global weights (not modified).
    server_lr : float
        ``eta``.
    weight : callable
        The staleness weight ``s``.
    arrivals : sequence of Arrival
        The updates, in the order ``add`` receives them; each carries its ``base_weights``.
    """

    def __init__(
        self,
        like: Mapping[str, torch.Tensor],
        server_lr: float,
        weight: Callable[[int], float],
        arrivals: Sequence[Any],
    ) -> None:
        self._like = {k: v for k, v in like.items() if v.is_floating_point()}
        self._sums = {k: torch.zeros_like(v) for k, v in self._like.items()}
        self._lr, self._weight, self._arrivals, self._k = server_lr, weight, arrivals, 0

    def add(self, weights: Mapping[str, torch.Tensor], n_samples: int, client_id: int) -> None:
        arrival = self._arrivals[self._k]
        self._k += 1
        s = self._weight(arrival.staleness)
        for key, acc in self._sums.items():
            acc.add_(weights[key] - arrival.base_weights[key], alpha=s)

    def result(self) -> dict[str, torch.Tensor] | None:
        if self._k == 0:
            return None
        return {k: self._like[k] + acc.mul_(self._lr / self._k) for k, acc in self._sums.items()}
