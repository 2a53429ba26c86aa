"""Tests for the adversarial-training plugins ``adv-train`` (PGD-AT, TRADES) and ``srat``.

Each batch loss is checked against its formula written out here on a tiny linear model whose
features are its inputs: PGD-AT against cross-entropy at the closed-form L-inf PGD example of a
two-class linear classifier (``x + eps sign(w_other - w_y)``: the input gradient of the loss is
``p_other (w_other - w_y)``, whose sign never changes, so enough steps reach the ball's edge);
TRADES against ``CE(f(x), y) + beta KL(f(x) || f(x'))`` with ``x'`` found here by a hand-written
sign-gradient ascent of the KL from the same seeded start; SRAT's weights and separability term
against explicit loops over a hand-made batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fedlt_plugins.adversarial import separability_loss, srat_class_weights
from support.contexts import client_ctx, client_hooks
from support.models import Linear
from torch import nn

import fedlt
from fedlt.testing import check_plugin
from fedlt.training.loss import batch_loss

# Class 0 and class 1 weights: w_1 - w_0 = [-2, 3, -1, 3], no zero coordinate.
W = [[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 3.0]]
X = [[0.2, -0.1, 0.4, 0.3], [-0.5, 0.2, 0.1, -0.2], [0.3, 0.3, -0.3, 0.1], [0.0, -0.4, 0.2, 0.5]]
Y = [0, 1, 1, 0]


def _loss(spec: dict, model: nn.Module, x, y, client_id: int = 0, round: int = 1, **ctx_fields):
    """The engine's batch loss of one client-round with the plugin ``spec``."""
    y = torch.tensor(y)
    ctx = client_ctx(
        y.tolist() * 5, num_classes=model.num_classes, client_id=client_id, round=round, **ctx_fields
    )
    hooks = client_hooks(spec, client_id=client_id, round=round)
    hooks.client_start(model=model, ctx=ctx)
    return batch_loss(model, hooks, ctx, torch.tensor(x), y), ctx


def _closed_form_pgd(x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """L-inf PGD on the two-class linear model, walked to the ball's edge."""
    w = torch.tensor(W)
    direction = torch.sign(w[1 - y] - w[y])
    return x + eps * direction


# --------------------------------------------------------------------------- PGD-AT


def test_pgd_at_loss_is_cross_entropy_at_the_closed_form_pgd_example() -> None:
    model, eps = Linear(W), 0.1
    loss, _ = _loss({"name": "adv-train", "eps": eps, "steps": 10}, model, X, Y)
    x, y = torch.tensor(X), torch.tensor(Y)
    x_adv = _closed_form_pgd(x, y, eps)
    torch.testing.assert_close(loss, F.cross_entropy(model.head(x_adv), y))
    # The attack raised the loss, as it must.
    assert loss > F.cross_entropy(model.head(x), y)


def test_pgd_at_uses_the_public_attack_with_the_client_stream() -> None:
    # Two steps do not reach the edge: the seeded start matters, so this pins the draws to
    # (seed, "adv-train", round, client) through fedlt.pgd.
    model, eps = Linear(W), 0.2
    spec = {"name": "adv-train", "eps": eps, "steps": 2, "step_size": 0.03}
    loss, ctx = _loss(spec, model, X, Y, client_id=3, round=2)
    x, y = torch.tensor(X), torch.tensor(Y)
    gen = ctx.generator_for("adv-train")
    x_adv = fedlt.pgd(lambda t: model.head(t), x, y, eps, "linf", 2, 0.03, gen)
    torch.testing.assert_close(loss, F.cross_entropy(model.head(x_adv), y))


# --------------------------------------------------------------------------- TRADES


def _kl_rows(p: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """sum_k p_k (log p_k - log q_k) per row, q = softmax(logits_adv)."""
    return (p * (p.log() - F.log_softmax(logits_adv, dim=1))).sum(1)


def test_trades_loss_is_ce_plus_beta_kl_at_the_kl_maximiser() -> None:
    model, eps, steps, alpha, beta = Linear(W, [0.1, -0.2]), 0.15, 5, 0.05, 6.0
    spec = {"name": "adv-train", "method": "trades", "eps": eps, "steps": steps, "step_size": alpha}
    loss, ctx = _loss(spec, model, X, Y)
    x, y = torch.tensor(X), torch.tensor(Y)
    # The KL ascent by hand, from the uniform start drawn from the plugin's stream.
    gen = ctx.generator_for("adv-train")
    delta = ((torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps).float()
    p = F.softmax(model.head(x), dim=1).detach()
    for _ in range(steps):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_kl_rows(p, model.head(x + d)).sum(), d)
        delta = (delta + alpha * g.sign()).clamp(-eps, eps)
    x_adv = x + delta
    clean = model.head(x)
    expected = F.cross_entropy(clean, y) + beta * _kl_rows(F.softmax(clean, dim=1), model.head(x_adv)).mean()
    torch.testing.assert_close(loss, expected)
    # Gradients flow through both f(x) and f(x'): compare with autograd on the formula.
    (g_plugin,) = torch.autograd.grad(loss, model.head.weight)
    (g_formula,) = torch.autograd.grad(expected, model.head.weight)
    torch.testing.assert_close(g_plugin, g_formula)


def test_trades_with_beta_zero_is_clean_cross_entropy() -> None:
    model = Linear(W)
    loss, _ = _loss({"name": "adv-train", "method": "trades", "beta": 0.0}, model, X, Y)
    torch.testing.assert_close(loss, F.cross_entropy(model.head(torch.tensor(X)), torch.tensor(Y)))


# --------------------------------------------------------------------------- SRAT


def test_srat_class_weights_are_inverse_powers_of_the_counts() -> None:
    np.testing.assert_allclose(srat_class_weights(np.array([100, 10, 1]), 1.0), [0.01, 0.1, 1.0])
    np.testing.assert_allclose(srat_class_weights(np.array([16, 4, 0]), 0.5), [0.25, 0.5, 1.0])
    np.testing.assert_allclose(srat_class_weights(np.array([7, 3]), 0.0), [1.0, 1.0])


def _sep_by_hand(h: list[list[float]], y: list[int], tau: float) -> float:
    """The supervised-contrastive term with explicit loops."""
    z = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in h]
    n, total, anchors = len(y), 0.0, 0
    for i in range(n):
        pos = [p for p in range(n) if p != i and y[p] == y[i]]
        if not pos:
            continue
        sims = [sum(a * b for a, b in zip(z[i], z[j], strict=True)) / tau for j in range(n)]
        log_den = math.log(sum(math.exp(sims[a]) for a in range(n) if a != i))
        total += -sum(sims[p] - log_den for p in pos) / len(pos)
        anchors += 1
    return total / anchors


def test_separability_term_matches_the_formula_on_a_hand_made_batch() -> None:
    h = [[1.0, 0.0, 0.5], [0.9, 0.2, 0.4], [0.0, 1.0, -0.3], [-0.2, 0.8, 0.1], [0.3, -0.7, 0.6]]
    y = [0, 0, 1, 1, 2]  # class 2 has no positive: not an anchor, still in the denominators
    out = separability_loss(torch.tensor(h), torch.tensor(y), 0.5)
    assert out.item() == pytest.approx(_sep_by_hand(h, y, 0.5), rel=1e-5)
    # Features of one class closer together: the term falls.
    tighter = [[1.0, 0.0, 0.5], [1.0, 0.05, 0.5], [0.0, 1.0, -0.3], [0.0, 1.0, -0.25], [0.3, -0.7, 0.6]]
    assert separability_loss(torch.tensor(tighter), torch.tensor(y), 0.5) < out
    # No positive pair at all: zero, with a gradient path.
    assert separability_loss(torch.tensor(h[:3]), torch.tensor([0, 1, 2]), 0.5).item() == 0.0


def test_srat_loss_is_weighted_ce_at_pgd_examples_plus_lam_separability() -> None:
    model, eps, lam, tau = Linear(W), 0.1, 0.7, 0.2
    counts = [40, 4]
    spec = {"name": "srat", "eps": eps, "lam": lam, "temperature": tau}
    loss, _ = _loss(spec, model, X, Y, local_counts=np.array(counts))
    x, y = torch.tensor(X), torch.tensor(Y)
    x_adv = _closed_form_pgd(x, y, eps)
    w = torch.tensor([1 / counts[c] for c in Y])
    ce = F.cross_entropy(model.head(x_adv), y, reduction="none")
    expected = (w * ce).sum() / w.sum() + lam * _sep_by_hand(x_adv.tolist(), Y, tau)
    torch.testing.assert_close(loss, expected.float())


def test_srat_global_prior_and_deferred_weights() -> None:
    model, eps = Linear(W), 0.1
    x, y = torch.tensor(X), torch.tensor(Y)
    ce = F.cross_entropy(model.head(_closed_form_pgd(x, y, eps)), y, reduction="none")
    # Global counts [2, 8] with power 2: w = [1/4, 1/64].
    spec = {"name": "srat", "eps": eps, "lam": 0.0, "prior": "global", "power": 2.0}
    loss, _ = _loss(spec, model, X, Y, local_counts=np.array([5, 5]), global_counts=np.array([2, 8]))
    w = torch.tensor([1 / 4 if c == 0 else 1 / 64 for c in Y])
    torch.testing.assert_close(loss, (w * ce).sum() / w.sum())
    # Before reweight_from_round: plain mean.
    spec = {"name": "srat", "eps": eps, "lam": 0.0, "reweight_from_round": 3}
    loss, _ = _loss(spec, model, X, Y, round=2, local_counts=np.array([40, 4]))
    torch.testing.assert_close(loss, ce.mean())


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("spec", [{"name": "adv-train", "method": "trades"}, {"name": "srat"}])
def test_attack_draws_repeat_per_seed_round_client_and_leave_the_sample_order(spec) -> None:
    # One short step from a random start: the start decides the loss.
    spec = {**spec, "eps": 0.3, "steps": 1, "step_size": 0.01}
    model = Linear(W)
    a, ctx = _loss(spec, model, X, Y, client_id=1, round=4)
    b, _ = _loss(spec, model, X, Y, client_id=1, round=4)
    other_client, _ = _loss(spec, model, X, Y, client_id=2, round=4)
    other_round, _ = _loss(spec, model, X, Y, client_id=1, round=5)
    assert a.item() == b.item()
    assert other_client.item() != a.item() and other_round.item() != a.item()
    # The sample-order generator was not drawn from.
    assert torch.equal(ctx.generator.get_state(), torch.Generator().get_state())


# --------------------------------------------------------------------------- runs and bad input


@pytest.mark.parametrize(
    ("plugin", "key", "value"),
    [
        ("adv-train", "eps", 0.0),
        ("adv-train", "method", "fgsm"),
        ("adv-train", "steps", 0),
        ("adv-train", "norm", "l1"),
        ("adv-train", "beta", -1.0),
        ("srat", "temperature", 0.0),
        ("srat", "prior", "server"),
        ("srat", "reweight_from_round", 0),
        ("srat", "step_size", -0.1),
    ],
)
def test_bad_parameters_refused_with_the_key(tiny, tmp_path, plugin, key, value) -> None:
    tiny["plugins"] = [{"name": plugin, key: value}]
    with pytest.raises(fedlt.ScenarioError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert key in info.value.key


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "adv-train", "steps": 2},
        {"name": "adv-train", "method": "trades", "steps": 2},
        {"name": "srat", "steps": 2},
    ],
)
def test_adversarial_runs_train_and_repeat(tiny, tmp_path, spec) -> None:
    tiny["plugins"] = [spec]
    tiny["eval"] = {**tiny.get("eval", {}), "attack": {"kind": "pgd", "eps": 0.3, "steps": 3}}
    tiny["engine"] = {**tiny.get("engine", {}), "vectorize": "on"}
    summary = fedlt.run(tiny, out=tmp_path / "a")
    first = summary["final"]
    again = fedlt.run(tiny, out=tmp_path / "b")["final"]
    # The attack needs input gradients in the loss: the clients train one by one, reason recorded.
    assert f"plugin {spec['name']!r} implements client_forward" in summary["training"][0]["why"]
    assert math.isfinite(first["robust_accuracy"]) and first["accuracy"] > 0.2
    assert first["robust_accuracy"] == again["robust_accuracy"] and first["accuracy"] == again["accuracy"]


@pytest.mark.parametrize(
    ("name", "params"),
    [("adv-train", {"steps": 2}), ("adv-train", {"steps": 2, "method": "trades"}), ("srat", {"steps": 2})],
)
def test_plugins_pass_the_conformance_checks(name, params) -> None:
    # Fresh instances, state round trip, resume == uninterrupted run, an effect on training.
    check_plugin(name, params, engines=("serial", "vectorized"))
