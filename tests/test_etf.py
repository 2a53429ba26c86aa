"""etf and sse-c: simplex geometry, sparsity and the re-fit, frozen heads that never travel."""

from __future__ import annotations

import math

import pytest
import torch
from fedlt_plugins.etf import refit_sparse_etf, simplex_etf, sparse_etf_loss, sparsify
from support.contexts import setup_ctx

import fedlt
from fedlt.base.seeding import torch_generator
from fedlt.driver.runner import Run
from fedlt.hooks.context import SetupContext
from fedlt.hooks.dispatch import build_hooks
from fedlt.models import build_model
from fedlt.training.worker import aggregated_keys


def _plugin(name, **params):
    return build_hooks(fedlt.load_scenario({"plugins": [{"name": name, **params}]}).plugins).plugins[0]


def _ctx(num_classes: int, seed: int = 0) -> SetupContext:
    return setup_ctx(num_classes, seed=seed, generator=torch_generator(seed, "configure-model"))


def _model(feature_dim: int, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", (8,), num_classes, hidden=[feature_dim])


def _cosines(rows: torch.Tensor) -> torch.Tensor:
    unit = rows / rows.norm(dim=1, keepdim=True)
    return unit @ unit.t()


# --------------------------------------------------------------------------- dense ETF


@pytest.mark.parametrize(("d", "c"), [(32, 10), (10, 10), (7, 2)])
def test_simplex_etf_is_exactly_equiangular(d, c):
    m = simplex_etf(d, c, torch.Generator().manual_seed(1))  # float64, (d, C)
    assert m.shape == (d, c)
    torch.testing.assert_close(m.norm(dim=0), torch.ones(c, dtype=torch.float64), rtol=0, atol=1e-12)
    cos = _cosines(m.t())
    off = ~torch.eye(c, dtype=torch.bool)
    torch.testing.assert_close(
        cos[off], torch.full((c * (c - 1),), -1 / (c - 1), dtype=torch.float64), rtol=0, atol=1e-12
    )
    # The columns sum to zero (centred) and span a (C-1)-dimensional subspace.
    torch.testing.assert_close(m.sum(dim=1), torch.zeros(d, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(m) == c - 1


@pytest.mark.parametrize("norm", [1.0, 2.5])
def test_etf_plugin_installs_frozen_etf_head(norm):
    model, c = _model(32, 10), 10
    _plugin("etf", norm=norm).configure_model(model=model, ctx=_ctx(c))
    w, b = model.head.weight, model.head.bias
    assert not w.requires_grad and not b.requires_grad
    torch.testing.assert_close(w.norm(dim=1), torch.full((c,), norm), rtol=0, atol=1e-5)
    off = ~torch.eye(c, dtype=torch.bool)
    torch.testing.assert_close(_cosines(w)[off], torch.full((c * (c - 1),), -1 / 9), rtol=0, atol=1e-6)
    assert torch.equal(b, torch.zeros(c))
    assert not any(k.startswith("head.") for k in aggregated_keys(model))


def test_etf_bias_random_keeps_the_initial_bias_frozen():
    model = _model(32, 10)
    initial = model.head.bias.detach().clone()
    _plugin("etf", bias="random").configure_model(model=model, ctx=_ctx(10))
    assert torch.equal(model.head.bias, initial) and bool(initial.abs().sum() > 0)
    assert not model.head.bias.requires_grad


def test_etf_head_depends_only_on_the_seed():
    heads = []
    for seed in (0, 0, 1):
        model = _model(32, 10)
        _plugin("etf").configure_model(model=model, ctx=_ctx(10, seed))
        heads.append(model.head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


@pytest.mark.parametrize("name", ["etf", "sse-c"])
def test_feature_dim_below_num_classes_is_a_scenario_error(name, tiny, tmp_path):
    tiny["model"]["hidden"] = [8]  # digits has 10 classes
    tiny["plugins"] = [{"name": name}]
    with pytest.raises(
        fedlt.ScenarioError, match=r"feature_dim is at least the number of classes \(10\)"
    ) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert "MLP with feature_dim 8" in str(info.value)


# --------------------------------------------------------------------------- sparse ETF (SSE-C)


@pytest.mark.parametrize(("d", "beta"), [(32, 0.6), (33, 0.25), (32, 0.0)])
def test_sse_c_zeros_exactly_floor_beta_d_c_entries_and_keeps_them_zero(d, beta):
    c = 10
    model = _model(d, c)
    _plugin("sse-c", beta=beta, n_refit_steps=300).configure_model(model=model, ctx=_ctx(c))
    w = model.head.weight
    assert not w.requires_grad and not model.head.bias.requires_grad
    assert int((w == 0).sum()) == math.floor(beta * d * c)  # 192, 82, 0
    # The zeros are exactly the entries pruned from the dense ETF (same seed, same draws).
    g = torch_generator(0, "configure-model")
    _, mask = sparsify(simplex_etf(d, c, g).t().float(), beta, g)
    assert torch.equal(w == 0, mask == 0)


def test_sse_c_leaves_the_generator_where_its_draws_end_cached_or_not():
    # Expected: the state after drawing the ETF and the pruning mask by hand.
    g = torch_generator(0, "configure-model")
    sparsify(simplex_etf(32, 10, g).t().float(), 0.6, g)
    for _ in range(2):  # the second call is served by the per-process cache
        ctx = _ctx(10)
        _plugin("sse-c", n_refit_steps=20).configure_model(model=_model(32, 10), ctx=ctx)
        assert torch.equal(ctx.generator.get_state(), g.get_state())


def test_refit_decreases_the_loss_and_pulls_norms_to_the_target():
    g = torch.Generator().manual_seed(0)
    w0, mask = sparsify(simplex_etf(64, 10, g).t().float(), 0.6, g)
    w, losses = refit_sparse_etf(w0, mask, norm=0.1, lr=1e-3, n_steps=1500, record_loss=True)
    assert losses.shape == (1500,)
    assert losses[-1] < losses[0] - 2.0
    assert losses[-150:].mean() < losses[:150].mean()
    assert torch.equal(w == 0, mask == 0)  # pruned entries never move
    start, end = (w0.norm(dim=1) - 0.1).abs(), (w.norm(dim=1) - 0.1).abs()
    assert bool((start > 0.3).all()) and bool((end < 0.01).all())
    # The nearest-class angle widens: max cosine falls towards the ETF's -1/(C-1).
    off = ~torch.eye(10, dtype=torch.bool)
    assert _cosines(w)[off].max() < _cosines(w0)[off].max() - 0.1


def test_refit_is_masked_adam_on_the_loss():
    """The hand-derived gradient and in-place Adam equal autograd + torch.optim.Adam."""
    g = torch.Generator().manual_seed(3)
    w0, mask = sparsify(simplex_etf(24, 6, g).t(), 0.5, g)  # float64
    p = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=1e-3)
    expected_losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = sparse_etf_loss(p, 0.1)
        loss.backward()
        p.grad.mul_(mask)
        opt.step()
        expected_losses.append(loss.item())
    w, losses = refit_sparse_etf(w0, mask, norm=0.1, lr=1e-3, n_steps=100, record_loss=True)
    torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(losses, torch.tensor(expected_losses, dtype=torch.float64), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- in a run


@pytest.mark.parametrize(
    "spec", [{"name": "etf"}, {"name": "sse-c", "n_refit_steps": 50}], ids=["etf", "sse-c"]
)
def test_frozen_head_is_bit_identical_after_a_run_and_never_aggregated(spec, tiny, tmp_path):
    tiny["plugins"] = [spec]
    tiny["federation"]["rounds"] = 2
    scenario = fedlt.load_scenario(tiny)
    run = Run.create(scenario, tmp_path / "a")
    head = {k: v.clone() for k, v in run.model.state_dict().items() if k.startswith("head.")}
    body = run.model.body[0].weight.detach().clone()
    assert not any(k.startswith("head.") for k in aggregated_keys(run.model))
    summary = run.execute()
    after = run.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in head.items())
    assert not torch.equal(run.model.body[0].weight, body)  # the backbone did train
    assert all(math.isfinite(summary["final"][k]) for k in ("accuracy", "balanced_accuracy"))
    # Another process building the model from the same scenario gets the same head, bit for bit.
    other = Run.create(scenario, tmp_path / "b").model.state_dict()
    assert all(torch.equal(other[k], v) for k, v in head.items())
