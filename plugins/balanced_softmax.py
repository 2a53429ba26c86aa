"""Balanced softmax (Ren et al., NeurIPS 2020): cross-entropy on logits shifted by log class counts.

L = -log( n_y e^{z_y} / sum_j n_j e^{z_j} ) = CE(z + log n, y). Training against the prior lets
the plain logits z estimate the balanced posterior, so evaluation uses z unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fedlt_plugins.priors import PRIOR_DOC, Prior, log_prior_tensor, prior_counts
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import ClientContext, Plugin, hookimpl


class BalancedSoftmaxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prior: Prior = Field("local", description=PRIOR_DOC)


class BalancedSoftmax(Plugin):
    """Balanced softmax loss with local or global class counts."""

    Params = BalancedSoftmaxParams
    vectorized = True

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        counts = prior_counts(self.params.prior, ctx.local_class_counts, ctx.global_class_counts, model)
        self.log_prior = log_prior_tensor(counts, ctx.device)

    # In a stream the local counts grow as batches arrive: refresh the prior with them.
    client_stream_batch = hookimpl(client_start)

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.log_prior, y, reduction="none")
