"""Evaluation metrics for long-tailed classification, as pure functions of logits and labels.

Top-1 accuracy hides how a model does on rare classes, so every evaluation also reports balanced
accuracy, per-class accuracy, head / medium / tail accuracy under a named split rule, the accuracy
disparity between head and tail, macro one-vs-rest ROC AUC and average precision (AUPRC) and the
confusion matrix. Results are plain Python (floats, lists, None) so they go straight to JSON.
Nothing here knows about engines, clients or rounds.

The confusion matrix (and from it per-class and balanced accuracy), the ROC AUC and the average
precision are computed here and tested equal to scikit-learn's ``confusion_matrix``,
``balanced_accuracy_score``, ``roc_auc_score`` and ``average_precision_score``. Why not call
sklearn: importing ``sklearn.metrics`` costs 1.7 s of every run's start-up (a fifth of the
quickstart) for what is one ``np.bincount``; and sklearn's AUC re-validates and re-sorts each
class separately, about ten times slower at CIFAR-100 scale (10,000 samples, 100
classes, evaluated every few rounds and per client view), and rejects the ``-inf`` logits of masked
classes.

The shot rules' thresholds are checked by :func:`shot_thresholds`, which :mod:`fedlt.scenario.config` calls
when a scenario is loaded, so a bad ``eval.shot_thresholds`` is reported before any training; here
errors are plain ``ValueError``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedlt.base.registry import ParameterError

__all__ = [
    "SHOT_RULES",
    "SHOT_THRESHOLDS",
    "classification_metrics",
    "disparity_metrics",
    "personalized_accuracy",
    "shot_groups",
    "shot_thresholds",
]

SHOT_RULES: tuple[str, ...] = ("count", "cumulative")
_DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {"count": (100.0, 20.0), "cumulative": (0.75, 0.95)}
#: What each rule's two thresholds must be, phrased to follow "must be".
SHOT_THRESHOLDS: dict[str, str] = {
    "count": "[many, few] sample counts with many >= few >= 0, e.g. [100, 20]",
    "cumulative": "[head, medium] cumulative fractions with 0 < head <= medium <= 1, e.g. [0.75, 0.95]",
}


def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.is_floating_point():
            array = array.double()
        return array.numpy()
    return np.asarray(array)


def _counts_array(train_class_counts: Any) -> np.ndarray:
    counts = _to_numpy(train_class_counts).astype(np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"train_class_counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("train_class_counts must be finite and >= 0")
    return counts


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def shot_thresholds(rule: str, thresholds: Any = None) -> tuple[float, float]:
    """The split rule's two thresholds, checked; the rule's defaults when ``thresholds`` is None.

    Raises
    ------
    ValueError
        An unknown rule.
    ParameterError
        Parameter ``thresholds`` is not what the rule allows (:data:`SHOT_THRESHOLDS`).
    """
    if rule not in SHOT_RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, SHOT_RULES))}, got {rule!r}")
    if thresholds is None:
        return _DEFAULT_THRESHOLDS[rule]
    allowed = SHOT_THRESHOLDS[rule]
    is_seq = isinstance(thresholds, (Sequence, np.ndarray)) and not isinstance(thresholds, str)
    if not is_seq or len(thresholds) != 2 or not all(_is_real(t) for t in thresholds):
        raise ParameterError("thresholds", thresholds, allowed)
    first, second = float(thresholds[0]), float(thresholds[1])
    valid = (0 <= second <= first < np.inf) if rule == "count" else (0 < first <= second <= 1)
    if not valid:
        raise ParameterError("thresholds", thresholds, allowed)
    return first, second


def shot_groups(
    train_class_counts: Sequence[float] | np.ndarray | torch.Tensor,
    rule: str = "count",
    thresholds: Sequence[float] | None = None,
) -> dict[str, list[int]]:
    """Split classes into head / medium / tail by their training counts.

    Parameters
    ----------
    train_class_counts : sequence of numbers
        Training samples per class (global or one client's), length C.
    rule : {"count", "cumulative"}
        ``"count"`` is the OLTR many/medium/few convention: head has more than ``thresholds[0]``
        (100) samples, tail fewer than ``thresholds[1]`` (20), medium the rest, boundaries
        included. It leaves CIFAR-10-LT nearly without a tail, hence ``"cumulative"``, FedLoGe's
        ``shot_split``: sort classes by count (descending, ties by class id); head is the
        shortest prefix covering at least ``thresholds[0]`` (0.75) of all samples, medium
        extends it until ``thresholds[1]`` (0.95) is covered, tail is the rest.
    thresholds : pair of numbers, optional
        The rule's two thresholds; ``None`` uses the defaults above.

    Returns
    -------
    dict
        ``{"head": [...], "medium": [...], "tail": [...]}``, each a sorted list of class ids.

    Raises
    ------
    ValueError
        An unknown rule, or thresholds the rule does not allow (see :func:`shot_thresholds`).
    """
    first, second = shot_thresholds(rule, thresholds)
    counts = _counts_array(train_class_counts)
    if rule == "count":
        head = np.flatnonzero(counts > first)
        tail = np.flatnonzero(counts < second)
        medium = np.flatnonzero((counts <= first) & (counts >= second))
    else:
        total = counts.sum()
        if total <= 0:
            raise ValueError("the cumulative shot rule needs train_class_counts with a positive sum")
        order = np.argsort(-counts, kind="stable")  # descending, ties keep ascending class id
        covered = np.cumsum(counts[order])
        # Index of the first class at which the cumulative count reaches each fraction.
        end_head = int(np.argmax(covered >= first * total)) + 1
        end_medium = max(end_head, int(np.argmax(covered >= second * total)) + 1)
        head, medium, tail = order[:end_head], order[end_head:end_medium], order[end_medium:]
    return {
        name: sorted(int(c) for c in ids)
        for name, ids in (("head", head), ("medium", medium), ("tail", tail))
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax, each row normalised in sorted order.

    Log-probabilities order samples as the softmax probabilities do, but do not underflow to 0, so
    confident predictions are not turned into spurious ties. Summing each row in sorted order makes
    the normaliser independent of the class order, so rows whose logits are permutations of each
    other give exactly tied probabilities. A masked class (``-inf`` logit) keeps ``-inf``.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(np.sort(shifted, axis=1)).sum(axis=1, keepdims=True))


def _auroc(ordered: np.ndarray, pos: np.ndarray) -> float:
    """One class's ROC AUC: the Mann-Whitney form (tied scores count one half), as sklearn's
    ``roc_auc_score``. ``ordered``: all N scores sorted ascending; ``pos``: the positives' scores;
    needs positives and negatives."""
    # Average rank (1-based) of each positive among all N scores, ties sharing their mean rank.
    ranks = (np.searchsorted(ordered, pos, "left") + np.searchsorted(ordered, pos, "right") + 1) / 2
    n_pos = pos.size
    return float((ranks.sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (ordered.size - n_pos)))


def _average_precision(ordered: np.ndarray, pos: np.ndarray) -> float:
    """One class's average precision, as sklearn's ``average_precision_score``.

    sklearn sums ``(R_n - R_{n-1}) P_n`` over the distinct thresholds (tied scores enter
    together); recall steps by ``1/P`` at each positive, so this is the mean over positives ``i``
    of the precision at threshold ``s_i``: positives scoring ``>= s_i`` over all samples scoring
    ``>= s_i``. ``ordered``: all N scores sorted ascending; ``pos``: the positives' scores (at
    least one).
    """
    pos_sorted = np.sort(pos)
    at_least = ordered.size - np.searchsorted(ordered, pos, "left")
    pos_at_least = pos.size - np.searchsorted(pos_sorted, pos, "left")
    return float(np.mean(pos_at_least / at_least))


def _macro_ranking(logits: np.ndarray, labels: np.ndarray, present: np.ndarray) -> tuple[float | None, ...]:
    """``(auroc_macro, auprc_macro)``: one-vs-rest ROC AUC and average precision of the
    log-softmax scores, each averaged over classes.

    ROC AUC: over the classes present in ``labels`` (positives and negatives), ``None`` with fewer
    than two. Average precision: over the classes present (a class with no negatives scores 1),
    ``None`` with none. A masked class (``-inf`` logit) has log-probability ``-inf``: below every
    finite score and tied with the other masked samples, as a sorted array holds it, so no special
    case is needed.
    """
    classes = np.flatnonzero(present)
    if classes.size == 0:
        return None, None
    log_probs = _log_softmax(logits)
    by_class = np.ascontiguousarray(log_probs[:, classes].T)  # (K, N): one sort per class row
    aucs, aps = np.empty(classes.size), np.empty(classes.size)
    for k, c in enumerate(classes):
        scores = by_class[k]
        ordered, pos = np.sort(scores), scores[labels == c]
        aps[k] = _average_precision(ordered, pos)
        if classes.size >= 2:
            aucs[k] = _auroc(ordered, pos)
    return (float(aucs.mean()) if classes.size >= 2 else None), float(aps.mean())


def _confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows the true class and columns the predicted one (sklearn's layout).

    Every class gets its row and column, present or not, so matrices of different evaluations
    (global set, each client's view) line up; no samples give all zeros.
    """
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def classification_metrics(
    logits: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    num_classes: int,
    train_class_counts: Sequence[float] | np.ndarray | torch.Tensor,
    rule: str = "count",
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Accuracy-type metrics of one evaluation, robust to class imbalance in train and test.

    Parameters
    ----------
    logits : (N, C) array or tensor
        Scores, already adjusted by any evaluation-time remedy; prediction is their argmax.
    labels : (N,) array of int
        True classes in ``[0, num_classes)``.
    num_classes : int
        C.
    train_class_counts : sequence of numbers, length C
        Training counts that define the head / medium / tail split (see ``shot_groups``).
    rule, thresholds
        The split rule, passed to ``shot_groups`` and reported back.

    Returns
    -------
    dict
        ``accuracy`` (top-1 over samples); ``balanced_accuracy`` (mean recall over the classes
        present in ``labels``); ``per_class_accuracy`` (C floats, ``None`` for a class absent
        from ``labels``); ``head_accuracy`` / ``medium_accuracy`` / ``tail_accuracy`` (mean
        per-class accuracy over the group's present classes, ``None`` if it has none);
        ``shot_rule`` (the rule, its thresholds and the three class lists); ``auroc_macro``
        (macro one-vs-rest ROC AUC of the softmax probabilities over classes with positives
        and negatives, ``None`` if fewer than two classes are present; ``-inf`` logits of
        masked classes rank below every finite score); ``auprc_macro`` (macro one-vs-rest
        average precision, sklearn's ``average_precision_score``, of the same scores over the
        classes present, ``None`` without samples); ``accuracy_disparity`` and
        ``per_class_accuracy_std`` (:func:`disparity_metrics`); ``confusion_matrix`` (C lists of C ints,
        row = true class, column = predicted class, every class included, all zeros when there
        are no samples). Accuracy-type values are ``None`` when there are no samples.
    """
    scores = _to_numpy(logits).astype(np.float64, copy=False)
    y = _to_numpy(labels)
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"logits must have shape (N, {num_classes}), got {scores.shape}")
    if (
        np.isnan(scores).any()
        or np.isposinf(scores).any()
        or (scores.size and np.isneginf(scores.max(axis=1)).any())
    ):
        # -inf is allowed (masked classes), but every sample needs a finite best score.
        raise ValueError("logits must not contain NaN or +inf, and no row may be all -inf")
    if y.ndim != 1 or y.shape[0] != scores.shape[0]:
        raise ValueError(f"labels must have shape ({scores.shape[0]},), got {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be integers in [0, {num_classes})")
    counts = _counts_array(train_class_counts)
    if counts.size != num_classes:
        raise ValueError(f"train_class_counts must have {num_classes} entries, got {counts.size}")
    first, second = shot_thresholds(rule, thresholds)
    groups = shot_groups(counts, rule, (first, second))

    y = y.astype(np.int64, copy=False)
    confusion = _confusion(y, scores.argmax(axis=1), num_classes)
    support = confusion.sum(axis=1)
    hits = np.diagonal(confusion)
    present = support > 0
    # sklearn's balanced_accuracy_score is this mean of recalls over the classes in ``labels``, but
    # it warns whenever a prediction names a class absent from them (routine on a client's local
    # view, and an error under the test suite's warning filter) and fails on an empty view.
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=present)

    result: dict[str, Any] = {
        "accuracy": float(hits.sum() / y.size) if y.size else None,
        "balanced_accuracy": _mean_or_none(recall[present]),
        "per_class_accuracy": [float(r) if p else None for r, p in zip(recall, present, strict=True)],
    }
    for name, ids in groups.items():
        ids_present = [c for c in ids if present[c]]
        result[f"{name}_accuracy"] = _mean_or_none(recall[ids_present])
    result["shot_rule"] = {"rule": rule, "thresholds": [first, second], **groups}
    result.update(disparity_metrics(result))
    result["auroc_macro"], result["auprc_macro"] = _macro_ranking(scores, y, present)
    result["confusion_matrix"] = confusion.tolist()
    return result


def disparity_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    """How unequal accuracy is across classes, from a :func:`classification_metrics` result.

    ``{prefix}accuracy_disparity``: ``head_accuracy - tail_accuracy`` (percentage points as a
    fraction; positive when the head is better; ``None`` when either group has no present class).
    ``{prefix}per_class_accuracy_std``: the population standard deviation (ddof 0) of the
    per-class accuracies of the classes present (``None`` when none is). ``prefix`` reads and
    writes prefixed keys (``"robust_"`` for the attacked metrics).
    """
    head, tail = metrics.get(f"{prefix}head_accuracy"), metrics.get(f"{prefix}tail_accuracy")
    per_class = [a for a in metrics.get(f"{prefix}per_class_accuracy") or [] if a is not None]
    return {
        f"{prefix}accuracy_disparity": None if head is None or tail is None else float(head - tail),
        f"{prefix}per_class_accuracy_std": float(np.std(per_class)) if per_class else None,
    }


def personalized_accuracy(correct: Sequence[int], total: Sequence[int]) -> float | None:
    """Unweighted mean over clients of local-test accuracy (FedLoGe's personalised accuracy).

    Each client counts once whatever its test-set size, so small (often tail-heavy) clients
    weigh as much as large ones. Clients with ``total == 0`` have no local view and are
    skipped; ``None`` if no client has one.
    """
    hit = np.asarray(correct, dtype=np.float64)
    seen = np.asarray(total, dtype=np.float64)
    if hit.shape != seen.shape or hit.ndim != 1:
        raise ValueError(f"correct and total must be 1-D of equal length, got {hit.shape} and {seen.shape}")
    if np.any(hit < 0) or np.any(hit > seen):
        raise ValueError("need 0 <= correct <= total for every client")
    has_view = seen > 0
    if not has_view.any():
        return None
    return float((hit[has_view] / seen[has_view]).mean())


def personalized_shot_accuracy(
    predictions: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_classes: int,
    thresholds: Sequence[float] | None = None,
) -> dict[str, float | None]:
    """Head / medium / tail accuracy of personalised evaluation, as FedLoGe's code computes it.

    Each client (one ``predictions``/``labels`` pair: its local test view) has its *own* split:
    the ``"cumulative"`` rule of :func:`shot_groups` applied to the class counts of its view
    (``thresholds`` default 0.75 / 0.95), so a client's tail is what is rare *for it*. Per client
    and group, the fraction of the view's samples of the group's classes predicted right; then
    the unweighted mean over the clients whose view has samples of that group (``None`` if none
    has). Returns ``personalized_head_accuracy``, ``personalized_medium_accuracy`` and
    ``personalized_tail_accuracy``.
    """
    hits: dict[str, list[float]] = {"head": [], "medium": [], "tail": []}
    for pred, y in zip(predictions, labels, strict=True):
        if y.size == 0:
            continue
        counts = np.bincount(y, minlength=num_classes)
        for name, classes in shot_groups(counts, "cumulative", thresholds).items():
            in_group = np.isin(y, np.asarray(classes, dtype=np.int64))
            if in_group.any():
                hits[name].append(float((pred[in_group] == y[in_group]).mean()))
    return {f"personalized_{g}_accuracy": float(np.mean(v)) if v else None for g, v in hits.items()}
