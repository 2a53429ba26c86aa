"""focal and balanced-softmax equal their formulas on hand-worked batches, and act in a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.contexts import client_ctx

import fedlt
from fedlt.context import ClientContext
from fedlt.pluginmanager import build_hooks


def _ctx(local, global_) -> ClientContext:
    return client_ctx(local_counts=local, global_counts=global_, batch_size=1)


def _plugin(name, **params):
    return build_hooks(fedlt.load_scenario({"plugins": [{"name": name, **params}]}).plugins).plugins[0]


def test_focal_matches_formula():
    # Prepare: p_t = sigmoid(2) = 0.880797 for sample 0, 0.5 for sample 1.
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    p0 = math.exp(2) / (math.exp(2) + 1)
    expected = torch.tensor(
        [-((1 - p0) ** 2) * math.log(p0), -(0.5**2) * math.log(0.5)]
    )  # [0.0018034, 0.1732868]
    # Execute / Assert
    out = _plugin("focal", gamma=2.0).client_loss(logits=logits, y=y, ctx=_ctx([1, 1], [1, 1]))
    torch.testing.assert_close(out, expected)
    alpha = _plugin("focal", gamma=2.0, alpha=[0.25, 0.75]).client_loss(
        logits=logits, y=y, ctx=_ctx([1, 1], [1, 1])
    )
    torch.testing.assert_close(alpha, expected * torch.tensor([0.25, 0.75]))
    ce = _plugin("focal", gamma=0.0).client_loss(logits=logits, y=y, ctx=_ctx([1, 1], [1, 1]))
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, y, reduction="none"))


def test_focal_alpha_length_checked_before_training(tiny, tmp_path):
    tiny["plugins"] = [{"name": "focal", "alpha": [0.5, 0.5]}]
    with pytest.raises(fedlt.ScenarioError, match="a list of 10 floats"):
        fedlt.run(tiny, out=tmp_path / "r")


@pytest.mark.parametrize(("prior", "counts"), [("local", [3, 1]), ("global", [30, 10])])
def test_balanced_softmax_matches_formula(prior, counts):
    # Prepare: equal logits, so the loss is -log(n_y / sum n): -log(3/4), -log(1/4).
    plugin = _plugin("balanced-softmax", prior=prior)
    ctx = _ctx([3, 1], [30, 10]) if prior == "local" else _ctx([1, 1], [30, 10])
    plugin.client_start(model=None, ctx=ctx)
    out = plugin.client_loss(logits=torch.zeros(2, 2), y=torch.tensor([0, 1]), ctx=ctx)
    torch.testing.assert_close(out, torch.tensor([-math.log(0.75), -math.log(0.25)]))


def test_balanced_softmax_zero_counts_stay_finite():
    plugin = _plugin("balanced-softmax")
    ctx = _ctx([5, 0, 2], [5, 0, 2])
    plugin.client_start(model=None, ctx=ctx)
    out = plugin.client_loss(logits=torch.zeros(1, 3), y=torch.tensor([1]), ctx=ctx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([-math.log(1 / 8)]))


def test_balanced_softmax_raises_tail_accuracy(tmp_path, lt_digits):
    """Seeded long-tailed digits: balanced softmax (global prior) lifts tail accuracy over CE."""
    base = lt_digits(n_clients=4, rounds=10)
    ce = fedlt.run(base, out=tmp_path / "ce")["final"]
    bs = fedlt.run(
        {**base, "plugins": [{"name": "balanced-softmax", "prior": "global"}]}, out=tmp_path / "bs"
    )["final"]
    assert bs["tail_accuracy"] > ce["tail_accuracy"] + 0.05
    assert bs["balanced_accuracy"] > ce["balanced_accuracy"]


def test_estimated_prior_follows_head_norms():
    from fedlt_plugins.priors import estimated_shares, prior_counts

    head = torch.nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0]]))
    model = torch.nn.Module()
    model.head = head
    np.testing.assert_allclose(estimated_shares(model), np.array([8, 1, 1]) / 10)
    np.testing.assert_allclose(
        prior_counts("estimated", np.array([5, 3, 2]), np.array([1, 1, 1]), model), [8, 1, 1]
    )
