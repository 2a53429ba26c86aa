"""Long-tail profiles: the CIFAR-LT numbers every paper reports, and exact subsampling."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt.data.longtail import (
    PROFILES,
    exponential_counts,
    long_tail_counts,
    step_counts,
    subsample_long_tail,
)


def test_cifar10_if100_counts_match_reference_list() -> None:
    counts = exponential_counts(5000, 10, 100)
    assert counts.dtype == np.int64
    assert counts.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize(
    ("n_max", "num_classes", "imbalance_factor", "total"),
    [
        (5000, 10, 100, 12406),
        (5000, 10, 50, 13996),
        (5000, 10, 10, 20431),
        (500, 100, 100, 10847),
        (500, 100, 50, 12608),
        (500, 100, 10, 19573),
    ],
)
def test_cifar_lt_totals(n_max: int, num_classes: int, imbalance_factor: float, total: int) -> None:
    counts = exponential_counts(n_max, num_classes, imbalance_factor)
    assert counts.sum() == total
    assert counts[0] == n_max
    assert counts[-1] == n_max // imbalance_factor
    assert np.all(np.diff(counts) <= 0)


def test_exact_powers_are_not_lost_to_rounding() -> None:
    # 8^(-1/3) = 1/2 exactly; a naive floor of the float product could give 2499.
    assert exponential_counts(5000, 4, 8).tolist() == [5000, 2500, 1250, 625]


def test_imbalance_factor_one_is_flat() -> None:
    assert exponential_counts(300, 7, 1).tolist() == [300] * 7
    assert step_counts(300, 7, 1).tolist() == [300] * 7


def test_single_class_keeps_n_max() -> None:
    assert exponential_counts(42, 1, 100).tolist() == [42]


def test_step_profile() -> None:
    assert step_counts(5000, 10, 100).tolist() == [5000] * 5 + [50] * 5
    # floor(0.3 * 10) = 3 minority classes at the end.
    assert step_counts(1000, 10, 10, fraction_minority=0.3).tolist() == [1000] * 7 + [100] * 3
    assert step_counts(1000, 5, 10, fraction_minority=0.5).tolist() == [1000] * 3 + [100] * 2


@pytest.mark.parametrize("bad", [0.5, 0.0, -3.0, float("nan"), float("inf")])
def test_imbalance_factor_below_one_is_a_value_error(bad: float) -> None:
    with pytest.raises(ValueError, match=r"imbalance_factor must be a finite float >= 1"):
        exponential_counts(5000, 10, bad)
    with pytest.raises(ValueError, match=r"imbalance_factor"):
        step_counts(5000, 10, bad)
    with pytest.raises(ValueError, match=r"imbalance_factor"):
        long_tail_counts(np.full(10, 50), "exponential", imbalance_factor=bad)


def test_registry_declares_each_profile_and_its_parameters() -> None:
    assert PROFILES.names == ("none", "exponential", "step")
    assert PROFILES["none"].takes == ()
    assert PROFILES["exponential"].defaults() == {"imbalance_factor": 1.0, "n_max": None}
    assert PROFILES["step"].defaults() == {"imbalance_factor": 1.0, "n_max": None, "fraction_minority": 0.5}


def test_long_tail_counts_rejects_parameters_the_profile_does_not_take() -> None:
    with pytest.raises(ValueError, match="imbalance_factor"):
        long_tail_counts(np.full(3, 10), "none", imbalance_factor=10)
    with pytest.raises(ValueError, match="fraction_minority"):
        long_tail_counts(np.full(3, 10), "exponential", fraction_minority=0.2)


def test_long_tail_counts_profiles() -> None:
    available = np.full(10, 5000)
    assert long_tail_counts(available, "none").tolist() == available.tolist()
    assert (
        long_tail_counts(available, "exponential", imbalance_factor=100).tolist()
        == exponential_counts(5000, 10, 100).tolist()
    )
    assert long_tail_counts(available, "step", imbalance_factor=100).tolist() == [5000] * 5 + [50] * 5
    # The default imbalance factor 1 is flat.
    assert long_tail_counts(available, "exponential").tolist() == available.tolist()
    assert long_tail_counts(available, "exponential", imbalance_factor=100, n_max=500).tolist() == [
        500,
        299,
        179,
        107,
        64,
        38,
        23,
        13,
        8,
        5,
    ]


def test_long_tail_counts_caps_at_available() -> None:
    available = np.array([100, 10, 80, 3])
    counts = long_tail_counts(available, "exponential", imbalance_factor=10)
    assert np.all(counts <= available)
    assert counts.tolist() == [100, 10, 21, 3]


def test_none_returns_a_copy() -> None:
    available = np.array([5, 6, 7])
    counts = long_tail_counts(available, "none")
    counts[0] = 0
    assert available[0] == 5


def test_unknown_profile() -> None:
    with pytest.raises(
        ValueError, match=r"unknown long-tail profile 'linear'; known: none, exponential, step"
    ):
        long_tail_counts(np.array([10, 10]), "linear")


def _labels(rng_seed: int = 0) -> np.ndarray:
    return np.random.default_rng(rng_seed).permutation(np.repeat(np.arange(5), 200))


def test_subsample_keeps_exactly_the_counts() -> None:
    labels = _labels()
    counts = exponential_counts(200, 5, 20)
    kept = subsample_long_tail(labels, counts, np.random.default_rng(1))
    assert kept.dtype == np.int64
    assert np.all(np.diff(kept) > 0)  # sorted, no duplicates
    assert np.bincount(labels[kept], minlength=5).tolist() == counts.tolist()


def test_subsample_is_deterministic_and_seed_dependent() -> None:
    labels = _labels()
    counts = np.array([100, 50, 25, 12, 6])
    a = subsample_long_tail(labels, counts, np.random.default_rng(7))
    b = subsample_long_tail(labels, counts, np.random.default_rng(7))
    c = subsample_long_tail(labels, counts, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_subsample_rejects_more_than_available() -> None:
    labels = np.array([0, 0, 1])
    with pytest.raises(ValueError, match="class 1 has 1 samples"):
        subsample_long_tail(labels, np.array([2, 2]), np.random.default_rng(0))
