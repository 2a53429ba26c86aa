"""Out-of-distribution detection metrics: how well a score separates in- from out-of-distribution
samples (docs/ood.md).

Convention: a score is *higher for in-distribution* samples, and in-distribution is the positive
class (OpenOOD's and Hendrycks & Gimpel's "AUPR-In"). ``ood_auroc`` does not depend on which side is
positive; ``ood_auprc`` does, and under a small OOD set it is the optimistic side, so the record
names it. ``ood_fpr_at_95_tpr`` is the share of OOD samples accepted at the threshold that keeps 95%
of the in-distribution ones (lower is better).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedlt.metrics.classification import _auroc, _average_precision

__all__ = ["TPR_LEVEL", "fpr_at_tpr", "ood_metrics"]

#: The true-positive rate of ``ood_fpr_at_95_tpr``.
TPR_LEVEL = 0.95


def fpr_at_tpr(score_in: np.ndarray, score_out: np.ndarray, level: float = TPR_LEVEL) -> float:
    """FPR at the first ROC point (thresholds descending) whose TPR reaches ``level``.

    The threshold is the ``k``-th largest in-distribution score, ``k`` the least count with
    ``k / n_in >= level`` (the comparison scikit-learn's ``roc_curve`` makes, ties included: every
    sample scoring at least the threshold is accepted); the FPR is the share of OOD samples scoring
    at least that. Equal to ``fpr[argmax(tpr >= level)]`` of ``sklearn.metrics.roc_curve``.
    """
    s_in = np.sort(np.asarray(score_in, dtype=np.float64))[::-1]
    n_in = s_in.size
    k = int(np.argmax(np.arange(1, n_in + 1) / n_in >= level)) + 1
    threshold = s_in[k - 1]
    return float(np.mean(np.asarray(score_out, dtype=np.float64) >= threshold))


def ood_metrics(score_in: Any, score_out: Any) -> dict[str, float | None]:
    """``ood_auroc``, ``ood_auprc`` (in-distribution positive) and ``ood_fpr_at_95_tpr`` of scores
    that are higher for in-distribution samples; all ``None`` when either set is empty."""
    s_in = np.asarray(score_in, dtype=np.float64).ravel()
    s_out = np.asarray(score_out, dtype=np.float64).ravel()
    if s_in.size == 0 or s_out.size == 0:
        return {"ood_auroc": None, "ood_auprc": None, "ood_fpr_at_95_tpr": None}
    ordered = np.sort(np.concatenate([s_in, s_out]))
    return {
        "ood_auroc": _auroc(ordered, s_in),
        "ood_auprc": _average_precision(ordered, s_in),
        "ood_fpr_at_95_tpr": fpr_at_tpr(s_in, s_out),
    }
