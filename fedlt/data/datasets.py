"""Dataset registry: every dataset loads into plain uint8/float arrays once, then clients index it.

:data:`DATASETS` declares each dataset once, with the parameters a scenario may set under
``[data]``; :mod:`fedlt.scenario.config` derives that section from it. Images stay uint8 ``(N, C, H, W)``
(a quarter of float32's memory) until :func:`to_tensor` normalises the samples a caller asks for;
tabular and synthetic data are float32.

Errors are plain: bad arguments are ``ValueError``; a dataset the given ``root`` does not hold is a
:class:`~fedlt.base.registry.ParameterError` naming ``root``, and image-folder problems are
:class:`~fedlt.data.imagefolder.ImageFolderError`. The scenario boundary
(:func:`fedlt.data.federated.build_federated_data`) turns them into scenario errors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, NonNegativeFloat, PositiveInt

from fedlt.base.registry import Entry, ParameterError, Params, Registry
from fedlt.base.seeding import numpy_rng
from fedlt.data.raw import RawDataset, RawSplit, n_test_samples, stratified_split

__all__ = [
    "DATASETS",
    "DATASET_GROUP",
    "DATASET_NAMES",
    "RawDataset",
    "RawSplit",
    "estimate_bytes",
    "known_train_size",
    "load_dataset",
    "stratified_split",
    "to_tensor",
]

_DIGITS_SIZE = 1797
_MIB = 2**20
_GIB = 2**30

# name -> (torchvision class name, train size, test size, sample shape, per-channel mean, std)
_TORCHVISION: dict[str, tuple[str, int, int, tuple[int, ...], tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ("CIFAR10", 50000, 10000, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", 50000, 10000, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ("MNIST", 60000, 10000, (1, 28, 28), (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", 60000, 10000, (1, 28, 28), (0.2860,), (0.3530,)),
}


def _test_fraction() -> Any:
    return Field(
        0.3, gt=0, lt=1, description="Held-out test share (the dataset has no test split of its own)."
    )


# --------------------------------------------------------------------------- parameters


class DigitsParams(Params):
    """``digits``: scikit-learn's bundled 8x8 digits, 1797 samples."""

    test_fraction: float = _test_fraction()


class SyntheticParams(Params):
    """``synthetic``: Gaussian classes whose means lie on the diagonal."""

    n_train: PositiveInt = Field(5000, description="Training samples.")
    n_test: PositiveInt = Field(1000, description="Test samples.")
    num_classes: int = Field(10, ge=2, description="Number of classes.")
    shape: Annotated[list[PositiveInt], Field(min_length=1)] = Field(
        [20], description="Per-sample shape (positive ints), e.g. [3, 32, 32]."
    )
    separation: NonNegativeFloat = Field(
        1.0, allow_inf_nan=False, description="How far apart class means are (larger = easier)."
    )


class TorchvisionParams(Params):
    """``cifar10``/``cifar100``/``mnist``/``fashion_mnist``: torchvision's files in a local folder."""

    root: str = Field(
        description="Local folder holding the files as torchvision stores them. Relative paths are relative "
        "to the scenario file."
    )
    download: bool = Field(False, description="Let torchvision download into `root` when files are missing.")


class ImageFolderParams(Params):
    """``imagefolder``: any folder, or tar archive, of class subfolders."""

    root: str = Field(
        description="A folder of class subfolders (maybe under train/ and test/), or a .tar/.tar.gz/.tgz of "
        "one. Relative paths are relative to the scenario file."
    )
    test_fraction: float = _test_fraction()
    cache_dir: str | None = Field(
        None,
        description="Where decoded arrays are cached (default $FEDLT_CACHE or ~/.cache/fedlt). Relative "
        "paths are relative to the scenario file.",
    )
    image_size: int | None = Field(
        None, gt=0, description="Resize every image to this square size (required when sizes differ)."
    )
    max_image_bytes: PositiveInt = Field(
        64 * _MIB, description="Archives: the largest member read into memory (bytes)."
    )
    max_total_bytes: PositiveInt = Field(
        8 * _GIB, description="Archives: total bytes of image members read into memory."
    )
    max_decoded_bytes: PositiveInt = Field(
        16 * _GIB, description="Decoded pixels in all (width x height x 3 per image, bytes)."
    )
    max_members: PositiveInt = Field(
        10**6,
        description="Archives: members of any kind, counted from their headers before any is read; a "
        "compressed archive also holds at most one per 20 bytes on disk (at least 10,000).",
    )
    max_expansion: PositiveInt = Field(
        100,
        description="Compressed archives: image members may total at most this many times the archive's "
        "size on disk (at least 64 MiB); images are compressed already, so more is a decompression bomb.",
    )


# --------------------------------------------------------------------------- loaders


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (1797, 64) pixel values 0-16 and (1797,) labels.

    Read straight from the file sklearn ships (``sklearn/datasets/data/digits.csv.gz``, what
    ``load_digits`` reads): importing ``sklearn.datasets`` costs 1.7 s of start-up, more than the
    quickstart's rounds. Falls back to ``load_digits`` if a sklearn build lays its data out otherwise.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target.astype(np.int64)


def _load_digits(seed: int, test_fraction: float) -> RawDataset:
    pixels, y = digits_arrays()
    x = (pixels / 16.0).astype(np.float32)
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
    seed: int, n_train: int, n_test: int, num_classes: int, shape: list[int], separation: float
) -> RawDataset:
    dims = tuple(int(s) for s in shape)
    return RawDataset(
        name="synthetic",
        train=_synthetic_split(n_train, num_classes, dims, separation, numpy_rng(seed, "synthetic", "train")),
        test=_synthetic_split(n_test, num_classes, dims, separation, numpy_rng(seed, "synthetic", "test")),
        num_classes=num_classes,
        class_names=tuple(str(c) for c in range(num_classes)),
        input_shape=dims,
        mean=(0.0,),
        std=(1.0,),
    )


def _missing_root(name: str, root: Any) -> ParameterError:
    return ParameterError(
        "root",
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


def _torchvision_loader(name: str) -> Any:
    def load(seed: int, root: str, download: bool) -> RawDataset:
        if not download and not Path(root).expanduser().is_dir():
            raise _missing_root(name, root)
        path = str(Path(root).expanduser())
        train, classes = _torchvision_split(name, path, True, download)
        test, _ = _torchvision_split(name, path, False, download)
        mean, std = _TORCHVISION[name][4:]
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

    return load


def _load_imagefolder(seed: int, root: str, **params: Any) -> RawDataset:
    from fedlt.data.imagefolder import load_imagefolder

    return load_imagefolder(root, seed=seed, **params)


#: The entry-point group where other packages register datasets (docs/extending.md).
DATASET_GROUP = "fedlt.datasets"

#: Every dataset a scenario can name; ``build(seed, **params) -> RawDataset``. Other installed
#: packages add theirs in :data:`DATASET_GROUP` (:meth:`~fedlt.base.registry.Registry.outside`).
DATASETS = Registry(
    "dataset",
    [
        Entry("digits", DigitsParams, "scikit-learn's bundled 8x8 digits (no download).", _load_digits),
        Entry(
            "synthetic", SyntheticParams, "Seeded Gaussian classes of any shape and size.", _load_synthetic
        ),
        *(
            Entry(
                name,
                TorchvisionParams,
                f"torchvision's {cls}, from a local folder.",
                _torchvision_loader(name),
            )
            for name, (cls, *_) in _TORCHVISION.items()
        ),
        Entry(
            "imagefolder",
            ImageFolderParams,
            "Any folder or tar archive of class subfolders, decoded once and cached.",
            _load_imagefolder,
        ),
    ],
    group=DATASET_GROUP,
)

#: The registry's names, in declaration order (derived from :data:`DATASETS`).
DATASET_NAMES: tuple[str, ...] = DATASETS.names


def load_dataset(name: str, *, seed: int = 0, **params: Any) -> RawDataset:
    """Load dataset ``name`` from the registry into arrays.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    seed : int, default=0
        Seeds generated splits (digits, imagefolder without train/test) and synthetic data.
    **params
        The dataset's parameters (see its entry's parameter model); the rest keep their defaults.

    Raises
    ------
    ValueError
        An unknown name, or parameters the dataset does not take or out of range (a
        ``pydantic.ValidationError``).
    ParameterError
        ``root`` does not hold the torchvision dataset; ``dataset`` for an outside builder that returns
        no :class:`RawDataset`.
    OutsideEntryError
        ``name`` is an outside dataset that cannot be used (its package fails to import, ...).
    ImageFolderError
        imagefolder: missing, broken or unsafe input, a cap exceeded, an unwritable cache.
    """
    entry = DATASETS[name]
    raw = entry.build(seed, **dict(entry.params.model_validate(params)))
    what = "a dataset whose builder returns a fedlt.data.raw.RawDataset"
    return DATASETS.check_built(name, raw, RawDataset, "dataset", what)


def _settings(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {**DATASETS[name].defaults(), **params}


def known_train_size(name: str, **params: Any) -> int | None:
    """Training-set size of ``name`` without loading it, or None when it is only known after loading.

    Takes the dataset's parameters (missing ones take their defaults), so a scenario can be checked
    for "more clients than samples" before any work.
    """
    values = _settings(name, params)
    if name in _TORCHVISION:
        return _TORCHVISION[name][1]
    if name == "digits":
        return _DIGITS_SIZE - n_test_samples(_DIGITS_SIZE, values["test_fraction"])
    if name == "synthetic":
        return int(values["n_train"])
    return None


def estimate_bytes(name: str, **params: Any) -> int | None:
    """Host memory loading ``name`` takes, without loading it; None when only the data can tell.

    Counts the arrays as loaded (float32 for digits and synthetic, uint8 for torchvision images) plus
    the float32 tensors :func:`to_tensor` builds from them, which coexist while the data is placed:
    ``samples x prod(sample shape) x (bytes per loaded value + 4)``. Synthetic data needs
    ``(n_train + n_test) x prod(shape) x 8`` bytes. imagefolder sizes are only known after listing
    the images, so it gives None (its own caps bound it).
    """
    values = _settings(name, params)
    if name in _TORCHVISION:
        _, n_train, n_test, shape, _, _ = _TORCHVISION[name]
        return (n_train + n_test) * math.prod(shape) * (1 + 4)
    if name == "digits":
        return _DIGITS_SIZE * 64 * (4 + 4)
    if name == "synthetic":
        n = int(values["n_train"]) + int(values["n_test"])
        return n * math.prod(int(s) for s in values["shape"]) * (4 + 4)
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
