"""Memorisation of noisy training labels (``[noise]`` scenarios).

A network trained long enough fits its noisy labels (Zhang et al. 2017; Arpit et al. 2017): on a
training sample whose label was flipped, its prediction moves from the clean class to the noisy
one. On each full evaluation, over every client's noisy training samples (those whose label differs
from the clean one), the global model's prediction is counted as *memorised* (it equals the noisy
label) or *corrected* (it equals the clean label); the rest predict a third class. Robust losses
(GCE, SCE) aim to keep memorisation low and correction high.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["memorisation", "memorisation_metrics"]


def memorisation(pred: np.ndarray, clean: np.ndarray, noisy: np.ndarray) -> tuple[int, int, int]:
    """``(memorised, corrected, n_noisy)`` over the samples whose ``noisy`` label differs from ``clean``."""
    pred, clean, noisy = np.asarray(pred), np.asarray(clean), np.asarray(noisy)
    flipped = clean != noisy
    return (
        int((pred[flipped] == noisy[flipped]).sum()),
        int((pred[flipped] == clean[flipped]).sum()),
        int(flipped.sum()),
    )


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    steps = range(0, x.shape[0], batch_size)
    out = [model.head(model.features(x[i : i + batch_size])).argmax(1) for i in steps]
    return torch.cat(out).cpu().numpy() if out else np.empty(0, dtype=np.int64)


def memorisation_metrics(model: nn.Module, data: Any, batch_size: int) -> dict[str, Any]:
    """The memorisation record of ``model`` (the model's own head, no evaluation-time adjustment).

    Returns ``{}`` without noise, else ``noise_memorised`` and ``noise_corrected`` (shares of all
    clients' noisy samples, pooled), ``noise_n_noisy``, and per client
    ``noise_client_memorised`` / ``noise_client_corrected`` (None for a client without noisy
    samples).
    """
    if data.y_train_clean is None:
        return {}
    clean, noisy = data.y_train_clean.cpu().numpy(), data.y_train_np
    mem, cor, tot = [], [], []
    for idx in data.client_indices:
        idx = np.asarray(idx, dtype=np.int64)
        idx = idx[clean[idx] != noisy[idx]]
        pred = _predict(model, data.x_train[torch.as_tensor(idx, device=data.x_train.device)], batch_size)
        m, c, n = memorisation(pred, clean[idx], noisy[idx])
        mem.append(m)
        cor.append(c)
        tot.append(n)
    n_all = sum(tot)
    return {
        "noise_memorised": sum(mem) / n_all if n_all else None,
        "noise_corrected": sum(cor) / n_all if n_all else None,
        "noise_n_noisy": n_all,
        "noise_client_memorised": [m / n if n else None for m, n in zip(mem, tot, strict=True)],
        "noise_client_corrected": [c / n if n else None for c, n in zip(cor, tot, strict=True)],
    }
