"""Tests for fedlt.metrics.classification: hand-worked examples, shot-split boundaries, edge cases, speed."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score

from fedlt.base.registry import ParameterError
from fedlt.errors import ScenarioError
from fedlt.metrics.classification import (
    SHOT_RULES,
    classification_metrics,
    personalized_accuracy,
    shot_groups,
    shot_thresholds,
)
from fedlt.scenario.config import scenario_from_dict

CIFAR10_LT_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _hand_example() -> tuple[np.ndarray, np.ndarray]:
    """Six samples, three classes; logits are log-probabilities, so softmax gives these rows back.

    Rows 1 and 4 are identical (labels 0 and 1), which creates exact AUROC ties.
    """
    probs = np.array(
        [
            [0.70, 0.20, 0.10],  # y=0, pred 0: right
            [0.40, 0.35, 0.25],  # y=0, pred 0: right
            [0.20, 0.60, 0.20],  # y=0, pred 1: wrong
            [0.10, 0.80, 0.10],  # y=1, pred 1: right
            [0.40, 0.35, 0.25],  # y=1, pred 0: wrong (same row as sample 1)
            [0.30, 0.30, 0.40],  # y=2, pred 2: right
        ]
    )
    return np.log(probs), np.array([0, 0, 0, 1, 1, 2])


def test_hand_worked_example() -> None:
    # Prepare
    logits, labels = _hand_example()
    # accuracy: 4 of 6 right. Per class: c0 2/3, c1 1/2, c2 1/1; balanced = (2/3 + 1/2 + 1)/3 = 13/18.
    # AUROC, one-vs-rest on p_c, counting (positive > negative) pairs, ties as 1/2:
    #   c0: positives 0.7, 0.4, 0.2 vs negatives 0.1, 0.4, 0.3 -> 3 + (2 + 0.5) + 1 = 6.5 of 9
    #   c1: positives 0.8, 0.35 vs negatives 0.2, 0.35, 0.6, 0.3 -> 4 + (2 + 0.5) = 6.5 of 8
    #   c2: positive 0.4 vs negatives 0.1, 0.25, 0.2, 0.1, 0.25 -> 5 of 5
    expected_auroc = (6.5 / 9 + 6.5 / 8 + 1.0) / 3

    # Execute
    result = classification_metrics(logits, labels, 3, train_class_counts=[200, 50, 10])

    # Assert
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["balanced_accuracy"] == pytest.approx(13 / 18)
    assert result["per_class_accuracy"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    # Count rule: 200 > 100 is head, 50 is medium, 10 < 20 is tail.
    assert result["head_accuracy"] == pytest.approx(2 / 3)
    assert result["medium_accuracy"] == pytest.approx(1 / 2)
    assert result["tail_accuracy"] == pytest.approx(1.0)
    assert result["shot_rule"] == {
        "rule": "count",
        "thresholds": [100.0, 20.0],
        "head": [0],
        "medium": [1],
        "tail": [2],
    }
    assert result["auroc_macro"] == pytest.approx(expected_auroc)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    assert result["auroc_macro"] == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    )


def test_result_is_plain_json_and_accepts_tensors() -> None:
    # Prepare
    logits, labels = _hand_example()

    # Execute
    from_numpy = classification_metrics(logits, labels, 3, [200, 50, 10])
    from_torch = classification_metrics(
        torch.from_numpy(logits).float(), torch.from_numpy(labels), 3, torch.tensor([200, 50, 10])
    )

    # Assert
    assert json.loads(json.dumps(from_numpy)) == from_numpy
    for key in ("accuracy", "balanced_accuracy", "auroc_macro"):
        assert type(from_numpy[key]) is float
        assert from_torch[key] == pytest.approx(from_numpy[key])
    assert all(type(v) is float for v in from_numpy["per_class_accuracy"])


def test_absent_classes_are_none_and_left_out() -> None:
    # Prepare: 4 classes, class 3 never appears in the labels; class 2 is the only tail class.
    logits = np.array(
        [
            [2.0, 0.0, 0.0, 1.0],  # y=0 right
            [0.0, 2.0, 0.0, 3.0],  # y=1 wrong (pred 3, an absent class)
            [0.0, 0.0, 2.0, 0.0],  # y=1 wrong (pred 2)
            [0.0, 0.0, 2.0, 0.0],  # y=2 right
        ]
    )
    labels = np.array([0, 1, 1, 2])

    # Execute
    result = classification_metrics(logits, labels, 4, train_class_counts=[300, 200, 10, 5])

    # Assert
    assert result["per_class_accuracy"] == [1.0, 0.0, 1.0, None]
    assert result["accuracy"] == pytest.approx(2 / 4)
    assert result["balanced_accuracy"] == pytest.approx(2 / 3)  # mean over classes 0, 1, 2 only
    assert result["head_accuracy"] == pytest.approx(0.5)  # classes 0 and 1
    assert result["medium_accuracy"] is None  # no class has 20..100 samples
    assert result["tail_accuracy"] == pytest.approx(1.0)  # class 3 is tail but absent
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in (0, 1, 2)])
    assert result["auroc_macro"] == pytest.approx(expected)


def test_auroc_none_with_one_class_and_metrics_none_without_samples() -> None:
    # Prepare
    one_class_logits = np.array([[1.0, 0.0], [0.0, 1.0]])
    empty = np.zeros((0, 2))

    # Execute
    one_class = classification_metrics(one_class_logits, np.array([1, 1]), 2, [10, 10])
    no_samples = classification_metrics(empty, np.zeros(0, dtype=np.int64), 2, [10, 10])

    # Assert
    assert one_class["auroc_macro"] is None
    assert one_class["accuracy"] == pytest.approx(0.5)
    assert no_samples["accuracy"] is None
    assert no_samples["balanced_accuracy"] is None
    assert no_samples["per_class_accuracy"] == [None, None]
    assert no_samples["auroc_macro"] is None


def test_auroc_matches_sklearn_on_random_data_with_ties() -> None:
    # Prepare: integer logits make many exact ties between samples.
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, size=(400, 5)).astype(np.float64)
    labels = rng.integers(0, 5, size=400)
    # Equal probabilities can differ in the last bit depending on the order softmax sums a row;
    # rounding to 12 digits restores the exact ties (distinct values here differ far more).
    probs = np.round(torch.softmax(torch.from_numpy(logits), dim=1).numpy(), 12)

    # Execute
    result = classification_metrics(logits, labels, 5, [100] * 5)

    # Assert
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert result["auroc_macro"] == pytest.approx(expected, abs=1e-12)


def test_auroc_does_not_tie_underflowing_probabilities() -> None:
    # Prepare: class-1 probabilities underflow to exactly 0 in float64 (e^-900, e^-1000), yet the
    # logits still rank the y=1 samples (-900) above the y=0 samples (-1000).
    logits = np.array([[0.0, -1000.0], [0.0, -1000.0], [0.0, -900.0], [0.0, -900.0]])
    labels = np.array([0, 0, 1, 1])

    # Execute
    result = classification_metrics(logits, labels, 2, [10, 10])

    # Assert: class 1 is ranked perfectly (AUC 1). Class 0's probabilities, 1 - e^-1000 and
    # 1 - e^-900, both round to 1.0 and tie (AUC 0.5): (1 + 0.5) / 2. Plain softmax gives 0.5.
    assert result["auroc_macro"] == pytest.approx(0.75)


def test_masked_classes_with_minus_inf_are_allowed() -> None:
    # Prepare: an evaluation-time remedy masked class 2 with -inf.
    logits = np.array([[1.0, 0.0, -np.inf], [0.0, 1.0, -np.inf], [0.0, 1.0, -np.inf]])
    labels = np.array([0, 1, 0])

    # Execute
    result = classification_metrics(logits, labels, 3, [10, 10, 10])

    # Assert
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert math.isfinite(result["auroc_macro"])


def test_confusion_matrix_hand_worked() -> None:
    # Prepare: predictions of _hand_example are 0, 0, 1 | 1, 0 | 2 for labels 0, 0, 0 | 1, 1 | 2.
    logits, labels = _hand_example()

    # Execute
    result = classification_metrics(logits, labels, 3, [200, 50, 10])

    # Assert: rows are the true class, columns the predicted one.
    assert result["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert all(type(v) is int for row in result["confusion_matrix"] for v in row)
    assert json.loads(json.dumps(result)) == result


def test_confusion_matrix_keeps_absent_classes_and_empty_input() -> None:
    # Prepare: 4 classes; class 3 is never a label but is predicted once, class 2 neither.
    logits = np.array([[2.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 3.0], [0.0, 2.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1])

    # Execute
    result = classification_metrics(logits, labels, 4, [10] * 4)
    empty = classification_metrics(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), 4, [10] * 4)

    # Assert
    assert result["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert empty["confusion_matrix"] == [[0] * 4 for _ in range(4)]


def _sklearn_macro_auroc(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean of sklearn's binary ROC AUC per class on log-softmax scores, classes with both outcomes.

    sklearn rejects infinite scores, so each class's -inf (masked) scores become one finite value
    below that class's finite ones: the ranking, hence the AUC, is unchanged.
    """
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()
    aucs = []
    for c in range(logits.shape[1]):
        positive = labels == c
        if positive.all() or not positive.any():
            continue
        scores = log_probs[:, c].copy()
        finite = np.isfinite(scores)
        scores[~finite] = scores[finite].min() - 1.0 if finite.any() else 0.0
        aucs.append(roc_auc_score(positive, scores))
    return float(np.mean(aucs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_on_random_data(seed: int) -> None:
    # Prepare: 7 classes, class 6 never a label (but predicted), log-normal-ish spread of logits.
    rng = np.random.default_rng(seed)
    n, c = 300, 7
    labels = rng.choice(6, size=n, p=[0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = rng.normal(scale=3.0, size=(n, c))
    logits[0, 6] = 50.0  # sample 0 is predicted as the absent class 6

    # Execute
    result = classification_metrics(logits, labels, c, [100] * c)

    # Assert
    predictions = logits.argmax(axis=1)
    with warnings.catch_warnings():
        # sklearn warns that class 6 is predicted but never true; the score still leaves it out.
        warnings.simplefilter("ignore", UserWarning)
        expected_balanced = balanced_accuracy_score(labels, predictions)
    assert result["balanced_accuracy"] == pytest.approx(expected_balanced, abs=1e-12)
    expected_matrix = confusion_matrix(labels, predictions, labels=np.arange(c))
    assert result["confusion_matrix"] == expected_matrix.tolist()
    per_class = np.diagonal(expected_matrix) / np.maximum(expected_matrix.sum(axis=1), 1)
    assert result["per_class_accuracy"][:6] == pytest.approx(per_class[:6].tolist(), abs=1e-12)
    assert result["per_class_accuracy"][6] is None
    assert result["auroc_macro"] == pytest.approx(_sklearn_macro_auroc(logits, labels), abs=1e-12)


def test_auroc_with_masked_logits_matches_sklearn() -> None:
    # Prepare: class 4 masked (-inf) for every sample, class 2 masked for a random third of them,
    # so class 2's scores mix finite values with a tied -inf block.
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=200)
    logits = rng.normal(size=(200, 5))
    logits[:, 4] = -np.inf
    logits[rng.random(200) < 1 / 3, 2] = -np.inf
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()

    # Execute
    result = classification_metrics(logits, labels, 5, [10] * 5)

    # Assert: sklearn cannot take the raw log-probabilities, which is why they are never passed.
    with pytest.raises(ValueError, match="infinity"):
        roc_auc_score(labels == 2, log_probs[:, 2])
    assert result["auroc_macro"] == pytest.approx(_sklearn_macro_auroc(logits, labels), abs=1e-12)
    assert np.asarray(result["confusion_matrix"])[:, 4].sum() == 0  # a masked class is never predicted


def test_masked_class_with_samples_scores_one_half() -> None:
    # Prepare: class 1 is masked but has a true sample; its scores all tie at -inf (AUC 1/2).
    logits = np.array([[0.0, -np.inf, -5.0], [1.0, -np.inf, 0.0], [0.0, -np.inf, -9.0], [0.0, -np.inf, 1.0]])
    labels = np.array([0, 1, 0, 2])

    # Execute
    result = classification_metrics(logits, labels, 3, [10] * 3)

    # Assert, by hand on log-softmax scores:
    #   c0: positives rows 0, 2 (log p ~ -0.0067, -0.0001) vs rows 1 (-0.313), 3 (-1.313): 4 of 4 -> 1
    #   c1: positive row 1 at -inf, negatives all -inf: 3 ties -> 1/2
    #   c2: positive row 3 (-0.313) vs rows 0 (-5.007), 1 (-1.313), 2 (-9.0001): 3 of 3 -> 1
    assert result["auroc_macro"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert result["per_class_accuracy"] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_positive_inf_logits_are_rejected(bad: float) -> None:
    logits = np.array([[1.0, bad], [0.0, 1.0]])
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(logits, np.array([0, 1]), 2, [10, 10])


def test_shape_mismatches_are_rejected() -> None:
    logits, labels = _hand_example()
    with pytest.raises(ValueError, match="logits"):
        classification_metrics(logits, labels, 4, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(logits, labels[:5], 3, [1, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(logits, np.array([0, 0, 0, 1, 1, 3]), 3, [1, 1, 1])
    with pytest.raises(ValueError, match="train_class_counts"):
        classification_metrics(logits, labels, 3, [1, 1])


def test_count_rule_boundaries_are_medium() -> None:
    # Prepare: 100 is not > 100 and 20 is not < 20, so both are medium (OLTR convention).
    counts = [500, 150, 100, 60, 20, 19, 5]

    # Execute
    groups = shot_groups(counts, rule="count")

    # Assert
    assert groups == {"head": [0, 1], "medium": [2, 3, 4], "tail": [5, 6]}


def test_count_rule_custom_thresholds() -> None:
    # head: > 150; tail: < 19; medium: 19..150 inclusive.
    assert shot_groups([500, 150, 100, 60, 20, 19, 5], "count", [150, 19]) == {
        "head": [0],
        "medium": [1, 2, 3, 4, 5],
        "tail": [6],
    }


def test_cumulative_rule_cifar10_lt() -> None:
    # Prepare: 12,406 samples; cumulative shares 0.403, 0.645, 0.789 | 0.876, 0.928, 0.959 | ...
    # Head reaches 75% at class 2, medium reaches 95% at class 5.

    # Execute
    groups = shot_groups(CIFAR10_LT_IF100, rule="cumulative")

    # Assert
    assert groups == {"head": [0, 1, 2], "medium": [3, 4, 5], "tail": [6, 7, 8, 9]}


def test_cumulative_rule_sorts_by_count_and_breaks_ties_by_id() -> None:
    # Prepare: shuffled counts; classes 1 and 3 tie at 30.
    counts = [10, 30, 50, 30, 0]  # total 120; order 2, 1, 3, 0, 4

    # Execute
    groups = shot_groups(counts, rule="cumulative", thresholds=[0.5, 0.9])

    # Assert: 50/120 = 0.42 < 0.5, +30 = 0.67 >= 0.5 -> head {2, 1}; +30 = 0.92 >= 0.9 -> medium {3}.
    assert groups == {"head": [1, 2], "medium": [3], "tail": [0, 4]}


def test_cumulative_rule_exact_threshold_hit_stops_the_group() -> None:
    # 3 of 4 samples is exactly 0.75: the prefix that reaches it is the head.
    assert shot_groups([3, 1], "cumulative", [0.75, 1.0]) == {"head": [0], "medium": [1], "tail": []}


BAD_THRESHOLDS = [
    ("count", [20, 100]),  # many < few
    ("count", [100]),
    ("count", "100,20"),
    ("count", [True, False]),
    ("count", [100, -1]),
    ("cumulative", [0.95, 0.75]),  # head > medium
    ("cumulative", [0.0, 0.5]),
    ("cumulative", [0.75, 1.5]),
]


def test_shot_rule_errors_are_plain_value_errors() -> None:
    with pytest.raises(ValueError, match="rule must be one of 'count', 'cumulative', got 'thirds'"):
        shot_groups([1, 2], rule="thirds")
    for rule, bad in BAD_THRESHOLDS:
        with pytest.raises(ParameterError) as info:
            shot_groups([1, 2], rule=rule, thresholds=bad)
        assert info.value.param == "thresholds"
    with pytest.raises(ValueError):
        classification_metrics(*_hand_example(), 3, [1, 1, 1], rule="nope")
    assert SHOT_RULES == ("count", "cumulative")
    assert shot_thresholds("count") == (100.0, 20.0) and shot_thresholds("cumulative") == (0.75, 0.95)
    assert shot_thresholds("count", [20, 20]) == (20.0, 20.0)  # many == few is allowed


@pytest.mark.parametrize(("rule", "bad"), [b for b in BAD_THRESHOLDS if not isinstance(b[1], str)])
def test_bad_shot_thresholds_are_refused_when_the_scenario_loads(rule: str, bad: list) -> None:
    # The rule is checked with the scenario, not first when a run evaluates after round 1.
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"eval": {"shot_rule": rule, "shot_thresholds": bad}})
    assert info.value.key.startswith("eval.shot_thresholds")  # [True, False] names its first item


def test_shot_rule_is_reported_with_cumulative_rule() -> None:
    # Prepare: a balanced 10-class test set with perfect predictions.
    labels = np.arange(10)
    logits = np.eye(10)

    # Execute
    result = classification_metrics(logits, labels, 10, CIFAR10_LT_IF100, rule="cumulative")

    # Assert
    assert result["shot_rule"] == {
        "rule": "cumulative",
        "thresholds": [0.75, 0.95],
        "head": [0, 1, 2],
        "medium": [3, 4, 5],
        "tail": [6, 7, 8, 9],
    }
    assert result["tail_accuracy"] == 1.0
    assert result["auroc_macro"] == pytest.approx(1.0)


def test_personalized_accuracy_ignores_empty_clients() -> None:
    # Prepare: client accuracies 9/10, 1/2 and an empty client (no local test view).
    correct, total = [9, 1, 0], [10, 2, 0]

    # Execute
    result = personalized_accuracy(correct, total)

    # Assert: unweighted mean (0.9 + 0.5) / 2, not the pooled 10/12.
    assert result == pytest.approx(0.7)
    assert type(result) is float
    assert personalized_accuracy([0, 0], [0, 0]) is None
    assert personalized_accuracy([], []) is None
    with pytest.raises(ValueError):
        personalized_accuracy([3], [2])
    with pytest.raises(ValueError):
        personalized_accuracy([1, 2], [2])


def test_fast_on_cifar100_sized_test_set() -> None:
    # Prepare: N=10,000, C=100.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 100, size=10_000)
    logits = torch.from_numpy(rng.normal(size=(10_000, 100)).astype(np.float32))
    counts = [int(500 * 0.01 ** (i / 99)) for i in range(100)]

    # Execute
    start = time.perf_counter()
    result = classification_metrics(logits, torch.from_numpy(labels), 100, counts, rule="cumulative")
    elapsed = time.perf_counter() - start

    # Assert
    assert elapsed < 0.5
    assert 0.45 < result["auroc_macro"] < 0.55  # random scores


def test_personalized_shot_accuracy_hand_worked() -> None:
    """Each client split by its own view's counts (cumulative 75% / 95%, as FedLoGe's localtest),
    sample-level accuracy per group, then the mean over the clients that have the group."""
    from fedlt.metrics.classification import personalized_shot_accuracy

    def view(counts_right: dict[int, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        y, p = [], []
        for c, (n, right) in counts_right.items():
            y += [c] * n
            p += [c] * right + [(c + 1) % 10] * (n - right)
        return np.array(p), np.array(y)

    # A: 6/3/1 samples of classes 0/1/2 -> head {0, 1} (90%), medium {2}; 5+1 of 9 head right, 0 of 1
    # B: 8/2 of classes 3/0 -> head {3} (80%), medium {0}; 8 of 8, 0 of 2
    # C: 18/1/1 of classes 5/6/7 -> head {5} (90%), medium {6} (95%), tail {7}; 9/18, 1/1, 1/1
    a = view({0: (6, 5), 1: (3, 1), 2: (1, 0)})
    b = view({3: (8, 8), 0: (2, 0)})
    c = view({5: (18, 9), 6: (1, 1), 7: (1, 1)})
    empty = (np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    preds, labels = zip(a, b, c, empty, strict=True)
    got = personalized_shot_accuracy(preds, labels, 10)
    assert got["personalized_head_accuracy"] == pytest.approx((6 / 9 + 1.0 + 0.5) / 3)
    assert got["personalized_medium_accuracy"] == pytest.approx((0.0 + 0.0 + 1.0) / 3)
    assert got["personalized_tail_accuracy"] == pytest.approx(1.0)  # only C has a tail sample
    only_a = personalized_shot_accuracy(preds[:1], labels[:1], 10)
    assert only_a["personalized_tail_accuracy"] is None


# --------------------------------------------------------------------------- AUPRC and disparity


def _sklearn_macro_auprc(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean of sklearn's ``average_precision_score`` per class present, one-vs-rest, on softmax
    probabilities (masked ``-inf`` logits become probability 0: below every finite one, tied)."""
    from sklearn.metrics import average_precision_score

    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    present = np.unique(labels)
    return float(np.mean([average_precision_score(labels == c, probs[:, c]) for c in present]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auprc_matches_sklearn_on_random_data_with_ties(seed: int) -> None:
    # Prepare: 6 classes, class 5 never a label; rows 10-19 repeat row 0 (exact ties across
    # labels), and class 3 masked with -inf on some rows (probability 0: tied at the bottom).
    rng = np.random.default_rng(seed)
    n, c = 200, 6
    labels = rng.choice(5, size=n, p=[0.45, 0.25, 0.15, 0.1, 0.05])
    logits = rng.normal(scale=2.0, size=(n, c))
    logits[10:20] = logits[0]
    logits[rng.random(n) < 0.2, 3] = -np.inf

    # Execute
    result = classification_metrics(logits, labels, c, [100] * c)

    # Assert
    assert result["auprc_macro"] == pytest.approx(_sklearn_macro_auprc(logits, labels), abs=1e-12)


def test_auprc_hand_worked() -> None:
    # Prepare: the hand example. AP of a class = mean over its positives i of (positives scoring
    # >= s_i) / (samples scoring >= s_i), ties entering together (sklearn's thresholds).
    # Class 0 (p_0 = .70 .40 .20 | .10 .40 .30): .70 -> 1/1; .40 -> samples 0, 1, 4: 2/3;
    # .20 -> samples 0, 1, 2, 4, 5: 3/5. Class 1 (p_1 = .20 .35 .60 | .80 .35 | .30): .80 -> 1/1;
    # .35 -> samples 3, 2, 1, 4: 2/4. Class 2: its one positive scores highest (.40): 1.
    logits, labels = _hand_example()

    # Execute
    result = classification_metrics(logits, labels, 3, [100, 100, 100])

    # Assert
    ap0 = (1 / 1 + 2 / 3 + 3 / 5) / 3
    ap1 = (1 / 1 + 2 / 4) / 2
    ap2 = 1.0
    assert result["auprc_macro"] == pytest.approx((ap0 + ap1 + ap2) / 3)


def test_auprc_one_class_and_no_samples() -> None:
    # One class present: every sample is a positive, so average precision is 1 (sklearn too).
    one = classification_metrics(np.array([[0.0, 1.0], [2.0, 0.0]]), np.array([1, 1]), 2, [5, 5])
    empty = classification_metrics(np.zeros((0, 2)), np.array([], dtype=int), 2, [5, 5])
    assert one["auprc_macro"] == pytest.approx(1.0)
    assert empty["auprc_macro"] is None


def test_disparity_hand_worked() -> None:
    # Prepare: 4 classes, count rule [60, 20]: head = {0} (100), medium = {1, 2}, tail = {3} (5).
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    predictions = np.array([0, 0, 1, 0, 2, 2, 0, 3])  # recalls 1, 0.5, 1, 0.5
    logits = np.eye(4)[predictions] * 5.0

    # Execute
    result = classification_metrics(logits, labels, 4, [100, 40, 30, 5], thresholds=[60, 20])

    # Assert: head - tail = 1 - 0.5; population std of [1, 0.5, 1, 0.5] = 0.25.
    assert result["accuracy_disparity"] == pytest.approx(0.5)
    assert result["per_class_accuracy_std"] == pytest.approx(0.25)


def test_disparity_none_without_a_group_or_samples() -> None:
    # Tail class 3 absent from the labels: no tail accuracy, so no disparity; std over present ones.
    labels = np.array([0, 1, 2])
    result = classification_metrics(np.eye(4)[[0, 1, 1]], labels, 4, [100, 40, 30, 5], thresholds=[60, 20])
    assert result["tail_accuracy"] is None
    assert result["accuracy_disparity"] is None
    assert result["per_class_accuracy_std"] == pytest.approx(float(np.std([1.0, 1.0, 0.0])))
    empty = classification_metrics(np.zeros((0, 4)), np.array([], dtype=int), 4, [100, 40, 30, 5])
    assert empty["accuracy_disparity"] is None and empty["per_class_accuracy_std"] is None
