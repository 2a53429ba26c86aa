"""Focal loss (Lin et al., ICCV 2017): down-weights easy samples so rare, hard ones count more.

FL = -alpha_t * (1 - p_t)^gamma * log p_t, with alpha_t the weight of the sample's class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedlt import ClientContext, Plugin, ScenarioError, SetupContext, hookimpl


class FocalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gamma: float = Field(2.0, ge=0, description="Focusing exponent; 0 gives (alpha-weighted) cross-entropy.")
    alpha: float | list[float] | None = Field(
        None,
        description="Class weight alpha_t: one float for all classes, one per class, or unset (1).",
    )


def focal_loss(
    logits: torch.Tensor, y: torch.Tensor, gamma: float, alpha: torch.Tensor | None
) -> torch.Tensor:
    """Per-sample focal loss; ``alpha`` is a (C,) tensor of class weights or None."""
    log_p = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    loss = -((1.0 - log_p.exp()) ** gamma) * log_p
    return loss if alpha is None else loss * alpha[y]


class Focal(Plugin):
    """Focal loss with ``gamma`` and ``alpha``."""

    Params = FocalParams
    vectorized = True

    @hookimpl
    def configure_model(self, ctx: SetupContext) -> None:
        alpha = self.params.alpha
        if isinstance(alpha, list) and len(alpha) != ctx.num_classes:
            raise ScenarioError(
                f"plugins.{self.name}.alpha",
                alpha,
                f"a float or a list of {ctx.num_classes} floats (one per class)",
            )

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        a = self.params.alpha
        self.alpha = None
        if a is not None:
            values = a if isinstance(a, list) else [a] * ctx.num_classes
            self.alpha = torch.tensor(values, dtype=torch.float32, device=ctx.device)

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha = None if self.alpha is None else self.alpha.to(logits.dtype)
        return focal_loss(logits, y, self.params.gamma, alpha)
