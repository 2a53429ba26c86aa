"""Samplers draw the target class distribution from the client's own indices, deterministically."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support.contexts import client_hooks, hook_set, round_ctx

import fedlt
from fedlt.hooks.context import ClientContext

COUNTS = [400, 100, 20]


def _ctx(counts=COUNTS, local_epochs: int = 1, local_steps: int | None = None, config=None, seed: int = 0):
    """A client holding ``counts[c]`` samples of class c, scattered among other clients' rows.

    The dataset has 3x as many rows as the client; the client's indices are a random subset, so a
    sampler that strays outside ``ctx.indices`` is caught.
    """
    g = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    n_total = 3 * len(labels)
    y_train = torch.as_tensor(g.integers(0, len(counts), n_total))
    indices = torch.as_tensor(np.sort(g.choice(n_total, size=len(labels), replace=False)))
    y_train[indices] = torch.as_tensor(g.permutation(labels))
    gen = torch.Generator()
    gen.manual_seed(seed)
    return ClientContext(
        client_id=0,
        round=1,
        n_rounds=10,
        seed=seed,
        num_classes=len(counts),
        config=config or {},
        local_class_counts=np.array(counts),
        global_class_counts=np.array(counts),
        indices=indices,
        labels=y_train[indices],
        x_train=torch.zeros(n_total, 1),
        y_train=y_train,
        batch_size=32,
        local_epochs=local_epochs,
        local_steps=local_steps,
        device=torch.device("cpu"),
        generator=gen,
    )


def _plugin(name, **params):
    """The client-side hooks of one client-round of the sampler ``name`` (a fresh instance)."""
    return client_hooks({"name": name, **params})


def _class_counts(ctx, out) -> np.ndarray:
    return np.bincount(ctx.y_train[out].numpy(), minlength=ctx.num_classes)


def _assert_own(ctx, out):
    assert out.dtype == torch.long and out.dim() == 1
    assert bool(torch.isin(out, ctx.indices).all()), "sampler returned indices of another client"


def _assert_frequencies(counts: np.ndarray, p: np.ndarray):
    """Empirical class counts within 4 binomial standard deviations of N * p_c."""
    n = counts.sum()
    std = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 4 * std + 1e-9), (counts, n * p, std)


# --------------------------------------------------------------------------- oversample


def test_oversample_balances_exactly_and_keeps_every_sample():
    ctx = _ctx()
    out = _plugin("oversample").client_select_indices(ctx=ctx)
    _assert_own(ctx, out)
    # One epoch: every class grown to n_max = 400.
    np.testing.assert_array_equal(_class_counts(ctx, out), [400, 400, 400])
    # Copies spread evenly: each of the 20 tail samples appears 400 / 20 = 20 times, each of the
    # 100 middle samples 4 times, every head sample once.
    uniq, reps = torch.unique(out, return_counts=True)
    assert uniq.numel() == 520
    by_class = {c: set(reps[ctx.y_train[uniq] == c].tolist()) for c in range(3)}
    assert by_class == {0: {1}, 1: {4}, 2: {20}}


def test_oversample_fraction_balance_fills_part_of_the_gap():
    # class c gets n_c + floor(0.5 * (400 - n_c)): [400, 250, 210].
    ctx = _ctx()
    out = _plugin("oversample", fraction_balance=0.5).client_select_indices(ctx=ctx)
    np.testing.assert_array_equal(_class_counts(ctx, out), [400, 250, 210])


def test_oversample_reshuffles_the_same_multiset_each_epoch():
    ctx = _ctx(local_epochs=3)
    out = _plugin("oversample").client_select_indices(ctx=ctx)
    assert out.numel() == 3 * 1200
    epochs = out.view(3, 1200)
    for e in (1, 2):
        assert torch.equal(epochs[e].sort().values, epochs[0].sort().values)
        assert not torch.equal(epochs[e], epochs[0])


def test_oversample_absent_classes_stay_absent():
    ctx = _ctx([50, 0, 5])
    out = _plugin("oversample").client_select_indices(ctx=ctx)
    np.testing.assert_array_equal(_class_counts(ctx, out), [50, 0, 50])


# --------------------------------------------------------------------------- undersample


@pytest.mark.parametrize(
    ("ratio", "expected"), [(1.0, [20, 20, 20]), (2.0, [40, 40, 20]), (7.5, [150, 100, 20])]
)
def test_undersample_keeps_n_min_times_ratio(ratio, expected):
    ctx = _ctx(local_epochs=2)
    out = _plugin("undersample", ratio=ratio).client_select_indices(ctx=ctx)
    _assert_own(ctx, out)
    n = sum(expected)
    assert out.numel() == 2 * n
    first, second = out[:n], out[n:]
    # Without replacement: each kept sample once per epoch, the same kept set in both epochs.
    assert torch.unique(first).numel() == n
    assert torch.equal(first.sort().values, second.sort().values)
    np.testing.assert_array_equal(_class_counts(ctx, first), expected)


# --------------------------------------------------------------------------- class-aware


def test_class_aware_inverse_is_uniform_over_classes():
    ctx = _ctx(local_epochs=10)
    out = _plugin("class-aware").client_select_indices(ctx=ctx)
    _assert_own(ctx, out)
    assert out.numel() == 10 * 520  # epoch length = client size
    _assert_frequencies(_class_counts(ctx, out), np.full(3, 1 / 3))
    # Within a class the draw is uniform: all 20 tail samples are drawn (about 87 times each).
    assert torch.unique(out[ctx.y_train[out] == 2]).numel() == 20


def test_class_aware_effective_follows_effective_numbers():
    # beta 0.99: E_n = (1 - 0.99^n) / 0.01 = [98.20, 63.40, 18.21]; P(class c) ∝ n_c / E_{n_c}
    # = [4.0731, 1.5774, 1.0983] -> [0.6035, 0.2337, 0.1627].
    ctx = _ctx(local_epochs=10)
    out = _plugin("class-aware", weighting="effective", beta=0.99).client_select_indices(ctx=ctx)
    n = np.array(COUNTS, dtype=float)
    p = n / ((1 - 0.99**n) / 0.01)
    p /= p.sum()
    np.testing.assert_allclose(p, [0.6035, 0.2337, 0.1627], atol=1e-4)
    _assert_frequencies(_class_counts(ctx, out), p)


def test_samplers_follow_local_steps_budget():
    for name in ("oversample", "undersample", "class-aware", "temperature"):
        ctx = _ctx(local_epochs=5, local_steps=7)
        out = _plugin(name).client_select_indices(ctx=ctx)
        assert out.numel() == 7 * 32, name


def test_samplers_are_deterministic_given_the_generator():
    for name in ("oversample", "undersample", "class-aware", "temperature"):
        a = _plugin(name).client_select_indices(ctx=_ctx(seed=5))
        b = _plugin(name).client_select_indices(ctx=_ctx(seed=5))
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- temperature


@pytest.mark.parametrize(
    ("tau", "p"),
    [
        (1.0, [400 / 520, 100 / 520, 20 / 520]),  # proportional: [0.7692, 0.1923, 0.0385]
        (2.0, [20 / 34.4721, 10 / 34.4721, math.sqrt(20) / 34.4721]),  # sqrt n: [0.5802, 0.2901, 0.1297]
        (1000.0, [1 / 3, 1 / 3, 1 / 3]),  # ~uniform (n^(1/1000) in [1.003, 1.006])
    ],
)
def test_temperature_frequencies_follow_p_tau(tau, p):
    ctx = _ctx(local_epochs=20)
    out = _plugin("temperature", tau=tau).client_select_indices(ctx=ctx)
    _assert_own(ctx, out)
    assert out.numel() == 20 * 520
    _assert_frequencies(_class_counts(ctx, out), np.array(p))


def test_temperature_reads_the_round_config():
    # The server's scheduled tau (1000: uniform) overrides the plugin's starting tau (1: proportional).
    ctx = _ctx(local_epochs=20, config={"temperature.tau": 1000.0})
    out = _plugin("temperature", tau=1.0).client_select_indices(ctx=ctx)
    _assert_frequencies(_class_counts(ctx, out), np.full(3, 1 / 3))


def test_cooldown_schedule_at_boundaries():
    from fedlt_plugins.samplers import cooldown_tau

    # tau 5 until round 3, linear to 1 over 4 rounds (3..7), then 1.
    got = [cooldown_tau(r, 5.0, 1.0, 3, 4) for r in range(1, 10)]
    assert got == [5.0, 5.0, 5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0]
    # length 0: a step at the start round.
    assert [cooldown_tau(r, 5.0, 1.0, 3, 0) for r in (2, 3, 4)] == [5.0, 1.0, 1.0]


def test_temperature_server_sends_the_scheduled_tau():
    hooks = hook_set(
        {"name": "temperature", "tau": 5.0, "tau_end": 1.0, "cooldown_start_round": 3, "cooldown_rounds": 4}
    )

    def rctx(r):
        return round_ctx(r, global_counts=COUNTS)

    assert [hooks.server_configure_round(ctx=rctx(r)) for r in (2, 5, 7)] == [
        {"temperature.tau": 5.0},
        {"temperature.tau": 3.0},
        {"temperature.tau": 1.0},
    ]
    # Without a cooldown, tau is constant.
    constant = hook_set({"name": "temperature", "tau": 2.0})
    assert constant.server_configure_round(ctx=rctx(9)) == {"temperature.tau": 2.0}


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"tau": 5.0, "tau_end": 1.0}, "when tau_end differs from tau"),
        ({"cooldown_start_round": 3}, "when tau_end is unset"),
    ],
)
def test_temperature_cooldown_parameters_must_agree(params, match):
    with pytest.raises(fedlt.ScenarioError, match=match):
        _plugin("temperature", **params)


# --------------------------------------------------------------------------- end to end


def test_first_listed_sampler_wins():
    hooks = client_hooks("undersample", "oversample")
    ctx = _ctx()
    out = hooks.client_select_indices(ctx=ctx)
    np.testing.assert_array_equal(_class_counts(ctx, out), [20, 20, 20])
    assert hooks.client_select_indices.winner == "undersample"


@pytest.mark.parametrize(
    "plugin",
    [
        {"name": "oversample"},
        {"name": "undersample", "ratio": 2.0},
        {"name": "class-aware"},
        {"name": "temperature", "tau": 3.0, "tau_end": 1.0, "cooldown_start_round": 2, "cooldown_rounds": 1},
    ],
)
def test_samplers_run_end_to_end(tiny, tmp_path, plugin):
    tiny["plugins"] = [plugin]
    summary = fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 2})
    assert summary["final"]["accuracy"] > 0.1
