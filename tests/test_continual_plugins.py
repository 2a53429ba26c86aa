"""gsf per-sample weights and afs scaling equal their formulas on hand-worked tensors; the
seen-class mask and GLFC compensation do what their formulas say; all four run together."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fedlt_plugins import continual
from fedlt_plugins.continual import gsf_weights, head_row_gradients, multilabel_bce
from fedlt_plugins.mvp import MaskedHead, PromptPool
from support.contexts import client_ctx, client_hooks, hook_set, per_batch
from torch import nn

import fedlt
from fedlt.hooks.context import ClientContext, Forward
from fedlt.hooks.discovery import discover_plugins
from fedlt.hooks.plugin import Plugin, hookimpl
from fedlt.hooks.recipe import LocalTraining
from fedlt.training.serial import train_alone as train_client

LN3 = math.log(3.0)


def _ctx(counts, labels=(), online_iter: int | None = None, step: int = 0) -> ClientContext:
    """A hand-built client context: `counts` seen so far, `labels` this round's (slice) labels."""
    return client_ctx(labels, local_counts=counts, online_iter=online_iter, step=step)


def _plugin(name, **params):
    return hook_set({"name": name, **params}).plugins[0]


def _started(ctx: ClientContext, *plugins, model: nn.Module | None = None):
    """One client-round's hooks (fresh instances), after ``client_start`` as the engine calls it."""
    hooks = client_hooks(*plugins, round=ctx.round)
    hooks.client_start(model=model, ctx=ctx)
    return hooks


class Identity(nn.Module):
    """features(x) = x and a 2x2 linear head with chosen weights: logits are easy to hand-work."""

    def __init__(self, weight, bias) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(weight))
            self.head.bias.copy_(torch.tensor(bias))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HeadOnly(nn.Module):
    """A model that is just ``head`` (what gsf reads: ``model.head.logit_factors`` if it has one)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_each_plugin_implements_exactly_its_hooks():
    found = discover_plugins()
    assert set(found["seen-class-mask"].hooks) == {
        "client_start",
        "client_stream_batch",
        "client_transform_logits",
    }
    assert set(found["gsf"].hooks) == {"client_sample_weights"}
    assert set(found["afs"].hooks) == {"client_forward"}  # training only: no eval hook
    assert set(found["glfc-compensation"].hooks) == {"client_loss", "client_sample_weights", "client_start"}


# --------------------------------------------------------------------------- gsf


def test_gsf_weights_match_hand_worked_batch():
    # Prepare: B=3, C=2, d=2.
    #   i  h       y  z          p            p - onehot
    #   0  [1, 0]  0  [0, 0]     [.5, .5]     [-.5, .5]
    #   1  [0, 1]  0  [ln3, 0]   [.75, .25]   [-.25, .25]
    #   2  [1, 1]  1  [0, 0]     [.5, .5]     [.5, -.5]
    # g_i = (p_{i,y_i} - 1) h_i:  g0 = [-.5, 0], g1 = [0, -.25], g2 = [-.5, -.5]
    # g_bar_0 = (1/3)(-.5[1,0] - .25[0,1] + .5[1,1]) = [0, 1/12]
    # g_bar_1 = (1/3)( .5[1,0] + .25[0,1] - .5[1,1]) = [0, -1/12]
    # cos(g0, g_bar_0) = 0        -> s0 = 1          -> w0 = .5 + .5 * 1 = 1
    # cos(g1, g_bar_0) = -1       -> s1 = 2          -> w1 = .5 + .5 * 4 = 2.5
    # cos(g2, g_bar_1) = 1/sqrt2  -> s2 = 1 - 1/sqrt2 -> w2 = .5 + .5 (1.5 - sqrt2) = 0.5428932
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    ctx = _ctx([2, 1])
    model = Identity([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])  # a plain linear head: no logit factors

    def weights(**params):
        hooks = _started(ctx, {"name": "gsf", **params}, model=model)
        return hooks.client_sample_weights(**per_batch(ctx, z, y, features=h, model=model))

    # Execute
    g, g_bar = head_row_gradients(z, h, y)
    w = weights()
    # Assert
    torch.testing.assert_close(g, torch.tensor([[-0.5, 0.0], [0.0, -0.25], [-0.5, -0.5]]))
    torch.testing.assert_close(g_bar, torch.tensor([[0.0, 1 / 12], [0.0, 1 / 12], [0.0, -1 / 12]]))
    torch.testing.assert_close(w, torch.tensor([1.0, 2.5, 0.5 + 0.5 * (1.5 - math.sqrt(2))]))
    # alpha and gamma enter as (1 - alpha) + alpha s^gamma: alpha=.2, gamma=1 -> .8 + .2 s.
    w2 = weights(alpha=0.2, gamma=1.0)
    torch.testing.assert_close(w2, torch.tensor([1.0, 1.2, 0.8 + 0.2 * (1 - 1 / math.sqrt(2))]))
    assert weights(alpha=0.0).eq(1).all()


@pytest.mark.parametrize("transform", ["none", "mask", "afs", "mvp-mask"])
def test_closed_form_gradients_equal_autograd(transform):
    # Prepare: a random linear head; the logits the loss sees are head(h_in) (+ a -inf mask on
    # class 4, which no label uses; or times per-sample class factors m, MVP's mask), with
    # h_in = h or h / r for a fixed per-sample r.
    gen = torch.Generator().manual_seed(0)
    B, C, d = 7, 5, 4
    head = nn.Linear(d, C).double()
    h = torch.randn(B, d, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 3, 0, 0])
    r = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    m = 2 * torch.sigmoid(torch.randn(B, C, generator=gen, dtype=torch.float64))
    h_in = h / r[:, None] if transform == "afs" else h
    factors = m if transform == "mvp-mask" else None

    def logits() -> torch.Tensor:
        z = head(h_in)
        if transform == "mask":
            return z.masked_fill(torch.arange(C) == 4, float("-inf"))
        return z * m if transform == "mvp-mask" else z

    per_sample = []
    for i in range(B):
        head.zero_grad()
        F.cross_entropy(logits()[i : i + 1], y[i : i + 1]).backward()
        per_sample.append(head.weight.grad[y[i]].clone())
    head.zero_grad()
    F.cross_entropy(logits(), y).backward()
    batch = head.weight.grad[y].clone()
    # Execute
    g, g_bar = head_row_gradients(logits(), h_in, y, factors)
    # Assert
    torch.testing.assert_close(g, torch.stack(per_sample))
    torch.testing.assert_close(g_bar, batch)


def _class_mask_head(weight: torch.Tensor, bias: torch.Tensor, class_mask: torch.Tensor, keys: torch.Tensor):
    """mvp-mask's MaskedHead on a 2-key-or-more pool whose selection is ``keys`` (one-hot queries
    on one-hot keys, no frequency penalty, so sample b selects key keys[b])."""
    n_keys = class_mask.shape[0]
    pool = PromptPool(n_keys, n_keys, (), 1, (), 1, False, torch.Generator().manual_seed(0))
    linear = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        pool.keys.copy_(torch.eye(n_keys))
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    head = MaskedHead(linear, pool)
    with torch.no_grad():
        head.class_mask.copy_(class_mask)
    pool.eval()
    pool(F.one_hot(keys, n_keys).float())
    assert pool.selected.tolist() == keys.tolist()
    return head


@pytest.mark.parametrize("head_kind", ["linear", "seen-mask", "afs", "mvp-mask", "afs+mvp-mask"])
def test_gsf_weights_equal_autograd_with_and_without_the_mvp_mask(head_kind):
    # Prepare: W, b random; logits z' = (W h_in + b) [* m] [masked], with h_in = h or h / r and
    # m = 2 sigmoid(M[k*]) (MVP's instance-wise class mask, M a (P, C) mask, k* per sample).
    gen = torch.Generator().manual_seed(4)
    B, C, d, P = 8, 5, 4, 3
    W = torch.randn(C, d, generator=gen, dtype=torch.float64)
    b = torch.randn(C, generator=gen, dtype=torch.float64)
    h = torch.randn(B, d, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 3, 0, 0, 3])
    r = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    M = torch.randn(P, C, generator=gen).double()  # float32-representable: the head keeps float32
    k = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1])
    masked = "mvp-mask" in head_kind
    m = 2 * torch.sigmoid(M[k]) if masked else torch.ones(B, C, dtype=torch.float64)
    h_in = h / r[:, None] if "afs" in head_kind else h

    def logits(weight: torch.Tensor) -> torch.Tensor:
        z = (h_in @ weight.T + b) * m
        return z.masked_fill(torch.arange(C) == 4, float("-inf")) if head_kind == "seen-mask" else z

    # Per-sample CE gradients w.r.t. each sample's own class row, and the batch-mean CE's, by autograd.
    g = []
    for i in range(B):
        w_leaf = W.clone().requires_grad_(True)
        F.cross_entropy(logits(w_leaf)[i : i + 1], y[i : i + 1]).backward()
        g.append(w_leaf.grad[y[i]])
    w_leaf = W.clone().requires_grad_(True)
    F.cross_entropy(logits(w_leaf), y).backward()
    g_bar = w_leaf.grad[y]
    s = (1 - F.cosine_similarity(torch.stack(g), g_bar, dim=1)).clamp_min(0)
    z = logits(W)

    if masked:
        head = _class_mask_head(W, b, M.float(), k)
        torch.testing.assert_close(head(h_in), (h_in @ W.T + b) * m)  # the formula is MaskedHead's
        torch.testing.assert_close(head.logit_factors().double(), m, rtol=0, atol=1e-6)
    else:
        head = nn.Linear(d, C).double()
        with torch.no_grad():
            head.weight.copy_(W)
            head.bias.copy_(b)
    model = HeadOnly(head)
    ctx = client_ctx(y, num_classes=C)
    for alpha, gamma in ((0.5, 2.0), (0.3, 1.5)):
        expected = (1 - alpha) + alpha * s**gamma
        # Execute: the helper (factors given), and the plugin hook (factors from model.head).
        direct = gsf_weights(z, h_in, y, alpha, gamma, factors=m if masked else None)
        hooks = _started(ctx, {"name": "gsf", "alpha": alpha, "gamma": gamma}, model=model)
        hooked = hooks.client_sample_weights(**per_batch(ctx, z, y, features=h, head_input=h_in, model=model))
        # Assert
        torch.testing.assert_close(direct, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(hooked, expected, rtol=0, atol=1e-5)
    if masked:
        # Ignoring the factors gives other weights: the mask is part of the gradient.
        unmasked = gsf_weights(z, h_in, y, 0.5, 2.0)
        assert not torch.allclose(unmasked, 0.5 + 0.5 * s**2, atol=1e-3)


def test_gsf_after_afs_reads_the_scaled_head_input():
    # afs returns Forward(h, head(h / r), h / r); gsf, listed with it, gets head_input = h / r and
    # its weights equal autograd of CE(W (h / r) + b) w.r.t. the class rows (r a constant).
    gen = torch.Generator().manual_seed(5)
    B, C, d = 6, 3, 4
    model = HeadOnly(nn.Linear(d, C).double())
    x = torch.randn(B, d, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 0, 1])
    W, b = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    r = 1 - F.cosine_similarity(W[y], x, dim=1) + 0.5  # afs's scale, margin 0.5
    ctx = client_ctx(y, num_classes=C)
    hooks = _started(ctx, "afs", "gsf", model=model)
    # Execute
    out = hooks.client_forward(model=model, x=x, y=y, ctx=ctx)
    assert isinstance(out, Forward)
    w = hooks.client_sample_weights(
        logits=out.logits, y=y, features=out.features, head_input=out.head_input, model=model, ctx=ctx
    )
    # Assert
    torch.testing.assert_close(out.head_input, x / r[:, None])
    g = []
    for i in range(B):
        w_leaf = W.clone().requires_grad_(True)
        F.cross_entropy(F.linear(x[i : i + 1] / r[i], w_leaf, b), y[i : i + 1]).backward()
        g.append(w_leaf.grad[y[i]])
    w_leaf = W.clone().requires_grad_(True)
    F.cross_entropy(F.linear(x / r[:, None], w_leaf, b), y).backward()
    s = 1 - F.cosine_similarity(torch.stack(g), w_leaf.grad[y], dim=1)
    torch.testing.assert_close(w, 0.5 + 0.5 * s**2, rtol=0, atol=1e-5)
    # The unscaled features would give other weights.
    unscaled = gsf_weights(out.logits, out.features, y, 0.5, 2.0)
    assert not torch.allclose(unscaled, w, atol=1e-4)


# --------------------------------------------------------------------------- afs


def test_afs_logits_equal_head_of_scaled_features():
    # Prepare: W = [[1, 0], [0, 1]], b = [.1, -.2]; margin .5.
    #   h = [1, 0],  y=0: cos(W_0, h) = 1       -> r = .5            -> h/r = [2, 0]
    #   h = [1, 1],  y=1: cos(W_1, h) = 1/sqrt2 -> r = 1.5 - 1/sqrt2 -> h/r = [1, 1] / r
    #   h = [-1, 0], y=0: cos(W_0, h) = -1      -> r = 2.5           -> h/r = [-.4, 0]
    model = Identity([[1.0, 0.0], [0.0, 1.0]], [0.1, -0.2])
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1, 0])
    r = torch.tensor([0.5, 1.5 - 1 / math.sqrt(2), 2.5])
    ctx = _ctx([2, 1], step=5)
    # Execute
    h, z, head_input = _started(ctx, "afs", model=model).client_forward(model=model, x=x, y=y, ctx=ctx)
    # Assert
    torch.testing.assert_close(h, x)  # features come back unscaled
    torch.testing.assert_close(head_input, x / r[:, None])  # what the head received
    expected = torch.tensor([[2.0, 0.0], [1 / r[1], 1 / r[1]], [-0.4, 0.0]]) + torch.tensor([0.1, -0.2])
    torch.testing.assert_close(z, expected)
    # r is detached: dz/dx_i = W / r_i, nothing flows through r (a live r would add its own term).
    z.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 2) / r[:, None])
    # margin shifts r: margin 1 -> r = [1, 2 - 1/sqrt2, 3].
    hooks = _started(ctx, {"name": "afs", "margin": 1.0}, model=model)
    _, z1, _ = hooks.client_forward(model=model, x=x.detach(), y=y, ctx=ctx)
    torch.testing.assert_close(z1[0], torch.tensor([1.0, 0.0]) + torch.tensor([0.1, -0.2]))


# --------------------------------------------------------------------------- seen-class mask


@pytest.mark.parametrize(
    ("online_iter", "mask_value"), [(1, float("-inf")), (None, float("-inf")), (1, -1e4)]
)
def test_seen_class_mask_masks_exactly_unseen_classes(online_iter, mask_value):
    # Prepare: classes 1 and 3 unseen.
    ctx = _ctx([3, 0, 2, 0, 1], online_iter=online_iter)
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = torch.tensor([0, 2, 4, 0, 2, 2])
    # Execute
    hooks = _started(ctx, {"name": "seen-class-mask", "mask_value": mask_value})
    out = hooks.client_transform_logits(**per_batch(ctx, logits, y))
    # Assert
    assert (out[:, [1, 3]] == mask_value).all()
    torch.testing.assert_close(out[:, [0, 2, 4]], logits[:, [0, 2, 4]])
    loss = F.cross_entropy(out, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (logits.grad[:, [1, 3]] == 0).all()


def test_seen_class_mask_updates_when_each_stream_batch_arrives():
    # Prepare: before this round's slice the client has read classes 0 and 1 ([2, 1, 0]); the
    # slice has two stream batches, [0, 1] then [2, 0]: class 2 first appears in the second.
    ctx = _ctx([2, 1, 0], labels=[0, 1, 2, 0], online_iter=2)
    logits = torch.zeros(2, 3)
    hooks = _started(ctx, "seen-class-mask")
    first, second = torch.tensor([0, 1]), torch.tensor([2, 3])

    def transformed(batch: torch.Tensor) -> torch.Tensor:
        return hooks.client_transform_logits(**per_batch(ctx, logits, ctx.y_train[batch]))

    # Execute / Assert: the first batch arrives (the engine counts it, then calls the hook).
    ctx.local_class_counts = ctx.local_class_counts + np.bincount(ctx.y_train[first], minlength=3)
    hooks.client_stream_batch(batch=first, ctx=ctx)
    for _ in range(ctx.online_iter):  # its steps: class 2 is still unseen
        out = transformed(first)
        assert (out[:, 2] == float("-inf")).all() and (out[:, :2] == 0).all()
    # The second batch arrives: class 2 is seen from its first step on.
    ctx.local_class_counts = ctx.local_class_counts + np.bincount(ctx.y_train[second], minlength=3)
    np.testing.assert_array_equal(ctx.local_class_counts, [4, 2, 1])
    hooks.client_stream_batch(batch=second, ctx=ctx)
    assert torch.equal(transformed(second), logits)


def test_seen_class_mask_per_stream_batch_in_local_training(install_plugins):
    # The same slice through the engine's local training, 2 steps per stream batch: a recording
    # plugin listed after the mask sees the logits every step trains on.
    seen_logits: list[torch.Tensor] = []

    class Record(Plugin):
        @hookimpl
        def client_loss(self, logits):
            seen_logits.append(logits.detach().clone())

    install_plugins(record=Record)
    model = Identity([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    model.head = nn.Linear(2, 3)  # 3 classes
    y = torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    ctx = client_ctx(y, x=x, local_counts=np.array([2, 1, 0]), online_iter=2, batch_size=2)
    recipe = LocalTraining(1, None, 2, "sgd", 0.0, 0.0, 0.0, None, "none")
    hooks = client_hooks("seen-class-mask", "record")
    total, n_steps, _ = train_client(model, ctx, hooks, recipe, list(model.parameters()), y.numpy())
    assert n_steps == 4 and torch.isfinite(total)
    masked = [bool((z[:, 2] == float("-inf")).all()) for z in seen_logits]
    assert masked == [True, True, False, False]
    assert all(torch.isfinite(z[:, :2]).all() for z in seen_logits)
    np.testing.assert_array_equal(ctx.local_class_counts, [4, 2, 1])


def test_seen_class_mask_rejects_a_non_negative_value():
    with pytest.raises(fedlt.ScenarioError, match="mask_value"):
        _plugin("seen-class-mask", mask_value=0.0)


# --------------------------------------------------------------------------- glfc compensation


def _glfc_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # y = [0, 2, 3, 2, 0]; z_y = [0, ln3, -ln3, ln3, ln3] -> sigma(z_y) = [.5, .75, .25, .75, .75]
    # -> g = |sigma - 1| = [.5, .25, .75, .25, .25]. Other logits are arbitrary (class 1 masked).
    y = torch.tensor([0, 2, 3, 2, 0])
    z = torch.full((5, 4), 0.3)
    z[:, 1] = float("-inf")
    z[torch.arange(5), y] = torch.tensor([0.0, LN3, -LN3, LN3, LN3])
    return z, y


def test_glfc_weights_normalise_old_and_new_groups_separately():
    # Prepare: at client_start the client has read [4, 0, 0, 1] (before this round's slice) ->
    # old = {0, 3}; the slice's labels [2, 2, 2, 3] bring class 2, which is new.
    ctx = _ctx([4, 0, 0, 1], labels=[2, 2, 2, 3], online_iter=1)
    z, y = _glfc_batch()
    # Execute
    hooks = _started(ctx, "glfc-compensation")
    w = hooks.client_sample_weights(**per_batch(ctx, z, y))
    # Assert: old samples 0, 2, 4 have g = .5, .75, .25 (mean .5) -> 1, 1.5, .5;
    #         new samples 1, 3 have g = .25, .25 (mean .25)        -> 1, 1.
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 1.5, 1.0, 0.5]))
    old = torch.tensor([True, False, True, False, True])
    torch.testing.assert_close(w[old].mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[~old].mean(), torch.tensor(1.0))
    assert hooks.client_loss(**per_batch(ctx, z, y)) is None  # loss = "ce" composes with other losses
    # Stream batches arriving during the round (the engine adds their counts) change nothing:
    # class 2 stays new for the whole round.
    ctx.local_class_counts = ctx.local_class_counts + np.array([0, 0, 3, 1])
    hooks.client_stream_batch(batch=torch.arange(4), ctx=ctx)
    torch.testing.assert_close(hooks.client_sample_weights(**per_batch(ctx, z, y)), w)
    # Next round class 2 has been read before the slice, so it is old: one group {0, 2, 3} with
    # mean g = (.5 + .25 + .75 + .25 + .25) / 5 = .4.
    nxt = _ctx([4, 0, 3, 2], labels=[2, 3], online_iter=1)
    w_next = _started(nxt, "glfc-compensation").client_sample_weights(**per_batch(nxt, z, y))
    torch.testing.assert_close(w_next, torch.tensor([1.25, 0.625, 1.875, 0.625, 0.625]))


def test_glfc_offline_treats_every_class_as_new():
    # Prepare: no stream -> one group; mean g = (.5 + .25 + .75 + .25 + .25) / 5 = .4.
    ctx = _ctx([4, 0, 3, 2], labels=[0, 0, 0, 0, 2, 2, 2, 3, 3])
    z, y = _glfc_batch()
    w = _started(ctx, "glfc-compensation").client_sample_weights(**per_batch(ctx, z, y))
    torch.testing.assert_close(w, torch.tensor([1.25, 0.625, 1.875, 0.625, 0.625]))
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))


def test_glfc_bce_is_per_sample_sum_over_classes_and_finite_under_a_mask():
    # Hand-worked: z = [0, ln3], y = 1 -> -log(1 - .5) - log(.75) = ln2 + ln(4/3).
    ctx = _ctx([1, 1])
    hooks = _started(ctx, {"name": "glfc-compensation", "loss": "bce"})
    out = hooks.client_loss(**per_batch(ctx, torch.tensor([[0.0, LN3]]), torch.tensor([1])))
    torch.testing.assert_close(out, torch.tensor([math.log(2) + math.log(4 / 3)]))
    # Matches torch's BCE summed over classes on finite logits.
    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 2, 1, 1])
    ref = F.binary_cross_entropy_with_logits(z, F.one_hot(y, 3).float(), reduction="none").sum(1)
    torch.testing.assert_close(multilabel_bce(z, y), ref)
    # A -inf (masked) logit contributes exactly 0, and gradients stay finite.
    zm, ym = _glfc_batch()
    zm.requires_grad_(True)
    loss = multilabel_bce(zm, ym)
    loss.sum().backward()
    finite = zm.detach()[:, [0, 2, 3]]
    onehot = F.one_hot(ym, 4)[:, [0, 2, 3]].float()
    torch.testing.assert_close(
        loss.detach(), F.binary_cross_entropy_with_logits(finite, onehot, reduction="none").sum(1)
    )
    assert torch.isfinite(zm.grad).all()


# --------------------------------------------------------------------------- end to end


ALL_FOUR = [
    {"name": "seen-class-mask"},
    {"name": "afs"},
    {"name": "gsf"},
    {"name": "glfc-compensation", "loss": "bce"},
]


def _finite_metrics(final) -> None:
    for key in ("train_loss", "accuracy", "balanced_accuracy"):
        assert math.isfinite(final[key]), key
    assert 0.0 <= final["accuracy"] <= 1.0


def _spy(monkeypatch, module, name: str, calls: dict[str, int]) -> None:
    """Count the calls of one of the module's helpers, so a run proves every plugin acted."""
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_all_four_plugins_run_together_offline(tiny, tmp_path, monkeypatch):
    calls: dict[str, int] = {}
    for name in ("head_row_gradients", "afs_scale", "glfc_weights", "multilabel_bce"):
        _spy(monkeypatch, continual, name, calls)
    tiny["plugins"] = ALL_FOUR
    summary = fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 2})
    assert summary["plugins"] == [p["name"] for p in ALL_FOUR]
    _finite_metrics(summary["final"])
    assert set(calls) == {"head_row_gradients", "afs_scale", "glfc_weights", "multilabel_bce"}


def test_all_four_plugins_run_together_on_a_si_blurry_stream(tiny, tmp_path, monkeypatch):
    # Record, per client-round, how many classes are old / new in the slice and how many are still
    # unseen after it, to show the stream exercises both GLFC groups and the seen-class mask; and
    # check that GLFC's weights use "old = read before the slice" (the counts at client_start).
    events: list[tuple[str, np.ndarray]] = []
    seen: list[tuple[int, int, int]] = []
    real_start = continual.GLFCCompensation.client_start
    real_weights = continual.glfc_weights

    @functools.wraps(real_start)  # keeps the @hookimpl marker and signature
    def recording_start(self, ctx):
        real_start(self, ctx)
        is_old = np.asarray(ctx.local_class_counts) > 0
        slice_counts = np.bincount(ctx.labels.cpu().numpy(), minlength=ctx.num_classes)
        in_slice = slice_counts > 0
        unseen_after = (np.asarray(ctx.local_class_counts) + slice_counts) == 0
        events.append(("start", is_old))
        seen.append(
            (int((is_old & in_slice).sum()), int((~is_old & in_slice).sum()), int(unseen_after.sum()))
        )

    def recording_weights(logits, y, is_old):
        events.append(("weights", is_old.cpu().numpy()))
        return real_weights(logits, y, is_old)

    monkeypatch.setattr(continual.GLFCCompensation, "client_start", recording_start)
    monkeypatch.setattr(continual, "glfc_weights", recording_weights)
    tiny["plugins"] = ALL_FOUR
    tiny["stream"] = {"kind": "si-blurry", "n_tasks": 2, "samples_per_round": 64, "online_iter": 2}
    summary = fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 3})
    _finite_metrics(summary["final"])
    assert math.isfinite(summary["final"]["a_auc"])
    assert any(old > 0 for old, _, _ in seen), seen
    assert any(new > 0 for _, new, _ in seen), seen
    assert any(unseen > 0 for _, _, unseen in seen), seen
    # Every weight call uses the old classes of its client-round's start.
    assert events and events[0][0] == "start"
    current = None
    n_weights = 0
    for kind, is_old in events:
        if kind == "start":
            current = is_old
        else:
            np.testing.assert_array_equal(is_old, current)
            n_weights += 1
    assert n_weights > 0
