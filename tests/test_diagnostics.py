"""Diagnostics plugins: neural collapse and calibration against hand-worked geometry and numpy formulas."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from fedlt_plugins.diagnostics import (
    Calibration,
    NeuralCollapse,
    calibration_errors,
    class_means,
    classwise_ece,
    equiangularity,
    equinorm,
    neural_collapse,
    self_duality,
    top_label_ece,
    within_class_variability,
)
from pydantic import ValidationError
from torch import nn

from fedlt import EvalContext

NC_KEYS = {
    "nc1",
    "nc2_equinorm_means",
    "nc2_equinorm_head",
    "nc2_cos_std_means",
    "nc2_cos_std_head",
    "nc2_etf_gap_means",
    "nc2_etf_gap_head",
    "nc3",
    "nc4",
    "n_classes",
}


def _ctx(client_id: int | None = None, num_classes: int = 4) -> EvalContext:
    counts = np.full(num_classes, 10)
    return EvalContext(
        round=3,
        n_rounds=10,
        num_classes=num_classes,
        client_id=client_id,
        local_class_counts=None if client_id is None else counts,
        global_class_counts=counts,
        test_class_counts=counts,
    )


def _simplex_etf_rows(k: int, d: int, seed: int) -> np.ndarray:
    """(K, d) rows of a simplex ETF: unit norms, pairwise cosines -1/(K-1), summing to 0."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, k)))  # orthonormal columns
    return (math.sqrt(k / (k - 1)) * basis @ (np.eye(k) - np.ones((k, k)) / k)).T


def _collapsed(counts: list[int], d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features exactly on shifted, scaled ETF vertices (class c repeated counts[c] times), W = ETF."""
    etf = _simplex_etf_rows(len(counts), d, seed)
    offset = np.random.default_rng(seed + 1).normal(size=d)  # a global mean far from the origin
    labels = np.repeat(np.arange(len(counts)), counts)
    features = offset + 3.0 * etf[labels]
    return features, labels, 2.0 * etf


# --------------------------------------------------------------------------- neural collapse


def test_simplex_etf_with_zero_spread_is_fully_collapsed() -> None:
    # Prepare: imbalanced counts; the geometry must still read as an ETF (means centred on their
    # unweighted average, not on the sample mean that the 9-sample class would pull).
    features, labels, weight = _collapsed([1, 2, 4, 9])

    # Execute
    result = neural_collapse(features, labels, weight)

    # Assert
    assert set(result) == NC_KEYS
    assert result["n_classes"] == 4
    for key in NC_KEYS - {"n_classes"}:
        assert result[key] == pytest.approx(0.0, abs=1e-12), key
    classes, counts, means = class_means(features, labels)
    centred = means - means.mean(axis=0)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    cosines = (unit @ unit.T)[~np.eye(4, dtype=bool)]
    assert cosines == pytest.approx(np.full(12, -1 / 3), abs=1e-12)
    assert classes.tolist() == [0, 1, 2, 3]
    assert counts.tolist() == [1, 2, 4, 9]


def test_hand_worked_two_class_example() -> None:
    # Prepare: class 0 at (1, 0), (3, 0) -> mean (2, 0); class 1 at (-2, 1), (-2, -1) -> mean (-2, 0).
    features = np.array([[1.0, 0.0], [3.0, 0.0], [-2.0, 1.0], [-2.0, -1.0]])
    labels = np.array([0, 0, 1, 1])
    weight = np.array([[1.0, 1.0], [-1.0, 0.0]])
    bias = np.array([5.0, 0.0])

    # Execute
    result = neural_collapse(features, labels, weight, bias=bias)

    # Assert
    # NC1: global mean 0; Sigma_B = mean of (2,0)(2,0)^T and (-2,0)(-2,0)^T = diag(4, 0).
    # Sigma_W = mean of class covariances diag(1, 0) and diag(0, 1) = diag(1/2, 1/2).
    # Tr(Sigma_W Sigma_B^+) = (1/2)(1/4) = 1/8; divided by K = 2: 1/16.
    assert result["nc1"] == pytest.approx(1 / 16)
    # Means: both norms 2, cosine -1 = -1/(K-1).
    assert result["nc2_equinorm_means"] == pytest.approx(0.0, abs=1e-15)
    assert result["nc2_cos_std_means"] == pytest.approx(0.0, abs=1e-15)
    assert result["nc2_etf_gap_means"] == pytest.approx(0.0, abs=1e-15)
    # Head: norms sqrt 2 and 1 -> std / mean = ((sqrt2 - 1)/2) / ((sqrt2 + 1)/2) = 3 - 2 sqrt 2;
    # one pair, cosine -1/sqrt 2 -> std 0, gap 1 - 1/sqrt 2.
    assert result["nc2_equinorm_head"] == pytest.approx(3 - 2 * math.sqrt(2))
    assert result["nc2_cos_std_head"] == pytest.approx(0.0, abs=1e-15)
    assert result["nc2_etf_gap_head"] == pytest.approx(1 - 1 / math.sqrt(2))
    # NC3: W/sqrt3 - [[1/sqrt2, 0], [-1/sqrt2, 0]] -> 2 (1/sqrt3 - 1/sqrt2)^2 + 1/3 = 2 - 4/sqrt6.
    assert result["nc3"] == pytest.approx(2 - 4 / math.sqrt(6))
    # NC4: logits W h + b = [6, -1], [8, -3], [4, 2], [2, 2] -> predictions 0, 0, 0, 0 (the tie
    # goes to class 0); nearest centres 0, 0, 1, 1 -> 2 of 4 disagree.
    assert result["nc4"] == pytest.approx(0.5)
    assert result["n_classes"] == 2


def _numpy_reference(
    features: np.ndarray, labels: np.ndarray, weight: np.ndarray, logits: np.ndarray
) -> dict[str, float]:
    """The measures written out directly: explicit covariances, pinv, pair loops, per-sample NCC."""
    classes = np.unique(labels)
    k = classes.size
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    mu_g = means.mean(axis=0)
    centred = means - mu_g
    sigma_b = sum(np.outer(m, m) for m in centred) / k
    sigma_w = sum(np.cov(features[labels == c].T, bias=True) for c in classes) / k
    # Sigma_B has rank K - 1 by construction; a loose rcond drops the rounding-level eigenvalues.
    nc1 = np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / k

    def cv(rows: np.ndarray) -> float:
        norms = np.array([np.sqrt(np.dot(r, r)) for r in rows])
        return float(np.std(norms) / np.mean(norms))

    def angles(rows: np.ndarray) -> tuple[float, float]:
        cos = [
            np.dot(rows[a], rows[b]) / (np.linalg.norm(rows[a]) * np.linalg.norm(rows[b]))
            for a, b in itertools.combinations(range(len(rows)), 2)
        ]
        return float(np.std(cos)), float(np.mean(np.abs(np.array(cos) + 1 / (len(rows) - 1))))

    head = weight[classes]
    nc3 = np.linalg.norm(head / np.linalg.norm(head) - centred / np.linalg.norm(centred)) ** 2
    nearest = [classes[np.argmin([np.linalg.norm(h - m) for m in means])] for h in features]
    nc4 = np.mean(np.array(nearest) != logits.argmax(axis=1))
    means_angles, head_angles = angles(centred), angles(head)
    return {
        "nc1": nc1,
        "nc2_equinorm_means": cv(centred),
        "nc2_equinorm_head": cv(head),
        "nc2_cos_std_means": means_angles[0],
        "nc2_cos_std_head": head_angles[0],
        "nc2_etf_gap_means": means_angles[1],
        "nc2_etf_gap_head": head_angles[1],
        "nc3": nc3,
        "nc4": nc4,
    }


@pytest.mark.parametrize(("noise", "seed"), [(0.1, 0), (0.5, 1), (2.0, 2)])
def test_perturbed_collapse_matches_numpy_formulas(noise: float, seed: int) -> None:
    # Prepare: 6 classes of which class 2 never appears; spread around ETF vertices, a noisy head,
    # and logits shifted per class (an eval-time adjustment) so NC4 must use them, not W h.
    rng = np.random.default_rng(seed)
    present = [0, 1, 3, 4, 5]
    counts = [30, 12, 7, 5, 3]
    etf = _simplex_etf_rows(5, 8, seed)
    labels = np.repeat(present, counts)
    features = 3.0 * etf[np.repeat(np.arange(5), counts)] + noise * rng.normal(size=(labels.size, 8))
    weight = rng.normal(size=(6, 8))
    weight[present] += 2.0 * etf
    logits = features @ weight.T + rng.normal(scale=noise, size=(labels.size, 6))

    # Execute
    result = neural_collapse(features, labels, weight, logits=logits)

    # Assert
    expected = _numpy_reference(features, labels, weight, logits)
    assert result["n_classes"] == 5
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert result["nc1"] > 0 and 0 < result["nc3"] < 4


def test_nc1_with_fewer_dimensions_than_classes() -> None:
    # Prepare: 5 classes in 2-D, so Sigma_B has rank 2 < K - 1 = 4: the pseudo-inverse keeps 2.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), 20)
    features = rng.normal(size=(5, 2))[labels] * 4 + rng.normal(size=(100, 2))
    weight = rng.normal(size=(5, 2))

    # Execute
    result = within_class_variability(features, labels)

    # Assert
    expected = _numpy_reference(features, labels, weight, features @ weight.T)["nc1"]
    assert result == pytest.approx(expected, rel=1e-9)


def test_one_class_or_no_samples_leave_geometry_undefined() -> None:
    # Prepare: one class present, predictions split between it and another class.
    features = np.array([[1.0, 0.0], [2.0, 0.0]])
    weight = np.array([[1.0, 0.0], [0.0, 1.0]])
    logits = np.array([[1.0, 0.0], [0.0, 1.0]])

    # Execute
    one = neural_collapse(features, np.array([0, 0]), weight, logits=logits)
    none = neural_collapse(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), weight)

    # Assert: NC4 is still defined with one class (the NCC always says class 0; the model once not).
    assert {k for k, v in one.items() if v is None} == NC_KEYS - {"nc4", "n_classes"}
    assert one["nc4"] == pytest.approx(0.5)
    assert one["n_classes"] == 1
    assert none["nc4"] is None and none["nc1"] is None and none["n_classes"] == 0


def test_building_blocks_and_degenerate_inputs() -> None:
    # equinorm: norms 3, 4 (vectors (3, 0), (0, 4)) -> std 0.5 / mean 3.5.
    assert equinorm(np.array([[3.0, 0.0], [0.0, 4.0]])) == pytest.approx(0.5 / 3.5)
    assert equinorm(np.zeros((3, 2))) is None
    # Three unit vectors at 0, 90 and 180 degrees: cosines 0, -1, 0 -> std sqrt(2)/3, gap mean of
    # |0 + 1/2|, |-1 + 1/2|, |0 + 1/2| = 1/2.
    std, gap = equiangularity(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    assert std == pytest.approx(math.sqrt(2) / 3)
    assert gap == pytest.approx(0.5)
    assert equiangularity(np.array([[1.0, 0.0], [0.0, 0.0]])) is None
    # Self-duality is scale-free and bounded by 4 (opposite directions).
    means = np.array([[1.0, 2.0], [-1.0, -2.0]])
    assert self_duality(7.0 * means, means) == pytest.approx(0.0, abs=1e-15)
    assert self_duality(-means, means) == pytest.approx(4.0)
    assert self_duality(np.zeros((2, 2)), means) is None
    # All class means equal: no between-class spread to measure NC1 against.
    assert within_class_variability(np.array([[1.0], [1.0]]), np.array([0, 1])) is None


def test_neural_collapse_rejects_bad_shapes() -> None:
    features, labels = np.ones((3, 2)), np.array([0, 1, 1])
    with pytest.raises(ValueError, match="weight"):
        neural_collapse(features, labels, np.ones((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        neural_collapse(features, np.array([0, 1, 2]), np.ones((2, 2)))
    with pytest.raises(ValueError, match="logits"):
        neural_collapse(features, labels, np.ones((2, 2)), logits=np.ones((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        neural_collapse(np.full((3, 2), np.nan), labels, np.ones((2, 2)))


# --------------------------------------------------------------------------- calibration


def _hand_calibration() -> tuple[np.ndarray, np.ndarray]:
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # y=0, predicted 0 (right, confidence 0.7)
            [0.5, 0.4, 0.1],  # y=1, predicted 0 (wrong, confidence 0.5: on a bin edge)
            [0.1, 0.3, 0.6],  # y=2, predicted 2 (right, 0.6)
            [0.2, 0.2, 0.6],  # y=0, predicted 2 (wrong, 0.6)
        ]
    )
    return probs, np.array([0, 1, 2, 0])


def test_classwise_and_top_label_ece_hand_worked() -> None:
    # Prepare: 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; 0.5 falls in the second.
    probs, labels = _hand_calibration()

    # Execute
    per_class = classwise_ece(probs, labels, n_bins=4)
    top = top_label_ece(probs, labels, n_bins=4)
    both = calibration_errors(probs, labels, n_bins=4)

    # Assert
    # class 0: p = .7 .5 .1 .2, y = 1 0 0 1. bin 1 {.1, .2}: |1/2 - .15| 2/4 = .175;
    #   bin 2 {.5}: |0 - .5| 1/4 = .125; bin 3 {.7}: |1 - .7| 1/4 = .075 -> .375
    # class 1: p = .2 .4 .3 .2, y = 0 1 0 0. bin 1 {.2, .2}: .2 * 2/4 = .1;
    #   bin 2 {.4, .3}: |1/2 - .35| 2/4 = .075 -> .175
    # class 2: p = .1 .1 .6 .6, y = 0 0 1 0. bin 1: .1 * 2/4 = .05; bin 3: |1/2 - .6| 2/4 = .05 -> .1
    assert per_class == pytest.approx([0.375, 0.175, 0.1])
    # top label: bin 2 {.5 wrong}: .5 * 1/4 = .125; bin 3 {.7 right, .6 right, .6 wrong}:
    #   |2/3 - 1.9/3| 3/4 = .025 -> .15
    assert top == pytest.approx(0.15)
    assert both == {
        "ece": pytest.approx(0.15),
        "classwise_ece": pytest.approx(0.65 / 3),
        "classwise_ece_per_class": pytest.approx([0.375, 0.175, 0.1]),
    }


def _loop_ece(confidence: np.ndarray, outcome: np.ndarray, n_bins: int) -> float:
    """Guo et al.'s loop over bins, lower < p <= upper, with p = 0 added to the first bin."""
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for b, (lower, upper) in enumerate(itertools.pairwise(edges)):
        inside = (confidence > lower) & (confidence <= upper)
        if b == 0:
            inside |= confidence == 0
        if inside.any():
            total += inside.mean() * abs(outcome[inside].mean() - confidence[inside].mean())
    return total


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_bin_loop_on_random_data(n_bins: int) -> None:
    # Prepare
    rng = np.random.default_rng(n_bins)
    logits = rng.normal(scale=2.0, size=(500, 6))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 6, size=500)

    # Execute
    result = calibration_errors(probs, labels, n_bins)

    # Assert
    expected = [_loop_ece(probs[:, c], (labels == c).astype(float), n_bins) for c in range(6)]
    assert result["classwise_ece_per_class"] == pytest.approx(expected, abs=1e-12)
    assert result["classwise_ece"] == pytest.approx(np.mean(expected), abs=1e-12)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    assert result["ece"] == pytest.approx(_loop_ece(probs.max(axis=1), correct, n_bins), abs=1e-12)


def test_probability_zero_counts_in_the_first_bin() -> None:
    # Prepare: class 1 masked (probability 0) but true: the worst possible mistake.
    probs, labels = np.array([[1.0, 0.0]]), np.array([1])

    # Execute
    per_class = classwise_ece(probs, labels, n_bins=15)

    # Assert: class 0 has p = 1 with y = 0, class 1 has p = 0 with y = 1: both off by 1.
    assert per_class == pytest.approx([1.0, 1.0])
    assert top_label_ece(probs, labels) == pytest.approx(1.0)


def test_calibration_rejects_non_probabilities_and_handles_no_samples() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        classwise_ece(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="probabilities"):
        top_label_ece(np.array([[0.5, 0.4]]), np.array([0]))
    with pytest.raises(ValueError, match="n_bins"):
        top_label_ece(np.array([[0.5, 0.5]]), np.array([0]), n_bins=0)
    assert calibration_errors(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == {
        "ece": None,
        "classwise_ece": None,
        "classwise_ece_per_class": None,
    }


# --------------------------------------------------------------------------- plugins


class _Net(nn.Module):
    def __init__(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(weight))
            if bias is not None:
                self.head.bias.copy_(torch.from_numpy(bias))


def _is_json_ready(result: dict) -> bool:
    return json.loads(json.dumps(result)) == result and all(
        v is None or type(v) in (int, float, list) for v in result.values()
    )


def test_neural_collapse_plugin_reads_the_head_and_the_views() -> None:
    # Prepare: float32 tensors as an evaluation hands them over; the logits are post-hoc adjusted.
    features, labels, weight = _collapsed([3, 3, 3, 3])
    model = _Net(weight, np.zeros(4))
    h = torch.from_numpy(features).float()
    y = torch.from_numpy(labels)
    logits = model.head(h).detach() - torch.tensor([0.0, 0.0, 0.0, 100.0])  # never predicts class 3
    default, everywhere = NeuralCollapse(), NeuralCollapse(NeuralCollapse.Params(views="all"))

    # Execute
    global_view = default.eval_metrics(model=model, features=h, logits=logits, labels=y, ctx=_ctx())
    client_view = default.eval_metrics(model=model, features=h, logits=logits, labels=y, ctx=_ctx(0))
    client_all = everywhere.eval_metrics(model=model, features=h, logits=logits, labels=y, ctx=_ctx(0))

    # Assert: float32 features are collapsed up to float32 rounding; NC4 sees the adjusted logits.
    assert client_view is None
    assert global_view == client_all
    assert set(global_view) == NC_KEYS and _is_json_ready(global_view)
    assert global_view["nc1"] == pytest.approx(0.0, abs=1e-8)
    assert global_view["nc3"] == pytest.approx(0.0, abs=1e-8)
    assert global_view["nc4"] == pytest.approx(3 / 12)
    assert global_view == neural_collapse(h, y, model.head.weight, model.head.bias, logits)


def test_calibration_plugin_softmaxes_the_logits() -> None:
    # Prepare: log-probabilities as logits give the hand-worked probabilities back.
    probs, labels = _hand_calibration()
    logits = torch.from_numpy(np.log(probs))
    y = torch.from_numpy(labels)
    plugin = Calibration(Calibration.Params(n_bins=4))
    features = torch.zeros(4, 2)

    # Execute
    result = plugin.eval_metrics(model=nn.Identity(), features=features, logits=logits, labels=y, ctx=_ctx())
    client = plugin.eval_metrics(model=nn.Identity(), features=features, logits=logits, labels=y, ctx=_ctx(1))

    # Assert
    assert client is None
    assert _is_json_ready(result)
    assert result["ece"] == pytest.approx(0.15)
    assert result["classwise_ece"] == pytest.approx(0.65 / 3)
    assert result["classwise_ece_per_class"] == pytest.approx([0.375, 0.175, 0.1])


def test_calibration_plugin_with_masked_logits_on_a_client_view() -> None:
    # Prepare: class 2 masked with -inf on the second sample, whose true class it is.
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, -math.inf]])
    labels = torch.tensor([0, 2])
    plugin = Calibration(Calibration.Params(views="all", n_bins=2))

    # Execute
    result = plugin.eval_metrics(
        model=nn.Identity(), features=torch.zeros(2, 1), logits=logits, labels=labels, ctx=_ctx(5, 3)
    )

    # Assert, bins (0, 1/2] and (1/2, 1]. p = [a, b, b] with a = e^2/(e^2 + 2), b = 1/(e^2 + 2),
    # and [1/2, 1/2, 0]. class 0: a (y=1) alone in bin 2, 1/2 (y=0) in bin 1 -> (1 - a)/2 + 1/4;
    # class 1: b, 1/2 both y=0 in bin 1 -> (b + 1/2)/2; class 2: b (y=0), 0 (y=1) in bin 1 ->
    # |1/2 - b/2| = (1 - b)/2. Top label: a right in bin 2, 1/2 wrong in bin 1 -> (1 - a)/2 + 1/4.
    a, b = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)
    expected = [(1 - a) / 2 + 0.25, (b + 0.5) / 2, (1 - b) / 2]
    assert result["classwise_ece_per_class"] == pytest.approx(expected)
    assert result["ece"] == pytest.approx((1 - a) / 2 + 0.25)


def test_params_are_validated_and_hooks_are_marked() -> None:
    with pytest.raises(ValidationError):
        NeuralCollapse.Params(views="clients")
    with pytest.raises(ValidationError):
        NeuralCollapse.Params(n_bins=3)  # calibration's parameter, not this plugin's
    with pytest.raises(ValidationError):
        Calibration.Params(n_bins=0)
    assert Calibration.Params().model_dump() == {"n_bins": 15, "views": "global"}
    assert NeuralCollapse.Params().model_dump() == {"views": "global"}
    assert NeuralCollapse.requires == frozenset({"head"})
    for cls in (NeuralCollapse, Calibration):
        assert hasattr(cls.eval_metrics, "fedlt_impl")
