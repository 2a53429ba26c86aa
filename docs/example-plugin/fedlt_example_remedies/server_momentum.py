"""Server momentum, FedAvgM (Hsu, Qi and Brown, 2019): momentum on the server's update.

Each round the server computes the FedAvg average ``a`` of the client weights, the pseudo-
gradient ``d = w - a`` of the global weights ``w``, a velocity ``v <- beta v + d`` and the new
global weights ``w - server_lr * v``. The velocity is the plugin's global state: kept on the
server-side instance, checkpointed with ``state_dict`` and restored on resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedlt import FedAvg, Plugin, RoundContext, hookimpl

__all__ = ["MomentumAggregator", "ServerMomentum", "ServerMomentumParams"]


class ServerMomentumParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(0.9, ge=0, lt=1, description="Momentum of the server's velocity.")
    server_lr: float = Field(1.0, gt=0, description="Server learning rate on the velocity.")


class MomentumAggregator:
    """FedAvg of the updates, then one momentum step from the global weights."""

    def __init__(
        self,
        global_weights: Mapping[str, torch.Tensor],
        velocity: dict[str, torch.Tensor],
        beta: float,
        lr: float,
    ) -> None:
        # The global weights are the server model's live tensors: copy them.
        self.start = {k: v.detach().clone() for k, v in global_weights.items()}
        self.average = FedAvg(self.start)
        self.velocity, self.beta, self.lr = velocity, beta, lr

    def add(self, weights: Mapping[str, torch.Tensor], n_samples: int, client_id: int) -> None:
        self.average.add(weights, n_samples, client_id)

    def result(self) -> dict[str, torch.Tensor] | None:
        avg = self.average.result()
        if avg is None:
            return None
        new = {}
        for key, w in self.start.items():
            if key not in avg:
                continue
            v = self.beta * self.velocity.get(key, torch.zeros_like(w)) + (w - avg[key])
            self.velocity[key] = v
            new[key] = w - self.lr * v
        return new


class ServerMomentum(Plugin):
    """FedAvgM: w <- w - server_lr * v with v <- beta v + (w - FedAvg(clients))."""

    Params = ServerMomentumParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self.velocity: dict[str, torch.Tensor] = {}

    @hookimpl
    def server_make_aggregator(
        self, global_weights: Mapping[str, torch.Tensor], ctx: RoundContext
    ) -> MomentumAggregator:
        return MomentumAggregator(global_weights, self.velocity, self.params.beta, self.params.server_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": {k: v.clone() for k, v in self.velocity.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = {k: v.clone() for k, v in state["velocity"].items()}
