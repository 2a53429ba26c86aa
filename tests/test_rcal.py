"""rcal: calibration against the formula written here, federated statistics against pooled ones
(numpy), sampled features against their Gaussian, LOF against scikit-learn, the robust selection on
hand-made points, parameter checks, and runs (determinism, no effect when switched off)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedlt_plugins.rcal import (
    RCALParams,
    calibrate,
    class_gaussians,
    class_statistics,
    combine_statistics,
    head_classes,
    lof_scores,
    robust_keep,
    sample_features,
)
from sklearn.neighbors import LocalOutlierFactor

import fedlt


def test_tail_classes_borrow_from_their_nearest_head_classes_by_the_formula():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 1.0], [9.0, 1.0], [4.0, 4.0]], dtype=torch.float64)
    covs = torch.stack([torch.eye(2, dtype=torch.float64) * (c + 1) for c in range(5)])
    count = torch.tensor([100.0, 80.0, 60.0, 5.0, 0.0])
    # P = 4 present classes, ceil(0.5 * 4) = 2 heads: classes 0 and 1; class 4 is absent.
    assert head_classes(count, 0.5).tolist() == [True, True, False, False, False]
    alpha = 0.3
    cal_m, cal_c = calibrate(means, covs, count, fraction_head=0.5, q=1, alpha=alpha)
    eye = torch.eye(2, dtype=torch.float64)
    # class 2 at (1, 1): nearest head is class 0; class 3 at (9, 1): class 1.
    torch.testing.assert_close(cal_m[2], (means[0] + means[2]) / 2)
    torch.testing.assert_close(cal_c[2], (covs[0] + covs[2]) / 2 + alpha * eye)
    torch.testing.assert_close(cal_m[3], (means[1] + means[3]) / 2)
    torch.testing.assert_close(cal_c[3], (covs[1] + covs[3]) / 2 + alpha * eye)
    for c in (0, 1, 4):  # head and absent classes unchanged
        torch.testing.assert_close(cal_m[c], means[c])
        torch.testing.assert_close(cal_c[c], covs[c])
    # q = 2 (both heads): mu' = (mu_0 + mu_1 + mu_k) / 3
    cal_m2, cal_c2 = calibrate(means, covs, count, fraction_head=0.5, q=5, alpha=0.0)
    torch.testing.assert_close(cal_m2[3], (means[0] + means[1] + means[3]) / 3)
    torch.testing.assert_close(cal_c2[3], (covs[0] + covs[1] + covs[3]) / 3)


def test_federated_statistics_equal_the_pooled_per_class_estimates():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(90, 4, generator=gen) * 3 + 1
    y = torch.randint(0, 3, (90,), generator=gen)
    y[:2] = 2
    parts = [class_statistics(f[i::3], y[i::3], 4) for i in range(3)]
    means, covs, present = class_gaussians(combine_statistics(parts))
    assert present.tolist() == [True, True, True, False]
    for c in range(3):
        rows = f[y == c].numpy().astype(np.float64)
        np.testing.assert_allclose(means[c].numpy(), rows.mean(0), rtol=1e-10)
        np.testing.assert_allclose(covs[c].numpy(), np.cov(rows, rowvar=False), rtol=1e-8, atol=1e-10)


def test_sampled_features_have_the_calibrated_mean_and_covariance():
    means = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.4, 0.0]], dtype=torch.float64)
    covs = torch.stack([a @ a.T, torch.eye(3, dtype=torch.float64)])  # the first is singular
    present = torch.tensor([True, False])
    z, y = sample_features(means, covs, present, 100_000, torch.Generator().manual_seed(1))
    assert z.shape == (100_000, 3) and set(y.tolist()) == {0}
    zn = z.numpy().astype(np.float64)
    np.testing.assert_allclose(zn.mean(0), means[0].numpy(), atol=0.03)
    np.testing.assert_allclose(np.cov(zn, rowvar=False), covs[0].numpy(), atol=0.05)
    again, _ = sample_features(means, covs, present, 100_000, torch.Generator().manual_seed(1))
    other, _ = sample_features(means, covs, present, 100_000, torch.Generator().manual_seed(2))
    assert torch.equal(again, z) and not torch.equal(other, z)  # the stream decides the draws


def test_lof_matches_scikit_learn():
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(40, 3, generator=gen), torch.tensor([[6.0, 6.0, 6.0]])])
    ours = lof_scores(x, 10).numpy()
    ref = LocalOutlierFactor(n_neighbors=10).fit(x.numpy().astype(np.float64))
    np.testing.assert_allclose(ours, -ref.negative_outlier_factor_, rtol=1e-6)


def test_robust_selection_keeps_the_expected_samples():
    # class 0: a tight square and one far point; class 1: two samples (too few: all kept).
    f = torch.tensor(
        [[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5], [20, 20], [5, 5], [50, 50]], dtype=torch.float32
    )
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    centre = robust_keep(f, y, RCALParams(robust="centre", keep=0.8))
    # ceil(0.8 * 6) = 5 closest to class 0's mean: all but (20, 20).
    assert centre.tolist() == [True, True, True, True, True, False, True, True]
    lof = robust_keep(f, y, RCALParams(robust="lof", n_neighbors=3))
    assert lof.tolist() == [True, True, True, True, True, False, True, True]
    assert robust_keep(f, y, RCALParams(robust="none")).all()


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("keep", 0.0, "greater than 0"),
        ("q", 0, ">= 1"),
        ("robust", "mcd", "one of 'lof', 'centre' or 'none'"),
        ("start_round", 1, ">= 2"),
        ("alpha", -1.0, ">= 0"),
    ],
)
def test_bad_parameters_are_refused_with_key_value_and_allowed(tiny, tmp_path, key, value, allowed):
    tiny["plugins"] = [{"name": "rcal", key: value}]
    with pytest.raises(fedlt.ScenarioError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert key in info.value.key
    assert repr(value) in str(info.value) and allowed in str(info.value)


def _final(scenario: dict, out) -> dict:
    return fedlt.run(scenario, out=out)["final"]


def test_runs_repeat_and_switched_off_rcal_changes_nothing(tiny, tmp_path):
    tiny["noise"] = {"kind": "symmetric", "rate": 0.4}
    tiny["federation"]["rounds"] = 4
    plain = _final(tiny, tmp_path / "plain")
    tiny["plugins"] = [{"name": "rcal", "robust": "centre"}]
    a = _final(tiny, tmp_path / "a")
    b = _final(tiny, tmp_path / "b")
    assert a["per_class_accuracy"] == b["per_class_accuracy"]
    assert math.isfinite(a["balanced_accuracy"])
    assert a["per_class_accuracy"] != plain["per_class_accuracy"]
    tiny["plugins"] = [{"name": "rcal", "weight": 0.0, "lam": 0.0}]
    off = _final(tiny, tmp_path / "off")
    assert off["per_class_accuracy"] == plain["per_class_accuracy"]


def test_rcal_passes_fedlts_plugin_checks(tmp_path):
    from fedlt.testing import check_plugin

    report = check_plugin(
        "rcal", {"robust": "lof", "n_neighbors": 5}, engines=("serial",), out=tmp_path / "c"
    )
    assert {"resume == uninterrupted", "has an effect", "state round-trip"} <= set(report["checks"])
