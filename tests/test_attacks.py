"""Tests for fedlt.evaluation.attacks and the robustness evaluation of ``[eval.attack]``.

Attacks are checked against closed forms on linear models (FGSM on a two-class linear classifier
moves each input by eps along sign(w_wrong - w_true); PGD on it walks that direction until the
ball's edge), a PGD L2 step computed by hand from the softmax gradient formula, and the known
fact that an undefended model's robust accuracy falls as eps grows.
"""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedlt
from fedlt.base.seeding import torch_generator
from fedlt.errors import ScenarioError
from fedlt.evaluation.attacks import AttackSpec, attack, fgsm, pgd, project_to_ball, random_ball_point
from fedlt.hooks.plugin import Plugin, hookimpl
from fedlt.scenario.config import scenario_from_dict


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


W2 = [[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 0.5, 3.0]]  # w_1 - w_0 = [-2, 3, 0, 3]


# --------------------------------------------------------------------------- closed forms


def test_fgsm_linf_on_two_class_linear_model_is_the_closed_form() -> None:
    # Prepare: CE's gradient in x is p_wrong (w_wrong - w_true), so its sign is sign(w_wrong - w_true).
    model = _linear(W2, [0.2, -0.1])
    x = torch.tensor([[0.5, 0.1, -0.3, 0.2], [0.0, 1.0, 2.0, -1.0]])
    y = torch.tensor([0, 1])
    eps = 0.25

    # Execute
    adv = fgsm(model, x, y, eps, "linf")

    # Assert
    diff = torch.tensor(W2[1]) - torch.tensor(W2[0])
    expected = torch.stack([x[0] + eps * diff.sign(), x[1] + eps * (-diff).sign()])
    assert torch.allclose(adv, expected)
    assert adv[0, 2] == x[0, 2]  # w_1 - w_0 is 0 there: no move


def test_fgsm_l2_moves_eps_along_the_weight_difference() -> None:
    model = _linear(W2, [0.0, 0.0])
    x = torch.tensor([[0.5, 0.1, -0.3, 0.2]])
    adv = fgsm(model, x, torch.tensor([0]), 0.5, "l2")
    diff = torch.tensor(W2[1]) - torch.tensor(W2[0])
    assert torch.allclose(adv, x + 0.5 * diff / diff.norm(), atol=1e-6)


@pytest.mark.parametrize(("steps", "alpha", "moved"), [(2, 0.3, 0.6), (3, 0.4, 1.0), (5, 0.5, 1.0)])
def test_pgd_on_two_class_linear_model_walks_to_the_ball_edge(steps: int, alpha: float, moved: float) -> None:
    # Prepare: every step's ascent direction is the same (sign(d) or d/|d|, d = w_1 - w_0), so
    # after k steps of alpha, projected on the ball of radius 1: min(k alpha, 1) along it.
    model = _linear(W2, [0.0, 0.0])
    x = torch.tensor([[0.3, -0.2, 0.1, 0.4]])
    y = torch.tensor([0])
    d = torch.tensor(W2[1]) - torch.tensor(W2[0])

    # Execute
    linf = pgd(model, x, y, 1.0, "linf", steps, alpha)
    l2 = pgd(model, x, y, 1.0, "l2", steps, alpha)

    # Assert
    assert torch.allclose(linf, x + moved * d.sign(), atol=1e-6)
    assert torch.allclose(l2, x + moved * d / d.norm(), atol=1e-6)


def test_one_pgd_l2_step_by_hand_on_three_classes() -> None:
    # Prepare: z = W x + b; dCE/dx = W^T (softmax(z) - onehot(y)); one step of alpha along
    # g / |g|, then projected on the L2 ball of radius eps (alpha > eps: the step is cut to eps).
    weight = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 1.0, 1.0]]
    bias = [0.1, 0.0, -0.2]
    model = _linear(weight, bias)
    x = torch.tensor([[0.2, -0.5, 1.0]])
    W, b = torch.tensor(weight), torch.tensor(bias)
    p = torch.softmax(x @ W.T + b, dim=1)
    g = (p - torch.tensor([[0.0, 0.0, 1.0]])) @ W
    eps, alpha = 0.3, 0.5

    # Execute
    one_step = pgd(model, x, torch.tensor([2]), eps, "l2", steps=1, step_size=alpha)
    small = pgd(model, x, torch.tensor([2]), 1.0, "l2", steps=1, step_size=alpha)

    # Assert
    assert torch.allclose(one_step, x + eps * g / g.norm(), atol=1e-6)
    assert torch.allclose(small, x + alpha * g / g.norm(), atol=1e-6)


def test_projection_and_random_start_stay_in_the_ball_and_repeat() -> None:
    x = torch.zeros(64, 5)
    for norm in ("linf", "l2"):
        a = random_ball_point(x, 0.5, norm, torch_generator(7, "attack", 3))
        b = random_ball_point(x, 0.5, norm, torch_generator(7, "attack", 3))
        c = random_ball_point(x, 0.5, norm, torch_generator(7, "attack", 4))
        assert torch.equal(a, b) and not torch.equal(a, c)
        size = a.abs().amax(1) if norm == "linf" else a.norm(dim=1)
        assert bool((size <= 0.5 + 1e-6).all()) and bool((size > 0.05).any())
    big = torch.tensor([[3.0, 4.0], [0.1, -0.2]])
    assert torch.allclose(project_to_ball(big, 1.0, "l2"), torch.tensor([[0.6, 0.8], [0.1, -0.2]]))
    assert torch.equal(project_to_ball(big, 0.15, "linf"), torch.tensor([[0.15, 0.15], [0.1, -0.15]]))


def test_attack_batches_like_one_call_and_leaves_parameter_gradients_alone() -> None:
    model = _linear(W2, [0.0, 0.0])
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 2
    spec = AttackSpec("pgd", "linf", 0.2, 3, 0.1, random_start=False)
    whole = attack(model, x, y, spec, torch_generator(0, "attack"), batch_size=100)
    batched = attack(model, x, y, spec, torch_generator(0, "attack"), batch_size=3)
    assert torch.allclose(whole, batched)
    assert model.weight.grad is None


# --------------------------------------------------------------------------- monotone in eps


def _digits_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained on 1,200 digits (full-batch Adam, seed 0), and 597 held-out digits."""
    from fedlt.data.datasets import digits_arrays

    pixels, labels = digits_arrays()
    x = torch.tensor(pixels / 16.0, dtype=torch.float32)
    x = (x - x[:1200].mean()) / x[:1200].std()
    y = torch.tensor(labels)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[:1200]), y[:1200]).backward()
        opt.step()
    return model.eval(), x[1200:], y[1200:]


@pytest.mark.parametrize(("kind", "norm"), [("pgd", "linf"), ("pgd", "l2"), ("fgsm", "linf")])
def test_robust_accuracy_of_an_undefended_model_falls_as_eps_grows(kind: str, norm: str) -> None:
    # Prepare
    model, x, y = _digits_model()
    scale = 1.0 if norm == "linf" else 8.0  # an L2 ball must be larger to bite in 64 dimensions
    grid = [0.0, 0.02, 0.05, 0.1, 0.2, 0.4]

    # Execute
    accuracies = []
    for eps in grid:
        if eps == 0:
            adv = x
        else:
            e = eps * scale
            spec = AttackSpec(kind, norm, e, 10 if kind == "pgd" else 1, 2.5 * e / 10, kind == "pgd")
            adv = attack(model, x, y, spec, torch_generator(0, "attack", 1), batch_size=256)
        with torch.no_grad():
            accuracies.append(float((model(adv).argmax(1) == y).float().mean()))

    # Assert: clean accuracy high, non-increasing in eps, and far lower at the largest budget.
    assert accuracies[0] > 0.9
    assert all(b <= a for a, b in itertools.pairwise(accuracies)), accuracies
    assert accuracies[-1] < accuracies[0] - 0.5, accuracies


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("attack_table", "key", "value", "allowed"),
    [
        ({"kind": "cw"}, "eval.attack.kind", "cw", "'none', 'fgsm' or 'pgd'"),
        ({"kind": "pgd"}, "eval.attack.eps", None, "a float > 0 with kind 'pgd'"),
        ({"kind": "pgd", "eps": 0.1, "norm": "l1"}, "eval.attack.norm", "l1", "'linf' or 'l2'"),
        ({"eps": 0.1}, "eval.attack.eps", 0.1, "unset with kind 'none'"),
        ({"kind": "fgsm", "eps": 0.1, "steps": 5}, "eval.attack.steps", 5, "unset with kind 'fgsm'"),
        ({"kind": "pgd", "eps": 0.1, "steps": 0}, "eval.attack.steps", 0, "a number >= 1"),
        ({"kind": "pgd", "eps": -0.1}, "eval.attack.eps", -0.1, "greater than 0"),
    ],
)
def test_bad_attack_settings_name_key_value_and_what_is_allowed(
    tiny, attack_table: dict, key: str, value: object, allowed: str
) -> None:
    tiny["eval"]["attack"] = attack_table
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(tiny)
    message = str(info.value)
    assert repr(key) in message and f"Got {value!r}" in message and allowed in message


def test_personalized_attack_needs_personalized_evaluation(tiny) -> None:
    tiny["eval"].update(personalized=False, attack={"kind": "fgsm", "eps": 0.1, "personalized": True})
    with pytest.raises(ScenarioError, match=r"eval\.attack\.personalized"):
        scenario_from_dict(tiny)


def test_pgd_defaults_are_resolved() -> None:
    cfg = scenario_from_dict({"eval": {"attack": {"kind": "pgd", "eps": 0.4}}}).eval.attack
    spec = AttackSpec.from_config(cfg)
    assert spec == AttackSpec("pgd", "linf", 0.4, 10, 0.1, True, False)
    assert spec.describe() == "pgd linf eps=0.4 steps=10 step_size=0.1 random_start"
    assert AttackSpec.from_config(scenario_from_dict({}).eval.attack) is None


# --------------------------------------------------------------------------- in a run


class _Shift(Plugin):
    """Evaluation-time logits 3 z + [2, 0, ..., 0]: the attack must see these, not the head's."""

    @hookimpl
    def eval_logits(self, logits):
        shift = torch.zeros(logits.shape[1], dtype=logits.dtype)
        shift[0] = 2.0
        return 3.0 * logits + shift.to(logits.device)


class _HandFGSM(Plugin):
    """Checks the inputs and score it is given, and runs FGSM by hand on them."""

    eps = 0.3

    @hookimpl
    def eval_metrics(self, logits, labels, ctx, inputs, score):
        # No personalised mask in this scenario, so on every view score(inputs) is the logits.
        same = torch.allclose(score(inputs), logits, atol=1e-5)
        x = inputs.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(score(x), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            hits = int((score(inputs + self.eps * grad.sign()).argmax(1) == labels).sum())
        n = int(inputs.shape[0])
        total = float(inputs.double().sum())
        return {"score_is_evaluated": bool(same), "n_inputs": n, "input_sum": total, "fgsm": hits / n}


def test_evaluator_attacks_the_evaluated_logits_and_hooks_see_the_inputs(install_plugins, tiny, tmp_path):
    # Prepare: the record's FGSM accuracy must equal FGSM computed by hand in a plugin from the
    # inputs and score it receives, on the logits after another plugin's eval_logits.
    install_plugins(shift=_Shift, hand=_HandFGSM)
    tiny["plugins"] = [{"name": "shift"}, {"name": "hand"}]
    tiny["eval"]["attack"] = {"kind": "fgsm", "eps": _HandFGSM.eps}

    # Execute
    fedlt.run(tiny, out=tmp_path / "r")
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]

    # Assert
    from fedlt.data.federated import build_federated_data

    data = build_federated_data(fedlt.load_scenario(tiny))
    last = records[-1]
    assert last["hand.score_is_evaluated"] is True
    assert last["hand.n_inputs"] == int(data.y_test.numel())
    views = [v for v in data.test_views if len(v)]
    assert last["client_metrics"]["hand.n_inputs"] == [len(v) for v in views]
    assert last["client_metrics"]["hand.score_is_evaluated"] == [True] * len(views)
    expected_sums = [float(data.x_test[torch.as_tensor(v)].double().sum()) for v in views]
    assert last["client_metrics"]["hand.input_sum"] == pytest.approx(expected_sums)
    assert last["hand.input_sum"] == pytest.approx(float(data.x_test.double().sum()))
    assert last["evaluated_head"] == "model.head -> shift"
    assert last["attack"] == "fgsm linf eps=0.3"
    for rec in records:
        assert rec["robust_accuracy"] == pytest.approx(rec["hand.fgsm"], abs=1e-9)
        assert rec["robust_accuracy"] <= rec["accuracy"]
        for key in ("robust_balanced_accuracy", "robust_head_accuracy", "robust_tail_accuracy"):
            assert 0.0 <= rec[key] <= 1.0
        assert len(rec["robust_per_class_accuracy"]) == 10
        assert rec["robust_accuracy_disparity"] == pytest.approx(
            rec["robust_head_accuracy"] - rec["robust_tail_accuracy"]
        )


def test_attack_changes_no_training_and_repeats(tiny, tmp_path):
    # Prepare: the same run without an attack, with PGD (random start) twice.
    base = fedlt.run(copy.deepcopy(tiny), out=tmp_path / "base")["final"]
    tiny["eval"]["attack"] = {"kind": "pgd", "eps": 0.2, "steps": 3}
    first = fedlt.run(copy.deepcopy(tiny), out=tmp_path / "a")["final"]
    second = fedlt.run(copy.deepcopy(tiny), out=tmp_path / "b")["final"]

    # Assert: clean metrics untouched (the attack draws from its own stream), attack repeatable.
    assert first["accuracy"] == base["accuracy"] and first["auroc_macro"] == base["auroc_macro"]
    assert "robust_accuracy" not in base
    assert first["robust_per_class_accuracy"] == second["robust_per_class_accuracy"]
    assert first["robust_accuracy"] < first["accuracy"]


def test_personalised_attack_with_a_vanishing_budget_matches_personalised_accuracy(tiny, tmp_path):
    tiny["eval"]["attack"] = {"kind": "fgsm", "eps": 1e-7, "personalized": True}
    final = fedlt.run(tiny, out=tmp_path / "r")["final"]
    assert final["robust_personalized_accuracy"] == pytest.approx(final["personalized_accuracy"])
    assert final["robust_accuracy"] == pytest.approx(final["accuracy"])
    assert np.isfinite(final["robust_per_class_accuracy_std"])
