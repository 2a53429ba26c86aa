"""class-balanced, ldam and logit-adjust equal their formulas on hand-worked batches, and act in a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fedlt_plugins.losses import class_balanced_weights, drw_start
from support.contexts import client_ctx, client_hooks, hook_set, per_batch, setup_ctx
from torch import nn

import fedlt
from fedlt.hooks.context import ClientContext
from fedlt.hooks.recipe import LocalTraining
from fedlt.models import CosineLinear
from fedlt.training.serial import train_alone as train_client

#: Class-balanced weights of counts [3, 1] at beta 0.9 (both classes present, so every prior
#: normalises over the same classes). Raw w = (1-b)/(1-b^n): 0.1/0.271 = 0.369004, 0.1/0.1 = 1;
#: normalised to sum 2: [0.539084, 1.460916].
CB_3_1 = torch.tensor([0.539084, 1.460916])


def _ctx(local, global_=None, round: int = 1, n_rounds: int = 10) -> ClientContext:
    return client_ctx(local_counts=local, global_counts=global_, round=round, n_rounds=n_rounds, batch_size=1)


def _plugin(name, **params):
    return hook_set({"name": name, **params}).plugins[0]


def _round(ctx: ClientContext, *plugins):
    """One client-round's hooks, started as the engine starts them (``client_start`` first)."""
    hooks = client_hooks(*plugins, round=ctx.round)
    hooks.client_start(model=None, ctx=ctx)
    return hooks


def _weights(ctx: ClientContext, y: torch.Tensor, *plugins):
    """The class weights of the plugins' client_class_weights (class-balanced, LDAM's DRW)."""
    return _round(ctx, *plugins).client_class_weights(
        **per_batch(ctx, torch.zeros(len(y), len(ctx.local_class_counts)), y)
    )


def _loss(ctx: ClientContext, logits: torch.Tensor, y: torch.Tensor, *plugins):
    return _round(ctx, *plugins).client_loss(**per_batch(ctx, logits, y))


class _Identity(nn.Module):
    """features(x) = x and a linear head: logits are whatever the head makes of the inputs."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.head = nn.Linear(d, c)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --------------------------------------------------------------------------- class-balanced


def test_class_balanced_weights_match_formula_and_sum_to_c():
    # Prepare: counts [3, 1], beta 0.9 (see CB_3_1).
    ctx = _ctx([3, 1])
    spec = {"name": "class-balanced", "beta": 0.9, "normalize": "weighted-mean"}
    # Execute
    w = _weights(ctx, torch.tensor([0, 1, 1]), spec)
    per_class = _weights(ctx, torch.tensor([0, 1]), spec)
    # Assert
    torch.testing.assert_close(w, CB_3_1[[0, 1, 1]])
    assert float(per_class.sum()) == pytest.approx(2.0)


def test_class_balanced_weights_sum_to_c_with_absent_classes():
    # An absent class is weighted as n = 1: raw weights [0.1/(1-0.9^10), 1, 1] for counts [10, 0, 1].
    w = class_balanced_weights(np.array([10, 0, 1]), 0.9)
    raw = np.array([0.1 / (1 - 0.9**10), 1.0, 1.0])
    np.testing.assert_allclose(w, raw * 3 / raw.sum())
    assert w.sum() == pytest.approx(3.0)


def test_class_balanced_present_only_weights_sum_to_the_present_classes():
    # counts [10, 0, 1], beta 0.9: raw = [0.1 / (1 - 0.9^10), 1, 1] = [0.153534, 1, 1] (the absent
    # class weighted as n = 1). Present classes {0, 2}: scale 2 / (0.153534 + 1) = 1.733802, so
    # w = [0.266198, 1.733802, 1.733802]; w_0 + w_2 = 2 (the number of present classes).
    expected = np.array([0.266198, 1.733802, 1.733802])
    w = class_balanced_weights(np.array([10, 0, 1]), 0.9, present_only=True)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-6)
    assert w[[0, 2]].sum() == pytest.approx(2.0)
    # The plugin with prior "local" normalises over the client's own classes.
    ctx = _ctx([10, 0, 1])
    spec = {"name": "class-balanced", "beta": 0.9, "normalize": "weighted-mean"}
    got = _weights(ctx, torch.tensor([0, 2, 1]), spec)
    torch.testing.assert_close(got, torch.tensor(expected[[0, 2, 1]], dtype=torch.float32))
    assert float(got[:2].sum()) == pytest.approx(2.0)


def test_class_balanced_global_prior_ignores_local_counts():
    spec = {"name": "class-balanced", "beta": 0.9, "normalize": "weighted-mean", "prior": "global"}
    ctx = _ctx([1, 1], global_=[3, 1])
    torch.testing.assert_close(_weights(ctx, torch.tensor([0, 1]), spec), CB_3_1)
    # Global counts [3, 1, 0]: raw [0.369004, 1, 1] normalised over all C = 3 classes (even the
    # absent one): x 3 / 2.369004 -> [0.467290, 1.266355, 1.266355], summing to 3.
    ctx = _ctx([1, 1, 1], global_=[3, 1, 0])
    w = _weights(ctx, torch.tensor([0, 1, 2]), spec)
    torch.testing.assert_close(w, torch.tensor([0.467290, 1.266355, 1.266355]))
    assert float(w.sum()) == pytest.approx(3.0)


def test_class_balanced_drw_switches_on_at_its_round():
    spec = {"name": "class-balanced", "beta": 0.9, "normalize": "weighted-mean", "drw_start_round": 3}
    y = torch.tensor([0, 1])
    assert _weights(_ctx([3, 1], round=2), y, spec) is None  # weights all 1
    for r in (3, 4):
        torch.testing.assert_close(_weights(_ctx([3, 1], round=r), y, spec), CB_3_1)


def test_class_balanced_composes_with_focal():
    # class-balanced focal: the focal per-sample loss, with the class weights as class weights.
    cb = {"name": "class-balanced", "beta": 0.9, "normalize": "weighted-mean"}
    hooks = hook_set({"name": "focal", "gamma": 2.0}, cb)
    ctx = _ctx([3, 1])
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 0.0]]), torch.tensor([0, 1])
    ch = client_hooks(hooks)
    ch.client_start(model=None, ctx=ctx)
    loss = ch.client_loss(**per_batch(ctx, logits, y))
    # weighted-mean: class-balanced's weights are class weights, not sample weights
    assert ch.client_sample_weights(**per_batch(ctx, logits, y)) is None
    c = ch.client_class_weights(**per_batch(ctx, logits, y))
    p0 = math.exp(2) / (math.exp(2) + 1)
    focal = torch.tensor([-((1 - p0) ** 2) * math.log(p0), -(0.5**2) * math.log(0.5)])
    torch.testing.assert_close(loss, focal)
    torch.testing.assert_close(c, CB_3_1)


def test_class_balanced_batch_loss_is_weighted_cross_entropy():
    # One engine step on fixed logits (lr 0): the batch loss is sum_i w_{y_i} l_i / sum_i w_{y_i},
    # which is F.cross_entropy(weight=w) (not the mean of w_{y_i} l_i).
    z, y = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]]), torch.tensor([0, 0, 1])
    model = _Identity(2, 2)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(2))
        model.head.bias.zero_()
    ctx = client_ctx(y, x=z, local_counts=[3, 1], batch_size=3)
    recipe = LocalTraining(1, None, 3, "sgd", 0.0, 0.0, 0.0, None, "none")
    hooks = client_hooks({"name": "class-balanced", "beta": 0.9, "normalize": "weighted-mean"})
    total, n_steps, _ = train_client(model, ctx, hooks, recipe, list(model.parameters()))
    assert n_steps == 1
    expected = F.cross_entropy(z, y, weight=CB_3_1)
    torch.testing.assert_close(total, expected)
    w = CB_3_1[y]
    assert not torch.allclose(expected, (w * F.cross_entropy(z, y, reduction="none")).mean())


def _one_step(normalize: str, lr: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """One engine SGD step of class-balanced (beta 0.9, counts [3, 1]) on a 3-sample batch."""
    x, y = torch.tensor([[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]]), torch.tensor([0, 0, 1])
    model = _Identity(2, 2)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[0.3, -0.2], [0.1, 0.4]]))
        model.head.bias.copy_(torch.tensor([0.05, -0.05]))
    start = _Identity(2, 2)
    start.load_state_dict(model.state_dict())
    ctx = client_ctx(y, x=x, local_counts=[3, 1], batch_size=3)
    recipe = LocalTraining(1, None, 3, "sgd", lr, 0.0, 0.0, None, "none")
    hooks = client_hooks({"name": "class-balanced", "beta": 0.9, "normalize": normalize})
    train_client(model, ctx, hooks, recipe, list(model.parameters()))
    return x, y, start, model


@pytest.mark.parametrize("normalize", ["cui", "weighted-mean"])
def test_class_balanced_step_follows_its_normalisation(normalize):
    # Formula, by hand: w = CB_3_1 (raw (1-b)/(1-b^n) rescaled to sum to C = 2), l_i = CE_i.
    #   cui:           L = sum_i w_{y_i} l_i / B              (Cui et al.'s code: weights sum to C, / batch)
    #   weighted-mean: L = sum_i w_{y_i} l_i / sum_i w_{y_i}  (F.cross_entropy(weight=w))
    # The engine's step must be W - lr * dL/dW of that L (autograd on the formula, not on the engine).
    lr = 0.5
    x, y, start, after = _one_step(normalize, lr)
    w = CB_3_1[y]
    params = [p.detach().clone().requires_grad_(True) for p in start.head.parameters()]
    per_sample = F.cross_entropy(F.linear(x, *params), y, reduction="none")
    loss = (w * per_sample).sum() / (len(y) if normalize == "cui" else w.sum())
    grads = torch.autograd.grad(loss, params)
    for p, g, new in zip(params, grads, after.head.parameters(), strict=True):
        torch.testing.assert_close(new.detach(), p.detach() - lr * g)


def test_class_balanced_normalisations_differ_by_the_weight_sum_over_batch_size():
    # Same direction, step sizes in ratio sum_i w_{y_i} / B = (2 * 0.539084 + 1.460916) / 3.
    _, _, start, cui = _one_step("cui")
    _, _, _, mean = _one_step("weighted-mean")
    ratio = float((2 * CB_3_1[0] + CB_3_1[1]) / 3)
    assert ratio == pytest.approx(0.846361, abs=1e-6)
    heads = (start.head.parameters(), cui.head.parameters(), mean.head.parameters())
    for p0, pc, pm in zip(*heads, strict=True):
        torch.testing.assert_close((pc - p0).detach(), ratio * (pm - p0).detach())


def test_class_balanced_defaults_to_cuis_normalisation():
    plugin = _plugin("class-balanced")
    assert plugin.params.normalize == "cui"
    ctx = _ctx([3, 1])
    batch = per_batch(ctx, torch.zeros(2, 2), torch.tensor([0, 1]))
    hooks = _round(ctx, {"name": "class-balanced", "beta": 0.9})
    assert hooks.client_class_weights(**batch) is None  # the weights are sample weights here
    torch.testing.assert_close(hooks.client_sample_weights(**batch), CB_3_1)


# --------------------------------------------------------------------------- LDAM


def test_ldam_matches_formula():
    # Prepare: counts [3, 1], max_margin 0.5, s = 2. n^(1/4) = [1.316074, 1]; K = 0.5 (the rarest
    # class has the max margin), Delta = [0.5/1.316074, 0.5] = [0.379918, 0.5].
    # Zero logits, y = [0, 1]:
    #   sample 0: s*(z - Delta_0 e_0) = [-0.759836, 0]  -> CE = log(1 + e^0.759836) = 1.143563
    #   sample 1: s*(z - Delta_1 e_1) = [0, -1]         -> CE = log(1 + e^1)        = 1.313262
    ctx = _ctx([3, 1])
    out = _loss(
        ctx, torch.zeros(2, 2), torch.tensor([0, 1]), {"name": "ldam", "max_margin": 0.5, "scale": 2.0}
    )
    torch.testing.assert_close(out, torch.tensor([1.143563, 1.313262]))
    # Margins alone: with s = 1 and y = 0, CE(z - Delta_0 e_0) on zero logits is log(1 + e^Delta_0).
    one = _loss(ctx, torch.zeros(1, 2), torch.tensor([0]), {"name": "ldam", "scale": 1.0})
    torch.testing.assert_close(one, torch.tensor([math.log1p(math.exp(0.379918))]))


def test_ldam_paper_scale_on_nonzero_logits():
    # s = 30, raw logits [1, 0.5], y = 0, counts [1, 16]: Delta = [0.5, 0.25] (16^(1/4) = 2).
    # s*(z - Delta_0 e_0) = [15, 15] -> CE = log 2. The linear head's logits are the raw z; the
    # cosine head's are already s z (here 30 * [1, 0.5] = [30, 15]), the loss the same.
    ctx = _ctx([1, 16])
    linear = {"name": "ldam", "scale": 30.0, "head": "linear"}
    out = _loss(ctx, torch.tensor([[1.0, 0.5]]), torch.tensor([0]), linear)
    torch.testing.assert_close(out, torch.tensor([math.log(2)]))
    cosine = _loss(ctx, torch.tensor([[30.0, 15.0]]), torch.tensor([0]), {"name": "ldam", "scale": 30.0})
    torch.testing.assert_close(cosine, torch.tensor([math.log(2)]))


def test_ldam_cosine_head_margins_on_cosines_times_thirty():
    # Prepare: the default head is cosine and the default scale 30.
    plugin = _plugin("ldam")
    assert plugin.params.head == "cosine" and plugin.params.scale == 30.0
    model = _Identity(2, 2)
    hook_set("ldam").configure_model(
        model=model, ctx=setup_ctx(2, generator=torch.Generator().manual_seed(0))
    )
    assert isinstance(model.head, CosineLinear) and model.head.bias is None
    assert set(model.head.state_dict()) == {"weight"}
    # Class rows [2, 0] and [0, 3] (norms are ignored); h = [sqrt3, 1] and twice that: the
    # cosines are [sqrt3/2, 1/2] for both samples, and the head's logits 30 times them.
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    h = torch.tensor([[math.sqrt(3), 1.0], [2 * math.sqrt(3), 2.0]])
    z = model.head(h)
    c0, c1 = math.sqrt(3) / 2, 0.5
    torch.testing.assert_close(z, 30 * torch.tensor([[c0, c1], [c0, c1]]))
    # counts [1, 16]: Delta = [0.5, 0.25]. Two classes: CE(30 (z - Delta_y e_y), y) =
    # log(1 + exp(30 (z_other - z_y + Delta_y))):
    #   y = 0: log(1 + e^{30 (1/2 - sqrt3/2 + 0.5)})  = 4.037045
    #   y = 1: log(1 + e^{30 (sqrt3/2 - 1/2 + 0.25)}) = 18.480762
    y = torch.tensor([0, 1])
    expected = torch.tensor(
        [math.log1p(math.exp(30 * (c1 - c0 + 0.5))), math.log1p(math.exp(30 * (c0 - c1 + 0.25)))]
    )
    torch.testing.assert_close(expected, torch.tensor([4.037045, 18.480762]))
    out = _loss(_ctx([1, 16]), z, y, "ldam")
    torch.testing.assert_close(out, expected)


def test_ldam_linear_head_keeps_the_model_head_and_scale_one():
    plugin = _plugin("ldam", head="linear")
    assert plugin.params.scale == 1.0
    model = _Identity(2, 2)
    head = model.head
    hook_set({"name": "ldam", "head": "linear"}).configure_model(model=model, ctx=setup_ctx(2))
    assert model.head is head
    # An explicit scale wins over either default.
    assert _plugin("ldam", head="linear", scale=5.0).params.scale == 5.0
    assert _plugin("ldam", scale=5.0).params.scale == 5.0


def test_ldam_absent_class_counts_as_one():
    from fedlt_plugins.losses import ldam_margins

    # counts [16, 0]: the absent class is n = 1 and gets the max margin; 16 gets 0.5 / 2.
    np.testing.assert_allclose(ldam_margins(np.array([16, 0]), 0.5), [0.25, 0.5])


def test_ldam_drw_weights_from_its_round():
    spec = {"name": "ldam", "drw": True, "drw_start_round": 2, "drw_beta": 0.9}
    y = torch.tensor([0, 1])
    assert _weights(_ctx([3, 1], round=1), y, spec) is None
    torch.testing.assert_close(_weights(_ctx([3, 1], round=2), y, spec), CB_3_1)
    assert hook_set(spec).implements("client_class_weights")


@pytest.mark.parametrize("n_rounds", [10, 7, 200])
def test_ldam_drw_starts_at_eighty_percent_by_default(n_rounds):
    # Default start: floor(0.8 R) + 1 (LDAM-DRW re-weights from epoch 160 of 200): 9, 6, 161.
    start = math.floor(0.8 * n_rounds) + 1
    assert start == {10: 9, 7: 6, 200: 161}[n_rounds]
    assert drw_start(None, n_rounds) == start
    assert drw_start(4, n_rounds) == 4
    spec = {"name": "ldam", "drw": True, "drw_beta": 0.9}
    y = torch.tensor([0, 1])
    assert _weights(_ctx([3, 1], round=start - 1, n_rounds=n_rounds), y, spec) is None
    for r in (start, n_rounds):
        torch.testing.assert_close(_weights(_ctx([3, 1], round=r, n_rounds=n_rounds), y, spec), CB_3_1)


def test_ldam_drw_start_round_needs_drw():
    _plugin("ldam", drw=True)  # the start round is optional: 80% of the rounds
    with pytest.raises(fedlt.ScenarioError, match="when drw is false"):
        _plugin("ldam", drw_start_round=5)


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
    out = _loss(_ctx([3, 1]), torch.zeros(2, 2), torch.tensor([0, 1]), {"name": "logit-adjust", "tau": tau})
    torch.testing.assert_close(out, torch.tensor(expected))


def test_logit_adjust_uses_named_prior_and_nonzero_logits():
    # global counts [1, 3] (local [3, 1] ignored): CE(z + log pi) with z = [1, 2], pi = [1/4, 3/4].
    z, y = torch.tensor([[1.0, 2.0]]), torch.tensor([1])
    out = _loss(_ctx([3, 1], global_=[1, 3]), z, y, {"name": "logit-adjust", "prior": "global"})
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
        # scale 1 was chosen for linear logits: keep the linear head for it.
        [
            {
                "name": "ldam",
                "head": "linear",
                "scale": 1.0,
                "prior": "estimated",
                "drw": True,
                "drw_start_round": 2,
            }
        ],
        # The defaults: cosine head, s = 30, DRW from floor(0.8 x 2) + 1 = round 2.
        [{"name": "ldam", "drw": True}],
        [{"name": "logit-adjust", "prior": "estimated"}],
    ],
)
def test_losses_run_end_to_end(tiny, tmp_path, plugins):
    tiny["plugins"] = plugins
    summary = fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 2})
    assert summary["final"]["accuracy"] > 0.2
