"""Out-of-distribution detection metrics: how well a score separates in- from out-of-distribution
samples (docs/ood.md).

Convention: a score is *higher for in-distribution* samples, and in-distribution is the positive
class (OpenOOD's and Hendrycks & Gimpel's "AUPR-In"). ``ood_auroc`` does not depend on which side is
positive; ``ood_auprc`` does, and under a small OOD set it is the optimistic side, so the record
names it. ``ood_fpr_at_95_tpr`` is the share of OOD samples accepted at the threshold that keeps 95%
of the in-distribution ones (lower is better).

Per shot group (:func:`ood_group_metrics`): the same three metrics of each group's
in-distribution test samples (head / medium / tail, by their true class) against *all* OOD samples,
named ``ood_head_auroc``, ``ood_medium_fpr_at_95_tpr``... as ``robust_head_accuracy`` names its
group: an overall AUROC can hide that a score takes tail samples for unknown ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedlt.metrics.classification import _auroc, _average_precision

__all__ = ["OOD_MEASURES", "SHOT_GROUPS", "TPR_LEVEL", "fpr_at_tpr", "ood_group_metrics", "ood_metrics"]

#: The three detection measures, as named after ``ood_`` (``ood_auroc``) and after the group
#: (``ood_tail_auroc``).
OOD_MEASURES: tuple[str, ...] = ("auroc", "auprc", "fpr_at_95_tpr")
#: The shot groups reported, as :func:`fedlt.metrics.classification.shot_groups` names them.
SHOT_GROUPS: tuple[str, ...] = ("head", "medium", "tail")

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


def ood_group_metrics(
    score_in: Any, labels_in: Any, score_out: Any, groups: Mapping[str, Sequence[int]]
) -> dict[str, float | None]:
    """``ood_{group}_{measure}`` for each of :data:`SHOT_GROUPS`: :func:`ood_metrics` of the
    in-distribution scores whose label is one of the group's classes against every OOD score.

    ``groups`` maps ``"head"`` / ``"medium"`` / ``"tail"`` to class ids (the run's shot split). A
    group without test samples (no class, or classes absent from the test set) gets ``None`` for
    each measure, as ``tail_accuracy`` does: there is nothing to separate.
    """
    s_in = np.asarray(score_in, dtype=np.float64).ravel()
    y_in = np.asarray(labels_in).ravel()
    if y_in.shape != s_in.shape:
        raise ValueError(f"labels_in has {y_in.size} labels for {s_in.size} in-distribution scores")
    out: dict[str, float | None] = {}
    for group in SHOT_GROUPS:
        members = np.isin(y_in, np.asarray(groups.get(group, []), dtype=np.int64))
        found = ood_metrics(s_in[members], score_out)
        out.update({f"ood_{group}_{m}": found[f"ood_{m}"] for m in OOD_MEASURES})
    return out
