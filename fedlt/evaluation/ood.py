"""Open-set evaluation (``[eval.ood]``, docs/ood.md): the score that separates the in-distribution
test set from the out-of-distribution set (built by :mod:`fedlt.data.ood`).

The score is one value per sample, higher for in-distribution: the first plugin implementing
``eval_ood_score`` gives it, else the maximum softmax probability (MSP, Hendrycks & Gimpel 2017),
computed as the largest log-softmax (same order, no ties from probabilities rounding to 1).
"""

from __future__ import annotations

from typing import Any

import torch

from fedlt.errors import PluginError

__all__ = ["DEFAULT_SCORE", "check_scores", "msp_score"]

#: The score's name in records when no plugin gives one.
DEFAULT_SCORE = "msp"


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """The log of the maximum softmax probability of each row (ordered as MSP itself)."""
    return torch.log_softmax(logits.double(), dim=1).max(dim=1).values


def check_scores(scores: Any, n: int, plugin: str) -> torch.Tensor:
    """``scores`` as a ``(n,)`` float64 CPU tensor, or :class:`PluginError` naming ``plugin``."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n,):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise PluginError(plugin, "eval_ood_score", f"returned {got}; expected a tensor of shape ({n},)")
    if not bool(torch.isfinite(scores).all()):
        raise PluginError(plugin, "eval_ood_score", "returned non-finite scores")
    return scores.detach().to("cpu", torch.float64)
