"""Open-set evaluation ([eval.ood]) and the mahalanobis-ood plugin, against independent computations:
numpy/scipy for the Gaussian fit and score, scikit-learn and a hand-worked example for the metrics,
a hand-made dataset whose inputs carry their original class for the held-out split."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fedlt_plugins.ood import (
    combine_statistics,
    feature_statistics,
    fit_gaussians,
    mahalanobis_score,
    preprocess,
)
from scipy.linalg import pinvh
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch import nn

import fedlt
from fedlt.data.federated import build_federated_data
from fedlt.data.ood import hold_out_classes
from fedlt.data.raw import RawDataset, RawSplit
from fedlt.errors import PluginError, ScenarioError
from fedlt.evaluation.ood import check_scores, msp_score
from fedlt.metrics.ood import fpr_at_tpr, ood_group_metrics, ood_metrics
from fedlt.scenario.config import scenario_from_dict

# --------------------------------------------------------------------------- Gaussian fit and score


def _gaussian_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three classes in 4-D with different means and one shared, non-diagonal covariance."""
    rng = np.random.default_rng(seed)
    cov = np.array([[2.0, 0.6, 0, 0], [0.6, 1.0, 0.3, 0], [0, 0.3, 0.5, 0.1], [0, 0, 0.1, 1.5]])
    means = np.array([[0, 0, 0, 0], [4, 0, 1, 0], [0, 3, 0, -2]], dtype=float)
    y = np.repeat([0, 1, 2], [120, 40, 10])  # long-tailed counts
    x = means[y] + rng.multivariate_normal(np.zeros(4), cov, size=y.size)
    return x, y


def test_federated_statistics_give_the_pooled_fit_and_the_score_of_the_formula() -> None:
    # Prepare: three clients hold disjoint shares; the pooled estimate is computed with numpy.
    x, y = _gaussian_features()
    parts = np.array_split(np.random.default_rng(1).permutation(y.size), 3)
    mu = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - mu[y]
    sigma = centred.T @ centred / y.size  # tied MLE covariance (sklearn's EmpiricalCovariance)
    precision = pinvh(sigma)

    # Execute
    stats = combine_statistics([feature_statistics(torch.tensor(x[p]), torch.tensor(y[p]), 3) for p in parts])
    means, prec, present = fit_gaussians(stats)
    queries = np.random.default_rng(2).normal(size=(7, 4)) * 3
    score = mahalanobis_score(torch.tensor(queries), means, prec, present).numpy()

    # Assert
    pooled = feature_statistics(torch.tensor(x), torch.tensor(y), 3)
    for key in ("count", "sum", "outer"):
        np.testing.assert_allclose(stats[key].numpy(), pooled[key].numpy(), rtol=1e-12)
    np.testing.assert_allclose(means.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(prec.numpy(), precision, rtol=1e-8)
    expected = [max(-(q - mu[c]) @ precision @ (q - mu[c]) for c in range(3)) for q in queries]
    np.testing.assert_allclose(score, expected, rtol=1e-8)
    assert present.all()


def test_classes_without_statistics_are_left_out_and_singular_covariance_uses_the_pseudo_inverse() -> None:
    # Prepare: class 1 absent; the last feature is constant (a dead unit): Sigma is singular.
    x, y = _gaussian_features()
    keep = y != 1
    x, y = x[keep], y[keep]
    x[:, 3] = 0.0
    stats = feature_statistics(torch.tensor(x), torch.tensor(y), 3)
    means, prec, present = fit_gaussians(stats)
    mu = {c: x[y == c].mean(0) for c in (0, 2)}
    centred = x - np.stack([mu[c] for c in y])
    precision = pinvh(centred.T @ centred / y.size)
    q = np.array([[1.0, 2.0, -1.0, 0.5]])

    # Execute
    score = float(mahalanobis_score(torch.tensor(q), means, prec, present))

    # Assert
    assert present.tolist() == [True, False, True]
    assert np.isfinite(prec.numpy()).all()
    assert score == pytest.approx(max(-(q[0] - mu[c]) @ precision @ (q[0] - mu[c]) for c in (0, 2)))


def test_input_preprocessing_steps_against_the_closed_form_gradient() -> None:
    # Prepare: linear features f(x) = W x, so grad_x d_c = 2 W^T P (W x - mu_c) for the closest c.
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False).double()
    model = nn.Module()
    model.features = lin
    means = torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]], dtype=torch.float64)
    prec = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    present = torch.tensor([True, True])

    # Execute
    moved = preprocess(model, x, 0.1, means, prec, present)

    # Assert
    w = lin.weight.detach()
    f = x @ w.T
    dist = torch.stack([((f - m) @ prec * (f - m)).sum(1) for m in means], 1)
    closest = means[dist.argmin(1)]
    grad = 2 * (f - closest) @ prec @ w
    torch.testing.assert_close(moved, x - 0.1 * grad.sign())


# --------------------------------------------------------------------------- metrics


def test_ood_metrics_match_scikit_learn_with_in_distribution_positive() -> None:
    rng = np.random.default_rng(3)
    s_in = np.round(rng.normal(1.0, 1.0, 200), 1)  # rounded: ties inside and across the sets
    s_out = np.round(rng.normal(0.0, 1.0, 37), 1)
    labels = np.r_[np.ones(200), np.zeros(37)]
    scores = np.r_[s_in, s_out]
    fpr, tpr, _ = roc_curve(labels, scores)

    got = ood_metrics(s_in, s_out)

    assert got["ood_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["ood_auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["ood_fpr_at_95_tpr"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_fpr_at_95_tpr_by_hand() -> None:
    # 20 in-distribution scores 1..20: 95% TPR keeps the 19 largest, threshold 2. OOD scores
    # 0, 1.5, 2, 3: those >= 2 are accepted (2 of 4).
    s_in = np.arange(1, 21, dtype=float)
    s_out = np.array([0.0, 1.5, 2.0, 3.0])
    assert fpr_at_tpr(s_in, s_out) == 0.5
    # AUROC by hand: pairs (in, out) with in > out count 1, ties 1/2; per OOD score 0, 1.5, 2, 3:
    # 20 + 19 + (18 + 0.5) + (17 + 0.5) = 75 of 80 pairs.
    assert ood_metrics(s_in, s_out)["ood_auroc"] == pytest.approx(75 / 80)
    assert ood_metrics(s_in, np.array([]))["ood_auroc"] is None


def test_ood_metrics_per_shot_group_match_scikit_learn_on_a_hand_split() -> None:
    # Prepare: 5 classes, head {0, 1}, medium {2, 3}, tail {4} but class 4 has no test sample;
    # tail samples score lower (closer to the OOD scores) than head ones.
    rng = np.random.default_rng(4)
    y_in = np.repeat([0, 1, 2, 3], [30, 25, 12, 8])
    s_in = np.round(rng.normal(2.0 - 0.4 * y_in, 1.0), 1)  # rounded: ties within and across sets
    s_out = np.round(rng.normal(0.0, 1.0, 23), 1)
    groups = {"head": [0, 1], "medium": [2, 3], "tail": [4]}

    # Execute
    got = ood_group_metrics(s_in, y_in, s_out, groups)

    # Assert: each group's samples picked by hand, against all OOD samples, with scikit-learn.
    for group, classes in (("head", (0, 1)), ("medium", (2, 3))):
        pick = s_in[(y_in == classes[0]) | (y_in == classes[1])]
        labels = np.r_[np.ones(pick.size), np.zeros(s_out.size)]
        scores = np.r_[pick, s_out]
        fpr, tpr, _ = roc_curve(labels, scores)
        assert got[f"ood_{group}_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert got[f"ood_{group}_auprc"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert got[f"ood_{group}_fpr_at_95_tpr"] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)
    assert {k: v for k, v in got.items() if k.startswith("ood_tail_")} == {
        "ood_tail_auroc": None,
        "ood_tail_auprc": None,
        "ood_tail_fpr_at_95_tpr": None,
    }
    assert got["ood_medium_auroc"] < got["ood_head_auroc"]  # the hand-made gap is seen
    with pytest.raises(ValueError, match="75 labels for 74"):
        ood_group_metrics(s_in[:-1], y_in, s_out, groups)


def test_compare_knows_every_ood_metric_a_record_carries() -> None:
    # Every key ood_metrics / ood_group_metrics write lies in [0, 1], so fedlt compare clips its
    # interval; the per-group AUROCs are among the default metrics (shown when a run has them).
    from fedlt.analysis.compare import DEFAULT_METRICS, metric_bounds

    keys = {
        **ood_metrics([1.0, 2.0], [0.0]),
        **ood_group_metrics([1.0, 2.0], [0, 1], [0.0], {"head": [0], "medium": [1], "tail": []}),
    }
    assert len(keys) == 12
    assert {k: metric_bounds(k) for k in keys} == {k: (0.0, 1.0) for k in keys}
    assert metric_bounds("ood_score") is None
    assert {"ood_auroc", "ood_head_auroc", "ood_medium_auroc", "ood_tail_auroc"} <= set(DEFAULT_METRICS)


def test_msp_orders_as_the_softmax_maximum_and_bad_plugin_scores_are_refused() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.1, 0.2, 0.0], [50.0, 0.0, -3.0]])
    probs = torch.softmax(logits.double(), 1).max(1).values
    torch.testing.assert_close(msp_score(logits).exp(), probs)
    with pytest.raises(PluginError, match=r"mine.*eval_ood_score.*shape \(3,\)"):
        check_scores(torch.zeros(3, 1), 3, "mine")
    with pytest.raises(PluginError, match="non-finite"):
        check_scores(torch.tensor([0.0, float("nan"), 1.0]), 3, "mine")


# --------------------------------------------------------------------------- held-out classes


def _labelled_raw() -> RawDataset:
    """Each input's single feature is its original class, so a split can be read off the inputs."""
    y_train = np.repeat(np.arange(5), [10, 8, 6, 4, 2])
    y_test = np.repeat(np.arange(5), 3)
    return RawDataset(
        "handmade",
        RawSplit(y_train[:, None].astype(np.float32), y_train),
        RawSplit(y_test[:, None].astype(np.float32), y_test),
        5,
        tuple("abcde"),
        (1,),
        (0.0,),
        (1.0,),
    )


def test_hold_out_classes_removes_them_and_renumbers_the_rest_in_order() -> None:
    raw = _labelled_raw()
    inside, held, class_ids = hold_out_classes(raw, [1, 3])
    assert class_ids.tolist() == [0, 2, 4]
    assert inside.num_classes == 3 and inside.class_names == ("a", "c", "e")
    for split in (inside.train, inside.test):
        assert set(split.x[:, 0].tolist()) <= {0.0, 2.0, 4.0}  # no held-out sample
        np.testing.assert_array_equal(split.x[:, 0], class_ids[split.y])  # labels follow the map
    assert len(inside.train) == 10 + 6 + 2
    assert sorted(raw.test.y[held].tolist()) == [1, 1, 1, 3, 3, 3]


def _ood_digits(tiny: dict) -> dict:
    tiny = copy.deepcopy(tiny)
    tiny["eval"]["ood"] = {"kind": "held-out-classes", "classes": [8, 9]}
    return tiny


def test_held_out_digits_reach_no_client_and_no_in_distribution_test_set(tiny) -> None:
    scenario = fedlt.load_scenario(_ood_digits(tiny))
    data = build_federated_data(scenario)
    plain = build_federated_data(fedlt.load_scenario(tiny))

    assert data.num_classes == 8 and data.ood["class_ids"] == list(range(8))
    assert data.describe()["ood"] == {
        "kind": "held-out-classes",
        "n_ood": int((plain.y_test >= 8).sum()),
        "held_out": [8, 9],
        "class_ids": list(range(8)),
    }
    assert int(data.y_train.max()) < 8 and int(data.y_test.max()) < 8
    for idx in data.client_indices:
        assert int(data.y_train[torch.as_tensor(idx)].max()) < 8
    # The OOD set is exactly the test samples of 8 and 9 of the same split, none of them elsewhere.
    held = plain.x_test[plain.y_test >= 8]
    torch.testing.assert_close(data.x_ood, held)
    for x in (data.x_train, data.x_test):
        assert not bool((torch.cdist(held, x) == 0).any())
    assert data.x_test.shape[0] + held.shape[0] == plain.x_test.shape[0]


# --------------------------------------------------------------------------- scenario keys


@pytest.mark.parametrize(
    ("ood", "key"),
    [
        ({"kind": "unknown"}, "eval.ood.kind"),
        ({"kind": "held-out-classes"}, "eval.ood.classes"),
        ({"kind": "held-out-classes", "classes": [3, 3]}, "eval.ood.classes"),
        ({"kind": "held-out-classes", "classes": [1], "dataset": "digits"}, "eval.ood.dataset"),
        ({"kind": "none", "classes": [1]}, "eval.ood.classes"),
        ({"kind": "dataset"}, "eval.ood.dataset"),
        ({"kind": "dataset", "dataset": "no-such"}, "eval.ood.dataset"),
        ({"kind": "dataset", "dataset": "synthetic", "params": {"n_tst": 5}}, "eval.ood.params.n_tst"),
        ({"kind": "none", "params": {}}, "eval.ood.params"),
        ({"kind": "held-out-classes", "classes": [1], "colour": 2}, "eval.ood.colour"),
    ],
)
def test_bad_ood_settings_name_the_key(tiny, ood: dict, key: str) -> None:
    tiny["eval"]["ood"] = ood
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(tiny)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("ood", "key", "allowed"),
    [
        ({"kind": "held-out-classes", "classes": [10]}, "eval.ood.classes", "in [0, 9]"),
        ({"kind": "held-out-classes", "classes": list(range(9))}, "eval.ood.classes", "at least 2"),
        (
            {"kind": "dataset", "dataset": "synthetic", "params": {"shape": [3, 4]}},
            "eval.ood.dataset",
            "[64]",
        ),
    ],
)
def test_ood_settings_only_the_data_can_refuse(tiny, ood: dict, key: str, allowed: str) -> None:
    tiny["eval"]["ood"] = ood
    with pytest.raises(ScenarioError) as info:
        build_federated_data(fedlt.load_scenario(tiny))
    assert info.value.key == key and allowed in info.value.allowed


# --------------------------------------------------------------------------- runs


def test_runs_report_ood_metrics_that_repeat_and_match_the_checkpointed_detector(tiny, tmp_path) -> None:
    # Prepare
    ood = _ood_digits(tiny)
    ood["plugins"] = [{"name": "mahalanobis-ood"}]

    # Execute: MSP (no plugin), the detector twice.
    msp = fedlt.run(_ood_digits(tiny), out=tmp_path / "msp")["final"]
    first = fedlt.run(copy.deepcopy(ood), out=tmp_path / "a")["final"]
    second = fedlt.run(copy.deepcopy(ood), out=tmp_path / "b")["final"]

    # Assert: names, determinism, and the record recomputed from the checkpointed statistics.
    assert msp["ood_score"] == "msp" and first["ood_score"] == "mahalanobis-ood"
    assert msp["ood_kind"] == "held-out-classes"
    assert first["accuracy"] == msp["accuracy"]  # the detector changes no training
    for key in ("ood_auroc", "ood_auprc", "ood_fpr_at_95_tpr"):
        assert first[key] == second[key]
    data = build_federated_data(fedlt.load_scenario(ood))
    from fedlt.models import build_model

    scenario = fedlt.load_scenario(ood)
    model = build_model(scenario.model.name, data.input_shape, data.num_classes, **scenario.model.params())
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    model.load_state_dict(ckpt["global"])
    model.eval()
    fit = fit_gaussians(ckpt["plugins"]["mahalanobis-ood"])
    with torch.no_grad():
        s_in = mahalanobis_score(model.features(data.x_test), *fit).numpy()
        s_out = mahalanobis_score(model.features(data.x_ood), *fit).numpy()
    labels = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    assert first["ood_auroc"] == pytest.approx(roc_auc_score(labels, np.r_[s_in, s_out]), abs=1e-9)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ood_score"] == "mahalanobis-ood" for r in records)
    # Per shot group, the same pass: MSP recomputed from its run's final model, both by hand.
    model.load_state_dict(torch.load(tmp_path / "msp" / "checkpoint.pt", weights_only=False)["global"])
    with torch.no_grad():
        msp_in = torch.softmax(model(data.x_test).double(), 1).max(1).values.numpy()
        msp_out = torch.softmax(model(data.x_ood).double(), 1).max(1).values.numpy()
    _assert_group_aurocs(msp, msp_in, msp_out, data.y_test.numpy())
    _assert_group_aurocs(first, s_in, s_out, data.y_test.numpy())


def _assert_group_aurocs(final: dict, s_in: np.ndarray, s_out: np.ndarray, y_in: np.ndarray) -> None:
    """``ood_{group}_auroc`` of a run record against scikit-learn on the group's samples picked by
    hand: the count rule at the tiny scenario's thresholds (head > 60, tail < 20 training samples)."""
    counts = np.asarray(final["train_class_counts"])
    groups = {"head": counts > 60, "medium": (counts >= 20) & (counts <= 60), "tail": counts < 20}
    assert all(groups[g].any() for g in groups)  # every group has classes here
    for group, in_group in groups.items():
        pick = s_in[in_group[y_in]]
        labels = np.r_[np.ones(pick.size), np.zeros(s_out.size)]
        expected = roc_auc_score(labels, np.r_[pick, s_out])
        assert final[f"ood_{group}_auroc"] == pytest.approx(expected, abs=1e-6), group
        assert final[f"ood_{group}_auprc"] is not None and final[f"ood_{group}_fpr_at_95_tpr"] is not None


def test_offline_refit_script_of_the_results_page_matches_a_numpy_fit(tiny, tmp_path, monkeypatch, capsys):
    # Prepare: a finished tiny run; the script is docs/results/ood-digits-lt.md's python block.
    page = (Path(__file__).parents[1] / "docs" / "results" / "ood-digits-lt.md").read_text()
    script = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    fedlt.run(_ood_digits(tiny), out=tmp_path / "run")
    capsys.readouterr()

    # Execute
    monkeypatch.setattr(sys, "argv", ["refit.py", str(tmp_path / "run")])
    exec(compile(script, "refit.py", "exec"), {"__name__": "__main__"})
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # Assert: the tied-covariance fit with numpy/scipy on all training features of the final model.
    from fedlt.models import build_model

    scenario = fedlt.load_scenario(_ood_digits(tiny))
    data = build_federated_data(scenario)
    model = build_model(scenario.model.name, data.input_shape, data.num_classes, **scenario.model.params())
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["global"])
    model.eval()
    with torch.no_grad():
        f, f_in, f_out = (model.features(x).double().numpy() for x in (data.x_train, data.x_test, data.x_ood))
    y = data.y_train.numpy()
    mu = np.stack([f[y == c].mean(0) for c in range(data.num_classes)])
    precision = pinvh((f - mu[y]).T @ (f - mu[y]) / y.size)

    def score(q: np.ndarray) -> np.ndarray:
        return np.max([-np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in mu], axis=0)

    s_in, s_out = score(f_in), score(f_out)
    tail_classes = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["shot_rule"]["tail"]
    assert tail_classes  # the tiny run has a tail
    tail = np.isin(data.y_test.numpy(), tail_classes)
    for key, pick in (("ood_auroc", s_in), ("ood_tail_auroc", s_in[tail])):
        labels = np.r_[np.ones(pick.size), np.zeros(s_out.size)]
        assert got[key] == pytest.approx(roc_auc_score(labels, np.r_[pick, s_out]), abs=1e-6), key


@pytest.mark.parametrize("pool", ["round", "latest"])
def test_server_pools_the_round_or_every_clients_latest_statistics_and_checkpoints_them(pool: str) -> None:
    from fedlt_plugins.ood import MahalanobisOOD, MahalanobisParams

    # Prepare: four clients' statistics; round 1 hears from 0 and 1, round 2 from 1 (new) and 2.
    x, y = _gaussian_features()
    parts = np.array_split(np.arange(y.size), 4)
    stats = [feature_statistics(torch.tensor(x[p]), torch.tensor(y[p]), 3) for p in parts]
    newer = feature_statistics(torch.tensor(x[parts[3]]), torch.tensor(y[parts[3]]), 3)
    plugin = MahalanobisOOD(MahalanobisParams(pool=pool))

    # Execute
    plugin.server_after_aggregate(ctx=None, payloads={0: stats[0], 1: stats[1]})
    plugin.server_after_aggregate(ctx=None, payloads={1: newer, 2: stats[2]})
    restored = MahalanobisOOD(MahalanobisParams(pool=pool))
    restored.load_state_dict(plugin.state_dict())
    restored.server_after_aggregate(ctx=None, payloads={3: stats[3]})

    # Assert
    expected = [stats[0], newer, stats[2]] if pool == "latest" else [newer, stats[2]]
    for key in ("count", "sum", "outer"):
        torch.testing.assert_close(plugin._stats[key], sum(s[key] for s in expected))
    after = [stats[0], newer, stats[2], stats[3]] if pool == "latest" else [stats[3]]
    torch.testing.assert_close(restored._stats["count"], sum(s["count"] for s in after))


def test_detector_with_preprocessing_resumes_to_the_same_numbers(tiny, tmp_path, interrupted_run) -> None:
    # Every client's latest statistics and the pre-processing step survive a checkpoint.
    ood = _ood_digits(tiny)
    ood["plugins"] = [{"name": "mahalanobis-ood", "eps": 0.05, "pool": "latest"}]
    full = fedlt.run(copy.deepcopy(ood), out=tmp_path / "full")["final"]

    interrupted_run(copy.deepcopy(ood), tmp_path / "cut", after=1)
    resumed = fedlt.resume(tmp_path / "cut")["final"]

    assert full["ood_score"] == "mahalanobis-ood"
    for key in ("ood_auroc", "ood_auprc", "ood_fpr_at_95_tpr"):
        assert resumed[key] == full[key]


def test_detector_passes_the_plugin_conformance_checks(tiny, tmp_path) -> None:
    from fedlt.testing import check_plugin

    # "has an effect" compares trained weights; the detector observes and changes no training.
    report = check_plugin(
        "mahalanobis-ood",
        {"eps": 0.05},
        scenario=_ood_digits(tiny),
        engines=("serial",),
        skip=("has an effect",),
        out=tmp_path,
    )
    assert "resume == uninterrupted" in report["checks"]
    assert report["final"]["ood_score"] == "mahalanobis-ood"


class _Energy(fedlt.Plugin):
    """An inline detector: the energy score logsumexp(logits), on the global evaluation only."""

    @fedlt.hookimpl
    def eval_ood_score(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits, dim=1)


class _Broken(fedlt.Plugin):
    @fedlt.hookimpl
    def eval_ood_score(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class _HalfDone(fedlt.Plugin):
    """Scores the in-distribution set only (the OOD set has all-zero test class counts)."""

    @fedlt.hookimpl
    def eval_ood_score(self, logits: torch.Tensor, ctx: fedlt.EvalContext) -> torch.Tensor | None:
        return torch.logsumexp(logits, dim=1) if ctx.test_class_counts.sum() else None


def test_a_plugin_score_on_another_dataset_is_what_the_record_reports(install_plugins, tiny, tmp_path):
    # Prepare: Gaussian noise of the digits' shape as the OOD set, scored by an inline plugin.
    install_plugins(energy=_Energy, broken=_Broken, half=_HalfDone)
    tiny["eval"]["ood"] = {"kind": "dataset", "dataset": "synthetic", "params": {"shape": [64], "n_test": 50}}
    tiny["plugins"] = [{"name": "energy"}]

    # Execute
    final = fedlt.run(copy.deepcopy(tiny), out=tmp_path / "e")["final"]

    # Assert: recomputed from the final model with scikit-learn.
    from fedlt.models import build_model

    scenario = fedlt.load_scenario(tiny)
    data = build_federated_data(scenario)
    model = build_model(scenario.model.name, data.input_shape, data.num_classes, **scenario.model.params())
    model.load_state_dict(torch.load(tmp_path / "e" / "checkpoint.pt", weights_only=False)["global"])
    model.eval()
    with torch.no_grad():
        s_in = torch.logsumexp(model(data.x_test), 1).numpy()
        s_out = torch.logsumexp(model(data.x_ood), 1).numpy()
    labels = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    assert final["ood_kind"] == "dataset" and final["ood_score"] == "energy" and s_out.size == 50
    assert final["ood_auroc"] == pytest.approx(roc_auc_score(labels, np.r_[s_in, s_out]), abs=1e-6)

    tiny["plugins"] = [{"name": "broken"}]
    with pytest.raises(PluginError, match=r"broken.*eval_ood_score"):
        fedlt.run(tiny, out=tmp_path / "b")
    tiny["plugins"] = [{"name": "half"}]
    with pytest.raises(PluginError, match=r"'half' but the OOD set with 'msp'"):
        fedlt.run(tiny, out=tmp_path / "h")
