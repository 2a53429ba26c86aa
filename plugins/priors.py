"""Where a remedy's class counts come from, and the helpers that turn them into tensors.

Every prior-using plugin takes ``prior = "local" | "global" | "estimated"``:

- ``local``: the client's own training counts: private data a real client has.
- ``global``: the true counts over all clients: privileged information a real federation does
  not have (the server would have to collect every client's label histogram); an upper bound.
- ``estimated``: inferred from the global model's classifier, as FedLoGe suggests
  (``dist_est = ||w_c||^3``): class c's share is proportional to the cube of the norm of its head
  row, because head rows of frequent classes grow larger. Uses nothing but the model every client
  already receives; uninformative (uniform) when the head is fixed, e.g. an ETF.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

Prior = Literal["local", "global", "estimated"]

PRIOR_DOC = (
    "Class counts used as the prior: 'local' = this client's own counts (what a real client has); "
    "'global' = true counts over all clients (privileged information); 'estimated' = shares "
    "proportional to ||w_c||^3 of the global model's head rows (FedLoGe), scaled to the local total."
)

#: Exponent of the head-norm estimate (FedLoGe's commented-out dist_est = ||g_aux||^3).
ESTIMATE_POWER = 3.0


def estimated_shares(model: nn.Module) -> np.ndarray:
    """Class shares proportional to ``||w_c||^3`` of the model's head rows (sums to 1)."""
    with torch.no_grad():
        norms = model.head.weight.detach().float().norm(dim=1).cpu().double().numpy()
    weights = norms**ESTIMATE_POWER
    total = weights.sum()
    if not np.isfinite(total) or total <= 0:
        return np.full(len(norms), 1.0 / len(norms))
    return weights / total


def prior_counts(
    prior: Prior,
    local: np.ndarray | None,
    global_: np.ndarray,
    model: nn.Module | None = None,
) -> np.ndarray:
    """Class counts (float64) from the named source.

    ``estimated`` needs ``model``; its shares are scaled to the local total (or the global total
    when there are no local counts, as on the server).
    """
    if prior == "local":
        if local is None:
            raise ValueError("prior 'local' needs a client's counts")
        return np.asarray(local, dtype=np.float64)
    if prior == "global":
        return np.asarray(global_, dtype=np.float64)
    if prior == "estimated":
        if model is None:
            raise ValueError("prior 'estimated' needs the model")
        total = float(np.sum(local if local is not None else global_))
        return estimated_shares(model) * total
    raise ValueError(f"prior must be 'local', 'global' or 'estimated', got {prior!r}")


def log_prior_tensor(counts: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """log n_c as a float32 tensor; counts below 1 are treated as 1 (as FedETF does) to stay finite."""
    return torch.as_tensor(np.maximum(counts, 1.0), dtype=torch.float32, device=device).log()
