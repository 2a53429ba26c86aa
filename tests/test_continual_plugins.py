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
from fedlt_plugins.continual import head_row_gradients, multilabel_bce
from support.contexts import client_ctx
from torch import nn

import fedlt
from fedlt.context import ClientContext
from fedlt.pluginmanager import build_hooks, discover_plugins

LN3 = math.log(3.0)


def _ctx(counts, labels=(), online_iter: int | None = None, step: int = 0) -> ClientContext:
    """A hand-built client context: `counts` seen so far, `labels` this round's (slice) labels."""
    return client_ctx(labels, local_counts=counts, online_iter=online_iter, step=step)


def _plugin(name, **params):
    return build_hooks(fedlt.load_scenario({"plugins": [{"name": name, **params}]}).plugins).plugins[0]


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


def test_each_plugin_implements_exactly_its_hooks():
    found = discover_plugins()
    assert found["seen-class-mask"].hooks == ["client_start", "client_transform_logits"]
    assert found["gsf"].hooks == ["client_sample_weights"]
    assert found["afs"].hooks == ["client_forward"]  # training only: no eval hook
    assert found["glfc-compensation"].hooks == ["client_loss", "client_sample_weights", "client_start"]


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
    # Execute
    g, g_bar = head_row_gradients(z, h, y)
    w = _plugin("gsf").client_sample_weights(logits=z, y=y, features=h, ctx=_ctx([2, 1]))
    # Assert
    torch.testing.assert_close(g, torch.tensor([[-0.5, 0.0], [0.0, -0.25], [-0.5, -0.5]]))
    torch.testing.assert_close(g_bar, torch.tensor([[0.0, 1 / 12], [0.0, 1 / 12], [0.0, -1 / 12]]))
    torch.testing.assert_close(w, torch.tensor([1.0, 2.5, 0.5 + 0.5 * (1.5 - math.sqrt(2))]))
    # alpha and gamma enter as (1 - alpha) + alpha s^gamma: alpha=.2, gamma=1 -> .8 + .2 s.
    w2 = _plugin("gsf", alpha=0.2, gamma=1.0).client_sample_weights(
        logits=z, y=y, features=h, ctx=_ctx([2, 1])
    )
    torch.testing.assert_close(w2, torch.tensor([1.0, 1.2, 0.8 + 0.2 * (1 - 1 / math.sqrt(2))]))
    assert (
        _plugin("gsf", alpha=0.0)
        .client_sample_weights(logits=z, y=y, features=h, ctx=_ctx([2, 1]))
        .eq(1)
        .all()
    )


@pytest.mark.parametrize("transform", ["none", "mask", "afs"])
def test_closed_form_gradients_equal_autograd(transform):
    # Prepare: a random linear head; the logits the loss sees are head(h_in) (+ a -inf mask on
    # class 4, which no label uses), with h_in = h or h / r for a fixed per-sample r.
    gen = torch.Generator().manual_seed(0)
    B, C, d = 7, 5, 4
    head = nn.Linear(d, C).double()
    h = torch.randn(B, d, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 3, 0, 0])
    r = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    h_in = h / r[:, None] if transform == "afs" else h

    def logits() -> torch.Tensor:
        z = head(h_in)
        return z.masked_fill(torch.arange(C) == 4, float("-inf")) if transform == "mask" else z

    per_sample = []
    for i in range(B):
        head.zero_grad()
        F.cross_entropy(logits()[i : i + 1], y[i : i + 1]).backward()
        per_sample.append(head.weight.grad[y[i]].clone())
    head.zero_grad()
    F.cross_entropy(logits(), y).backward()
    batch = head.weight.grad[y].clone()
    # Execute
    g, g_bar = head_row_gradients(logits(), h_in, y)
    # Assert
    torch.testing.assert_close(g, torch.stack(per_sample))
    torch.testing.assert_close(g_bar, batch)
    if transform == "afs":
        # gsf picks r up from afs through ctx.extra, so the features it gets stay the unscaled h.
        ctx = _ctx([1] * C, step=3)
        ctx.extra["afs.scale"] = (3, r)
        w = _plugin("gsf").client_sample_weights(logits=logits(), y=y, features=h, ctx=ctx)
        s = 1 - F.cosine_similarity(torch.stack(per_sample), batch, dim=1)
        torch.testing.assert_close(w, 0.5 + 0.5 * s**2)
        ctx.step = 4  # a stale scale from an earlier step is ignored
        w_stale = _plugin("gsf").client_sample_weights(logits=logits(), y=y, features=h, ctx=ctx)
        assert not torch.allclose(w_stale, w)


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
    h, z = _plugin("afs").client_forward(model=model, x=x, y=y, ctx=ctx)
    # Assert
    torch.testing.assert_close(h, x)  # features come back unscaled
    expected = torch.tensor([[2.0, 0.0], [1 / r[1], 1 / r[1]], [-0.4, 0.0]]) + torch.tensor([0.1, -0.2])
    torch.testing.assert_close(z, expected)
    step, published = ctx.extra["afs.scale"]
    assert step == 5
    torch.testing.assert_close(published, r)
    # r is detached: dz/dx_i = W / r_i, nothing flows through r (a live r would add its own term).
    z.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 2) / r[:, None])
    # margin shifts r: margin 1 -> r = [1, 2 - 1/sqrt2, 3].
    _, z1 = _plugin("afs", margin=1.0).client_forward(model=model, x=x.detach(), y=y, ctx=ctx)
    torch.testing.assert_close(z1[0], torch.tensor([1.0, 0.0]) + torch.tensor([0.1, -0.2]))


# --------------------------------------------------------------------------- seen-class mask


@pytest.mark.parametrize(
    ("online_iter", "mask_value"), [(1, float("-inf")), (None, float("-inf")), (1, -1e4)]
)
def test_seen_class_mask_masks_exactly_unseen_classes(online_iter, mask_value):
    # Prepare: classes 1 and 3 unseen.
    plugin = _plugin("seen-class-mask", mask_value=mask_value)
    ctx = _ctx([3, 0, 2, 0, 1], online_iter=online_iter)
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = torch.tensor([0, 2, 4, 0, 2, 2])
    # Execute
    plugin.client_start(ctx=ctx)
    out = plugin.client_transform_logits(logits=logits, ctx=ctx)
    # Assert
    assert (out[:, [1, 3]] == mask_value).all()
    torch.testing.assert_close(out[:, [0, 2, 4]], logits[:, [0, 2, 4]])
    loss = F.cross_entropy(out, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (logits.grad[:, [1, 3]] == 0).all()


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
    # Prepare: seen so far [4, 0, 3, 2]; this slice's labels [2, 2, 2, 3] -> slice counts
    # [0, 0, 3, 1]; seen before the slice [4, 0, 0, 1] -> old = {0, 3}, new = {2}.
    plugin = _plugin("glfc-compensation")
    ctx = _ctx([4, 0, 3, 2], labels=[2, 2, 2, 3], online_iter=1)
    z, y = _glfc_batch()
    # Execute
    plugin.client_start(ctx=ctx)
    w = plugin.client_sample_weights(logits=z, y=y, ctx=ctx)
    # Assert: old samples 0, 2, 4 have g = .5, .75, .25 (mean .5) -> 1, 1.5, .5;
    #         new samples 1, 3 have g = .25, .25 (mean .25)        -> 1, 1.
    np.testing.assert_array_equal(ctx.extra["glfc-compensation.slice_counts"], [0, 0, 3, 1])
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 1.5, 1.0, 0.5]))
    old = torch.tensor([True, False, True, False, True])
    torch.testing.assert_close(w[old].mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[~old].mean(), torch.tensor(1.0))
    assert plugin.client_loss(logits=z, y=y) is None  # loss = "ce" composes with other losses


def test_glfc_offline_treats_every_class_as_new():
    # Prepare: no stream -> one group; mean g = (.5 + .25 + .75 + .25 + .25) / 5 = .4.
    plugin = _plugin("glfc-compensation")
    ctx = _ctx([4, 0, 3, 2], labels=[0, 0, 0, 0, 2, 2, 2, 3, 3])
    z, y = _glfc_batch()
    plugin.client_start(ctx=ctx)
    w = plugin.client_sample_weights(logits=z, y=y, ctx=ctx)
    torch.testing.assert_close(w, torch.tensor([1.25, 0.625, 1.875, 0.625, 0.625]))
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))


def test_glfc_bce_is_per_sample_sum_over_classes_and_finite_under_a_mask():
    # Hand-worked: z = [0, ln3], y = 1 -> -log(1 - .5) - log(.75) = ln2 + ln(4/3).
    plugin = _plugin("glfc-compensation", loss="bce")
    out = plugin.client_loss(logits=torch.tensor([[0.0, LN3]]), y=torch.tensor([1]))
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
    # Record, per client-round, how many classes are old / new in the slice and still unseen, to
    # show the stream exercises both GLFC groups and the seen-class mask.
    seen: list[tuple[int, int, int]] = []
    real_start = continual.GLFCCompensation.client_start

    @functools.wraps(real_start)  # keeps the @hookimpl marker and signature
    def recording_start(self, ctx):
        real_start(self, ctx)
        is_old = ctx.extra["glfc-compensation.is_old"].numpy()
        in_slice = ctx.extra["glfc-compensation.slice_counts"] > 0
        seen.append(
            (int((is_old & in_slice).sum()), int((~is_old & in_slice).sum()), int((~ctx.seen_classes).sum()))
        )

    monkeypatch.setattr(continual.GLFCCompensation, "client_start", recording_start)
    tiny["plugins"] = ALL_FOUR
    tiny["stream"] = {"kind": "si-blurry", "n_tasks": 2, "samples_per_round": 64, "online_iter": 2}
    summary = fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 3})
    _finite_metrics(summary["final"])
    assert math.isfinite(summary["final"]["a_auc"])
    assert any(old > 0 for old, _, _ in seen), seen
    assert any(new > 0 for _, new, _ in seen), seen
    assert any(unseen > 0 for _, _, unseen in seen), seen
