"""Class counts and FedLoGe-style local test views that mirror each client's training mix."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt.data.clients import class_counts, client_class_counts, local_test_views


def test_class_counts_all_and_subset() -> None:
    labels = np.array([0, 2, 2, 1, 2, 0])
    assert class_counts(labels, 4).tolist() == [2, 1, 3, 0]
    assert class_counts(labels, 4, np.array([1, 2, 5])).tolist() == [1, 0, 2, 0]
    assert class_counts(labels, 3, np.array([], dtype=np.int64)).tolist() == [0, 0, 0]
    assert class_counts(labels, 4).dtype == np.int64


def test_class_counts_rejects_labels_outside_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_counts(np.array([0, 1, 2]), 2)


def test_client_class_counts_rows() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    m = client_class_counts(
        labels, [np.array([0, 2]), np.array([1, 3, 4, 5]), np.array([], dtype=np.int64)], 3
    )
    assert m.shape == (3, 3)
    assert m.dtype == np.int64
    assert m.tolist() == [[1, 1, 0], [1, 2, 1], [0, 0, 0]]
    assert m.sum() == len(labels)
    assert client_class_counts(labels, [], 3).shape == (0, 3)


def balanced_test_labels(per_class: int = 1000, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(num_classes), per_class))


def rngs(n: int, seed: int = 0) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, k]) for k in range(n)]


def test_view_sizes_follow_the_formula() -> None:
    counts = np.array([[600, 300, 100, 0], [0, 50, 50, 900]])  # N_train = 2000
    test_labels = balanced_test_labels(per_class=1000, num_classes=4)  # N_test = 4000
    views = local_test_views(counts, test_labels, rngs(2))
    got = [np.bincount(test_labels[v], minlength=4).tolist() for v in views]
    # floor(n_kc / 2000 * 4000) = 2 n_kc, capped at the 1000 test samples per class
    assert got == [[1000, 600, 200, 0], [0, 100, 100, 1000]]


def test_view_proportions_mirror_training_mix_and_skip_missing_classes() -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 400, size=(8, 10))
    counts[rng.random(counts.shape) < 0.3] = 0  # each client lacks some classes
    test_labels = balanced_test_labels()
    views = local_test_views(counts, test_labels, rngs(8))
    for k, view in enumerate(views):
        assert view.dtype == np.int64
        assert np.all(np.diff(view) > 0)  # sorted, no repeats
        got = np.bincount(test_labels[view], minlength=10)
        assert np.all(got[counts[k] == 0] == 0)
        expected = counts[k] * len(test_labels) // counts.sum()
        np.testing.assert_array_equal(got, expected)
        train_mix = counts[k] / counts[k].sum()
        view_mix = got / got.sum()
        assert np.abs(train_mix - view_mix).max() < 0.02


def test_views_are_deterministic_per_rng_and_differ_across_seeds() -> None:
    counts = np.array([[100, 200, 300], [50, 0, 10]])
    test_labels = balanced_test_labels(per_class=500, num_classes=3)
    a = local_test_views(counts, test_labels, rngs(2, seed=1))
    b = local_test_views(counts, test_labels, rngs(2, seed=1))
    c = local_test_views(counts, test_labels, rngs(2, seed=2))
    for va, vb in zip(a, b, strict=True):
        np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(a[0], c[0])


def test_a_client_view_does_not_depend_on_other_clients_rngs() -> None:
    counts = np.array([[100, 200], [30, 40]])
    test_labels = balanced_test_labels(per_class=300, num_classes=2)
    first = local_test_views(counts, test_labels, [np.random.default_rng(9), np.random.default_rng(1)])
    second = local_test_views(counts, test_labels, [np.random.default_rng(9), np.random.default_rng(2)])
    np.testing.assert_array_equal(first[0], second[0])


def test_empty_client_gets_empty_view() -> None:
    views = local_test_views(np.array([[0, 0], [5, 5]]), np.array([0, 1, 0, 1]), rngs(2))
    assert views[0].tolist() == []
    assert views[0].dtype == np.int64
    assert sorted(views[1].tolist()) == [0, 1, 2, 3]


def test_one_rng_per_client_is_required() -> None:
    with pytest.raises(ValueError, match="one rng per client"):
        local_test_views(np.ones((3, 2), dtype=np.int64), np.array([0, 1]), rngs(2))
