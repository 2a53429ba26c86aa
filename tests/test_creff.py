"""creff: the gradient-matching maths on hand-worked tensors, the client upload, the server's
feature matching and re-training, evaluation through the re-trained classifier, and a run that
resumes to the same numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedlt_plugins.creff import (
    ce_gradients,
    client_class_gradients,
    match_distance,
    match_features,
    match_objective,
    retrain_classifier,
)
from support.contexts import client_ctx, client_hooks, eval_ctx, round_ctx, setup_ctx
from torch import nn

import fedlt
from fedlt.base.seeding import torch_generator
from fedlt.hooks.context import ClientContext, RoundContext
from fedlt.hooks.dispatch import build_hooks
from fedlt.store.checkpoint import load_checkpoint

# Small enough that a tiny run's server work takes milliseconds.
SMALL = {"n_features": 8, "n_match_steps": 10, "n_retrain_epochs": 20, "n_grad_batches": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _plugin(**params):
    return build_hooks(fedlt.load_scenario({"plugins": [{"name": "creff", **params}]}).plugins).plugins[0]


class Identity(nn.Module):
    """A model whose features are its inputs, so gradients can be worked by hand."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.feature_dim = d
        self.head = nn.Linear(d, c)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _client_ctx(x, y, config=None) -> ClientContext:
    return client_ctx(y, x=x, config=config or {}, num_classes=2, batch_size=2)


def _setup(plugin, d: int, c: int) -> None:
    plugin.server_setup(model=Identity(d, c), ctx=setup_ctx(c, input_shape=(d,)))


def _round_ctx(c: int) -> RoundContext:
    return round_ctx(1, global_counts=np.ones(c))


# --------------------------------------------------------------------------- maths


def test_match_distance_hand_worked():
    # Prepare: one class, C = 2 rows of the weight gradient plus the bias row.
    g = (torch.tensor([[[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]]), torch.tensor([[0.3, -0.3]]))
    orth = (torch.tensor([[[0.0, 0.0, 2.0], [0.0, 2.0, 0.0]]]), torch.tensor([[0.3, -0.3]]))
    base = (torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]]), torch.tensor([[1.0, 1.0]]))
    # Execute / Assert: identical -> 0; opposite -> 2 per row (3 rows: 6), whatever the scale.
    # (Not exactly 0: the cosine's 1e-6 guard leaves 1e-6/|g_b|^2 = 5.6e-6 on the bias row.)
    torch.testing.assert_close(match_distance(g, g), torch.zeros(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(match_distance(g, (-2 * g[0], -g[1])), torch.tensor([6.0]))
    # Rows separately: cos = 1, 0 (orthogonal) and 0 (bias [0.3, -0.3] vs [1, 1]) -> 0 + 1 + 1.
    torch.testing.assert_close(match_distance(orth, base), torch.tensor([2.0]))


def test_ce_gradients_hand_worked():
    # Prepare: W = 0, b = 0, so p = (1/2, 1/2) and p - e_0 = (-1/2, 1/2) for both samples of
    # class 0; the mean of h1 = (1, 2) and h2 = (3, 0) is (2, 1).
    h = torch.tensor([[[1.0, 2.0], [3.0, 0.0]]])
    gw, gb = ce_gradients(h, torch.tensor([0]), torch.zeros(2, 2), torch.zeros(2))
    # Assert: dW = (p - e_0) (x) mean h, db = p - e_0.
    torch.testing.assert_close(gw, torch.tensor([[[-1.0, -0.5], [1.0, 0.5]]]))
    torch.testing.assert_close(gb, torch.tensor([[-0.5, 0.5]]))


def test_ce_gradients_equal_autograd():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(3, 5, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    labels = torch.tensor([0, 5, 2])
    gw, gb = ce_gradients(h, labels, w, b)
    for k in range(3):
        lin = nn.Linear(4, 6)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        nn.functional.cross_entropy(lin(h[k]), labels[k].repeat(5)).backward()
        torch.testing.assert_close(gw[k], lin.weight.grad)
        torch.testing.assert_close(gb[k], lin.bias.grad)


def test_client_gradient_is_analytic_ce_gradient():
    # Prepare: class 0 has two samples; W = [[1, 0], [0, 1]], b = 0.
    # h1 = (1, 0): z = (1, 0), p = (e/(e+1), 1/(e+1)); h2 = (0, 1): p = (1/(e+1), e/(e+1)).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    model = Identity(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _client_ctx(x, [0, 0, 1])
    # Execute: batches of 32 > n_0 = 2, so every batch is the whole class.
    out = client_class_gradients(model, ctx, torch.eye(2), torch.zeros(2), 32, 10, torch.Generator())
    # Assert: (p - e_0) (x) h averaged over the two samples, and p - e_0 for the bias.
    s = math.e / (math.e + 1)
    r1, r2 = torch.tensor([s - 1, 1 - s]), torch.tensor([1 / (math.e + 1) - 1, s])
    gw = (torch.outer(r1, x[0]) + torch.outer(r2, x[1])) / 2
    torch.testing.assert_close(out[0][0], gw)
    torch.testing.assert_close(out[0][1], (r1 + r2) / 2)
    assert sorted(out) == [0, 1]
    assert model.training, "the model's mode is restored"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_client_gradient_averages_drawn_batches():
    # Prepare: 40 samples of class 1 with batches of 4: each upload averages n_grad_batches draws.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g), [1] * 40
    w, b = torch.randn(2, 3, generator=g), torch.zeros(2)
    gw, gb = client_class_gradients(Identity(3, 2), _client_ctx(x, y), w, b, 4, 200, torch.Generator())[1]
    full_w, full_b = ce_gradients(x[None], torch.tensor([1]), w, b)
    # Assert: the mean of 200 random batches is near the full-class gradient but not equal to it.
    torch.testing.assert_close(gw, full_w[0], atol=0.05, rtol=0)
    torch.testing.assert_close(gb, full_b[0], atol=0.05, rtol=0)
    assert not torch.allclose(gw, full_w[0], atol=1e-6)


def test_match_objective_equals_autograd_of_the_definition():
    # The closed-form value and gradient used for matching agree with D(ce_gradients(F)) and
    # autograd through it (a zero target row included: its cosine is 0 everywhere).
    g = torch.Generator().manual_seed(3)
    f = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    w, b = (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    )
    labels = torch.tensor([1, 4, 0])
    targets = (
        torch.randn(3, 6, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 6, generator=g, dtype=torch.float64),
    )
    targets[0][1, 2] = 0.0
    dist, grad = match_objective(f, labels, targets, w, b)
    leaf = f.clone().requires_grad_(True)
    expected = match_distance(ce_gradients(leaf, labels, w, b), targets)
    expected.sum().backward()
    torch.testing.assert_close(dist, expected.detach())
    torch.testing.assert_close(grad, leaf.grad)


def test_matching_brings_feature_gradients_closer():
    # Prepare: targets are the gradients of "real" features (shifted Gaussians), per class.
    g = torch.Generator().manual_seed(0)
    c, d = 4, 16
    w, b = torch.randn(c, d, generator=g) * 0.3, torch.zeros(c)
    real = torch.relu(torch.randn(c, 32, d, generator=g) + 2 * torch.randn(c, 1, d, generator=g))
    labels = torch.arange(c)
    targets = ce_gradients(real, labels, w, b)
    start = torch.randn(c, 20, d, generator=g)
    # Execute
    matched, before, after = match_features(start, labels, targets, w, b, n_steps=100, lr=0.1)
    # Assert: every class is closer, the distance reported matches a recomputation.
    assert (after < 0.5 * before).all(), (before, after)
    torch.testing.assert_close(after, match_distance(ce_gradients(matched, labels, w, b), targets))
    assert not torch.equal(matched, start)


def test_retrain_one_full_batch_step_is_sgd_on_cross_entropy():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    w, b = retrain_classifier(x, y, 3, n_epochs=1, lr=0.5, batch_size=6, generator=torch.Generator())
    w0, b0 = retrain_classifier(x, y, 3, n_epochs=1, lr=1e-12, batch_size=6, generator=torch.Generator())
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight.copy_(w0)
        lin.bias.copy_(b0)
    nn.functional.cross_entropy(lin(x), y).backward()
    torch.testing.assert_close(w, w0 - 0.5 * lin.weight.grad)
    torch.testing.assert_close(b, b0 - 0.5 * lin.bias.grad)


def test_retrain_fits_separable_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g) * 0.1 + 3 * torch.eye(5)[torch.arange(60) % 3]
    y = torch.arange(60) % 3
    w, b = retrain_classifier(x, y, 3, 50, 0.1, 8, torch.Generator().manual_seed(1))
    assert ((x @ w.T + b).argmax(1) == y).all()


# --------------------------------------------------------------------------- plugin


def _grads_for(h: torch.Tensor, c: int, w, b):
    gw, gb = ce_gradients(h[None], torch.tensor([c]), w, b)
    return gw[0], gb[0]


def test_server_matches_uploaded_classes_and_eval_uses_retrained_classifier():
    # Prepare: 3 classes; this round only class 0 (two clients) and class 1 were uploaded.
    plugin = _plugin(**SMALL, personalized=False)
    _setup(plugin, d=4, c=3)
    config = plugin.server_configure_round()
    w, b = config["creff.weight"], config["creff.bias"]
    start = plugin.state_dict()
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(3, 8, 4, generator=g)
    payloads = {
        5: {0: _grads_for(feats[0], 0, w, b)},
        7: {0: _grads_for(feats[1], 0, w, b), 1: _grads_for(feats[2], 1, w, b)},
    }
    h, raw = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    glob, local = (eval_ctx(k, global_counts=np.ones(3)) for k in (None, 2))
    # Before any re-training the logits are left alone.
    assert torch.equal(plugin.eval_logits(logits=raw, features=h, ctx=glob), raw)
    # Execute
    plugin.server_after_aggregate(ctx=_round_ctx(3), payloads=payloads)
    state = plugin.state_dict()
    # Assert: uploaded classes moved, the other kept its features and stays out of re-training.
    assert not torch.equal(state["features"][0], start["features"][0])
    assert not torch.equal(state["features"][1], start["features"][1])
    assert torch.equal(state["features"][2], start["features"][2])
    assert state["seen"].tolist() == [True, True, False]
    # The matched target of class 0 is the unweighted mean over the two clients that hold it.
    target0 = tuple(((p + q) / 2)[None] for p, q in zip(payloads[5][0], payloads[7][0], strict=True))
    alone, _, _ = match_features(start["features"][:1], torch.tensor([0]), target0, w, b, 10, 0.1)
    torch.testing.assert_close(state["features"][0], alone[0])
    # The classifier is re-trained from scratch on the features of classes 0 and 1 only.
    x, y = state["features"][:2].reshape(-1, 4), torch.tensor([0, 1]).repeat_interleave(8)
    w_re, b_re = retrain_classifier(x, y, 3, 20, 0.01, 32, torch_generator(0, "creff-retrain", 1))
    assert torch.equal(state["weight"], w_re) and torch.equal(state["bias"], b_re)
    # Evaluation: W_re h + b_re on the global test set; personalised views untouched when off.
    expected = h @ state["weight"].T + state["bias"]
    torch.testing.assert_close(plugin.eval_logits(logits=raw, features=h, ctx=glob), expected)
    assert torch.equal(plugin.eval_logits(logits=raw, features=h, ctx=local), raw)
    on = _plugin(**SMALL, personalized=True)
    _setup(on, d=4, c=3)
    on.load_state_dict(state)
    torch.testing.assert_close(on.eval_logits(logits=raw, features=h, ctx=local), expected)
    # The next round's clients get the re-trained classifier.
    nxt = plugin.server_configure_round()
    assert torch.equal(nxt["creff.weight"], state["weight"]) and torch.equal(nxt["creff.bias"], state["bias"])
    assert not torch.equal(nxt["creff.weight"], w)


@pytest.mark.parametrize("where", ["global", "local"])
def test_client_uploads_gradients_against_the_round_classifier(where):
    hooks = client_hooks({"name": "creff", **SMALL, "client_features": where})
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    config = {"creff.weight": torch.eye(2), "creff.bias": torch.tensor([0.5, -0.5])}
    ctx, model = _client_ctx(x, [0, 0, 1], config), Identity(2, 2)
    hooks.client_start(model=model, ctx=ctx)
    payload = hooks.client_end(model=model, ctx=ctx)["creff"]
    assert sorted(payload) == [0, 1]
    for c, rows in ((0, x[:2]), (1, x[2:])):
        exp_w, exp_b = _grads_for(rows, c, config["creff.weight"], config["creff.bias"])
        torch.testing.assert_close(payload[c][0], exp_w)
        torch.testing.assert_close(payload[c][1], exp_b)


# --------------------------------------------------------------------------- runs


def test_run_keeps_fedavg_model_and_resumes_to_the_same_numbers(tiny, tmp_path, interrupted_run):
    plain = fedlt.run(tiny, out=tmp_path / "plain")
    tiny["plugins"] = [{"name": "creff", **SMALL}]
    full = fedlt.run(tiny, out=tmp_path / "full")

    interrupted_run(tiny, tmp_path / "cut", after=2)
    resumed = fedlt.resume(tmp_path / "cut")

    # Checkpoint/resume reproduces the final metrics exactly.
    assert resumed["final"] == full["final"]
    ckpt = load_checkpoint(tmp_path / "full")
    again = load_checkpoint(tmp_path / "cut")
    for key in ("features", "weight", "bias"):
        assert torch.equal(ckpt["plugins"]["creff"][key], again["plugins"]["creff"][key])
    # The global model is plain FedAvg's (head included): CReFF changes evaluation only.
    base = load_checkpoint(tmp_path / "plain")["global"]
    assert all(torch.equal(v, base[k]) for k, v in ckpt["global"].items())
    assert full["final"]["accuracy"] != plain["final"]["accuracy"]
