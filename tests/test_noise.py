"""[noise]: per-client label noise matches its transition matrix, is seeded per client, leaves test
labels alone, is refused with the key when misconfigured, and memorisation is counted right."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import fedlt
from fedlt.base.registry import ParameterError
from fedlt.data.noise import apply_noise, class_rates, noisy_class_counts, transition_matrix
from fedlt.metrics.noise import memorisation, memorisation_metrics
from fedlt.prepare import build_data
from fedlt.scenario.config import load_scenario

C = 10


def _clients(
    n_clients: int = 4, per_client: int = 5000, seed: int = 0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Balanced labels over ``C`` classes, split into contiguous client blocks."""
    labels = np.random.default_rng(seed).integers(0, C, size=n_clients * per_client)
    return labels, [np.arange(k * per_client, (k + 1) * per_client) for k in range(n_clients)]


def _within(observed: float, p: float, n: int, sigmas: float = 4.5) -> bool:
    """``observed`` is within ``sigmas`` binomial standard deviations of ``p`` over ``n`` draws."""
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_symmetric_rate_per_client_and_uniform_destinations():
    labels, clients = _clients()
    t = transition_matrix("symmetric", class_rates("symmetric", 0.4, None, np.ones(C)))
    noisy = apply_noise(labels, clients, t, seed=7)
    for idx in clients:
        flipped = noisy[idx] != labels[idx]
        assert _within(flipped.mean(), 0.4, len(idx))
    # A flipped label is never its own class, and lands on each other class with probability 1/9.
    flipped = noisy != labels
    offsets = (noisy[flipped] - labels[flipped]) % C
    assert offsets.min() >= 1
    shares = np.bincount(offsets, minlength=C)[1:] / flipped.sum()
    assert all(_within(s, 1 / 9, int(flipped.sum())) for s in shares)


def test_pair_flips_go_to_the_next_class():
    labels, clients = _clients()
    t = transition_matrix("pair", class_rates("pair", 0.3, None, np.ones(C)))
    noisy = apply_noise(labels, clients, t, seed=3)
    flipped = noisy != labels
    assert np.array_equal(noisy[flipped], (labels[flipped] + 1) % C)
    for idx in clients:
        assert _within((noisy[idx] != labels[idx]).mean(), 0.3, len(idx))


def test_transition_matrices_written_out():
    # class-dependent: rates 0.1, 0.2, 0.3 spread evenly over the two other classes.
    t = transition_matrix("class-dependent", class_rates("class-dependent", 0.0, [0.1, 0.2, 0.3], np.ones(3)))
    expected = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.15, 0.15, 0.7]])
    np.testing.assert_allclose(t, expected)
    pair = transition_matrix("pair", np.full(3, 0.2))
    np.testing.assert_allclose(pair, [[0.8, 0.2, 0.0], [0.0, 0.8, 0.2], [0.2, 0.0, 0.8]])


def test_tail_rates_give_every_class_the_same_noisy_count():
    # N = 160, C = 3, rate 0.1: r_c = 0.1 * 160 / (3 n_c); every class expects 16/3 noisy labels.
    counts = np.array([100, 50, 10])
    rates = class_rates("tail", 0.1, None, counts)
    np.testing.assert_allclose(rates, [16 / 300, 16 / 150, 16 / 30])
    np.testing.assert_allclose(rates * counts, [16 / 3] * 3)
    assert math.isclose((rates * counts).sum() / counts.sum(), 0.1)
    # 3 * 10 / 160 = 0.1875 is the largest rate that keeps the rarest class's rate <= 1.
    with pytest.raises(ParameterError, match=r"at most 0\.1875"):
        class_rates("tail", 0.2, None, counts)


def test_empirical_transition_matches_class_dependent_matrix():
    labels, clients = _clients(n_clients=2, per_client=20000)
    rates = np.linspace(0.0, 0.45, C)
    t = transition_matrix("class-dependent", rates)
    noisy = apply_noise(labels, clients, t, seed=11)
    for c in range(C):
        rows = labels == c
        assert (
            _within((noisy[rows] != c).mean(), rates[c], int(rows.sum()))
            if rates[c]
            else ((noisy[rows] == c).all())
        )


def test_noise_is_deterministic_per_seed_and_client():
    labels, clients = _clients(n_clients=3, per_client=500)
    t = transition_matrix("symmetric", np.full(C, 0.4))
    a = apply_noise(labels, clients, t, seed=5)
    np.testing.assert_array_equal(a, apply_noise(labels, clients, t, seed=5))
    assert not np.array_equal(a, apply_noise(labels, clients, t, seed=6))
    # Client 0's labels do not depend on which other clients exist.
    alone = apply_noise(labels, clients[:1], t, seed=5)
    np.testing.assert_array_equal(alone[clients[0]], a[clients[0]])
    np.testing.assert_array_equal(alone[clients[1][0] :], labels[clients[1][0] :])  # unheld: clean


def test_overlapping_clients_refused():
    labels = np.zeros(10, dtype=np.int64)
    with pytest.raises(ValueError, match="held by clients 0 and 1"):
        apply_noise(labels, [np.arange(5), np.arange(4, 10)], np.eye(C), seed=0)


def test_noisy_class_counts_by_clean_class():
    clean = np.array([0, 0, 1, 2, 2, 2])
    noisy = np.array([1, 0, 1, 0, 1, 2])
    out = noisy_class_counts(clean, noisy, [np.array([0, 1, 2]), np.array([3, 4, 5])], 3)
    np.testing.assert_array_equal(out, [[1, 0, 0], [0, 0, 2]])


def test_scenario_noise_changes_training_labels_only(tiny):
    clean = build_data(load_scenario(tiny))
    noisy_scn = {**tiny, "noise": {"kind": "symmetric", "rate": 0.4}}
    noisy = build_data(load_scenario(noisy_scn))
    # Test labels, client splits, local test views and the long tail are the clean ones.
    assert torch.equal(noisy.y_test, clean.y_test)
    assert torch.equal(noisy.y_train_clean, clean.y_train)
    assert all(np.array_equal(a, b) for a, b in zip(noisy.client_indices, clean.client_indices, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(noisy.test_views, clean.test_views, strict=True))
    np.testing.assert_array_equal(noisy.train_class_counts, clean.train_class_counts)
    # Training labels changed, at about the requested rate; client counts are of the noisy labels.
    y, y0 = noisy.y_train.numpy(), clean.y_train.numpy()
    n = sum(len(i) for i in noisy.client_indices)
    assert _within((y != y0).sum() / n, 0.4, n)
    for k, idx in enumerate(noisy.client_indices):
        np.testing.assert_array_equal(
            noisy.client_counts[k], np.bincount(y[idx], minlength=noisy.num_classes)
        )
    # inspect's view: noisy samples per client and clean class.
    info = noisy.describe()
    assert info["noise"]["n_noisy"] == int((y != y0).sum())
    assert [c["n_noisy"] for c in info["clients"]] == [
        int((y[i] != y0[i]).sum()) for i in noisy.client_indices
    ]
    # Same scenario, same labels; another noise seed, other labels.
    assert torch.equal(build_data(load_scenario(noisy_scn)).y_train, noisy.y_train)
    other = build_data(load_scenario({**tiny, "noise": {"kind": "symmetric", "rate": 0.4, "seed": 99}}))
    assert not torch.equal(other.y_train, noisy.y_train)


@pytest.mark.parametrize(
    ("noise", "key", "allowed"),
    [
        ({"kind": "symmetric"}, "noise.rate", "in (0, 1]"),
        ({"kind": "pair", "rate": 1.5}, "noise.rate", "1"),
        ({"kind": "class-dependent"}, "noise.rates", "per-class rates"),
        ({"kind": "class-dependent", "rates": [0.1, 1.2]}, "noise.rates", "in [0, 1]"),
        ({"kind": "symmetric", "rate": 0.2, "rates": [0.1]}, "noise.rates", "unset"),
        ({"kind": "none", "rate": 0.2}, "noise.rate", "unset"),
        ({"kind": "gaussian"}, "noise.kind", "symmetric"),
        ({"kind": "asymmetric", "rate": 0.4}, "noise.map", "'cifar10'"),
        ({"kind": "symmetric", "rate": 0.4, "map": "cifar10"}, "noise.map", "unset"),
        ({"kind": "asymmetric", "rate": 0.4, "map": "mnist"}, "noise.map", "one of ['cifar10']"),
        ({"kind": "asymmetric", "rate": 0.4, "map": {"3": 3}}, "noise.map", "other than its source"),
        ({"kind": "asymmetric", "rate": 0.4, "map": {"a": 1}}, "noise.map", "class ids >= 0"),
        ({"kind": "asymmetric", "rate": 0.4, "map": {}}, "noise.map", "non-empty"),
        ({"kind": "asymmetric", "map": {"1": 2}}, "noise.rate", "in (0, 1]"),
    ],
)
def test_bad_noise_keys_refused_with_the_key(tiny, noise, key, allowed):
    with pytest.raises(fedlt.ScenarioError) as info:
        load_scenario({**tiny, "noise": noise})
    assert info.value.key == key
    assert allowed in str(info.value)


def test_data_dependent_noise_errors_name_the_key(tiny):
    with pytest.raises(fedlt.ScenarioError) as info:
        build_data(load_scenario({**tiny, "noise": {"kind": "class-dependent", "rates": [0.1, 0.2]}}))
    assert info.value.key == "noise.rates"
    assert "10 rates" in str(info.value)
    with pytest.raises(fedlt.ScenarioError) as info:
        build_data(load_scenario({**tiny, "noise": {"kind": "tail", "rate": 0.9}}))
    assert info.value.key == "noise.rate"


def test_asymmetric_cifar10_map_written_out():
    """Patrini et al.'s CIFAR-10 map at rate 0.4: truck (9) -> automobile (1), bird (2) ->
    airplane (0), deer (4) -> horse (7), cat (3) <-> dog (5); the other classes stay clean."""
    from fedlt.data.noise import resolve_map

    mapping = resolve_map("cifar10", C)
    rates = class_rates("asymmetric", 0.4, None, np.ones(C), mapping)
    np.testing.assert_allclose(rates, [0, 0, 0.4, 0.4, 0.4, 0.4, 0, 0, 0, 0.4])
    expected = np.eye(C)
    for source, target in [(9, 1), (2, 0), (4, 7), (3, 5), (5, 3)]:
        expected[source, source], expected[source, target] = 0.6, 0.4
    np.testing.assert_allclose(transition_matrix("asymmetric", rates, mapping), expected)


def test_asymmetric_flips_go_to_the_mapped_class_only():
    labels, clients = _clients()
    mapping = {0: 1, 3: 2}
    t = transition_matrix("asymmetric", class_rates("asymmetric", 0.3, None, np.ones(C), mapping), mapping)
    noisy = apply_noise(labels, clients, t, seed=5)
    flipped = noisy != labels
    assert set(labels[flipped].tolist()) == {0, 3}  # only mapped classes flip...
    assert np.array_equal(noisy[flipped], np.vectorize(mapping.get)(labels[flipped]))  # ...to their target
    for c in (0, 3):
        rows = labels == c
        assert _within(flipped[rows].mean(), 0.3, int(rows.sum()))


def test_asymmetric_map_round_trips_and_names_classes_the_data_lacks(tiny, tmp_path):
    from fedlt.scenario.config import scenario_to_toml

    s = load_scenario({**tiny, "noise": {"kind": "asymmetric", "rate": 0.4, "map": {9: 1, "2": 0}}})
    assert s.noise.map == {"9": 1, "2": 0}  # TOML's table keys are strings, however given
    path = tmp_path / "s.toml"
    path.write_text(scenario_to_toml(s))
    assert load_scenario(path).noise.map == s.noise.map
    with pytest.raises(fedlt.ScenarioError) as info:
        build_data(load_scenario({**tiny, "noise": {"kind": "asymmetric", "rate": 0.4, "map": {"12": 1}}}))
    assert info.value.key == "noise.map" and "0..9" in str(info.value)


def test_memorisation_on_a_hand_made_example():
    # Samples 0, 1 and 3 are noisy: 0 predicts its noisy label, 1 its clean one, 3 a third class.
    pred = np.array([1, 2, 0, 4])
    clean = np.array([0, 2, 1, 3])
    noisy = np.array([1, 0, 1, 2])
    assert memorisation(pred, clean, noisy) == (1, 1, 3)


class _Lookup(nn.Module):
    """Predicts the class written in each sample's one-hot input."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return h


def test_memorisation_metrics_per_client_and_pooled():
    clean = np.array([0, 1, 2, 0, 1, 2])
    noisy = np.array([1, 1, 0, 2, 0, 2])  # noisy: 0, 2 (client 0), 3, 4 (client 1)
    pred = np.array([1, 0, 2, 2, 2, 0])  # memorised: 0, 3; corrected: 2; neither: 4
    data = SimpleNamespace(
        y_train_clean=torch.as_tensor(clean),
        y_train_np=noisy,
        client_indices=[np.array([0, 1, 2]), np.array([3, 4, 5])],
        x_train=torch.eye(3)[pred],
    )
    out = memorisation_metrics(_Lookup(), data, batch_size=2)
    assert out["noise_n_noisy"] == 4
    assert out["noise_memorised"] == 2 / 4
    assert out["noise_corrected"] == 1 / 4
    assert out["noise_client_memorised"] == [1 / 2, 1 / 2]
    assert out["noise_client_corrected"] == [1 / 2, 0.0]
    assert memorisation_metrics(_Lookup(), SimpleNamespace(y_train_clean=None), 2) == {}


def test_run_records_memorisation(tiny, tmp_path):
    tiny["noise"] = {"kind": "pair", "rate": 0.3}
    final = fedlt.run(tiny, out=tmp_path / "r")["final"]
    assert final["noise_n_noisy"] > 0
    assert 0 <= final["noise_memorised"] + final["noise_corrected"] <= 1
    assert len(final["noise_client_memorised"]) == tiny["partition"]["n_clients"]


def test_inspect_json_lists_noisy_samples_per_client_and_class(capsys):
    from fedlt.cli import main

    scenario = Path(__file__).resolve().parents[1] / "scenarios" / "noise_digits_lt.toml"
    assert main(["inspect", str(scenario), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    noise = info["noise"]
    assert noise["kind"] == "symmetric" and noise["rate"] == 0.4
    per_client = np.array([c["noisy_class_counts"] for c in info["clients"]])
    assert per_client.shape == (len(info["clients"]), info["num_classes"])
    assert per_client.sum(axis=0).tolist() == noise["noisy_class_counts"]
    assert [c["n_noisy"] for c in info["clients"]] == per_client.sum(axis=1).tolist()
    assert noise["n_noisy"] == per_client.sum() and _within(noise["realised_rate"], 0.4, info["n_train"])
    np.testing.assert_allclose(np.array(noise["transition_matrix"]).sum(axis=1), 1.0)


def test_noisy_run_resumes_to_the_same_numbers(tiny, tmp_path, interrupted_run):
    tiny["noise"] = {"kind": "symmetric", "rate": 0.4}
    full = fedlt.run(tiny, out=tmp_path / "full")
    interrupted_run(tiny, tmp_path / "cut", after=1)
    resumed = fedlt.resume(tmp_path / "cut")
    assert resumed["final"]["noise_memorised"] == full["final"]["noise_memorised"]
    assert resumed["final"]["balanced_accuracy"] == full["final"]["balanced_accuracy"]


def test_tail_kind_follows_the_long_tail(tiny):
    data = build_data(load_scenario({**tiny, "noise": {"kind": "tail", "rate": 0.05}}))
    counts = data.train_class_counts.astype(float)
    expected = 0.05 * counts.sum() / (counts.size * counts)  # r_c = rate * N / (C * n_c)
    np.testing.assert_allclose(data.noise["class_rates"], expected)
    t = np.array(data.noise["transition_matrix"])
    np.testing.assert_allclose(np.diag(t), 1 - expected)
    off = t[~np.eye(counts.size, dtype=bool)].reshape(counts.size, -1)
    np.testing.assert_allclose(off, np.repeat(expected[:, None] / (counts.size - 1), counts.size - 1, axis=1))
