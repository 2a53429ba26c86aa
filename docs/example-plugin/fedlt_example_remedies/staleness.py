"""Staleness weighting: clients that have not taken part for a while count more, and learn slower.

The server remembers the round each client last trained (global state, checkpointed). A
selected client's staleness ``s`` is the number of rounds since then (its first round counts
from round 0). The server sends ``s`` to that client alone through the per-client config
(``server_configure_client``); the client scales its learning rate by ``(1 + s)^(-lr_decay)``
(``client_configure_training``); the aggregator weights its update by
``n_samples * (1 + s)^boost`` instead of ``n_samples``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedlt import ClientContext, LocalTraining, Plugin, RoundContext, hookimpl

__all__ = ["Staleness", "StalenessAggregator", "StalenessParams"]


class StalenessParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    boost: float = Field(
        0.5, ge=0, description="Exponent of (1 + staleness) on a client's aggregation weight."
    )
    lr_decay: float = Field(
        0.0, ge=0, description="Exponent of 1 / (1 + staleness) on a client's learning rate."
    )


class StalenessAggregator:
    """Average of the updates weighted by ``n_samples * (1 + staleness)^boost``."""

    def __init__(self, like: Mapping[str, torch.Tensor], staleness: Mapping[int, int], boost: float) -> None:
        self.sums = {k: torch.zeros_like(v) for k, v in like.items() if v.is_floating_point()}
        self.total = 0.0
        self.staleness, self.boost = staleness, boost

    def add(self, weights: Mapping[str, torch.Tensor], n_samples: int, client_id: int) -> None:
        w = n_samples * (1.0 + self.staleness[client_id]) ** self.boost
        if w <= 0:
            return
        for key, acc in self.sums.items():
            acc.add_(weights[key], alpha=w)
        self.total += w

    def result(self) -> dict[str, torch.Tensor] | None:
        if self.total == 0:
            return None
        return {k: v / self.total for k, v in self.sums.items()}


class Staleness(Plugin):
    """Aggregation weights n (1 + s)^boost and learning rates lr (1 + s)^-lr_decay by staleness s."""

    Params = StalenessParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self.last_round: dict[int, int] = {}

    def _staleness(self, client: int, round: int) -> int:
        return round - self.last_round.get(client, 0) - 1

    @hookimpl
    def server_configure_client(self, client_id: int, ctx: RoundContext) -> dict[str, Any]:
        return {"staleness.rounds": self._staleness(client_id, ctx.round)}

    @hookimpl
    def client_configure_training(self, recipe: LocalTraining, ctx: ClientContext) -> LocalTraining:
        s = ctx.config["staleness.rounds"]
        return recipe.replace(lr=recipe.lr * (1.0 + s) ** -self.params.lr_decay)

    @hookimpl
    def server_make_aggregator(
        self, global_weights: Mapping[str, torch.Tensor], ctx: RoundContext
    ) -> StalenessAggregator:
        staleness = {c: self._staleness(c, ctx.round) for c in ctx.selected}
        return StalenessAggregator(global_weights, staleness, self.params.boost)

    @hookimpl
    def server_after_aggregate(self, ctx: RoundContext) -> None:
        for client in ctx.selected:
            self.last_round[client] = ctx.round

    def state_dict(self) -> dict[str, Any]:
        return {"last_round": dict(self.last_round)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_round = {int(k): int(v) for k, v in state["last_round"].items()}
