"""Client partitioners: exact coverage, determinism, and Dirichlet skew that behaves statistically."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt.base.registry import ParameterError
from fedlt.data.longtail import exponential_counts
from fedlt.data.partition import (
    PARTITIONS,
    partition,
    partition_dirichlet,
    partition_dirichlet_equal,
    partition_iid,
    partition_shards,
)

NUM_CLASSES = 10


def balanced_labels(per_class: int = 100, num_classes: int = NUM_CLASSES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def long_tail_labels(seed: int = 0) -> np.ndarray:
    counts = exponential_counts(500, NUM_CLASSES, 100)  # 1240 samples, 500 ... 5
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(NUM_CLASSES), counts))


def class_matrix(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=NUM_CLASSES) for p in parts])


def assert_exact_cover(parts: list[np.ndarray], n: int, n_clients: int) -> None:
    assert len(parts) == n_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices are sorted and unique"
    everything = np.concatenate(parts)
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize("kind", PARTITIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("labels_fn", [balanced_labels, long_tail_labels], ids=["balanced", "long-tail"])
def test_every_index_lands_in_exactly_one_client(kind: str, seed: int, labels_fn) -> None:
    labels = labels_fn(seed=seed)
    params = {"alpha": 0.5} if "alpha" in PARTITIONS[kind].takes else {}
    parts = partition(kind, labels, 20, np.random.default_rng(seed), num_classes=NUM_CLASSES, **params)
    assert_exact_cover(parts, len(labels), 20)


@pytest.mark.parametrize("kind", PARTITIONS)
def test_same_seed_same_partition(kind: str) -> None:
    labels = long_tail_labels()
    a = partition(kind, labels, 15, np.random.default_rng(11))
    b = partition(kind, labels, 15, np.random.default_rng(11))
    c = partition(kind, labels, 15, np.random.default_rng(12))
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert any(not np.array_equal(pa, pc) for pa, pc in zip(a, c, strict=True))


def test_unknown_kind_lists_the_registry() -> None:
    with pytest.raises(ValueError, match=r"unknown partition 'pathological'; known: dirichlet, ") as excinfo:
        partition("pathological", balanced_labels(), 4, np.random.default_rng(0))
    assert "iid" in str(excinfo.value)


def test_registry_declares_each_partitioner_and_its_parameters() -> None:
    assert PARTITIONS.names == ("dirichlet", "dirichlet-equal", "shards", "iid")
    assert {name: PARTITIONS[name].defaults() for name in PARTITIONS} == {
        "dirichlet": {"alpha": 0.5, "min_client_size": 0},
        "dirichlet-equal": {"alpha": 0.5},
        "shards": {"shards_per_client": 2},
        "iid": {},
    }


def test_partition_rejects_parameters_its_kind_does_not_take() -> None:
    with pytest.raises(ValueError, match="alpha"):
        partition("iid", balanced_labels(), 4, np.random.default_rng(0), alpha=0.5)
    with pytest.raises(ValueError, match="shards_per_client"):
        partition("shards", balanced_labels(), 4, np.random.default_rng(0), shards_per_client=0)


def test_partition_fills_in_the_registered_defaults() -> None:
    labels = balanced_labels()
    by_name = partition("shards", labels, 10, np.random.default_rng(4))
    by_hand = partition_shards(labels, 10, 2, np.random.default_rng(4))  # shards' default is 2
    for a, b in zip(by_name, by_hand, strict=True):
        np.testing.assert_array_equal(a, b)


def test_iid_sizes_and_mix() -> None:
    labels = balanced_labels(per_class=300)
    parts = partition_iid(labels, 7, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    shares = class_matrix(labels, parts) / np.array(sizes)[:, None]
    assert np.abs(shares - 0.1).max() < 0.08  # every client sees roughly the global mix


def max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    m = class_matrix(labels, [p for p in parts if len(p)])
    return float((m.max(axis=1) / m.sum(axis=1)).mean())


def classes_for_90_percent(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    m = class_matrix(labels, [p for p in parts if len(p)])
    shares = -np.sort(-m / m.sum(axis=1, keepdims=True), axis=1)
    return float((np.cumsum(shares, axis=1) < 0.9).sum(axis=1).mean() + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_small_alpha_is_far_more_skewed_than_large_alpha(seed: int) -> None:
    labels = balanced_labels(per_class=400, seed=seed)
    skewed = partition_dirichlet(labels, 20, 0.05, np.random.default_rng(seed))
    flat = partition_dirichlet(labels, 20, 100.0, np.random.default_rng(seed))
    # Dir(0.05) gives each class to one or two clients: a client is mostly one class.
    assert max_class_share(labels, skewed) > 0.7
    assert classes_for_90_percent(labels, skewed) < 2.5
    # Dir(100) spreads every class evenly: shares stay near 1/10 and ~9 classes hold 90%.
    assert max_class_share(labels, flat) < 0.25
    assert classes_for_90_percent(labels, flat) > 8


def test_dirichlet_skew_decreases_with_alpha() -> None:
    labels = balanced_labels(per_class=400)
    shares = [
        np.mean(
            [
                max_class_share(labels, partition_dirichlet(labels, 20, a, np.random.default_rng(s)))
                for s in range(3)
            ]
        )
        for a in (0.05, 0.5, 5.0, 100.0)
    ]
    assert shares == sorted(shares, reverse=True)


def test_dirichlet_client_sizes_are_unequal() -> None:
    labels = balanced_labels(per_class=400)
    sizes = [len(p) for p in partition_dirichlet(labels, 20, 0.5, np.random.default_rng(0))]
    assert max(sizes) > 2 * min(sizes)


def test_dirichlet_min_client_size_is_respected() -> None:
    labels = balanced_labels(per_class=100)
    parts = partition_dirichlet(labels, 10, 0.3, np.random.default_rng(3), min_client_size=40)
    assert_exact_cover(parts, len(labels), 10)
    assert min(len(p) for p in parts) >= 40


def test_dirichlet_min_client_size_unreachable() -> None:
    labels = balanced_labels(per_class=100)
    with pytest.raises(ParameterError, match=r"min_client_size must be reachable") as excinfo:
        partition_dirichlet(labels, 10, 0.01, np.random.default_rng(0), min_client_size=95, max_tries=20)
    assert (excinfo.value.param, excinfo.value.value) == ("min_client_size", 95)
    # 1000 samples over 10 clients: at most 100 each.
    with pytest.raises(ParameterError, match=r"an int in \[0, 100\]") as excinfo:
        partition_dirichlet(labels, 10, 0.5, np.random.default_rng(0), min_client_size=101)
    assert excinfo.value.param == "min_client_size"


def test_dirichlet_absent_classes_are_allowed() -> None:
    labels = np.repeat([0, 3], 50)
    parts = partition_dirichlet(labels, 4, 1.0, np.random.default_rng(0), num_classes=5)
    assert_exact_cover(parts, 100, 4)


@pytest.mark.parametrize("n_clients", [7, 10, 23, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_dirichlet_equal_sizes_differ_by_at_most_one(n_clients: int, seed: int) -> None:
    labels = long_tail_labels(seed=seed)
    parts = partition_dirichlet_equal(labels, n_clients, 0.5, np.random.default_rng(seed))
    assert_exact_cover(parts, len(labels), n_clients)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_equal_skew_follows_alpha() -> None:
    labels = balanced_labels(per_class=400)
    skewed = partition_dirichlet_equal(labels, 20, 0.1, np.random.default_rng(0))
    flat = partition_dirichlet_equal(labels, 20, 100.0, np.random.default_rng(0))
    assert max_class_share(labels, skewed) > 2 * max_class_share(labels, flat)
    assert classes_for_90_percent(labels, skewed) < classes_for_90_percent(labels, flat) - 3


def test_dirichlet_equal_unreachable_balance_is_a_scenario_error() -> None:
    # One class holds nearly everything: 10 workers cannot each get half the average from
    # near-one-hot Dirichlet draws.
    labels = np.concatenate([np.zeros(990, dtype=np.int64), np.arange(1, 11)])
    with pytest.raises(ParameterError) as excinfo:
        partition_dirichlet_equal(labels, 10, 0.001, np.random.default_rng(0), max_tries=5)
    assert (excinfo.value.param, excinfo.value.value) == ("alpha", 0.001)


@pytest.mark.parametrize("shards_per_client", [1, 2, 3])
def test_shards_clients_see_at_most_their_shard_count_of_classes(shards_per_client: int) -> None:
    # 10 classes x 60 samples; 30 clients x k shards: shard boundaries fall on class boundaries.
    labels = balanced_labels(per_class=60 * shards_per_client)
    parts = partition_shards(labels, 30, shards_per_client, np.random.default_rng(5))
    assert_exact_cover(parts, len(labels), 30)
    n_classes = (class_matrix(labels, parts) > 0).sum(axis=1)
    assert n_classes.max() <= shards_per_client
    assert n_classes.mean() > 0.6 * shards_per_client  # not all shards of one class
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) == 0


def test_shards_more_shards_than_samples() -> None:
    # 6 clients x 2 shards = 12 shards of 10 samples: at most 10 // 6 = 1 shard per client.
    with pytest.raises(ParameterError, match=r"an int in \[1, 1\]") as excinfo:
        partition_shards(np.arange(10) % 2, 6, 2, np.random.default_rng(0))
    assert (excinfo.value.param, excinfo.value.value) == ("shards_per_client", 2)


@pytest.mark.parametrize("kind", PARTITIONS)
def test_bad_client_count(kind: str) -> None:
    with pytest.raises(ValueError, match=r"n_clients must be an int >= 1, got 0"):
        partition(kind, balanced_labels(), 0, np.random.default_rng(0))


def test_bad_alpha() -> None:
    with pytest.raises(ValueError, match=r"alpha"):
        partition("dirichlet", balanced_labels(), 4, np.random.default_rng(0), alpha=0.0)
    with pytest.raises(ValueError, match=r"alpha must be a finite float > 0, got -1.0"):
        partition_dirichlet_equal(balanced_labels(), 4, -1.0, np.random.default_rng(0))


def test_more_clients_than_samples_leaves_empty_clients_in_iid() -> None:
    parts = partition_iid(np.array([0, 1, 0]), 5, np.random.default_rng(0))
    assert_exact_cover(parts, 3, 5)
    assert sorted(len(p) for p in parts) == [0, 0, 1, 1, 1]
