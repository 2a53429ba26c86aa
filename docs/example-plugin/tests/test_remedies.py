"""The example remedies: each formula against an independent computation, then fedlt's
conformance suite (fedlt.testing.check_plugin) on each plugin."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from fedlt_example_remedies import (
    FeatureSMOTE,
    FedProx,
    GradientSimilarity,
    LabelSmoothing,
    ServerMomentum,
    Staleness,
    WithinClassVariability,
)
from fedlt_example_remedies.diagnostic import nc1
from fedlt_example_remedies.fedprox import proximal_term
from fedlt_example_remedies.gradsim import similarity_weights
from fedlt_example_remedies.label_smoothing import label_smoothing_loss
from fedlt_example_remedies.server_momentum import MomentumAggregator
from fedlt_example_remedies.smote import interpolate
from fedlt_example_remedies.staleness import StalenessAggregator

import fedlt
from fedlt.testing import check_plugin

# --------------------------------------------------------------------------- formulas


def test_label_smoothing_equals_torch():
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    expected = F.cross_entropy(logits, y, label_smoothing=0.2, reduction="none")
    assert torch.allclose(label_smoothing_loss(logits, y, 0.2), expected, atol=1e-6)


def test_proximal_gradient_is_mu_times_the_drift():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    anchor = torch.tensor([0.5, 3.0])
    proximal_term([w], [anchor], mu=0.2).backward()
    assert torch.allclose(w.grad, 0.2 * (w.detach() - anchor))


def test_server_momentum_by_hand():
    # Prepare: global w = 1, clients with 1 and 3 samples at 0 and 2: FedAvg a = 1.5, d = -0.5.
    g = {"w": torch.tensor([1.0])}
    velocity = {"w": torch.tensor([0.2])}
    agg = MomentumAggregator(g, velocity, beta=0.9, lr=0.5)
    agg.add({"w": torch.tensor([0.0])}, 1, 0)
    agg.add({"w": torch.tensor([2.0])}, 3, 1)
    # Execute / Assert: v = 0.9 * 0.2 + (1 - 1.5) = -0.32; w' = 1 - 0.5 * (-0.32) = 1.16.
    assert torch.allclose(agg.result()["w"], torch.tensor([1.16]))
    assert torch.allclose(velocity["w"], torch.tensor([-0.32]))


def test_staleness_aggregation_by_hand():
    agg = StalenessAggregator({"w": torch.zeros(1)}, {4: 0, 7: 3}, boost=0.5)
    agg.add({"w": torch.tensor([1.0])}, 10, 4)  # weight 10 * 1^0.5 = 10
    agg.add({"w": torch.tensor([4.0])}, 5, 7)  # weight 5 * 4^0.5 = 10
    assert torch.allclose(agg.result()["w"], torch.tensor([2.5]))


def test_gradient_similarity_matches_autograd():
    torch.manual_seed(0)
    h, y = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    head = torch.nn.Linear(5, 3)
    grads = []
    for i in range(8):  # per-sample gradient of sample i's loss w.r.t. its class row
        head.zero_grad()
        F.cross_entropy(head(h[i : i + 1]), y[i : i + 1]).backward()
        grads.append(head.weight.grad[y[i]].clone())
    head.zero_grad()
    F.cross_entropy(head(h), y).backward()
    batch = head.weight.grad.clone()
    expected = torch.stack(
        [1 + 0.7 * (1 - F.cosine_similarity(grads[i], batch[y[i]], dim=0)) for i in range(8)]
    )
    got = similarity_weights(head(h), h, y, alpha=0.7)
    assert torch.allclose(got, expected, atol=1e-5)


def test_smote_features_lie_between_same_class_pairs():
    h = torch.tensor([[0.0, 0.0], [2.0, 2.0], [5.0, 1.0], [9.0, 9.0], [8.0, 8.0], [7.0, 7.0], [6.0, 6.0]])
    # counts 2, 1 and 2 (mean 5/3, 2 is not below it) and the 1-sample class cannot pair: nothing
    y = torch.tensor([0, 0, 2, 1, 1])
    feats, labels = interpolate(h[:5], y, 4, torch.Generator().manual_seed(0))
    assert len(labels) == 0
    y = torch.tensor([0, 0, 1, 1, 1, 1, 1])  # counts 2 and 5: mean 3.5, class 0 is the minority
    feats, labels = interpolate(h, y, 6, torch.Generator().manual_seed(0))
    assert labels.tolist() == [0] * 6
    # every synthetic point is on the segment [h0, h1] = {t (2, 2), t in [0, 1]}
    assert torch.allclose(feats[:, 0], feats[:, 1]) and bool(((feats >= 0) & (feats <= 2)).all())


def test_nc1_is_zero_when_features_sit_on_their_class_means_and_grows_with_spread():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert nc1(means[labels], labels) == pytest.approx(0.0, abs=1e-12)
    noise = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1], [0.1, 0.1], [-0.1, -0.1]])
    # S_W by hand: per class covariance of +-e, averaged; S_B of the three means around their mean.
    centred = (means - means.mean(0)).double()
    s_b = centred.T @ centred / 3
    s_w = (
        torch.diag(torch.tensor([0.01, 0.0]))
        + torch.diag(torch.tensor([0.0, 0.01]))
        + torch.full((2, 2), 0.01)
    ) / 3
    expected = float(torch.trace(s_w.double() @ torch.linalg.pinv(s_b)) / 3)
    assert nc1(means[labels] + noise, labels) == pytest.approx(expected, rel=1e-6)  # float32 inputs


# --------------------------------------------------------------------------- conformance


@pytest.mark.parametrize(
    ("plugin", "params"),
    [
        (LabelSmoothing, {"epsilon": 0.1}),
        (FedProx, {"mu": 0.1}),
        (GradientSimilarity, {"alpha": 0.5}),
        (FeatureSMOTE, {"n_per_class": 4}),
        (ServerMomentum, {"beta": 0.5}),
        (Staleness, {"boost": 1.0, "lr_decay": 0.5}),
        (WithinClassVariability, {}),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_conformance(plugin, params, tmp_path):
    report = check_plugin(plugin, params, engines=("serial",), out=tmp_path)
    assert "state round-trip" in report["checks"] and "resume == uninterrupted" in report["checks"]


def test_metric_reaches_metrics_and_summary(tmp_path):
    summary = fedlt.run(
        "quickstart",
        out=tmp_path / "r",
        federation__rounds=2,
        **{"plugins.0.name": "within-class-variability"},
    )
    assert isinstance(summary["final"]["within-class-variability.nc1"], float)
    assert all("within-class-variability.nc1" in r for r in fedlt.history(tmp_path / "r"))


class LRRecorder(fedlt.Plugin):
    """Listed after ``staleness``: records (round, learning rate) in each client's state."""

    @fedlt.hookimpl
    def client_configure_training(self, recipe, ctx, state):
        state["lrs"] = [*state.get("lrs", []), [ctx.round, recipe.lr]]
        return recipe


def test_staleness_sends_each_client_its_own_learning_rate(tmp_path, monkeypatch):
    """The per-client channel: a client trained at rounds r_1 < r_2 < ... learns at round r_k
    with lr / (r_k - r_{k-1}) (staleness r_k - r_{k-1} - 1, lr_decay 1; r_0 = 0)."""
    monkeypatch.setenv(
        "FEDLT_EXTRA_PLUGINS", f"{os.environ['FEDLT_EXTRA_PLUGINS']},lr-recorder=test_remedies:LRRecorder"
    )
    plugins = [{"name": "staleness", "lr_decay": 1.0}, {"name": "lr-recorder"}]
    fedlt.run(
        "quickstart",
        out=tmp_path / "r",
        federation__rounds=6,
        federation__fraction_clients=0.3,
        plugins=plugins,
    )
    states = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["client_states"]
    lr = fedlt.load_scenario("quickstart").train.lr
    checked = 0
    for state in states.values():
        previous = 0
        for round, got in state.get("lr-recorder", {}).get("lrs", []):
            assert got == pytest.approx(lr / (round - previous)), (round, previous)
            previous, checked = round, checked + 1
    assert checked >= 6
