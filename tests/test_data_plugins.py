"""Two-phase training and input-space SMOTE (plugins/data_plugins.py), and the data-side hook
``data_client_samples`` SMOTE is built on.

SMOTE is checked against a brute-force k-nearest-neighbour search written here on hand-made 2-D
data; two-phase against class counts worked out by hand for a hand-made client.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from support.contexts import client_ctx, client_hooks, hook_set, setup_ctx

import fedlt
from fedlt.base.seeding import torch_generator
from fedlt.prepare import prepare
from fedlt.testing import TINY, check_plugin
from fedlt.training.plan import plan_steps

# --------------------------------------------------------------------------- SMOTE: hand-made data


def _points(n: int, centre: tuple[float, float], seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.as_tensor(np.asarray(centre) + g.normal(size=(n, 2)), dtype=torch.float32)


#: Class 0: 30 points (the largest), class 1: 10, class 2: one, class 3: absent.
X = torch.cat([_points(30, (0.0, 0.0), 1), _points(10, (5.0, 5.0), 2), torch.tensor([[-4.0, 7.0]])])
Y = torch.tensor([0] * 30 + [1] * 10 + [2])


def _smote(x: torch.Tensor, y: torch.Tensor, seed: int = 0, client: int = 0, **params):
    hooks = hook_set({"name": "smote", **params})
    out = hooks.data_client_samples(
        x=x,
        y=y,
        client_id=client,
        generator=torch_generator(seed, "client-samples", client),
        ctx=setup_ctx(4, input_shape=(2,), seed=seed),
    )
    return out.get("smote", (torch.empty(0, 2), torch.empty(0, dtype=torch.long)))


def _brute_knn(points: list[list[float]], i: int, k: int) -> list[int]:
    """The k nearest other points of point i, by squared distance, by plain loops."""
    d = []
    for j, p in enumerate(points):
        if j != i:
            d.append((sum((a - b) ** 2 for a, b in zip(points[i], p, strict=True)), j))
    return [j for _, j in sorted(d)[:k]]


def _on_segment(s: list[float], a: list[float], b: list[float]) -> bool:
    """Whether s = a + u (b - a) for some u in [0, 1] (up to float32 rounding)."""
    dx = [q - p for p, q in zip(a, b, strict=True)]
    axis = max(range(len(dx)), key=lambda i: abs(dx[i]))
    u = (s[axis] - a[axis]) / dx[axis]
    return -1e-6 <= u <= 1 + 1e-6 and all(abs(a[i] + u * dx[i] - s[i]) < 1e-4 for i in range(len(dx)))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_smote_samples_lie_between_a_sample_and_one_of_its_k_nearest_same_class_neighbours(k):
    x_new, y_new = _smote(X, Y, k=k)
    assert (y_new == 1).sum() == 20  # class 1 grown from 10 to 30
    pts = X[Y == 1].tolist()
    knn = {i: _brute_knn(pts, i, k) for i in range(len(pts))}
    for s in x_new[y_new == 1].tolist():
        hits = [(i, j) for i in knn for j in knn[i] if _on_segment(s, pts[i], pts[j])]
        assert hits, f"{s} lies on no segment from a class-1 sample to one of its {k} nearest"
    # The test has power: with k < 9 not every pair of the class is a neighbour pair, so samples
    # interpolated towards any same-class point would miss the neighbour segments.
    assert any(j not in knn[i] for i in knn for j in range(len(pts)) if j != i)


def test_smote_neighbours_are_the_nearest_not_any_same_class_point():
    # Points at 0, 1 and 10 on a line; with k = 1 the neighbour pairs are 0->1, 1->0 and 10->1, so
    # every sample lies in [0, 10], and none may come from 0 towards 10 (a sample in (1, 10] then
    # lies on 10->1, which the segment check of the other test covers).
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]] + [[50.0 + i, 50.0] for i in range(40)])
    y = torch.tensor([0, 0, 0] + [1] * 40)
    x_new, y_new = _smote(x, y, k=1)
    xs = x_new[y_new == 0][:, 0]
    assert xs.numel() == 37
    # from 0 only towards 1 ([0, 1]); from 1 only towards 0 ([0, 1]); from 10 only towards 1 ([1, 10]).
    assert bool(((xs >= 0) & (xs <= 10)).all())
    from10 = xs[xs > 1]
    assert from10.numel() > 0  # 10 is the base of about a third of them
    assert bool((x_new[y_new == 0][:, 1] == 0).all())


def test_smote_counts_reach_the_target_exactly():
    _, y_new = _smote(X, Y)
    total = torch.bincount(torch.cat([Y, y_new]), minlength=4)
    assert total.tolist() == [30, 30, 30, 0]  # class 3 is absent and stays absent
    _, y_half = _smote(X, Y, target=0.5)
    assert torch.bincount(torch.cat([Y, y_half]), minlength=4).tolist() == [30, 15, 15, 0]  # floor(0.5 * 30)
    _, y_low = _smote(X, Y, target=0.1)  # floor(0.1 * 30) = 3: class 1 (10) is left alone
    assert torch.bincount(torch.cat([Y, y_low]), minlength=4).tolist() == [30, 10, 3, 0]


def test_smote_single_sample_class_is_grown_by_copies():
    x_new, y_new = _smote(X, Y)
    assert bool((x_new[y_new == 2] == X[40]).all())


def test_smote_is_deterministic_per_seed_and_client():
    a = _smote(X, Y, seed=0, client=3)
    b = _smote(X, Y, seed=0, client=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], _smote(X, Y, seed=1, client=3)[0])
    assert not torch.equal(a[0], _smote(X, Y, seed=0, client=4)[0])


@pytest.mark.parametrize(("key", "value"), [("k", 0), ("target", 1.5), ("target", 0.0), ("target", "min")])
def test_smote_bad_parameters_refused_with_the_key(tiny, tmp_path, key, value):
    tiny["plugins"] = [{"name": "smote", key: value}]
    with pytest.raises(fedlt.ScenarioError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert key in info.value.key


# --------------------------------------------------------------------------- SMOTE: in a run


def test_smote_samples_join_each_clients_data_deterministically():
    s = fedlt.load_scenario({**copy.deepcopy(TINY), "plugins": [{"name": "smote"}]})
    plain = prepare(fedlt.load_scenario(copy.deepcopy(TINY)), "cpu").data
    p = prepare(s, "cpu")
    data, again = p.data, prepare(s, "cpu").data
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_train, again.y_train)
    n = plain.y_train.numel()
    assert torch.equal(data.x_train[:n], plain.x_train)  # the real samples keep their rows
    for k in range(data.n_clients):
        real = plain.client_indices[k]
        assert np.array_equal(data.client_indices[k][: len(real)], real)
        counts = plain.client_counts[k]
        want = np.where(counts > 0, counts.max(), 0)
        assert data.client_counts[k].tolist() == want.tolist()
        assert np.bincount(data.y_train_np[data.client_indices[k]], minlength=10).tolist() == want.tolist()
        # the synthetic rows are exactly the hook's answer for (seed, client) on the real data
        rows = torch.as_tensor(real)
        x_new, y_new = _hook_answer(plain.x_train[rows], plain.y_train[rows], s.seed, k)
        added = torch.as_tensor(data.client_indices[k][len(real) :])
        assert torch.equal(data.x_train[added], x_new) and torch.equal(data.y_train[added], y_new)
    assert data.train_class_counts.tolist() == plain.train_class_counts.tolist()  # the real long tail


def _hook_answer(x: torch.Tensor, y: torch.Tensor, seed: int, client: int):
    hooks = hook_set("smote")
    ctx = setup_ctx(10, input_shape=tuple(x.shape[1:]), seed=seed)
    g = torch_generator(seed, "client-samples", client)
    return hooks.data_client_samples(x=x, y=y, client_id=client, generator=g, ctx=ctx)["smote"]


def test_smote_with_label_noise_interpolates_the_labels_clients_see(tiny, tmp_path):
    tiny["noise"] = {"kind": "symmetric", "rate": 0.4}
    s = fedlt.load_scenario({**tiny, "plugins": [{"name": "smote"}]})
    data = prepare(s, "cpu").data
    plain = prepare(fedlt.load_scenario(tiny), "cpu").data
    n = plain.y_train.numel()
    assert data.y_train_clean.numel() == data.y_train.numel() > n  # clean labels cover the added rows
    assert torch.equal(data.y_train_clean[n:], data.y_train[n:])  # an added sample's label is its own
    for k in range(data.n_clients):  # every class a client sees (noisy labels) reaches its largest
        counts = np.bincount(data.y_train_np[data.client_indices[k]], minlength=10)
        assert set(counts[counts > 0].tolist()) == {counts.max()}
    assert math.isfinite(fedlt.run(s, out=tmp_path / "r")["final"]["balanced_accuracy"])


def test_smote_refused_in_a_stream_scenario(tiny, tmp_path):
    tiny["stream"] = {"kind": "si-blurry", "n_tasks": 2}
    tiny["plugins"] = [{"name": "smote"}]
    with pytest.raises(fedlt.ScenarioError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert info.value.key == "plugins[0].name" and "offline" in str(info.value)


def test_a_bad_data_client_samples_result_is_a_plugin_error(tiny, tmp_path, install_plugins):
    class WrongShape(fedlt.Plugin):
        @fedlt.hookimpl
        def data_client_samples(self, x, y):
            return torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)

    install_plugins(**{"wrong-shape": WrongShape})
    tiny["plugins"] = [{"name": "wrong-shape"}]
    with pytest.raises(fedlt.PluginError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert "data_client_samples" in str(info.value) and "(2, 3)" in str(info.value)


@pytest.mark.parametrize(
    ("plugin", "params"), [("smote", {}), ("two-phase", {}), ("two-phase", {"balance": "over"})]
)
def test_plugins_pass_fedlts_checks_serial_equals_vectorized(tmp_path, plugin, params):
    report = check_plugin(plugin, params, engines=("serial", "vectorized"), out=tmp_path / plugin)
    assert "serial == vectorized" in report["checks"] and "has an effect" in report["checks"]


# --------------------------------------------------------------------------- two-phase

#: A hand-made client: 10 samples of class 0, 4 of class 1, 2 of class 2, none of class 3.
LABELS = [0] * 10 + [1] * 4 + [2] * 2


def _trained_counts(round: int, n_rounds: int = 10, local_epochs: int = 2, **params) -> list[int]:
    """Class counts of what the client trains on in ``round`` (all its batches, as the engine plans them)."""
    hooks = client_hooks({"name": "two-phase", **params}, round=round)
    ctx = client_ctx(
        LABELS,
        num_classes=4,
        round=round,
        n_rounds=n_rounds,
        local_epochs=local_epochs,
        generator=torch_generator(0, round, 0),
    )
    steps = plan_steps(ctx, hooks, None)
    order = torch.cat([s.batch for s in steps])
    return torch.bincount(ctx.labels[order], minlength=4).tolist()


def test_two_phase_balanced_then_all_switching_at_half_the_rounds():
    for r in (1, 5):  # 10 rounds: rounds 1-5 balanced (down to the smallest class, 2), then all
        assert _trained_counts(r) == [4, 4, 4, 0]  # 2 per class x 2 local epochs
    for r in (6, 10):
        assert _trained_counts(r) == [20, 8, 4, 0]  # every sample once per local epoch
    # 7 rounds: switch at 7 // 2 + 1 = 4
    assert _trained_counts(3, n_rounds=7) == [4, 4, 4, 0] and _trained_counts(4, n_rounds=7) == [20, 8, 4, 0]


def test_two_phase_switch_round_and_the_reverse_order():
    assert _trained_counts(2, switch_round=3) == [4, 4, 4, 0]
    assert _trained_counts(3, switch_round=3) == [20, 8, 4, 0]
    assert _trained_counts(2, switch_round=3, order="all-first") == [20, 8, 4, 0]
    assert _trained_counts(3, switch_round=3, order="all-first") == [4, 4, 4, 0]
    assert _trained_counts(9, order="all-first") == [4, 4, 4, 0]


def test_two_phase_cap_and_over_sampling():
    assert _trained_counts(1, per_class=3) == [6, 6, 4, 0]  # min(n_c, 3) per epoch
    assert _trained_counts(1, balance="over") == [20, 20, 20, 0]  # up to the largest, 10 per epoch


def test_two_phase_draws_a_fresh_subset_per_round_from_the_clients_generator():
    def subset(round: int, seed: int) -> list[int]:
        hooks = client_hooks({"name": "two-phase", "switch_round": 9}, round=round)
        ctx = client_ctx(LABELS, num_classes=4, round=round, generator=torch_generator(seed, round, 0))
        return sorted(hooks.client_select_indices(ctx=ctx).tolist())

    assert subset(1, 0) == subset(1, 0)
    assert len({tuple(subset(r, 0)) for r in range(1, 9)}) > 1


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"switch_round": 99}, "switch_round"),
        ({"switch_round": 1}, "switch_round"),
        ({"order": "tail-first"}, "order"),
        ({"balance": "over", "per_class": 3}, "per_class"),
        ({"per_class": 0}, "per_class"),
    ],
)
def test_two_phase_bad_parameters_refused_with_the_key(tiny, tmp_path, params, key):
    tiny["plugins"] = [{"name": "two-phase", **params}]
    with pytest.raises(fedlt.ScenarioError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert key in info.value.key


@pytest.mark.slow
def test_smote_serial_equals_ray(tmp_path):
    """Ray workers receive the driver's data, synthetic samples included."""
    pytest.importorskip("ray")
    report = check_plugin("smote", {}, engines=("serial", "ray"), out=tmp_path / "ray")
    assert "serial == Ray" in report["checks"]


@pytest.mark.slow
def test_smote_serial_equals_flower(tmp_path, restore_threads):
    """Every Flower node rebuilds the data, and the samples, from (seed, client)."""
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from fedlt.flower.simulation import FlowerSimulation

    s = {**copy.deepcopy(TINY), "plugins": [{"name": "smote"}]}
    serial = fedlt.run({**s, "engine": {"kind": "serial", "threads": 1}}, out=tmp_path / "serial")
    with FlowerSimulation(num_supernodes=4, num_workers=2, num_cpus=1.0):
        flower = fedlt.run({**s, "engine": {"kind": "flower", "threads": 1}}, out=tmp_path / "flower")
    assert flower["engine"] == "flower" and flower["final"] == serial["final"]
