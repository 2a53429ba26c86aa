"""class-balanced, ldam and logit-adjust equal their formulas on hand-worked batches, and act in a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedlt
from fedlt.context import ClientContext
from fedlt.pluginmanager import build_hooks


def _ctx(local, global_=None, round: int = 1) -> ClientContext:
    z = torch.zeros(1)
    return ClientContext(
        client_id=0,
        round=round,
        seed=0,
        num_classes=len(local),
        config={},
        local_class_counts=np.array(local),
        global_class_counts=np.array(global_ if global_ is not None else local),
        indices=z.long(),
        labels=z.long(),
        x_train=z,
        y_train=z.long(),
        batch_size=1,
        local_epochs=1,
        local_steps=None,
        device=torch.device("cpu"),
        generator=torch.Generator(),
    )


def _hooks(*plugins):
    return build_hooks(fedlt.load_scenario({"plugins": list(plugins)}).plugins)


def _plugin(name, **params):
    return _hooks({"name": name, **params}).plugins[0]


# --------------------------------------------------------------------------- class-balanced


def test_class_balanced_weights_match_formula_and_sum_to_c():
    # Prepare: counts [3, 1], beta 0.9. Raw w = (1-b)/(1-b^n): 0.1/0.271 = 0.369004, 0.1/0.1 = 1.
    # Normalised to sum 2: [0.539084, 1.460916].
    plugin = _plugin("class-balanced", beta=0.9)
    ctx = _ctx([3, 1])
    # Execute
    plugin.client_start(model=None, ctx=ctx)
    w = plugin.client_sample_weights(y=torch.tensor([0, 1, 1]), ctx=ctx)
    # Assert
    torch.testing.assert_close(w, torch.tensor([0.539084, 1.460916, 1.460916]))
    assert float(ctx.extra["class-balanced.weights"].sum()) == pytest.approx(2.0)


def test_class_balanced_weights_sum_to_c_with_absent_classes():
    from fedlt_plugins.losses import class_balanced_weights

    # An absent class is weighted as n = 1: raw weights [0.1/(1-0.9^10), 1, 1] for counts [10, 0, 1].
    w = class_balanced_weights(np.array([10, 0, 1]), 0.9)
    raw = np.array([0.1 / (1 - 0.9**10), 1.0, 1.0])
    np.testing.assert_allclose(w, raw * 3 / raw.sum())
    assert w.sum() == pytest.approx(3.0)


def test_class_balanced_global_prior_ignores_local_counts():
    plugin = _plugin("class-balanced", beta=0.9, prior="global")
    ctx = _ctx([1, 1], global_=[3, 1])
    plugin.client_start(model=None, ctx=ctx)
    torch.testing.assert_close(ctx.extra["class-balanced.weights"], torch.tensor([0.539084, 1.460916]))


def test_class_balanced_drw_switches_on_at_its_round():
    plugin = _plugin("class-balanced", beta=0.9, drw_start_round=3)
    y = torch.tensor([0, 1])
    before = _ctx([3, 1], round=2)
    plugin.client_start(model=None, ctx=before)
    assert plugin.client_sample_weights(y=y, ctx=before) is None  # weights all 1
    for r in (3, 4):
        at = _ctx([3, 1], round=r)
        plugin.client_start(model=None, ctx=at)
        torch.testing.assert_close(
            plugin.client_sample_weights(y=y, ctx=at), torch.tensor([0.539084, 1.460916])
        )


def test_class_balanced_composes_with_focal():
    # class-balanced focal: the focal per-sample loss times the class weights, via the hook combiners.
    hooks = _hooks({"name": "focal", "gamma": 2.0}, {"name": "class-balanced", "beta": 0.9})
    ctx = _ctx([3, 1])
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    hooks.client_start.all(model=None, ctx=ctx, states={})
    loss = hooks.client_loss.first(logits=logits, y=y, features=None, ctx=ctx, states={})
    w = hooks.client_sample_weights.product(logits=logits, y=y, features=None, ctx=ctx, states={})
    p0 = math.exp(2) / (math.exp(2) + 1)
    focal = torch.tensor([-((1 - p0) ** 2) * math.log(p0), -(0.5**2) * math.log(0.5)])
    torch.testing.assert_close(loss * w, focal * torch.tensor([0.539084, 1.460916]))


# --------------------------------------------------------------------------- LDAM


def test_ldam_matches_formula():
    # Prepare: counts [3, 1], max_margin 0.5, s = 2. n^(1/4) = [1.316074, 1]; K = 0.5 (the rarest
    # class has the max margin), Delta = [0.5/1.316074, 0.5] = [0.379918, 0.5].
    # Zero logits, y = [0, 1]:
    #   sample 0: s*(z - Delta_0 e_0) = [-0.759836, 0]  -> CE = log(1 + e^0.759836) = 1.143563
    #   sample 1: s*(z - Delta_1 e_1) = [0, -1]         -> CE = log(1 + e^1)        = 1.313262
    plugin = _plugin("ldam", max_margin=0.5, scale=2.0)
    ctx = _ctx([3, 1])
    plugin.client_start(model=None, ctx=ctx)
    out = plugin.client_loss(logits=torch.zeros(2, 2), y=torch.tensor([0, 1]), ctx=ctx)
    torch.testing.assert_close(out, torch.tensor([1.143563, 1.313262]))
    torch.testing.assert_close(ctx.extra["ldam.margins"], torch.tensor([0.379918, 0.5]))


def test_ldam_paper_scale_on_nonzero_logits():
    # s = 30, logits [1, 0.5], y = 0, counts [1, 16]: Delta = [0.5, 0.25] (16^(1/4) = 2).
    # s*(z - Delta_0 e_0) = [15, 15] -> CE = log 2.
    plugin = _plugin("ldam", scale=30.0)
    ctx = _ctx([1, 16])
    plugin.client_start(model=None, ctx=ctx)
    out = plugin.client_loss(logits=torch.tensor([[1.0, 0.5]]), y=torch.tensor([0]), ctx=ctx)
    torch.testing.assert_close(out, torch.tensor([math.log(2)]))


def test_ldam_absent_class_counts_as_one():
    from fedlt_plugins.losses import ldam_margins

    # counts [16, 0]: the absent class is n = 1 and gets the max margin; 16 gets 0.5 / 2.
    np.testing.assert_allclose(ldam_margins(np.array([16, 0]), 0.5), [0.25, 0.5])


def test_ldam_drw_weights_from_its_round():
    plugin = _plugin("ldam", drw=True, drw_start_round=2, drw_beta=0.9)
    y = torch.tensor([0, 1])
    before = _ctx([3, 1], round=1)
    plugin.client_start(model=None, ctx=before)
    assert plugin.client_sample_weights(y=y, ctx=before) is None
    at = _ctx([3, 1], round=2)
    plugin.client_start(model=None, ctx=at)
    torch.testing.assert_close(plugin.client_sample_weights(y=y, ctx=at), torch.tensor([0.539084, 1.460916]))


@pytest.mark.parametrize(
    ("params", "match"),
    [({"drw": True}, "when drw is true"), ({"drw_start_round": 5}, "when drw is false")],
)
def test_ldam_drw_parameters_must_agree(params, match):
    with pytest.raises(fedlt.ScenarioError, match=match):
        _plugin("ldam", **params)


# --------------------------------------------------------------------------- logit adjustment


@pytest.mark.parametrize(
    ("tau", "expected"),
    [
        # tau 1: CE(log pi, y) = -log pi_y with pi = [3/4, 1/4]: [0.287682, 1.386294].
        (1.0, [-math.log(0.75), -math.log(0.25)]),
        # tau 2: softmax(2 log pi) = pi^2 / sum pi^2 = [9, 1] / 10: -log -> [0.105361, 2.302585].
        (2.0, [-math.log(0.9), -math.log(0.1)]),
        # tau 0: plain CE on zero logits: log 2 each.
        (0.0, [math.log(2), math.log(2)]),
    ],
)
def test_logit_adjust_matches_formula(tau, expected):
    plugin = _plugin("logit-adjust", tau=tau)
    ctx = _ctx([3, 1])
    plugin.client_start(model=None, ctx=ctx)
    out = plugin.client_loss(logits=torch.zeros(2, 2), y=torch.tensor([0, 1]), ctx=ctx)
    torch.testing.assert_close(out, torch.tensor(expected))


def test_logit_adjust_uses_named_prior_and_nonzero_logits():
    # global counts [1, 3] (local [3, 1] ignored): CE(z + log pi) with z = [1, 2], pi = [1/4, 3/4].
    plugin = _plugin("logit-adjust", prior="global")
    ctx = _ctx([3, 1], global_=[1, 3])
    plugin.client_start(model=None, ctx=ctx)
    z, y = torch.tensor([[1.0, 2.0]]), torch.tensor([1])
    out = plugin.client_loss(logits=z, y=y, ctx=ctx)
    expected = F.cross_entropy(z + torch.tensor([math.log(0.25), math.log(0.75)]), y, reduction="none")
    torch.testing.assert_close(out, expected)


def test_logit_adjust_raises_tail_accuracy(tmp_path, lt_digits):
    """Seeded long-tailed digits: logit adjustment (global prior) lifts tail accuracy over CE."""
    base = lt_digits(n_clients=2, rounds=4)
    ce = fedlt.run(base, out=tmp_path / "ce")["final"]
    la = fedlt.run({**base, "plugins": [{"name": "logit-adjust", "prior": "global"}]}, out=tmp_path / "la")[
        "final"
    ]
    assert la["tail_accuracy"] > ce["tail_accuracy"] + 0.05
    assert la["balanced_accuracy"] > ce["balanced_accuracy"]


@pytest.mark.parametrize(
    "plugins",
    [
        [{"name": "class-balanced", "drw_start_round": 2}],
        [{"name": "ldam", "scale": 1.0, "prior": "estimated", "drw": True, "drw_start_round": 2}],
        [{"name": "logit-adjust", "prior": "estimated"}],
    ],
)
def test_losses_run_end_to_end(tiny, tmp_path, plugins):
    tiny["plugins"] = plugins
    summary = fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 2})
    assert summary["final"]["accuracy"] > 0.2
