"""Losses robust to label noise: generalized cross entropy (``gce``) and symmetric cross entropy (``sce``).

Cross-entropy's gradient weights a sample by ``1 / p_y``, so a confidently wrong (noisy) label pulls
hardest and is eventually memorised. Both losses bound that pull (docs/noise.md):

- GCE (Zhang & Sabuncu, NeurIPS 2018): ``L_q = (1 - p_y^q) / q`` with ``q`` in (0, 1]; the
  negative Box-Cox transform of ``p_y``. ``q -> 0`` gives cross-entropy ``-log p_y``, ``q = 1`` the
  mean absolute error ``1 - p_y`` (noise-robust but slow to fit). The authors use ``q = 0.7``.
- SCE (Wang et al., ICCV 2019): ``alpha * CE + beta * RCE`` with the reverse cross-entropy
  ``RCE = -sum_k p_k log y_k``, ``log 0`` replaced by ``A = log(1e-4)``; for a one-hot label that is
  ``-A (1 - p_y)``. As the official code, ``p`` is clamped to ``[1e-7, 1]`` inside RCE. The
  authors' CIFAR-10 setting is ``alpha = 0.1, beta = 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedlt import Plugin, hookimpl

__all__ = ["GCE", "SCE", "SCE_LOG_ZERO", "gce_loss", "sce_loss"]

#: SCE's stand-in for ``log 0`` in the reverse cross-entropy (the paper's ``A``).
SCE_LOG_ZERO = math.log(1e-4)


def gce_loss(logits: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Per-sample generalized cross entropy ``(1 - p_y^q) / q``, as ``-expm1(q log p_y) / q``: exact
    for small ``q``, where ``1 - p_y^q`` would cancel to nothing in float32."""
    log_p_y = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    return -torch.expm1(q * log_p_y) / q


def sce_loss(logits: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Per-sample symmetric cross entropy ``alpha * CE + beta * RCE`` (RCE with ``A = log 1e-4``)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    p = F.softmax(logits, dim=1).clamp(1e-7, 1.0)
    rce = -SCE_LOG_ZERO * (p.sum(1) - p.gather(1, y[:, None]).squeeze(1))
    return alpha * ce + beta * rce


class GCEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    q: float = Field(
        0.7, gt=0, le=1, description="Box-Cox exponent in (0, 1]: near 0 cross-entropy, 1 mean absolute error"
    )


class SCEParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.1, ge=0, description="Weight of cross-entropy (the paper's CIFAR-10 value).")
    beta: float = Field(1.0, ge=0, description="Weight of the reverse cross-entropy.")


class GCE(Plugin):
    """Generalized cross entropy ``(1 - p_y^q) / q`` as the training loss."""

    Params = GCEParams
    vectorized = True

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return gce_loss(logits, y, self.params.q)


class SCE(Plugin):
    """Symmetric cross entropy ``alpha * CE + beta * RCE`` as the training loss."""

    Params = SCEParams
    vectorized = True

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sce_loss(logits, y, self.params.alpha, self.params.beta)
