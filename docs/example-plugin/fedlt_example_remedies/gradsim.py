"""Gradient-similarity sample weights: samples whose gradient disagrees with their class's get more.

For a linear head ``z = W h + b`` and cross-entropy, the gradient of sample i's loss with respect
to its class row is ``g_i = (p_{i,y_i} - 1) h_i`` and that of the batch's mean loss is
``G_c = (1/B) sum_j (p_{j,c} - 1[y_j = c]) h_j``. The weight is
``w_i = 1 + alpha (1 - cos(g_i, G_{y_i}))``: 1 for a sample pulling with its class, up to
``1 + 2 alpha`` for one pulling against it (typically a minority sample swamped by the majority).
``h`` is the head's actual input, which the engine passes as ``head_input``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedlt import Plugin, hookimpl

__all__ = ["GradientSimilarity", "GradientSimilarityParams", "similarity_weights"]


class GradientSimilarityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(1.0, ge=0, description="Extra weight per unit of gradient dissimilarity.")


def similarity_weights(logits: torch.Tensor, h: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``w_i = 1 + alpha (1 - cos(g_i, G_{y_i}))`` (detached), closed-form head gradients."""
    logits, h = logits.detach(), h.detach()
    err = torch.softmax(logits, dim=1)
    err[torch.arange(len(y)), y] -= 1.0  # p - onehot
    own = err.gather(1, y[:, None]) * h  # g_i
    batch = (err.T @ h / len(y))[y]  # G_{y_i}
    cos = (own * batch).sum(1) / (own.norm(dim=1) * batch.norm(dim=1)).clamp_min(1e-12)
    return 1.0 + alpha * (1.0 - cos)


class GradientSimilarity(Plugin):
    """Per-sample weights 1 + alpha (1 - cos(own gradient, class's batch gradient)) on the head."""

    Params = GradientSimilarityParams

    @hookimpl
    def client_sample_weights(
        self, logits: torch.Tensor, y: torch.Tensor, head_input: torch.Tensor
    ) -> torch.Tensor:
        return similarity_weights(logits, head_input, y, self.params.alpha)
