"""FedProx (Li et al., MLSys 2020): a proximal term keeps local training near the global model.

The client's loss gains ``(mu / 2) * ||w - w_global||^2`` over its trainable parameters, where
``w_global`` are the weights the client received this round. Client side only: the global
weights are copied in ``client_start`` onto this client-round's own plugin instance.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import Plugin, hookimpl

__all__ = ["FedProx", "FedProxParams", "proximal_term"]


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mu: float = Field(0.01, ge=0, description="Weight of the proximal term (mu / 2) ||w - w_global||^2.")


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """``(mu / 2) * sum_i ||params_i - anchor_i||^2`` as a scalar tensor."""
    return 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))


class FedProx(Plugin):
    """Proximal term (mu / 2) ||w - w_global||^2 added to every local batch loss."""

    Params = FedProxParams

    @hookimpl
    def client_start(self, model: nn.Module) -> None:
        # The model holds the global weights now; keep a copy on this client-round's instance.
        self.anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    @hookimpl
    def client_extra_losses(self, model: nn.Module) -> torch.Tensor:
        trained = [p for p in model.parameters() if p.requires_grad]
        return proximal_term(trained, self.anchor, self.params.mu)
