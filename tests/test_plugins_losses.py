"""focal and balanced-softmax equal their formulas on hand-worked batches, and act in a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.contexts import client_ctx, client_hooks, per_batch

import fedlt
from fedlt.hooks.context import ClientContext


def _ctx(local, global_) -> ClientContext:
    return client_ctx(local_counts=local, global_counts=global_, batch_size=1)


def _loss(ctx: ClientContext, logits: torch.Tensor, y: torch.Tensor, name: str, **params) -> torch.Tensor:
    """One client-round of plugin ``name``: ``client_start``, then ``client_loss`` on the batch."""
    hooks = client_hooks({"name": name, **params})
    hooks.client_start(model=None, ctx=ctx)
    return hooks.client_loss(**per_batch(ctx, logits, y))


def test_focal_matches_formula():
    # Prepare: p_t = sigmoid(2) = 0.880797 for sample 0, 0.5 for sample 1.
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    p0 = math.exp(2) / (math.exp(2) + 1)
    expected = torch.tensor(
        [-((1 - p0) ** 2) * math.log(p0), -(0.5**2) * math.log(0.5)]
    )  # [0.0018034, 0.1732868]
    # Execute / Assert
    out = _loss(_ctx([1, 1], [1, 1]), logits, y, "focal", gamma=2.0)
    torch.testing.assert_close(out, expected)
    alpha = _loss(_ctx([1, 1], [1, 1]), logits, y, "focal", gamma=2.0, alpha=[0.25, 0.75])
    torch.testing.assert_close(alpha, expected * torch.tensor([0.25, 0.75]))
    one_alpha = _loss(_ctx([1, 1], [1, 1]), logits, y, "focal", gamma=2.0, alpha=0.25)
    torch.testing.assert_close(one_alpha, expected * 0.25)
    ce = _loss(_ctx([1, 1], [1, 1]), logits, y, "focal", gamma=0.0)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, y, reduction="none"))


def test_focal_alpha_length_checked_before_training(tiny, tmp_path):
    tiny["plugins"] = [{"name": "focal", "alpha": [0.5, 0.5]}]
    with pytest.raises(fedlt.ScenarioError, match="a list of 10 floats"):
        fedlt.run(tiny, out=tmp_path / "r")


@pytest.mark.parametrize(("prior", "counts"), [("local", [3, 1]), ("global", [30, 10])])
def test_balanced_softmax_matches_formula(prior, counts):
    # Prepare: equal logits, so the loss is -log(n_y / sum n): -log(3/4), -log(1/4).
    ctx = _ctx([3, 1], [30, 10]) if prior == "local" else _ctx([1, 1], [30, 10])
    out = _loss(ctx, torch.zeros(2, 2), torch.tensor([0, 1]), "balanced-softmax", prior=prior)
    torch.testing.assert_close(out, torch.tensor([-math.log(0.75), -math.log(0.25)]))


def test_balanced_softmax_zero_counts_stay_finite():
    ctx = _ctx([5, 0, 2], [5, 0, 2])
    out = _loss(ctx, torch.zeros(1, 3), torch.tensor([1]), "balanced-softmax")
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
