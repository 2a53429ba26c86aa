"""Datasets as loaded: plain arrays (:class:`RawDataset`) and the stratified split loaders share.

Its own module so that loaders (:mod:`fedlt.data.datasets`, :mod:`fedlt.data.imagefolder`) import
these types from one place and never each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RawDataset", "RawSplit", "n_test_samples", "stratified_split"]


@dataclass(frozen=True)
class RawSplit:
    """One split as arrays: ``x`` uint8 ``(N, C, H, W)`` images or float32 samples, ``y`` int64 ``(N,)``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class RawDataset:
    """A dataset as loaded: both splits plus what models and ``to_tensor`` need to know.

    ``mean``/``std`` are per channel for images (on the [0, 1] scale) and a single scalar for
    float data.
    """

    name: str
    train: RawSplit
    test: RawSplit
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def n_test_samples(n: int, test_fraction: float) -> int:
    """Size of the test split :func:`stratified_split` cuts from ``n`` samples: ``ceil(fraction * n)``.

    Clamped to ``[1, n - 1]`` so both splits are non-empty; rounding first keeps e.g.
    ``0.7 * 100 = 70.00000000000001`` from becoming 71.
    """
    return min(n - 1, max(1, math.ceil(round(test_fraction * n, 6))))


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and test, keeping each class's share in both.

    The test set holds :func:`n_test_samples` samples, spread over classes in proportion to their
    size (largest remainders get the leftover samples), so the split sizes depend only on ``N``
    and ``test_fraction``, which lets a dataset's training size be known without loading it.

    Returns
    -------
    tuple of np.ndarray
        Sorted int64 ``(train_indices, test_indices)``.

    Raises
    ------
    ValueError
        ``test_fraction`` outside (0, 1), or fewer than 2 samples.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise ValueError(f"a split needs at least 2 samples, got {n}")
    n_test = n_test_samples(n, test_fraction)
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n_test
    per_class = share // n
    leftover = n_test - int(per_class.sum())
    per_class[np.argsort(-(share % n), kind="stable")[:leftover]] += 1
    test_parts = [
        rng.permutation(np.flatnonzero(labels == c))[:t] for c, t in zip(classes, per_class, strict=True)
    ]
    test = np.sort(np.concatenate(test_parts)).astype(np.int64)
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test).astype(np.int64), test
