"""Where a remedy's class counts come from, and the helpers that turn them into tensors."""

from __future__ import annotations

from typing import Literal

import torch

from fedlt.context import ClientContext

Prior = Literal["local", "global"]

PRIOR_DOC = (
    "Class counts used as the prior: 'local' = this client's own training counts (private, what a "
    "real client has); 'global' = true counts over all clients (privileged information a real "
    "federation does not have; an upper bound)."
)


def log_prior(ctx: ClientContext, prior: Prior) -> torch.Tensor:
    """log n_c on the client's device; counts of 0 are treated as 1 (as FedETF does) to stay finite."""
    counts = torch.as_tensor(ctx.class_counts(prior), dtype=torch.float32, device=ctx.device)
    return counts.clamp_min(1.0).log()
