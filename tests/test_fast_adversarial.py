"""Tests for single-step adversarial training (``adv-train``'s ``attack``: fgsm, fgsm-rs, n-fgsm)
and the catastrophic-overfitting indicator of the evaluation (``eval.attack.also_fgsm``).

On a two-class linear model whose features are its inputs, the input gradient of the
cross-entropy at any point is ``p_other (w_other - w_y)``, so its sign is ``sign(w_other - w_y)``
wherever the attack starts. Each single-step example is therefore written out here by hand:
the random start redrawn from the plugin's stream ``(seed, "adv-train", round, client)`` with
torch's uniform draw, one step of the papers' length along that sign, clipped as each method
says. The evaluator's FGSM-robust accuracy is checked against FGSM run by hand in a plugin.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from fedlt_plugins.adversarial import PGD_STEPS, AdvTrainParams
from fedlt_plugins.fast_adversarial import SINGLE_STEP, single_step
from support.contexts import client_ctx, client_hooks
from torch import nn

import fedlt
from fedlt.errors import ScenarioError
from fedlt.hooks.plugin import Plugin, hookimpl
from fedlt.scenario.config import scenario_from_dict
from fedlt.testing import check_plugin
from fedlt.training.loss import batch_loss

# Class 0 and class 1 weights: w_1 - w_0 = [-2, 3, -1, 3], no zero coordinate.
W = [[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 3.0]]
X = [[0.2, -0.1, 0.4, 0.3], [-0.5, 0.2, 0.1, -0.2], [0.3, 0.3, -0.3, 0.1], [0.0, -0.4, 0.2, 0.5]]
Y = [0, 1, 1, 0]


class Linear(fedlt.FedModel):
    """Features are the inputs; the head is a linear layer with the given weights."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.num_classes, self.feature_dim = len(weight), len(weight[0])
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(weight))
            self.head.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _loss(spec: dict, model: nn.Module, client_id: int = 0, round: int = 1):
    """The engine's batch loss of one client-round with the plugin ``spec`` on ``X, Y``."""
    y = torch.tensor(Y)
    ctx = client_ctx(Y * 5, num_classes=2, client_id=client_id, round=round)
    hooks = client_hooks(spec, client_id=client_id, round=round)
    hooks.client_start(model=model, ctx=ctx)
    return batch_loss(model, hooks, ctx, torch.tensor(X), y), ctx


def _uniform(shape, half_width: float, gen: torch.Generator) -> torch.Tensor:
    """Each coordinate uniform in [-half_width, half_width], drawn as torch.rand in float64."""
    return ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * half_width).float()


def _wrong_way(y: torch.Tensor) -> torch.Tensor:
    """sign(w_other - w_y) per sample: the sign of CE's input gradient on the linear model."""
    w = torch.tensor(W)
    return torch.sign(w[1 - y] - w[y])


# --------------------------------------------------------------------------- the papers' defaults


def test_single_step_defaults_are_the_papers() -> None:
    # Goodfellow et al. 2015: from x, step eps. Wong et al. 2020: uniform start in the eps-ball,
    # step 1.25 eps, projected. de Jorge et al. 2022: noise U(-2 eps, 2 eps), step eps, no projection.
    got = {k: (v.start, v.step, v.projected) for k, v in SINGLE_STEP.items()}
    assert got == {"fgsm": (0.0, 1.0, True), "fgsm-rs": (1.0, 1.25, True), "n-fgsm": (2.0, 1.0, False)}
    params = AdvTrainParams()
    assert params.attack == "pgd" and params.step_size is None
    # adv-train's PGD keeps Madry et al.'s: 10 steps of 2.5 eps / steps from a random start.
    assert (params.steps, params.random_start) == (None, None) and PGD_STEPS == 10


# --------------------------------------------------------------------------- hand-computed examples


def test_fgsm_training_loss_is_ce_at_x_plus_eps_sign() -> None:
    model, eps = Linear(W), 0.1
    # From the clean input (no random start), whatever the client.
    for client in (0, 3):
        loss, _ = _loss({"name": "adv-train", "attack": "fgsm", "eps": eps}, model, client_id=client)
        x, y = torch.tensor(X), torch.tensor(Y)
        torch.testing.assert_close(loss, F.cross_entropy(model.head(x + eps * _wrong_way(y)), y))


def test_fgsm_rs_is_a_uniform_start_a_1_25_eps_step_and_a_projection() -> None:
    model, eps = Linear(W), 0.2
    loss, ctx = _loss({"name": "adv-train", "attack": "fgsm-rs", "eps": eps}, model, client_id=2, round=3)
    x, y = torch.tensor(X), torch.tensor(Y)
    delta0 = _uniform(x.shape, eps, ctx.generator_for("adv-train"))
    x_adv = x + (delta0 + 1.25 * eps * _wrong_way(y)).clamp(-eps, eps)
    torch.testing.assert_close(loss, F.cross_entropy(model.head(x_adv), y))
    # The 1.25 eps step overshoots from most starts: the projection put those coordinates at the edge.
    assert ((x_adv - x).abs() > eps - 1e-6).float().mean() > 0.5


def test_n_fgsm_is_2_eps_noise_and_an_eps_step_without_projection() -> None:
    model, eps = Linear(W), 0.2
    loss, ctx = _loss({"name": "adv-train", "attack": "n-fgsm", "eps": eps}, model, client_id=1, round=2)
    x, y = torch.tensor(X), torch.tensor(Y)
    eta = _uniform(x.shape, 2 * eps, ctx.generator_for("adv-train"))
    x_adv = x + eta + eps * _wrong_way(y)
    torch.testing.assert_close(loss, F.cross_entropy(model.head(x_adv), y))


def test_step_size_replaces_the_default_step() -> None:
    model, eps, alpha = Linear(W), 0.2, 0.05
    spec = {"name": "adv-train", "attack": "n-fgsm", "eps": eps, "step_size": alpha}
    loss, ctx = _loss(spec, model)
    x, y = torch.tensor(X), torch.tensor(Y)
    x_adv = x + _uniform(x.shape, 2 * eps, ctx.generator_for("adv-train")) + alpha * _wrong_way(y)
    torch.testing.assert_close(loss, F.cross_entropy(model.head(x_adv), y))


def test_trades_with_fgsm_rs_takes_one_kl_step_from_the_seeded_start() -> None:
    model, eps, beta = Linear(W), 0.15, 6.0
    loss, ctx = _loss({"name": "adv-train", "method": "trades", "attack": "fgsm-rs", "eps": eps}, model)
    x, y = torch.tensor(X), torch.tensor(Y)
    clean = model.head(x)
    p = F.softmax(clean, dim=1).detach()
    delta = _uniform(x.shape, eps, ctx.generator_for("adv-train")).requires_grad_(True)
    kl = (p * (p.log() - F.log_softmax(model.head(x + delta), dim=1))).sum()
    (g,) = torch.autograd.grad(kl, delta)
    x_adv = x + (delta.detach() + 1.25 * eps * g.sign()).clamp(-eps, eps)
    q = F.log_softmax(model.head(x_adv), dim=1)
    kl_rows = (F.softmax(clean, 1) * (F.log_softmax(clean, 1) - q)).sum(1)
    expected = F.cross_entropy(clean, y) + beta * kl_rows.mean()
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------- GradAlign

W3 = [[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 3.0], [0.5, 0.5, 2.0, -1.0]]
Y3 = [0, 1, 2, 1]


def _loss3(spec: dict, model: nn.Module):
    ctx = client_ctx(Y3 * 5, num_classes=3)
    hooks = client_hooks(spec, client_id=0, round=1)
    hooks.client_start(model=model, ctx=ctx)
    return batch_loss(model, hooks, ctx, torch.tensor(X), torch.tensor(Y3)), ctx


def test_grad_align_adds_lambda_one_minus_cos_of_input_gradients_with_its_parameter_gradient() -> None:
    # Three classes, so the input gradient (softmax(Wx + b) - onehot(y)) W turns with x.
    model, eps, lam = Linear(W3), 0.3, 0.7
    base = {"name": "adv-train", "attack": "fgsm", "eps": eps}  # fgsm draws nothing: eta is the first draw
    plain, _ = _loss3(base, model)
    aligned, ctx = _loss3({**base, "grad_align": lam}, model)
    x, y = torch.tensor(X), torch.tensor(Y3)
    onehot = F.one_hot(y, 3).float()

    def input_grad(t: torch.Tensor) -> torch.Tensor:
        return (F.softmax(model.head(t), dim=1) - onehot) @ model.head.weight

    eta = _uniform(x.shape, eps, ctx.generator_for("adv-train"))
    g0, g1 = input_grad(x).detach(), input_grad(x + eta)
    cos = (g0 * g1).sum(1) / (g0.norm(dim=1) * g1.norm(dim=1))
    expected = lam * (1 - cos.mean())
    assert expected.item() > 1e-4  # the term is not trivially zero here
    torch.testing.assert_close(aligned - plain, expected)
    # Double backpropagation: the parameter gradient of the term is that of the formula.
    (got,) = torch.autograd.grad(aligned - plain, model.head.weight)
    (want,) = torch.autograd.grad(expected, model.head.weight)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- the budgets


def _random_batch(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen)


def test_n_fgsm_leaves_the_eps_ball_up_to_3_eps_and_fgsm_rs_never_does() -> None:
    model, eps = Linear(W), 0.1
    x, y = _random_batch()
    out = {}
    for method in ("fgsm", "fgsm-rs", "n-fgsm"):
        adv = single_step(model.head, x, y, method, eps, "linf", None, torch.Generator().manual_seed(0))
        out[method] = float((adv - x).abs().max())
    assert out["fgsm"] == pytest.approx(eps)
    assert out["fgsm-rs"] <= eps + 1e-6
    # Noise up to 2 eps plus a step of eps in the same direction: beyond 2 eps somewhere, never past 3 eps.
    assert 2 * eps < out["n-fgsm"] <= 3 * eps + 1e-6


def test_l2_fgsm_rs_stays_in_the_l2_ball_and_l2_n_fgsm_within_3_eps() -> None:
    model, eps = Linear(W), 0.5
    x, y = _random_batch()
    gen = torch.Generator().manual_seed(1)
    rs = single_step(model.head, x, y, "fgsm-rs", eps, "l2", None, gen)
    nf = single_step(model.head, x, y, "n-fgsm", eps, "l2", None, gen)
    assert float((rs - x).norm(dim=1).max()) <= eps + 1e-5
    assert eps < float((nf - x).norm(dim=1).max()) <= 3 * eps + 1e-5


def test_a_random_start_needs_a_generator() -> None:
    x, y = _random_batch(4)
    with pytest.raises(ValueError, match="fgsm-rs"):
        single_step(Linear(W).head, x, y, "fgsm-rs", 0.1)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("attack", ["fgsm-rs", "n-fgsm"])
def test_draws_repeat_per_seed_round_client_and_leave_the_sample_order(attack: str) -> None:
    spec = {"name": "adv-train", "attack": attack, "eps": 0.3, "step_size": 0.01}
    model = Linear(W)
    a, ctx = _loss(spec, model, client_id=1, round=4)
    b, _ = _loss(spec, model, client_id=1, round=4)
    other_client, _ = _loss(spec, model, client_id=2, round=4)
    other_round, _ = _loss(spec, model, client_id=1, round=5)
    assert a.item() == b.item()
    assert other_client.item() != a.item() and other_round.item() != a.item()
    assert torch.equal(ctx.generator.get_state(), torch.Generator().get_state())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("params", "key", "allowed"),
    [
        ({"attack": "fgsm-rs", "steps": 5}, "plugins[0].steps", "unset with attack 'fgsm-rs'"),
        ({"attack": "n-fgsm", "random_start": False}, "plugins[0].random_start", "unset with attack"),
        ({"attack": "fgsm", "method": "trades"}, "plugins[0].attack", "with method 'trades'"),
        ({"attack": "bim"}, "plugins[0].attack", "'pgd', 'fgsm', 'fgsm-rs' or 'n-fgsm'"),
        ({"attack": "fgsm", "step_size": 0.0}, "plugins[0].step_size", "greater than 0"),
        ({"grad_align": -0.1}, "plugins[0].grad_align", "0"),
    ],
)
def test_bad_single_step_settings_name_the_key(tiny, tmp_path, params, key, allowed) -> None:
    tiny["plugins"] = [{"name": "adv-train", **params}]
    with pytest.raises(ScenarioError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert info.value.key == key
    assert allowed in str(info.value)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"kind": "fgsm", "eps": 0.1, "also_fgsm": True}, "eval.attack.also_fgsm"),
        ({"also_fgsm": True}, "eval.attack.also_fgsm"),
    ],
)
def test_also_fgsm_only_with_pgd(tiny, table, key) -> None:
    tiny["eval"]["attack"] = table
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(tiny)
    assert info.value.key == key and "Got True" in str(info.value)


# --------------------------------------------------------------------------- in a run


class _HandFGSM(Plugin):
    """FGSM by hand on the global test set from the inputs and score the evaluator gives."""

    eps = 0.25

    @hookimpl
    def eval_metrics(self, labels, ctx, inputs, score):
        if ctx.client_id is not None:
            return {}
        x = inputs.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(score(x), labels, reduction="sum"), x)
        with torch.no_grad():
            hits = int((score(inputs + self.eps * grad.sign()).argmax(1) == labels).sum())
        return {"fgsm": hits / int(inputs.shape[0])}


def test_also_fgsm_reports_fgsm_accuracy_and_the_gap_leaving_pgd_alone(install_plugins, tiny, tmp_path):
    install_plugins(hand=_HandFGSM)
    tiny["plugins"] = [{"name": "hand"}]
    tiny["eval"]["attack"] = {"kind": "pgd", "eps": _HandFGSM.eps, "steps": 3}
    base = fedlt.run(json.loads(json.dumps(tiny)), out=tmp_path / "pgd")["final"]
    tiny["eval"]["attack"]["also_fgsm"] = True
    fedlt.run(tiny, out=tmp_path / "both")
    records = [json.loads(line) for line in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["attack"] == "pgd linf eps=0.25 steps=3 step_size=0.208333 random_start + fgsm"
    # The PGD numbers are those of the run without the second attack (it draws nothing).
    assert last["robust_per_class_accuracy"] == base["robust_per_class_accuracy"]
    assert "fgsm_robust_accuracy" not in base
    for rec in records:
        assert rec["fgsm_robust_accuracy"] == pytest.approx(rec["hand.fgsm"], abs=1e-9)
        assert rec["fgsm_pgd_gap"] == pytest.approx(rec["fgsm_robust_accuracy"] - rec["robust_accuracy"])
        assert rec["fgsm_robust_tail_accuracy"] is None or 0.0 <= rec["fgsm_robust_tail_accuracy"] <= 1.0
        assert len(rec["fgsm_robust_per_class_accuracy"]) == 10


@pytest.mark.parametrize("attack", ["fgsm-rs", "n-fgsm"])
def test_single_step_runs_train_and_repeat(tiny, tmp_path, attack: str) -> None:
    tiny["plugins"] = [{"name": "adv-train", "attack": attack, "eps": 0.3}]
    tiny["eval"]["attack"] = {"kind": "pgd", "eps": 0.3, "steps": 3, "also_fgsm": True}
    first = fedlt.run(tiny, out=tmp_path / "a")["final"]
    again = fedlt.run(tiny, out=tmp_path / "b")["final"]
    assert math.isfinite(first["robust_accuracy"]) and first["accuracy"] > 0.2
    assert first["robust_per_class_accuracy"] == again["robust_per_class_accuracy"]
    assert first["fgsm_robust_accuracy"] == again["fgsm_robust_accuracy"]


@pytest.mark.parametrize("params", [{"attack": "n-fgsm"}, {"attack": "fgsm", "grad_align": 0.2}])
def test_single_step_passes_the_conformance_checks(params) -> None:
    check_plugin("adv-train", params, engines=("serial",))
