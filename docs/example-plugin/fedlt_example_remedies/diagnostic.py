"""A neural-collapse diagnostic: how tightly each class's features cluster (an evaluation metric).

``NC1 = Tr(S_W S_B^+) / C`` (Papyan, Han and Donoho, PNAS 2020), with ``S_W`` the average of the
classes' feature covariances and ``S_B`` the covariance of the class means: 0 when every sample
sits on its class mean. Reported for the global test set as ``within-class-variability.nc1`` in
metrics.jsonl and summary.json.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fedlt import EvalContext, Plugin, hookimpl

__all__ = ["WithinClassVariability", "nc1"]


def nc1(features: torch.Tensor, labels: torch.Tensor) -> float | None:
    """``Tr(S_W S_B^+) / C`` over the classes present (None with fewer than two)."""
    h = features.detach().double()
    classes = torch.unique(labels)
    if len(classes) < 2:
        return None
    means = torch.stack([h[labels == c].mean(0) for c in classes])
    centred = means - means.mean(0)
    between = centred.T @ centred / len(classes)
    within = sum(
        (h[labels == c] - means[k]).T @ (h[labels == c] - means[k]) / int((labels == c).sum())
        for k, c in enumerate(classes)
    ) / len(classes)
    return float(torch.trace(within @ torch.linalg.pinv(between)) / len(classes))


class WithinClassVariability(Plugin):
    """NC1 of the evaluated model's features on the global test set."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

    @hookimpl
    def eval_metrics(
        self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, ctx: EvalContext
    ) -> dict[str, Any] | None:
        if ctx.client_id is not None:  # client views: skip, the global set is what NC describes
            return None
        return {"nc1": nc1(features, labels)}
