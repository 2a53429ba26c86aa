"""Tests for ``mt-adv-distill`` (MTARD, Zhao et al. ECCV 2022) and :func:`fedlt.load_model`.

The batch loss is checked against the authors' formula written out here on a tiny linear student
whose features are its inputs, with hand-made linear teachers: the one-step L-inf example in
closed form (``x + eps sign((softmax(Wx + b) - onehot(y)) W)``, the input gradient of the
student's cross-entropy), the KL terms as the authors' element-wise ``-log s * t + log(t + 1e-5)
* t`` averaged over batch and classes, the weight by their update rule. Teachers come from real
tiny run folders.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import fedlt_plugins.mtard as mtard
import pytest
import torch
import torch.nn.functional as F
from fedlt_plugins.mtard import balance_weight, mtard_kl
from support.contexts import client_ctx, client_hooks
from support.models import Linear
from support.scenarios import TINY
from torch import nn

import fedlt
from fedlt.prepare import prepare
from fedlt.testing import check_plugin
from fedlt.training.loss import batch_loss

W = [[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 3.0], [0.5, 0.5, 1.0, -1.0]]
B = [0.1, -0.2, 0.05]
W_CLEAN = [[0.3, 0.1, -0.2, 0.4], [-0.6, 0.2, 0.5, 0.1], [0.2, -0.3, 0.1, 0.0]]
W_ROBUST = [[0.1, -0.5, 0.3, 0.2], [0.4, 0.4, -0.1, -0.3], [-0.2, 0.1, 0.2, 0.6]]
X1 = [[0.2, -0.1, 0.4, 0.3], [-0.5, 0.2, 0.1, -0.2], [0.3, 0.3, -0.3, 0.1], [0.0, -0.4, 0.2, 0.5]]
X2 = [[0.1, 0.4, -0.2, 0.0], [0.3, -0.3, 0.2, 0.2], [-0.1, 0.1, 0.5, -0.4], [0.2, 0.2, 0.2, 0.2]]
Y1, Y2 = [0, 1, 2, 0], [2, 1, 0, 1]


def _authors_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``torch.mean(-a * b + torch.log(b + 1e-5) * b)``, a = log_softmax(student), b = softmax(teacher)."""
    a, b = F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1)
    return torch.mean(-a * b + torch.log(b + 1e-5) * b)


def _one_step_example(w: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float):
    """One L-inf step of eps on CE from x (no start noise), written with the closed-form gradient."""
    p = F.softmax(x @ w.T + bias, dim=1)
    grad = (p - F.one_hot(y, w.shape[0]).float()) @ w
    return x + eps * grad.sign()


# --------------------------------------------------------------------------- pure rules


def test_kl_is_the_authors_elementwise_mean() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    torch.testing.assert_close(mtard_kl(s, t).mean(), _authors_kl(s, t))
    # KL(t || s): minimised (up to the 1e-5 guard) when the student equals the teacher.
    assert mtard_kl(t, t).abs().max() < 1e-4 < mtard_kl(s, t).mean()


def test_balance_weight_follows_the_update_rule() -> None:
    # r_nat = 0.2 / 0.4 = 0.5, r_adv = 0.6 / 0.5 = 1.2: the adversarial term fell least.
    w = balance_weight(0.5, 0.2, 0.6, 0.4, 0.5, lr=0.025, power=1.0)
    assert w == pytest.approx(0.5 - 0.025 * (0.5 - 0.5 / 1.7))
    assert w < 0.5  # weight moves toward the adversarial term
    w2 = balance_weight(0.3, 0.2, 0.6, 0.4, 0.5, lr=0.1, power=2.0)
    assert w2 == pytest.approx(0.3 - 0.1 * (0.3 - 0.25 / (0.25 + 1.44)))
    # First batch: both ratios 1, target 0.5.
    assert balance_weight(0.3, 0.7, 0.9, 0.7, 0.9, lr=0.025, power=1.0) == pytest.approx(0.305)
    assert balance_weight(0.4, 0.0, 0.0, 0.5, 0.5, lr=0.5, power=1.0) == 0.4


# --------------------------------------------------------------------------- the plugin's loss


@pytest.fixture
def linear_teachers(monkeypatch: pytest.MonkeyPatch) -> dict[str, nn.Module]:
    """Teacher folders "clean" / "robust" resolved to hand-made linear teachers."""
    teachers = {"clean": Linear(W_CLEAN).eval(), "robust": Linear(W_ROBUST, [0.2, 0.0, -0.1]).eval()}
    monkeypatch.setattr(mtard, "teacher", lambda folder, device: teachers[folder])
    return teachers


def test_loss_and_weights_equal_the_formula_on_a_linear_student(
    linear_teachers: dict[str, nn.Module],
) -> None:
    eps, lr, w0 = 0.1, 0.025, 0.3
    spec = {
        "name": "mt-adv-distill",
        "clean_teacher": "clean",
        "robust_teacher": "robust",
        "eps": eps,
        "steps": 1,
        "step_size": eps,
        "start_noise": 0.0,
        "init_nat_weight": w0,
        "weight_lr": lr,
    }
    model, states = Linear(W, B), {}
    w, bias = torch.tensor(W), torch.tensor(B)
    clean_t, robust_t = linear_teachers["clean"], linear_teachers["robust"]
    hooks = client_hooks(spec, states=states)
    ctx = client_ctx(Y1 * 3, num_classes=3)
    hooks.client_start(model=model, ctx=ctx)
    expected_w, init = w0, None
    for step, (xs, ys) in enumerate([(X1, Y1), (X2, Y2)]):
        ctx.step = step
        x, y = torch.tensor(xs), torch.tensor(ys)
        model.zero_grad()
        loss = batch_loss(model, hooks, ctx, x, y)
        # The formula, by hand.
        x_adv = _one_step_example(w, bias, x, y, eps)
        l_adv = _authors_kl(model.head(x_adv), robust_t(x_adv))
        l_nat = _authors_kl(model.head(x), clean_t(x))
        init = init or (l_nat.item(), l_adv.item())
        r_nat, r_adv = l_nat.item() / init[0], l_adv.item() / init[1]
        expected_w = expected_w - lr * (expected_w - r_nat / (r_nat + r_adv))
        expected = (1 - expected_w) * l_adv + expected_w * l_nat
        torch.testing.assert_close(loss, expected)
        (g_plugin,) = torch.autograd.grad(loss, model.head.weight)
        (g_formula,) = torch.autograd.grad(expected, model.head.weight)
        torch.testing.assert_close(g_plugin, g_formula)
    # The weight lives in the client's state, updated once per step.
    state = states["mt-adv-distill"]
    assert state["w_nat"] == pytest.approx(expected_w)
    assert (state["init_nat"], state["init_adv"]) == pytest.approx(init)
    ctx.step = 1
    batch_loss(model, hooks, ctx, torch.tensor(X2), torch.tensor(Y2))  # a re-evaluation of step 1
    assert state["w_nat"] == pytest.approx(expected_w)


def test_attack_starts_from_the_client_stream(linear_teachers: dict[str, nn.Module]) -> None:
    # Three steps of 0.03 from a start of std 0.05 stay inside eps = 0.3: the start matters, so
    # this pins the draws to (seed, "mt-adv-distill", round, client).
    eps, alpha, noise = 0.3, 0.03, 0.05
    spec = {
        "name": "mt-adv-distill",
        "clean_teacher": "clean",
        "robust_teacher": "robust",
        "eps": eps,
        "steps": 3,
        "step_size": alpha,
        "start_noise": noise,
    }
    model, (w, bias) = Linear(W, B), (torch.tensor(W), torch.tensor(B))
    x, y = torch.tensor(X1), torch.tensor(Y1)
    hooks = client_hooks(spec, client_id=2, round=3)
    ctx = client_ctx(Y1 * 3, num_classes=3, client_id=2, round=3)
    hooks.client_start(model=model, ctx=ctx)
    loss = batch_loss(model, hooks, ctx, x, y)
    x_adv = x + noise * torch.randn(x.shape, generator=ctx.generator_for("mt-adv-distill"))
    for _ in range(3):
        x_adv = _one_step_example(w, bias, x_adv, y, alpha)
    assert (x_adv - x).abs().max() < eps
    robust_t, clean_t = linear_teachers["robust"], linear_teachers["clean"]
    l_adv, l_nat = _authors_kl(model.head(x_adv), robust_t(x_adv)), _authors_kl(model.head(x), clean_t(x))
    expected = 0.5 * l_adv + 0.5 * l_nat
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------- real run folders


def _scenario(**extra: Any) -> dict[str, Any]:
    s = copy.deepcopy(TINY)
    s["engine"] = {"threads": 1}
    s.update(extra)
    return s


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A FedAvg run and an adv-train run of the tiny scenario (about half a second each)."""
    root = tmp_path_factory.mktemp("teachers")
    fedlt.run(_scenario(), out=root / "clean")
    fedlt.run(_scenario(plugins=[{"name": "adv-train", "steps": 2}]), out=root / "robust")
    return {"clean": root / "clean", "robust": root / "robust"}


def _mtard(teachers: dict[str, Path], **params: Any) -> dict[str, Any]:
    spec = {
        "name": "mt-adv-distill",
        "clean_teacher": str(teachers["clean"]),
        "robust_teacher": str(teachers["robust"]),
        "steps": 2,
        **params,
    }
    return _scenario(plugins=[spec])


def test_load_model_gives_the_runs_final_global_model(teachers: dict[str, Path]) -> None:
    folder = teachers["robust"]
    model = fedlt.load_model(folder)
    assert not model.training
    data = prepare(fedlt.load_scenario(folder / "scenario.toml"), "cpu", checked=True).data
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    summary = fedlt.history(folder)[-1]
    assert acc == pytest.approx(summary["accuracy"], abs=1e-6)


def test_load_model_refuses_an_unfinished_folder(tmp_path: Path, teachers: dict[str, Path]) -> None:
    with pytest.raises(fedlt.FedltError, match="not a finished fedlt run"):
        fedlt.load_model(tmp_path)
    (tmp_path / "scenario.toml").write_text((teachers["clean"] / "scenario.toml").read_text())
    with pytest.raises(fedlt.FedltError, match="not a finished fedlt run"):
        fedlt.load_model(tmp_path)


def test_a_run_trains_with_teachers_from_run_folders(tmp_path: Path, teachers: dict[str, Path]) -> None:
    summary = fedlt.run(_mtard(teachers), out=tmp_path / "student")
    assert summary["finished"]
    # Loaded once per process: the same frozen module every time.
    t1 = mtard.teacher(str(teachers["clean"]), "cpu")
    assert t1 is mtard.teacher(str(teachers["clean"]), "cpu") and not t1.training
    assert not any(p.requires_grad for p in t1.parameters())
    ckpt = torch.load(tmp_path / "student" / "checkpoint.pt", weights_only=True)
    weights = [s["mt-adv-distill"]["w_nat"] for s in ckpt["client_states"].values()]
    assert weights and all(0.0 <= w <= 1.0 for w in weights) and any(w != 0.5 for w in weights)


def test_same_seed_same_run_other_seed_other_run(tmp_path: Path, teachers: dict[str, Path]) -> None:
    fedlt.run(_mtard(teachers, start_noise=0.05), out=tmp_path / "a")
    fedlt.run(_mtard(teachers, start_noise=0.05), out=tmp_path / "b")
    fedlt.run({**_mtard(teachers, start_noise=0.05), "seed": 4}, out=tmp_path / "c")
    a, b, c = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["global"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- bad parameters


def test_a_folder_that_is_not_a_finished_run_is_refused(tmp_path: Path, teachers: dict[str, Path]) -> None:
    bad = _mtard(teachers)
    bad["plugins"][0]["clean_teacher"] = str(tmp_path / "nowhere")
    with pytest.raises(fedlt.ScenarioError, match="clean_teacher") as info:
        fedlt.run(bad, out=tmp_path / "x")
    assert "finished fedlt run" in str(info.value)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_a_teacher_whose_model_does_not_fit_is_refused(tmp_path: Path, teachers: dict[str, Path]) -> None:
    # Same 64 inputs as digits, but 5 classes: the teacher cannot score the run's 10 classes.
    other = _scenario(
        data={"dataset": "synthetic", "n_train": 200, "n_test": 50, "num_classes": 5, "shape": [64]},
        federation={"rounds": 1, "fraction_clients": 0.5, "eval_every": 1},
    )
    fedlt.run(other, out=tmp_path / "five")
    bad = _mtard(teachers)
    bad["plugins"][0]["robust_teacher"] = str(tmp_path / "five")
    with pytest.raises(fedlt.FedltError, match="robust_teacher") as info:
        fedlt.run(bad, out=tmp_path / "x")
    assert "10 class scores" in str(info.value)


def test_another_forward_listed_first_is_refused_by_name(tmp_path: Path, teachers: dict[str, Path]) -> None:
    scenario = _mtard(teachers)
    scenario["plugins"].insert(0, {"name": "adv-train", "steps": 1})
    with pytest.raises(fedlt.PluginError, match="list 'mt-adv-distill' first") as info:
        fedlt.run(scenario, out=tmp_path / "x")
    assert info.value.plugin == "mt-adv-distill" and info.value.hook == "client_loss"


@pytest.mark.parametrize(
    ("key", "value"), [("eps", 0.0), ("weight_lr", 1.5), ("init_nat_weight", -0.1), ("norm", "l1")]
)
def test_bad_values_are_refused_naming_the_key(
    tmp_path: Path, teachers: dict[str, Path], key: str, value: Any
) -> None:
    with pytest.raises(fedlt.ScenarioError, match=key) as info:
        fedlt.run(_mtard(teachers, **{key: value}), out=tmp_path / "x")
    assert repr(value) in str(info.value)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


def test_passes_the_plugin_conformance_checks(tmp_path: Path, teachers: dict[str, Path]) -> None:
    params = {"clean_teacher": str(teachers["clean"]), "robust_teacher": str(teachers["robust"]), "steps": 2}
    check_plugin("mt-adv-distill", params, engines=("serial", "vectorized"), out=tmp_path)
