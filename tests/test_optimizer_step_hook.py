"""client_step_gradients, the hook around the local optimizer step, and its plugins sam and fedspeed.

Each expectation is computed here, independently of the engine: SAM's step and FedSpeed's two
rounds from their formulas with autograd on a tiny model; the engines' agreement from a run with
``engine.vectorize = "on"`` (which falls back to the serial client round, the reason recorded).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from support.contexts import client_ctx, client_hooks, hook_set, round_ctx, setup_ctx
from torch import nn

import fedlt
from fedlt import Plugin, hookimpl
from fedlt.errors import PluginError, ScenarioError
from fedlt.hooks.hookspecs import SPECS
from fedlt.hooks.recipe import LocalTraining
from fedlt.store.checkpoint import load_checkpoint
from fedlt.training.serial import train_alone
from fedlt.training.vectorized import vectorize_blockers

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.tensor([[1.0, 0.0, 0.5], [0.5, 2.0, -1.0], [-1.0, 1.0, 0.3], [0.2, -0.4, 1.5]])
Y = torch.tensor([0, 1, 1, 0])


class Tiny(nn.Module):
    """features -> tanh -> head: the default forward ``head(features(x))``."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(3, 4)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(4))
        self.body = nn.Sequential(*layers, nn.Tanh())
        self.head = nn.Linear(4, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def recipe(lr: float, steps: int) -> LocalTraining:
    """Full-batch SGD (batch = the 4 samples, so sample order does not matter), ``steps`` steps."""
    return LocalTraining(1, steps, 4, "sgd", lr, 0.0, 0.0, None, "none")


def loss_at(model: nn.Module, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(torch.func.functional_call(model, weights, (X,)), Y)


def grad_at(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w = {n: t.detach().requires_grad_(True) for n, t in weights.items()}
    g = torch.autograd.grad(loss_at(model, w), list(w.values()))
    return dict(zip(w, g, strict=True))


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model: nn.Module, plugin: dict[str, Any], lr: float, steps: int, states: dict | None = None):
    hooks = client_hooks(plugin, states=states)
    ctx = client_ctx(Y, x=X, batch_size=4, local_steps=steps)
    return train_alone(model, ctx, hooks, recipe(lr, steps), list(model.parameters()))


# --------------------------------------------------------------------------- SAM


def test_sam_step_equals_the_hand_computed_step():
    """One step: e = rho g / (||g|| + 1e-7) (one norm over every parameter, as their ESAM),
    g' = grad L(w + e), w - lr g'."""
    model, rho, lr = Tiny(), 0.3, 0.5
    w = params(model)
    g = grad_at(model, w)
    norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
    g_sam = grad_at(model, {n: w[n] + rho * g[n] / (norm + 1e-7) for n in w})
    expected = {n: w[n] - lr * g_sam[n] for n in w}
    total, n_steps, _ = train(model, {"name": "sam", "rho": rho}, lr, 1)
    assert n_steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], msg=n)
    # the step's loss is the loss at the unperturbed weights
    torch.testing.assert_close(total, loss_at(model, w))
    # and the step differs from plain SGD's (the perturbation matters at this rho)
    assert not torch.allclose(expected["head.weight"], w["head.weight"] - lr * g["head.weight"], atol=1e-4)


def test_regrad_restores_weights_and_batchnorm_statistics():
    """A SAM step leaves BatchNorm's running statistics as a plain step does (the perturbed
    forward pass is undone), while the weights take SAM's step."""
    plain, sam = Tiny(batchnorm=True), Tiny(batchnorm=True)
    train(plain, {"name": "sam", "rho": 1e-30}, 0.0, 1)  # lr 0: only the statistics move
    train(sam, {"name": "sam", "rho": 0.5}, 0.0, 1)
    for (n, a), (_, b) in zip(plain.named_buffers(), sam.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
    assert int(sam.body[1].num_batches_tracked) == 1


# --------------------------------------------------------------------------- FedSpeed
#
# The authors' code (FL-Simulator: client/fedspeed.py, optimizer/ESAM.py, server/FedSpeed.py), as
# formulas: a step is g2 = grad f(x + rho g / (||g|| + 1e-7)), d = clip(g2 + lamb (h_i - w^t)),
# x <- x - lr (d + (wd + lamb) x); after the round h_i += x_K - w^t; the server takes the uniform
# mean of the x_K plus (1 / N) sum_j h_j over all N clients.


def clipped(d: dict[str, torch.Tensor], max_norm: float | None) -> dict[str, torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (||d|| + 1e-6) when below 1."""
    if max_norm is None:
        return d
    coef = min(1.0, max_norm / (float(torch.sqrt(sum((t**2).sum() for t in d.values()))) + 1e-6))
    return {n: t * coef for n, t in d.items()}


def fedspeed_client(
    model: nn.Module, w_t: dict, h: dict, *, lr: float, steps: int, rho: float, lamb: float, wd: float, clip
) -> tuple[dict, dict, int]:
    """The authors' client round: (x_K, the new h_i, how many steps clipping shortened)."""
    x, n_clipped = dict(w_t), 0
    for _ in range(steps):
        g = grad_at(model, x)
        norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
        g2 = grad_at(model, {n: x[n] + rho * g[n] / (norm + 1e-7) for n in x})
        raw = {n: g2[n] + lamb * (h[n] - w_t[n]) for n in x}
        d = clipped(raw, clip)
        n_clipped += not torch.allclose(d["head.weight"], raw["head.weight"])
        x = {n: x[n] - lr * (d[n] + (wd + lamb) * x[n]) for n in x}
    return x, {n: h[n] + x[n] - w_t[n] for n in x}, n_clipped


def fedspeed_server(uploads: list[dict], hs: list[dict], n_clients: int) -> dict:
    """w^{t+1} = mean_i x_K,i + (1 / N) sum_j h_j (uniform; clients never trained hold h_j = 0)."""
    return {
        n: sum(u[n] for u in uploads) / len(uploads) + sum(h[n] for h in hs) / n_clients for n in uploads[0]
    }


def fedspeed_side(spec: dict[str, Any], model: nn.Module, n_clients: int) -> Plugin:
    """The plugin's server side, set up for ``n_clients`` clients."""
    server = hook_set(spec).plugins[0]
    server.server_setup(model=model, ctx=setup_ctx(2, n_clients=n_clients))
    return server


def test_fedspeed_two_rounds_equal_the_authors_formulas():
    """Client 0 of N = 3 trains two rounds, the plugin's own aggregator making round 2's model:
    the weights, the h kept in state and the global models equal the formulas (with clipping and
    weight decay active, so their order and the lamb added to the decay are checked)."""
    spec = {"name": "fedspeed", "rho": 0.2, "lamb": 0.3}
    lr, steps, wd, clip, n_clients = 0.3, 3, 0.01, 0.5, 3
    model = Tiny()
    server = fedspeed_side(spec, model, n_clients)
    w_t, h = params(model), {n: torch.zeros_like(t) for n, t in params(model).items()}
    states: dict[str, dict[str, Any]] = {}
    n_clipped = 0
    for r in (1, 2):
        want_x, h, k = fedspeed_client(
            copy.deepcopy(model), w_t, h, lr=lr, steps=steps, rho=0.2, lamb=0.3, wd=wd, clip=clip
        )
        n_clipped += k
        hooks = client_hooks(spec, round=r, states=states)
        ctx = client_ctx(Y, x=X, batch_size=4, local_steps=steps)
        train_alone(
            model,
            ctx,
            hooks,
            LocalTraining(1, steps, 4, "sgd", lr, 0.0, wd, clip, "none"),
            list(model.parameters()),
        )
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), want_x[n], msg=n)
            torch.testing.assert_close(states["fedspeed"]["h"][n], h[n], msg=n)
        aggregator = server.server_make_aggregator(global_weights=w_t, ctx=round_ctx(r, global_counts=[2, 2]))
        aggregator.add(params(model), 4, 0)
        w_next = aggregator.result()
        want_w = fedspeed_server([want_x], [h], n_clients)
        for n in w_t:
            torch.testing.assert_close(w_next[n], want_w[n], msg=n)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(w_next[n])
        w_t = params(model)
    assert n_clipped > 0  # clipping acted on some step
    assert any(bool(t.abs().max() > 1e-3) for t in h.values())  # a correction that matters


def test_fedspeed_aggregator_averages_uniformly_and_keeps_every_clients_sum():
    """Two rounds of the server step alone with N = 4: round 1 trains clients 0 and 1, round 2
    clients 1 and 2; client 0's h still counts in round 2. ``average = "samples"`` weighs the
    uploads by samples instead, with the same h term."""
    w0 = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.5])}
    up = {
        0: {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([1.0])},
        1: {"a": torch.tensor([0.0, -1.0]), "b": torch.tensor([-0.5])},
    }
    model = nn.Module()
    model.a, model.b = nn.Parameter(w0["a"].clone()), nn.Parameter(w0["b"].clone())
    for average in ("uniform", "samples"):
        server = fedspeed_side({"name": "fedspeed", "average": average}, model, 4)
        agg = server.server_make_aggregator(global_weights=w0, ctx=round_ctx(1, global_counts=[1, 1]))
        agg.add(up[0], 10, 0)
        agg.add(up[1], 30, 1)
        w1 = agg.result()
        h = {c: {n: up[c][n] - w0[n] for n in w0} for c in (0, 1)}
        mean = (lambda a, b: (a + b) / 2) if average == "uniform" else (lambda a, b: (10 * a + 30 * b) / 40)
        for n in w0:
            torch.testing.assert_close(w1[n], mean(up[0][n], up[1][n]) + (h[0][n] + h[1][n]) / 4, msg=n)
        up2 = {1: {n: w1[n] + 1.0 for n in w0}, 2: {n: w1[n] - 3.0 for n in w0}}
        agg = server.server_make_aggregator(global_weights=w1, ctx=round_ctx(2, global_counts=[1, 1]))
        agg.add(up2[1], 30, 1)
        agg.add(up2[2], 30, 2)
        w2 = agg.result()
        h[1] = {n: h[1][n] + up2[1][n] - w1[n] for n in w0}
        h[2] = {n: up2[2][n] - w1[n] for n in w0}
        for n in w0:
            want = (up2[1][n] + up2[2][n]) / 2 + (h[0][n] + h[1][n] + h[2][n]) / 4
            torch.testing.assert_close(w2[n], want, msg=n)
        torch.testing.assert_close(server.state_dict()["h_sum"]["a"], h[0]["a"] + h[1]["a"] + h[2]["a"])


def test_fedspeed_refuses_modes_other_than_sync():
    """Checked when the first round is configured, before any client trains."""
    server = fedspeed_side({"name": "fedspeed"}, Tiny(), 3)
    ctx = dataclasses.replace(round_ctx(1, global_counts=[2, 2]), mode="async")
    with pytest.raises(ScenarioError) as info:
        server.server_configure_round(ctx=ctx)
    assert info.value.key == "federation.mode" and "async" in str(info.value) and "'sync'" in str(info.value)
    assert server.server_configure_round(ctx=round_ctx(1, global_counts=[2, 2])) is None


# --------------------------------------------------------------------------- the contract


class WrongShape(Plugin):
    @hookimpl
    def client_step_gradients(self, grads):
        return {n: g.reshape(-1)[:1] for n, g in grads.items()}


class Halve(Plugin):
    @hookimpl
    def client_step_gradients(self, grads):
        return {n: g / 2 for n, g in grads.items()}


def test_chain_order_and_a_plugin_without_the_hook(install_plugins):
    """halve then sam: SAM perturbs along the halved gradient (same direction: same step);
    sam then halve: the step is half SAM's. A plugin without the hook (focal with gamma 0 is
    cross-entropy) changes nothing."""
    install_plugins(halve=Halve)
    runs = {}
    for name, plugins in {
        "sam": ["sam"],
        "halve-sam": ["halve", "sam"],
        "sam-halve": ["sam", "halve"],
        "sam-focal": [{"name": "focal", "gamma": 0.0}, "sam"],
    }.items():
        model = Tiny()
        w = params(model)
        hooks = client_hooks(*[{"name": p} if isinstance(p, str) else p for p in plugins])
        ctx = client_ctx(Y, x=X, batch_size=4, local_steps=1)
        train_alone(model, ctx, hooks, recipe(0.5, 1), list(model.parameters()))
        runs[name] = {n: w[n] - p.detach() for n, p in model.named_parameters()}  # lr * gradient used
    for n in runs["sam"]:
        torch.testing.assert_close(runs["halve-sam"][n], runs["sam"][n], msg=n)
        torch.testing.assert_close(runs["sam-halve"][n], runs["sam"][n] / 2, msg=n)
        torch.testing.assert_close(runs["sam-focal"][n], runs["sam"][n], msg=n)


def test_a_result_of_the_wrong_shape_names_the_plugin(install_plugins):
    install_plugins(**{"wrong-shape": WrongShape})
    with pytest.raises(PluginError, match=r"wrong-shape.*client_step_gradients.*expected a tensor of shape"):
        train(Tiny(), {"name": "wrong-shape"}, 0.1, 1)


def test_the_hook_is_declared_serial():
    spec = SPECS["client_step_gradients"]
    assert spec.serial and not spec.vmap and spec.combine == "chain" and spec.check == "update"


class AfterBackward(Plugin):
    @hookimpl
    def client_after_backward(self, model):
        pass


def test_serial_hooks_block_the_vectorized_step_with_their_reason(install_plugins):
    """The reasons come from the declarations (HookSpec.serial), one per plugin and hook."""
    install_plugins(**{"after-backward": AfterBackward})
    hooks = hook_set("sam", {"name": "fedspeed"}, "after-backward", {"name": "focal"})
    model = Tiny()
    reasons = vectorize_blockers(hooks, model, False, list(model.state_dict()))
    assert reasons[:3] == [
        f"plugin 'sam' implements client_step_gradients ({SPECS['client_step_gradients'].serial})",
        f"plugin 'fedspeed' implements client_step_gradients ({SPECS['client_step_gradients'].serial})",
        "plugin 'after-backward' implements client_after_backward (it needs one model's gradients)",
    ]
    assert not any("'focal' implements client_step_gradients" in r for r in reasons)


@pytest.mark.parametrize(
    ("plugin", "key", "value"),
    [
        ("sam", "rho", 0.0),
        ("fedspeed", "lamb", -1.0),
        ("fedspeed", "average", "median"),
        ("fedspeed", "alpha", 0.5),  # the paper's quasi-gradient mix is not in the authors' code
    ],
)
def test_bad_parameters_are_refused_with_key_and_value(plugin, key, value):
    """Refused when the scenario's plugins are built, before any training."""
    with pytest.raises(ScenarioError) as info:
        hook_set({"name": plugin, key: value})
    assert key in info.value.key and str(value) in str(info.value)


# --------------------------------------------------------------------------- engines


def test_serial_and_vectorized_engines_agree_and_record_the_fallback(tiny, tmp_path):
    """engine.vectorize = "on" with fedspeed trains one by one (the summary says why) and gives
    the serial engine's weights and client states exactly."""
    from fedlt.driver.runner import Run

    tiny["plugins"] = [{"name": "fedspeed", "rho": 0.05}]
    tiny["federation"]["rounds"] = 2
    sc = fedlt.load_scenario(tiny)
    runs = {}
    for mode in ("off", "on"):
        spec = sc.model_copy(update={"engine": sc.engine.model_copy(update={"vectorize": mode})})
        runs[mode] = Run.create(spec, tmp_path / mode)
        runs[mode].execute()
    serial, vectorized = runs["off"], runs["on"]
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["training"][0]["vectorized"] is False
    assert "'fedspeed' implements client_step_gradients" in summary["training"][0]["why"]
    a, b = serial.model.state_dict(), vectorized.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    for run in (serial, vectorized):
        # the server's sum of updates is the sum of the h the clients keep (each trained client's)
        hs = [s["fedspeed"]["h"] for s in run.client_states.values() if "fedspeed" in s]
        h_sum = run.hooks.by_name["fedspeed"].state_dict()["h_sum"]
        assert hs and set(h_sum) == set(hs[0])
        for n, total in h_sum.items():
            torch.testing.assert_close(total, sum(h[n] for h in hs), msg=n)
        assert any(bool(t.abs().max() > 1e-4) for t in h_sum.values())


def test_fedspeed_resumes_with_its_server_sum(tiny, tmp_path, interrupted_run):
    """A run cut off after round 1 and resumed ends where an uninterrupted run does: h_sum is
    checkpointed (state_dict) and each client's h travels in its state."""
    tiny["plugins"] = [{"name": "fedspeed"}]
    full = fedlt.run(tiny, out=tmp_path / "full")
    interrupted_run(tiny, tmp_path / "cut", after=1)
    resumed = fedlt.resume(tmp_path / "cut")
    assert resumed["final"] == full["final"]
    ckpt, again = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    for n, t in ckpt["plugins"]["fedspeed"]["h_sum"].items():
        assert torch.equal(again["plugins"]["fedspeed"]["h_sum"][n], t), n
    for k, v in ckpt["global"].items():
        assert torch.equal(again["global"][k], v), k


def test_defaults_are_the_authors():
    """train.py of FL-Simulator: --rho 0.1 (SAM radius, FedSAM and FedSpeed), --lamb 0.1; the
    server averages uniformly (server/server.py)."""
    sam, speed = hook_set("sam", "fedspeed").plugins
    assert sam.params.rho == 0.1
    assert (speed.params.rho, speed.params.lamb, speed.params.average) == (0.1, 0.1, "uniform")
