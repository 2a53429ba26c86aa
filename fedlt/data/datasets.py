"""Dataset registry: every dataset loads into plain uint8/float arrays once, then clients index it.

Images stay uint8 ``(N, C, H, W)`` (a quarter of float32's memory) until :func:`to_tensor`
normalises the samples a caller asks for; tabular and synthetic data are float32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlt.errors import ScenarioError
from fedlt.seeding import numpy_rng

__all__ = [
    "DATASET_NAMES",
    "RawDataset",
    "RawSplit",
    "known_train_size",
    "load_dataset",
    "stratified_split",
    "to_tensor",
]

DATASET_NAMES: tuple[str, ...] = (
    "digits",
    "synthetic",
    "cifar10",
    "cifar100",
    "mnist",
    "fashion_mnist",
    "imagefolder",
)

_DIGITS_SIZE = 1797

# name -> (torchvision class name, train size, per-channel mean, per-channel std)
_TORCHVISION: dict[str, tuple[str, int, tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ("CIFAR10", 50000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 50000, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ("MNIST", 60000, (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", 60000, (0.2860,), (0.3530,)),
}


@dataclass(frozen=True)
class RawSplit:
    """One split as arrays: ``x`` uint8 ``(N, C, H, W)`` images or float32 samples, ``y`` int64 ``(N,)``."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class RawDataset:
    """A dataset as loaded: both splits plus what models and :func:`to_tensor` need to know.

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


# --------------------------------------------------------------------------- splits


def _check_test_fraction(test_fraction: float) -> None:
    if not 0 < test_fraction < 1:
        raise ScenarioError("data.test_fraction", test_fraction, "a float in (0, 1)")


def _n_test(n: int, test_fraction: float) -> int:
    # Rounding first keeps e.g. 0.7 * 100 = 70.00000000000001 from becoming 71.
    return min(n - 1, max(1, math.ceil(round(test_fraction * n, 6))))


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into train and test, keeping each class's share in both.

    The test set holds ``ceil(test_fraction * N)`` samples, spread over classes in proportion
    to their size (largest remainders get the leftover samples), so the split sizes depend only
    on ``N`` and ``test_fraction``, which lets :func:`known_train_size` answer without loading.

    Returns
    -------
    tuple of np.ndarray
        Sorted int64 ``(train_indices, test_indices)``.
    """
    _check_test_fraction(test_fraction)
    labels = np.asarray(labels)
    n = len(labels)
    if n < 2:
        raise ScenarioError("data", f"{n} samples", "a dataset with at least 2 samples to split")
    n_test = _n_test(n, test_fraction)
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


# --------------------------------------------------------------------------- loaders


def _load_digits(seed: int, test_fraction: float) -> RawDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, test_fraction, numpy_rng(seed, "digits", "split"))
    x_train = x[train_idx]
    std = float(x_train.std())
    return RawDataset(
        name="digits",
        train=RawSplit(x_train, y[train_idx]),
        test=RawSplit(x[test_idx], y[test_idx]),
        num_classes=10,
        class_names=tuple(str(c) for c in range(10)),
        input_shape=(64,),
        mean=(float(x_train.mean()),),
        std=(std if std > 0 else 1.0,),
    )


def _synthetic_split(
    n: int, num_classes: int, shape: tuple[int, ...], separation: float, rng: np.random.Generator
) -> RawSplit:
    y = rng.integers(0, num_classes, size=n, dtype=np.int64)
    x = rng.standard_normal((n, *shape), dtype=np.float32)
    # Class c is shifted by c * separation * 0.1 on every feature: the class means lie on the
    # all-ones diagonal, 0.1 * separation * sqrt(D) apart, so larger separation is easier.
    shift = (y * (separation * 0.1)).astype(np.float32).reshape((n,) + (1,) * len(shape))
    x += shift
    return RawSplit(x, y)


def _load_synthetic(
    seed: int, n_train: int, n_test: int, num_classes: int, shape: tuple[int, ...], separation: float
) -> RawDataset:
    if n_train < 1:
        raise ScenarioError("data.n_train", n_train, "an int >= 1")
    if n_test < 1:
        raise ScenarioError("data.n_test", n_test, "an int >= 1")
    if num_classes < 2:
        raise ScenarioError("data.num_classes", num_classes, "an int >= 2")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ScenarioError("data.shape", list(shape), "a non-empty list of positive ints")
    if not (separation >= 0 and math.isfinite(separation)):
        raise ScenarioError("data.separation", separation, "a finite float >= 0")
    return RawDataset(
        name="synthetic",
        train=_synthetic_split(
            n_train, num_classes, shape, separation, numpy_rng(seed, "synthetic", "train")
        ),
        test=_synthetic_split(n_test, num_classes, shape, separation, numpy_rng(seed, "synthetic", "test")),
        num_classes=num_classes,
        class_names=tuple(str(c) for c in range(num_classes)),
        input_shape=shape,
        mean=(0.0,),
        std=(1.0,),
    )


def _missing_root(name: str, root: Any) -> ScenarioError:
    return ScenarioError(
        "data.root",
        root,
        f"a folder holding the {name} files torchvision expects",
        hint="Set data.download = true to fetch them, or point data.root at an existing copy.",
    )


def _torchvision_split(name: str, root: str, train: bool, download: bool) -> tuple[RawSplit, tuple[str, ...]]:
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[name][0])
    try:
        ds = cls(root, train=train, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. ..."
        if download:
            raise
        raise _missing_root(name, root) from exc
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    # MNIST-like data is (N, H, W); CIFAR's is (N, H, W, C).
    x = data[:, None, :, :] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    targets = ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else ds.targets
    split = RawSplit(np.ascontiguousarray(x, dtype=np.uint8), np.asarray(targets, dtype=np.int64))
    return split, tuple(str(c) for c in ds.classes)


def _load_torchvision(name: str, root: str | os.PathLike[str] | None, download: bool) -> RawDataset:
    if root is None or (not download and not Path(root).expanduser().is_dir()):
        raise _missing_root(name, root)
    path = str(Path(root).expanduser())
    train, classes = _torchvision_split(name, path, True, download)
    test, _ = _torchvision_split(name, path, False, download)
    _, _, mean, std = _TORCHVISION[name]
    return RawDataset(
        name=name,
        train=train,
        test=test,
        num_classes=len(classes),
        class_names=classes,
        input_shape=tuple(int(s) for s in train.x.shape[1:]),
        mean=mean,
        std=std,
    )


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ScenarioError("data.dataset", name, f"one of {DATASET_NAMES}")


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    test_fraction: float = 0.3,
    cache_dir: str | os.PathLike[str] | None = None,
    n_train: int = 5000,
    n_test: int = 1000,
    num_classes: int = 10,
    shape: tuple[int, ...] = (20,),
    separation: float = 1.0,
    image_size: int | None = None,
) -> RawDataset:
    """Load dataset ``name`` from the registry into arrays.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.
    root : str, optional
        torchvision datasets: the folder holding their files. imagefolder: a folder of class
        subfolders, or a ``.tar``/``.tar.gz``/``.tgz`` archive of one.
    download : bool, default=False
        Let torchvision fetch missing files into ``root``.
    seed : int, default=0
        Seeds generated splits (digits, imagefolder without train/test) and synthetic data.
    test_fraction : float, default=0.3
        Test share where a split has to be generated.
    cache_dir : str, optional
        imagefolder's decode cache (default ``$FEDLT_CACHE`` or ``~/.cache/fedlt``).
    n_train, n_test, num_classes, shape, separation
        synthetic only.
    image_size : int, optional
        imagefolder: resize every image to ``image_size x image_size``.

    Raises
    ------
    ScenarioError
        Unknown name (``data.dataset``), missing files (``data.root``), or bad parameters.
    """
    _check_name(name)
    if name == "digits":
        _check_test_fraction(test_fraction)
        return _load_digits(seed, test_fraction)
    if name == "synthetic":
        return _load_synthetic(seed, n_train, n_test, num_classes, tuple(shape), separation)
    if name == "imagefolder":
        from fedlt.data.imagefolder import load_imagefolder

        return load_imagefolder(
            root, seed=seed, test_fraction=test_fraction, cache_dir=cache_dir, image_size=image_size
        )
    return _load_torchvision(name, root, download)


def known_train_size(name: str, **kwargs: Any) -> int | None:
    """Training-set size of ``name`` without loading it, or None when it is only known after loading.

    Takes the same keyword arguments as :func:`load_dataset` (those it does not need are
    ignored), so a scenario can be checked for "more clients than samples" before any work.
    """
    _check_name(name)
    if name in _TORCHVISION:
        return _TORCHVISION[name][1]
    if name == "digits":
        test_fraction = kwargs.get("test_fraction", 0.3)
        _check_test_fraction(test_fraction)
        return _DIGITS_SIZE - _n_test(_DIGITS_SIZE, test_fraction)
    if name == "synthetic":
        return int(kwargs.get("n_train", 5000))
    return None


def to_tensor(dataset: RawDataset, split: RawSplit, indices: np.ndarray | None = None) -> torch.Tensor:
    """Normalised float32 tensor of ``split.x[indices]`` (all samples when ``indices`` is None).

    uint8 images are scaled to [0, 1] first; then ``(x - mean) / std`` per channel (axis 1) when
    the dataset has per-channel statistics, or with the single scalar otherwise.
    """
    idx = None if indices is None else np.asarray(indices, dtype=np.int64)
    if idx is not None and len(idx) == len(split.x) and np.array_equal(idx, np.arange(len(idx))):
        idx = None  # every sample in order (no long tail applied): skip the gather copy
    x = split.x if idx is None else split.x[idx]
    if not x.flags.writeable:  # torch.from_numpy warns on read-only arrays
        x = x.copy()
    t = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype == np.uint8:
        t = t.to(torch.float32).div_(255.0)
    elif t.dtype != torch.float32 or t.data_ptr() == split.x.__array_interface__["data"][0]:
        t = t.to(torch.float32, copy=True)  # never hand out a view of the dataset's own array
    if all(m == 0 for m in dataset.mean) and all(s == 1 for s in dataset.std):
        return t  # identity statistics (synthetic data): no second full-size pass
    mean = torch.tensor(dataset.mean, dtype=torch.float32)
    std = torch.tensor(dataset.std, dtype=torch.float32)
    if len(dataset.mean) > 1:
        stat_shape = (1, len(dataset.mean)) + (1,) * (t.ndim - 2)
        mean, std = mean.reshape(stat_shape), std.reshape(stat_shape)
    return (t - mean).div_(std)
