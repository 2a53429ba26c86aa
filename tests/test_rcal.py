"""rcal: calibration against the formula written here, federated statistics against pooled ones
(numpy), sampled features against their Gaussian, LOF against scikit-learn, the robust selection on
hand-made points, parameter checks, and runs (determinism, no effect when switched off)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fedlt_plugins.rcal import (
    RCALParams,
    borrow_weights,
    calibrate,
    class_gaussians,
    class_statistics,
    combine_statistics,
    head_classes,
    lof_scores,
    mix_batch,
    mixup_loss,
    robust_keep,
    sample_features,
)
from sklearn.neighbors import LocalOutlierFactor

import fedlt


def test_head_classes_hold_the_head_share_of_the_labelled_samples():
    # Sec. 4.2: the most frequent classes holding at least 50% of the samples are the heads.
    present = torch.tensor([True, True, True, True, False])
    labelled = torch.tensor([100.0, 80.0, 60.0, 5.0, 0.0])  # 245 samples; 100 < 122.5 <= 180
    assert head_classes(labelled, present, 0.5).tolist() == [True, True, False, False, False]
    one = torch.tensor([300.0, 50.0, 50.0, 50.0, 50.0])  # 300 / 500 = 0.6 >= 0.5: one head
    assert head_classes(one, present | True, 0.5).tolist() == [True, False, False, False, False]
    ties = torch.tensor([10.0, 10.0, 10.0, 10.0, 0.0])  # ties broken by the lower id
    assert head_classes(ties, present, 0.5).tolist() == [True, True, False, False, False]
    assert head_classes(ties, present, 1.0).tolist() == [True, True, True, True, False]


def test_tail_classes_are_calibrated_by_the_papers_weighted_rule():
    """mu'_k = g sum w_c mu_c + (1 - g) mu_k, Sigma'_k = g sum w_c Sigma_c + (1 - g) Sigma_k + a 1,
    w_c = n_c d_c^2 / sum_j n_j d_j^2 (ICCV 2023, Sec. 3.3), worked by hand."""
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0], [9.0, 9.0], [1.0, 1.0], [5.0, 1.0]], dtype=torch.float64)
    covs = torch.stack([torch.eye(2, dtype=torch.float64) * (c + 1) for c in range(5)])
    labelled = torch.tensor([100.0, 90.0, 80.0, 5.0, 5.0])  # 280 samples: heads 0 and 1 (190 >= 140)
    present = torch.ones(5, dtype=torch.bool)
    params = RCALParams(q=2, gamma=0.5, alpha=0.3)
    cal_m, cal_c = calibrate(means, covs, labelled, present, params)
    ones = torch.ones(2, 2, dtype=torch.float64)
    # class 3 at (1, 1): d^2 = 2 to head 0, 10 to head 1; w = (100*2, 90*10) / 1100 = (2/11, 9/11).
    torch.testing.assert_close(cal_m[3], torch.tensor([0.5 * 36 / 11 + 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        cal_c[3], (0.5 * (2 / 11 * 1 + 9 / 11 * 2) + 0.5 * 4) * torch.eye(2).double() + 0.3 * ones
    )
    # class 4 at (5, 1): d^2 = 26 to head 0, 2 to head 1; w = (2600, 180) / 2780.
    w0, w1 = 2600 / 2780, 180 / 2780
    torch.testing.assert_close(cal_m[4], 0.5 * (w0 * means[0] + w1 * means[1]) + 0.5 * means[4])
    torch.testing.assert_close(
        cal_c[4], (0.5 * (w0 * 1 + w1 * 2) + 0.5 * 5) * torch.eye(2).double() + 0.3 * ones
    )
    for c in (0, 1):  # head classes keep their estimates
        torch.testing.assert_close(cal_m[c], means[c])
        torch.testing.assert_close(cal_c[c], covs[c])
    assert not torch.allclose(cal_m[2], means[2])  # 80 samples, but outside the first half: a tail
    # q = 1: class 4 borrows its nearest head (1) only, w = 1.
    cal_m1, _ = calibrate(means, covs, labelled, present, RCALParams(q=1, gamma=0.5, alpha=0.0))
    torch.testing.assert_close(cal_m1[4], torch.tensor([4.5, 0.5], dtype=torch.float64))
    # gamma = 0 leaves every class as estimated, up to alpha times all-ones.
    cal_m0, cal_c0 = calibrate(means, covs, labelled, present, RCALParams(gamma=0.0, alpha=0.0))
    torch.testing.assert_close(cal_m0, means)
    torch.testing.assert_close(cal_c0, covs)
    # an absent class is left alone
    absent = present.clone()
    absent[3] = False
    cal_ma, cal_ca = calibrate(means, covs, labelled, absent, params)
    torch.testing.assert_close(cal_ma[3], means[3])
    torch.testing.assert_close(cal_ca[3], covs[3])


def test_borrow_weights_are_uniform_when_the_tail_sits_on_its_heads():
    near = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    w = borrow_weights(near, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 7.0]))
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_mixup_mixes_the_inputs_and_the_labels_by_the_formula():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=gen)
    perm = torch.tensor([2, 0, 3, 1])
    lam = 0.3
    mixed = mix_batch(x, lam, perm)
    for i in range(4):
        torch.testing.assert_close(mixed[i], 0.3 * x[i] + 0.7 * x[int(perm[i])])
    logits = torch.randn(4, 5, generator=gen)
    y = torch.tensor([0, 4, 1, 1])
    # the cross-entropy with the mixed one-hot target lam e_y + (1 - lam) e_y[perm]
    target = lam * F.one_hot(y, 5).float() + (1 - lam) * F.one_hot(y[perm], 5).float()
    expected = -(target * torch.log_softmax(logits, dim=1)).sum(1)
    torch.testing.assert_close(mixup_loss(logits, y, lam, perm), expected)


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
        ("gamma", 1.5, "<= 1"),
        ("mixup", -0.5, ">= 0"),
        ("fraction_head", 0.5, "replaced by head_share"),
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
    tiny["plugins"] = [{"name": "rcal", "weight": 0.0, "lam": 0.0, "mixup": 0.0}]
    off = _final(tiny, tmp_path / "off")
    assert off["per_class_accuracy"] == plain["per_class_accuracy"]


def test_rcal_passes_fedlts_plugin_checks(tmp_path):
    from fedlt.testing import check_plugin

    report = check_plugin(
        "rcal", {"robust": "lof", "n_neighbors": 5}, engines=("serial",), out=tmp_path / "c"
    )
    assert {"resume == uninterrupted", "has an effect", "state round-trip"} <= set(report["checks"])


def test_server_uses_the_labelled_counts_for_heads_and_weights():
    """Head classes and w_c count the labelled samples (n_c, the paper's class sizes), not the kept ones."""
    from fedlt_plugins.rcal import RCAL

    gen = torch.Generator().manual_seed(4)
    f = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    y = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    kept = torch.ones(60, dtype=torch.bool)
    kept[:25] = False  # class 0 keeps 5 of 30: by kept counts it would be the smallest class
    payloads = {}
    for k in range(2):
        rows = torch.arange(k, 60, 2)
        stats = class_statistics(f[rows][kept[rows]], y[rows][kept[rows]], 3)
        stats["labelled"] = torch.bincount(y[rows], minlength=3).to(torch.float64)
        payloads[k] = stats
    plugin = RCAL(RCALParams(q=1))
    plugin.server_after_aggregate(None, payloads)
    means, covs, present = class_gaussians(combine_statistics(list(payloads.values())))
    labelled = torch.tensor([30.0, 20.0, 10.0], dtype=torch.float64)
    assert head_classes(labelled, present, 0.5).tolist() == [True, False, False]
    expected_m, expected_c = calibrate(means, covs, labelled, present, RCALParams(q=1))
    torch.testing.assert_close(plugin._fit[0], expected_m)
    torch.testing.assert_close(plugin._fit[1], expected_c)
    torch.testing.assert_close(plugin._fit[0][0], means[0])  # the labelled-largest class is the head
