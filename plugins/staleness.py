"""Staleness-aware FedAvg: a baseline for asynchronous federations (docs/async.md).

Each arriving update is re-expressed as its change from the weights it started from,
``delta_k = w_k - base_k``, discounted by its staleness ``x_k`` and averaged by samples:

    w <- w + sum_k n_k s(x_k) delta_k / sum_k n_k

With ``weight = "constant"`` this is Wang & Gao's "direct aggregation" of stale deltas; with
``"exponential"`` (``s(x) = 2^(-x / half_life)``, half-life 20 as in their code) their weighted
baseline; ``"polynomial"`` and ``"hinge"`` are FedAsync's functions. Without staleness (sync or
deadline rounds) it is FedAvg exactly. Unlike FedAsync it moves by deltas, so a stale update
does not pull the model back towards its old base; unlike FedBuff it weighs by samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedlt import Plugin, RoundContext, hookimpl, staleness_weight

__all__ = ["StalenessFedAvg"]


class StalenessFedAvgParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: Literal["constant", "polynomial", "hinge", "exponential"] = Field(
        "exponential", description="s(x): 1; (x + 1)^-a; hinge(a, b); 2^(-x / half_life)."
    )
    a: float = Field(0.5, ge=0, description="polynomial, hinge: a.")
    b: float = Field(4.0, ge=0, description="hinge: b.")
    half_life: float = Field(20.0, gt=0, description="exponential: staleness that halves an update.")


class _Discounted:
    """Sample-weighted mean of staleness-discounted deltas, added to the current weights."""

    def __init__(
        self, like: Mapping[str, torch.Tensor], s: Callable[[int], float], ctx: RoundContext
    ) -> None:
        self._like = {k: v for k, v in like.items() if v.is_floating_point()}
        self._sum = {k: torch.zeros_like(v) for k, v in self._like.items()}
        self._s, self._arrivals, self._i, self._n = s, ctx.arrivals, 0, 0

    def add(self, weights: Mapping[str, torch.Tensor], n_samples: int, client_id: int) -> None:
        arrival = self._arrivals[self._i]
        self._i += 1
        if n_samples <= 0:
            return
        scale = n_samples * self._s(arrival.staleness)
        for k, acc in self._sum.items():
            acc.add_(weights[k] - arrival.base_weights[k], alpha=scale)
        self._n += n_samples

    def result(self) -> dict[str, torch.Tensor] | None:
        if self._n == 0:
            return None
        return {k: self._like[k] + acc / self._n for k, acc in self._sum.items()}


class StalenessFedAvg(Plugin):
    """FedAvg over staleness-discounted deltas (direct / exponential / polynomial / hinge)."""

    Params = StalenessFedAvgParams
    contract = "0.3"

    @hookimpl
    def server_make_aggregator(
        self, global_weights: Mapping[str, torch.Tensor], ctx: RoundContext
    ) -> _Discounted:
        p = self.params
        if p.weight == "exponential":
            s = lambda x: 2.0 ** (-x / p.half_life)  # noqa: E731
        else:
            s = staleness_weight(p.weight, p.a, p.b)
        return _Discounted(global_weights, s, ctx)
