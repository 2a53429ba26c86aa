"""The asynchronous remedies against independent computations.

- stale-inversion: its simulated training equals a plain optimizer loop; its mask keeps the
  largest coordinates; the inversion recovers a known batch's label distribution from the update
  it caused; a refreshed update is close to the update the client would have made from the
  current weights (computed here by training on the true batch), closer than the stale one; the
  switch back to plain aggregation; its state survives a checkpoint; it refuses sync federations.
- staleness-fedavg: the formula on hand values, and FedAvg exactly when nothing is stale.
- tail-aware-select and oort-select: selection frequencies and choices by their definitions.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fedlt_plugins.selection import OortSelect, TailAwareSelect
from fedlt_plugins.stale_inversion import StaleInversion, invert, simulate, top_mask
from fedlt_plugins.staleness import StalenessFedAvg
from support.scenarios import TINY
from torch import nn

import fedlt
from fedlt.errors import ScenarioError
from fedlt.hooks.context import Arrival, RoundContext, SetupContext
from fedlt.hooks.recipe import LocalTraining
from fedlt.scenario.config import SystemConfig
from fedlt.system import Devices

D, C = 8, 4


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def train_on(
    model: nn.Module, start: dict[str, torch.Tensor], x, y, steps: int, lr: float
) -> dict[str, torch.Tensor]:
    """What a client's plain SGD makes of ``start`` on the batch (x, y): the update (independent)."""
    m = copy.deepcopy(model)
    m.load_state_dict(start)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return {k: v.detach() - start[k] for k, v in m.named_parameters()}


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, D, generator=g), torch.tensor([2] * 12 + [0] * 4)


# --------------------------------------------------------------------------- stale-inversion


def test_simulated_training_is_plain_gradient_descent_on_soft_labels() -> None:
    model = tiny_model()
    start = params_of(model)
    x, y = batch()
    # Hard labels as one-hot soft labels: the same as cross-entropy SGD on the batch.
    got = simulate(model, start, {}, x, F.one_hot(y, C).float(), steps=3, lr=0.2)
    want = train_on(model, start, x, y, steps=3, lr=0.2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_the_mask_keeps_the_largest_coordinates_over_all_tensors() -> None:
    delta = {"a": torch.tensor([0.1, -5.0, 0.3]), "b": torch.tensor([[2.0, -0.2], [0.0, 1.0]])}
    mask = top_mask(delta, 3 / 7)  # 3 of 7 coordinates: -5, 2, 1
    assert mask["a"].tolist() == [0, 1, 0] and mask["b"].tolist() == [[1, 0], [0, 1]]
    assert sum(int(m.sum()) for m in top_mask(delta, 1.0).values()) == 7


def test_inversion_recovers_a_known_batchs_label_distribution() -> None:
    model = tiny_model()
    start = params_of(model)
    x, y = batch()
    delta = train_on(model, start, x, y, steps=5, lr=0.1)
    X, L = invert(
        model.eval(), start, {}, delta, samples=16, num_classes=C, input_shape=(D,), steps=5, lr=0.1,
        iterations=300, inversion_lr=0.1, match_fraction=1.0, input_bound=3.0,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    recovered = L.softmax(1).mean(0)
    truth = torch.bincount(y, minlength=C).float() / len(y)  # [0.25, 0, 0.75, 0]
    assert 0.5 * (recovered - truth).abs().sum() < 0.1  # total variation
    syn = simulate(model, start, {}, X, L.softmax(1), 5, 0.1)
    rel = sum((syn[k] - delta[k]).abs().sum() for k in delta) / sum(d.abs().sum() for d in delta.values())
    assert rel < 0.3


def _plugin(**params) -> StaleInversion:
    plugin = StaleInversion(StaleInversion.Params(**params))
    plugin.name = "stale-inversion"
    recipe = LocalTraining(5, None, 16, "sgd", 0.1, 0.0, 0.0, None, "none")
    ctx = SetupContext(0, C, (D,), 4, 10, torch.device("cpu"), np.ones(C), torch.Generator(), None, recipe)
    plugin.server_setup(model=tiny_model(), ctx=ctx)
    return plugin


def _round_ctx(round: int = 5) -> RoundContext:
    return RoundContext(round, 10, 0, C, (), {"round": round}, np.ones(C), np.ones((4, C)), mode="async")


def test_a_refreshed_update_is_close_to_the_fresh_update_the_client_would_have_made() -> None:
    model = tiny_model()
    base = params_of(model)
    g = torch.Generator().manual_seed(7)
    now = {k: v + 0.4 * torch.randn(v.shape, generator=g) for k, v in base.items()}  # the model moved on
    x, y = batch()
    stale = train_on(model, base, x, y, steps=5, lr=0.1)
    fresh = train_on(model, now, x, y, steps=5, lr=0.1)  # what the client would send today
    plugin = _plugin(samples=16, iterations=300, switch="never")
    arrival = Arrival(1, 0, 4, 0.0, 3.0, base)
    weights = {k: base[k] + stale[k] for k in base}
    out = plugin.server_refresh_update(
        weights=weights, arrival=arrival, global_weights=now, n_steps=5, ctx=_round_ctx()
    )
    refreshed = {k: out[k] - now[k] for k in now}

    def error(update: dict[str, torch.Tensor]) -> float:
        return float(
            sum((update[k] - fresh[k]).abs().sum() for k in fresh)
            / sum(f.abs().sum() for f in fresh.values())
        )

    assert error(refreshed) < 0.5 * error(stale), (error(refreshed), error(stale))
    assert plugin.counts["refreshed"] == 1 and 1 in plugin.estimates


def test_it_switches_back_to_plain_aggregation_when_the_estimate_keeps_losing() -> None:
    model = tiny_model()
    base = params_of(model)
    x, y = batch()
    weights = {k: base[k] + d for k, d in train_on(model, base, x, y, steps=5, lr=0.1).items()}
    now = {k: v + 1e-4 for k, v in base.items()}  # hardly stale: the estimate cannot win
    plugin = _plugin(iterations=2, patience=2, warmup=0.5)  # no switching in rounds 1-5 of 10
    stale = Arrival(1, 0, 3, 0.0, 1.0, base)
    call = lambda r: plugin.server_refresh_update(  # noqa: E731
        weights=weights, arrival=stale, global_weights=now, n_steps=5, ctx=_round_ctx(r)
    )
    assert call(3) is None and call(4) is None and plugin.switched_at is None  # lost twice, but early
    assert call(6) is None and plugin.switched_at == 6
    iterations_before = len(plugin.errors)
    assert call(7) is None and len(plugin.errors) == iterations_before  # no inversion any more
    restored = _plugin()
    restored.load_state_dict(plugin.state_dict())
    assert restored.switched_at == 6 and restored.counts == plugin.counts


def test_stale_inversion_refuses_a_synchronous_federation(tmp_path: Path) -> None:
    s = copy.deepcopy(TINY)
    s["plugins"] = [{"name": "stale-inversion"}]
    with pytest.raises(ScenarioError, match=r"plugins\[0\]\.name.*asynchronous federation"):
        fedlt.run(s, out=tmp_path / "r")


def test_stale_inversion_refreshes_stale_updates_in_a_run(tmp_path: Path) -> None:
    s = copy.deepcopy(TINY)
    s["federation"].update(mode="async", concurrency=3, rounds=6, eval_every=6)
    s["system"] = {"speed": "lognormal", "speed_sigma": 1.0}
    s["plugins"] = [{"name": "stale-inversion", "iterations": 20, "switch": "never"}]
    summary = fedlt.run(s, out=tmp_path / "r")
    fed = summary["federation"]
    stale = sum(n for k, n in fed["staleness_histogram"].items() if int(k) > 0)
    assert stale > 0 and fed["refreshed"] == stale
    assert summary["final"]["stale-inversion.refreshed"] == stale


# --------------------------------------------------------------------------- staleness-fedavg


def test_staleness_fedavg_is_the_sample_weighted_mean_of_discounted_deltas() -> None:
    plugin = StalenessFedAvg(StalenessFedAvg.Params(weight="exponential", half_life=20.0))
    now = {"w": torch.tensor([1.0])}
    arrivals = (
        Arrival(0, 5, 0, 0, 1, {"w": torch.tensor([1.0])}),
        Arrival(1, 0, 40, 0, 1, {"w": torch.tensor([0.0])}),
    )
    ctx = RoundContext(6, 10, 0, C, (0, 1), {}, np.ones(C), np.ones((2, C)), arrivals=arrivals)
    agg = plugin.server_make_aggregator(global_weights=now, ctx=ctx)
    agg.add({"w": torch.tensor([3.0])}, 10, 0)  # delta 2, weight 1
    agg.add({"w": torch.tensor([4.0])}, 30, 1)  # delta 4, weight 2^(-40/20) = 1/4
    assert agg.result()["w"].item() == pytest.approx(1 + (10 * 2 + 30 * 0.25 * 4) / 40)


def test_staleness_fedavg_is_fedavg_when_nothing_is_stale(tmp_path: Path) -> None:
    s = copy.deepcopy(TINY)
    plain = fedlt.run(s, out=tmp_path / "a")
    s["plugins"] = [{"name": "staleness-fedavg"}]
    ours = fedlt.run(s, out=tmp_path / "b")
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["global"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["global"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    assert ours["final"]["accuracy"] == pytest.approx(plain["final"]["accuracy"], abs=0.01)


# --------------------------------------------------------------------------- selection


def _selection_ctx(
    tail: np.ndarray, round: int = 1, counts: np.ndarray | None = None, **system
) -> RoundContext:
    devices = Devices(SystemConfig(**system), 0, tail, 4 * 1000)
    n = len(tail)
    counts = np.full((n, C), 10) if counts is None else counts
    return RoundContext(round, 100, 0, C, (), {"round": round}, counts.sum(0), counts, system=devices)


def test_tail_aware_selection_draws_clients_in_proportion_to_one_plus_boost_times_tail_share() -> None:
    tail = np.array([0.0, 0.0, 0.5, 1.0])
    plugin = TailAwareSelect(TailAwareSelect.Params(boost=4.0))
    counts = np.zeros(4)
    for r in range(1, 4001):
        for c in plugin.server_select_clients(candidates=[0, 1, 2, 3], k=1, ctx=_selection_ctx(tail, r)):
            counts[c] += 1
    want = (1 + 4 * tail) / (1 + 4 * tail).sum()  # [1, 1, 3, 5] / 10
    assert counts / counts.sum() == pytest.approx(want, abs=0.02)


def test_oort_explores_the_fastest_untried_then_exploits_utility_penalising_slow_clients() -> None:
    plugin = OortSelect(OortSelect.Params(epsilon=0.0, min_epsilon=0.0, alpha=2.0, preferred_duration=1.0))
    recipe = LocalTraining(1, None, 10, "sgd", 0.1, 0.0, 0.0, None, "none")
    plugin.server_setup(
        ctx=SetupContext(0, C, (D,), 4, 10, torch.device("cpu"), np.ones(C), torch.Generator(), None, recipe)
    )
    tail = np.zeros(4)
    # 40 samples each: durations 40 / speed; uniform speeds 10..100 drawn per client.
    ctx = _selection_ctx(tail, 1, speed="uniform", speed_low=10.0, speed_high=100.0)
    durations = 40 / ctx.system.speeds
    first = plugin.server_select_clients(candidates=[0, 1, 2, 3], k=2, ctx=ctx)
    assert first == sorted(range(4), key=lambda c: durations[c])[:2]  # nothing tried: fastest first
    # After round 1: utilities reported; client 3 the most useful but, if slow, penalised.
    plugin.server_after_aggregate(
        ctx=ctx,
        payloads={0: {"utility": 1.0}, 1: {"utility": 2.0}, 2: {"utility": 3.0}, 3: {"utility": 50.0}},
    )
    score = {
        c: (u + math.sqrt(0.1 * math.log(2) / 1)) * (min(1.0, 1.0 / durations[c]) ** 2)
        for c, u in {0: 1.0, 1: 2.0, 2: 3.0, 3: 50.0}.items()
    }
    best = max(score, key=score.get)
    picks = {
        plugin.server_select_clients(
            candidates=[0, 1, 2, 3],
            k=1,
            ctx=_selection_ctx(tail, r, speed="uniform", speed_low=10.0, speed_high=100.0),
        )[0]
        for r in range(2, 40)
    }
    assert best in picks and all(score[c] >= 0.9 * score[best] for c in picks)
