"""Label smoothing (Szegedy et al., CVPR 2016) as a fedlt plugin.

The per-sample loss is cross-entropy against a softened target, ``(1 - epsilon)`` on the true
class plus ``epsilon / C`` spread over all ``C`` classes::

    L = (1 - epsilon) * (-log p_y) + epsilon * mean_j(-log p_j)

the same as ``torch.nn.functional.cross_entropy(logits, y, label_smoothing=epsilon)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedlt import Plugin, hookimpl

__all__ = ["LabelSmoothing", "LabelSmoothingParams", "label_smoothing_loss"]


class LabelSmoothingParams(BaseModel):
    """The plugin's parameters, validated when a scenario is loaded."""

    # Forbid unknown keys, so a misspelt parameter in a scenario is an error, not ignored.
    model_config = ConfigDict(extra="forbid")

    epsilon: float = Field(
        0.1, ge=0, lt=1, description="Share of the target spread evenly over all classes (0: cross-entropy)."
    )


def label_smoothing_loss(logits: torch.Tensor, y: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per-sample label-smoothed cross-entropy, shape ``(B,)``."""
    log_p = F.log_softmax(logits, dim=1)
    nll = -log_p.gather(1, y[:, None]).squeeze(1)
    uniform = -log_p.mean(dim=1)
    return (1.0 - epsilon) * nll + epsilon * uniform


class LabelSmoothing(Plugin):
    """Label-smoothed cross-entropy as the client training loss."""

    Params = LabelSmoothingParams

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return label_smoothing_loss(logits, y, self.params.epsilon)
