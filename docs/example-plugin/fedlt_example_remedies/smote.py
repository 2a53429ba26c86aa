"""Feature-space SMOTE: synthetic minority features between same-class features, trained on.

Per batch, the classes with fewer samples than the batch's mean class count are minority
classes. For each, ``n_per_class`` synthetic features ``h_i + lam (h_j - h_i)`` are drawn from
random same-class pairs (``lam ~ U(0, 1)``, all draws from the client's seeded generator), and
their cross-entropy through the head is added with weight ``weight`` (Chawla et al. 2002's SMOTE,
in feature space as in many long-tail papers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import ClientContext, Plugin, hookimpl

__all__ = ["FeatureSMOTE", "FeatureSMOTEParams", "interpolate"]


class FeatureSMOTEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_per_class: int = Field(8, ge=1, description="Synthetic features per minority class and batch.")
    weight: float = Field(0.5, ge=0, description="Weight of the synthetic features' cross-entropy.")


def interpolate(
    h: torch.Tensor, y: torch.Tensor, n_per_class: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic (features, labels) for the batch's minority classes (classes with two or more
    samples and fewer than the mean count); empty tensors when there are none."""
    classes, counts = torch.unique(y, return_counts=True)
    mean = counts.float().mean()
    feats, labels = [], []
    for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
        if n < 2 or n >= mean:
            continue
        rows = torch.nonzero(y == c).squeeze(1)
        i = rows[torch.randint(n, (n_per_class,), generator=generator)]
        j = rows[torch.randint(n, (n_per_class,), generator=generator)]
        lam = torch.rand(n_per_class, 1, generator=generator).to(h)
        feats.append(h[i] + lam * (h[j] - h[i]))
        labels.append(torch.full((n_per_class,), c, dtype=y.dtype))
    if not feats:
        return h[:0], y[:0]
    return torch.cat(feats), torch.cat(labels).to(y.device)


class FeatureSMOTE(Plugin):
    """Cross-entropy on SMOTE-interpolated minority features, added to the batch loss."""

    Params = FeatureSMOTEParams

    @hookimpl
    def client_extra_losses(
        self, model: nn.Module, y: torch.Tensor, head_input: torch.Tensor, ctx: ClientContext
    ) -> torch.Tensor | None:
        feats, labels = interpolate(head_input, y, self.params.n_per_class, ctx.generator)
        if not len(labels):
            return None
        return self.params.weight * F.cross_entropy(model.head(feats), labels)
