"""gce and sce equal their formulas (values and gradients written out here), GCE tends to CE as
q -> 0, and both plugins act as a run's loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.contexts import client_ctx, client_hooks, per_batch

import fedlt
from fedlt.testing import check_plugin

A = math.log(1e-4)


def _plugin_loss(logits: torch.Tensor, y: torch.Tensor, name: str, **params) -> torch.Tensor:
    ctx = client_ctx(local_counts=[1, 1, 1], global_counts=[1, 1, 1], batch_size=1)
    hooks = client_hooks({"name": name, **params})
    hooks.client_start(model=None, ctx=ctx)
    return hooks.client_loss(**per_batch(ctx, logits, y))


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


LOGITS = [[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [-0.5, 3.0, 1.0]]
LABELS = [0, 2, 2]


def test_gce_values_and_gradient_match_formula():
    q = 0.7
    z = torch.tensor(LOGITS, requires_grad=True)
    out = _plugin_loss(z, torch.tensor(LABELS), "gce", q=q)
    expected, grads = [], []
    for row, y in zip(LOGITS, LABELS, strict=True):
        p = _softmax(row)
        expected.append((1 - p[y] ** q) / q)
        # dL/dz_j = -p_y^q (1[j = y] - p_j)
        grads.append([-(p[y] ** q) * ((j == y) - p[j]) for j in range(3)])
    torch.testing.assert_close(out, torch.tensor(expected))
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor(grads))


def test_gce_tends_to_cross_entropy_and_mae():
    z, y = torch.tensor(LOGITS), torch.tensor(LABELS)
    ce = F.cross_entropy(z, y, reduction="none")
    torch.testing.assert_close(_plugin_loss(z, y, "gce", q=1e-5), ce, rtol=1e-3, atol=1e-4)
    p_y = torch.tensor([_softmax(r)[c] for r, c in zip(LOGITS, LABELS, strict=True)])
    torch.testing.assert_close(_plugin_loss(z, y, "gce", q=1.0), 1 - p_y)


def test_sce_values_and_gradient_match_formula():
    alpha, beta = 0.1, 1.0
    z = torch.tensor(LOGITS, requires_grad=True)
    out = _plugin_loss(z, torch.tensor(LABELS), "sce", alpha=alpha, beta=beta)
    expected, grads = [], []
    for row, y in zip(LOGITS, LABELS, strict=True):
        p = _softmax(row)
        ce = -math.log(p[y])
        # RCE = -sum_k p_k log(onehot_k), log 0 -> A: only the k != y terms remain.
        rce = -sum(p[k] * (0.0 if k == y else A) for k in range(3))
        expected.append(alpha * ce + beta * rce)
        # dCE/dz_j = p_j - 1[j = y]; RCE = -A (1 - p_y), so dRCE/dz_j = A p_y (1[j = y] - p_j).
        grads.append([alpha * (p[j] - (j == y)) + beta * A * p[y] * ((j == y) - p[j]) for j in range(3)])
    torch.testing.assert_close(out, torch.tensor(expected))
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor(grads))


def test_sce_with_beta_zero_is_scaled_cross_entropy():
    z, y = torch.tensor(LOGITS), torch.tensor(LABELS)
    out = _plugin_loss(z, y, "sce", alpha=2.0, beta=0.0)
    torch.testing.assert_close(out, 2.0 * F.cross_entropy(z, y, reduction="none"))


@pytest.mark.parametrize(
    ("plugin", "key", "value"), [("gce", "q", 0.0), ("gce", "q", 1.5), ("sce", "beta", -1.0)]
)
def test_bad_parameters_refused_with_the_key(tiny, tmp_path, plugin, key, value):
    tiny["plugins"] = [{"name": plugin, key: value}]
    with pytest.raises(fedlt.ScenarioError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert key in info.value.key


@pytest.mark.parametrize("plugin", ["gce", "sce"])
def test_robust_losses_train_on_noisy_labels(tiny, tmp_path, plugin):
    tiny["noise"] = {"kind": "symmetric", "rate": 0.4}
    tiny["plugins"] = [{"name": plugin}]
    final = fedlt.run(tiny, out=tmp_path / plugin)["final"]
    assert final["noise_n_noisy"] > 0
    assert math.isfinite(final["balanced_accuracy"])


@pytest.mark.parametrize(("plugin", "params"), [("gce", {"q": 0.5}), ("sce", {"alpha": 0.5, "beta": 0.5})])
def test_plugins_pass_fedlts_checks(tmp_path, plugin, params):
    report = check_plugin(plugin, params, engines=("serial", "vectorized"), out=tmp_path / plugin)
    assert "serial == vectorized" in report["checks"]
