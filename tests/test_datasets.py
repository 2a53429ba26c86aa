"""Dataset registry: digits, synthetic, torchvision loaders (on fake local copies) and imagefolder."""

from __future__ import annotations

import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fedlt.data.imagefolder as imagefolder
from fedlt.base.registry import ParameterError
from fedlt.data.datasets import (
    DATASET_NAMES,
    DATASETS,
    RawDataset,
    RawSplit,
    estimate_bytes,
    known_train_size,
    load_dataset,
    stratified_split,
    to_tensor,
)
from fedlt.data.imagefolder import ImageFolderError

# --------------------------------------------------------------------------- registry


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; known: digits, synthetic, cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown dataset"):
        known_train_size("imagenet")


def test_parameters_a_dataset_does_not_take_are_refused() -> None:
    with pytest.raises(ValueError, match="n_train"):
        load_dataset("digits", n_train=10)
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")  # root is required


def test_registry_declares_each_datasets_parameters() -> None:
    assert {name: DATASETS[name].takes for name in DATASETS} == {
        "digits": ("test_fraction",),
        "synthetic": ("n_train", "n_test", "num_classes", "shape", "separation"),
        "cifar10": ("root", "download"),
        "cifar100": ("root", "download"),
        "mnist": ("root", "download"),
        "fashion_mnist": ("root", "download"),
        "imagefolder": (
            "root",
            "test_fraction",
            "cache_dir",
            "image_size",
            "max_image_bytes",
            "max_total_bytes",
            "max_decoded_bytes",
            "max_members",
            "max_expansion",
        ),
    }
    caps = DATASETS["imagefolder"].defaults()
    assert (caps["max_image_bytes"], caps["max_total_bytes"], caps["max_decoded_bytes"]) == (
        64 * 2**20,
        8 * 2**30,
        16 * 2**30,
    )


def test_estimate_bytes_counts_arrays_and_tensors() -> None:
    # synthetic: (n_train + n_test) x prod(shape) float32 values, plus the float32 tensors built from them.
    assert estimate_bytes("synthetic", n_train=100, n_test=20, shape=[3, 4, 5]) == 120 * 60 * 8
    assert estimate_bytes("synthetic") == (5000 + 1000) * 20 * 8  # the registered defaults
    # CIFAR-10: 60,000 uint8 images of 3 x 32 x 32, plus their float32 tensors.
    assert estimate_bytes("cifar10", root="x") == 60000 * 3072 * 5
    assert estimate_bytes("mnist", root="x") == 70000 * 784 * 5
    assert estimate_bytes("imagefolder", root="x") is None  # known only after listing the images


def test_known_train_size() -> None:
    assert known_train_size("cifar10") == 50000
    assert known_train_size("cifar100") == 50000
    assert known_train_size("mnist") == 60000
    assert known_train_size("fashion_mnist") == 60000
    assert known_train_size("synthetic", n_train=123, n_test=5) == 123
    assert known_train_size("synthetic") == 5000
    assert known_train_size("imagefolder", root="/nowhere") is None
    for fraction in (0.3, 0.25, 0.1, 0.5):
        assert known_train_size("digits", test_fraction=fraction) == len(
            load_dataset("digits", test_fraction=fraction).train
        )


# --------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_seeded() -> None:
    ds = load_dataset("digits", seed=3, test_fraction=0.3)
    assert ds.name == "digits"
    assert ds.num_classes == 10
    assert ds.input_shape == (64,)
    assert ds.class_names == tuple("0123456789")
    assert ds.train.x.dtype == np.float32 and ds.train.x.shape == (1257, 64)
    assert ds.test.x.shape == (540, 64)
    assert ds.train.y.dtype == np.int64
    assert ds.train.x.min() >= 0.0 and ds.train.x.max() <= 1.0
    train_share = np.bincount(ds.train.y) / len(ds.train)
    test_share = np.bincount(ds.test.y) / len(ds.test)
    assert np.abs(train_share - test_share).max() < 0.01
    assert ds.mean[0] == pytest.approx(float(ds.train.x.mean()))
    assert ds.std[0] == pytest.approx(float(ds.train.x.std()))

    again = load_dataset("digits", seed=3, test_fraction=0.3)
    other = load_dataset("digits", seed=4, test_fraction=0.3)
    np.testing.assert_array_equal(ds.train.x, again.train.x)
    assert not np.array_equal(ds.train.x, other.train.x)
    # Train and test together are the whole bundled set, each sample once.
    joined = np.concatenate([ds.train.x, ds.test.x])
    assert len(np.unique(joined, axis=0)) == len(
        np.unique(other.train.x.tolist() + other.test.x.tolist(), axis=0)
    )


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"test_fraction"):
        load_dataset("digits", test_fraction=fraction)
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\)"):
        stratified_split(np.arange(10) % 2, fraction, np.random.default_rng(0))


def test_stratified_split_sizes_and_cover() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = stratified_split(labels, 0.25, np.random.default_rng(0))
    assert len(test) == 25
    # 25 * [50, 30, 20] / 100 = [12.5, 7.5, 5]: floors [12, 7, 5], the spare one to the first tie.
    assert np.bincount(labels[test]).tolist() == [13, 7, 5]
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    assert train.dtype == test.dtype == np.int64


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_determinism() -> None:
    kw = {"n_train": 300, "n_test": 100, "num_classes": 4, "shape": (3, 8, 8), "seed": 5}
    ds = load_dataset("synthetic", **kw)
    assert ds.train.x.shape == (300, 3, 8, 8) and ds.train.x.dtype == np.float32
    assert ds.test.x.shape == (100, 3, 8, 8)
    assert ds.train.y.dtype == np.int64 and set(np.unique(ds.train.y)) == {0, 1, 2, 3}
    assert ds.input_shape == (3, 8, 8)
    assert (ds.mean, ds.std) == ((0.0,), (1.0,))
    np.testing.assert_array_equal(ds.train.x, load_dataset("synthetic", **kw).train.x)
    assert not np.array_equal(ds.train.x, load_dataset("synthetic", **{**kw, "seed": 6}).train.x)
    assert not np.array_equal(ds.train.x[:100], ds.test.x)


def _nearest_mean_accuracy(ds: RawDataset) -> float:
    means = np.stack(
        [ds.train.x[ds.train.y == c].reshape(-1, *ds.input_shape).mean(0) for c in range(ds.num_classes)]
    )
    flat_test = ds.test.x.reshape(len(ds.test), -1)
    dists = ((flat_test[:, None, :] - means.reshape(ds.num_classes, -1)[None]) ** 2).sum(-1)
    return float((dists.argmin(1) == ds.test.y).mean())


def test_synthetic_separation_makes_it_easier() -> None:
    kw = {"n_train": 1000, "n_test": 500, "num_classes": 5, "shape": (20,), "seed": 0}
    hard = _nearest_mean_accuracy(load_dataset("synthetic", separation=0.5, **kw))
    easy = _nearest_mean_accuracy(load_dataset("synthetic", separation=12.0, **kw))
    assert easy > hard + 0.3
    assert easy > 0.95


def test_synthetic_cifar_sized_is_fast_enough() -> None:
    ds = load_dataset("synthetic", n_train=2000, n_test=10, shape=(3, 32, 32))
    assert ds.train.x.shape == (2000, 3, 32, 32)


def test_synthetic_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"shape"):
        load_dataset("synthetic", shape=(3, 0))


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist", "fashion_mnist"])
def test_missing_root_is_a_parameter_error(name: str, tmp_path: Path) -> None:
    for root in (str(tmp_path / "absent"), str(tmp_path)):  # missing, empty
        with pytest.raises(ParameterError) as excinfo:
            load_dataset(name, root=root)
        assert (excinfo.value.param, excinfo.value.value) == ("root", root)
        assert f"the {name} files torchvision expects" in str(excinfo.value)
        assert "data.download = true" in str(excinfo.value)


def _write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_from_a_tiny_local_copy(name: str, folder: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    images = {"train": rng.integers(0, 256, (12, 28, 28)), "t10k": rng.integers(0, 256, (5, 28, 28))}
    labels = {"train": np.arange(12) % 10, "t10k": np.arange(5)}
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split])
    ds = load_dataset(name, root=str(tmp_path))
    assert ds.train.x.shape == (12, 1, 28, 28) and ds.train.x.dtype == np.uint8
    np.testing.assert_array_equal(ds.train.x[:, 0], images["train"])
    np.testing.assert_array_equal(ds.test.y, labels["t10k"])
    assert ds.train.y.dtype == np.int64
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert ds.mean == ((0.1307,) if name == "mnist" else (0.2860,))


class _FakeCifar:
    """Stands in for torchvision's CIFAR classes: NHWC uint8 data, list targets."""

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        if not (Path(root) / "fake-cifar").is_dir():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        n = 6 if train else 4
        self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3).astype(np.uint8)
        self.targets = [i % 3 for i in range(n)]
        self.classes = ["a", "b", "c"]


def test_cifar_layout_becomes_nchw(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCifar)
    with pytest.raises(ParameterError, match=r"root must be a folder holding the cifar10 files"):
        load_dataset("cifar10", root=str(tmp_path))
    (tmp_path / "fake-cifar").mkdir()
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.train.x.shape == (6, 3, 32, 32) and ds.test.x.shape == (4, 3, 32, 32)
    assert ds.train.x.flags.c_contiguous
    reference = _FakeCifar(str(tmp_path)).data
    np.testing.assert_array_equal(ds.train.x[2, 1], reference[2, :, :, 1])
    assert ds.train.y.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.class_names == ("a", "b", "c") and ds.num_classes == 3
    assert ds.mean == (0.4914, 0.4822, 0.4465)


# --------------------------------------------------------------------------- to_tensor


def test_to_tensor_normalises_images_per_channel() -> None:
    x = np.zeros((2, 3, 2, 2), dtype=np.uint8)
    x[:, 1] = 255
    x[1, 2] = 51
    split = RawSplit(x, np.array([0, 1]))
    ds = RawDataset("t", split, split, 2, ("a", "b"), (3, 2, 2), (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
    t = to_tensor(ds, split)
    assert t.dtype == torch.float32 and t.shape == (2, 3, 2, 2)
    assert torch.allclose(t[:, 0], torch.zeros(2, 2, 2))
    assert torch.allclose(t[:, 1], torch.ones(2, 2, 2))
    assert torch.allclose(t[0, 2], torch.full((2, 2), -2.0))
    assert torch.allclose(t[1, 2], torch.zeros(2, 2), atol=1e-6)
    picked = to_tensor(ds, split, np.array([1]))
    assert picked.shape == (1, 3, 2, 2) and torch.allclose(picked[0], t[1])


def test_to_tensor_scalar_stats_and_no_mutation() -> None:
    x = np.array([[1.0, 3.0], [5.0, 7.0]], dtype=np.float32)
    split = RawSplit(x, np.array([0, 1]))
    ds = RawDataset("t", split, split, 2, ("a", "b"), (2,), (4.0,), (2.0,))
    t = to_tensor(ds, split)
    assert torch.allclose(t, torch.tensor([[-1.5, -0.5], [0.5, 1.5]]))
    assert x[0, 0] == 1.0  # the dataset's array is untouched
    readonly = x.copy()
    readonly.flags.writeable = False
    assert torch.allclose(to_tensor(ds, RawSplit(readonly, split.y)), t)


def test_to_tensor_identity_stats_never_aliases_the_dataset() -> None:
    # Synthetic data has mean 0 / std 1: the fast path skips normalising, but the tensor must
    # still be a copy, or training code writing into it would corrupt the dataset.
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    split = RawSplit(x, np.array([0, 1, 0]))
    ds = RawDataset("t", split, split, 2, ("a", "b"), (2,), (0.0,), (1.0,))
    for indices in (None, np.arange(3), np.array([2, 0])):
        t = to_tensor(ds, split, indices)
        assert torch.equal(t, torch.from_numpy(x if indices is None else x[indices]))
        t.fill_(-1.0)
        assert x[0, 0] == 0.0 and x[2, 1] == 5.0


def test_to_tensor_digits_is_standardised() -> None:
    ds = load_dataset("digits")
    t = to_tensor(ds, ds.train)
    assert abs(float(t.mean())) < 1e-4
    assert float(t.std()) == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- imagefolder

CLASSES = ("cat", "dog", "zebra")


def _save(path: Path, value: int, size: int = 8, mode: str = "RGB", fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        img = Image.fromarray(np.full((size, size), value, dtype=np.uint8), mode="L")
    else:
        pixels = np.zeros((size, size, 3), dtype=np.uint8)
        pixels[..., 0] = value
        pixels[..., 1] = 255 - value
        pixels[..., 2] = 7
        img = Image.fromarray(pixels)
    img.save(path, format=fmt)


def _make_split_tree(base: Path, per_class: dict[str, int]) -> None:
    """base/<split>/<class>/<i>.png, red channel = 10 * class index + i (per split offset)."""
    for split, n in per_class.items():
        offset = 0 if split == "train" else 100
        for c, name in enumerate(CLASSES):
            for i in range(n):
                _save(base / split / name / f"{i:03d}.png", offset + 10 * c + i)


def _tar(source: Path, archive: Path, mode: str) -> Path:
    with tarfile.open(archive, mode) as tar:
        tar.add(source, arcname=source.name)
    return archive


def _load(root: Path, cache: Path, **kw) -> RawDataset:
    return load_dataset("imagefolder", root=str(root), cache_dir=str(cache), **kw)


def test_imagefolder_train_test_folders(tmp_path: Path) -> None:
    base = tmp_path / "data" / "wrapper"
    _make_split_tree(base, {"train": 4, "test": 2})
    (base / "train" / "cat" / "notes.txt").write_text("not an image")
    _save(base / "train" / "dog" / ".hidden.png", 0)
    ds = _load(tmp_path / "data", tmp_path / "cache")  # descends through the lone wrapper folder
    assert ds.name == "imagefolder"
    assert ds.class_names == CLASSES and ds.num_classes == 3
    assert ds.input_shape == (3, 8, 8)
    assert ds.train.x.shape == (12, 3, 8, 8) and ds.train.x.dtype == np.uint8
    assert ds.test.x.shape == (6, 3, 8, 8)
    assert ds.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test.y.tolist() == [0, 0, 1, 1, 2, 2]
    # Pixels decode exactly (PNG) and land with their label: red = 10 * label + i.
    assert ds.train.x[:, 0, 0, 0].tolist() == [10 * c + i for c in range(3) for i in range(4)]
    assert ds.test.x[:, 0, 0, 0].tolist() == [100 + 10 * c + i for c in range(3) for i in range(2)]
    assert np.all(ds.train.x[:, 2] == 7)
    red = ds.train.x[:, 0].astype(float).mean() / 255
    assert ds.mean[0] == pytest.approx(red)
    assert ds.std[2] == 1.0  # a constant channel gets std 1, not 0


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tgz"])
def test_imagefolder_archive_matches_folder(tmp_path: Path, suffix: str) -> None:
    base = tmp_path / "set"
    _make_split_tree(base, {"train": 3, "test": 2})
    mode = "w" if suffix == ".tar" else "w:gz"
    archive = _tar(base, tmp_path / f"set{suffix}", mode)
    from_dir = _load(base, tmp_path / "cache")
    from_tar = _load(archive, tmp_path / "cache")
    np.testing.assert_array_equal(from_dir.train.x, from_tar.train.x)
    np.testing.assert_array_equal(from_dir.test.y, from_tar.test.y)
    assert from_dir.class_names == from_tar.class_names
    assert from_dir.mean == from_tar.mean


def test_imagefolder_generated_split_is_stratified_and_seeded(tmp_path: Path) -> None:
    for c, name in enumerate(CLASSES):
        for i in range(10):
            _save(tmp_path / "flat" / name / f"{i}.png", 10 * c + i)
    cache = tmp_path / "cache"
    ds = _load(tmp_path / "flat", cache, seed=1, test_fraction=0.2)
    assert len(ds.train) == 24 and len(ds.test) == 6
    assert np.bincount(ds.test.y).tolist() == [2, 2, 2]
    # Each image keeps its label: red // 10 is the class index.
    assert np.all(ds.train.x[:, 0, 0, 0] // 10 == ds.train.y)
    same = _load(tmp_path / "flat", cache, seed=1, test_fraction=0.2)
    other = _load(tmp_path / "flat", cache, seed=2, test_fraction=0.2)
    np.testing.assert_array_equal(ds.test.x, same.test.x)
    assert not np.array_equal(ds.test.x, other.test.x)
    # One decode serves every seed.
    assert len(list(cache.glob("*.npz"))) == 1


def test_imagefolder_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "set"
    _make_split_tree(base, {"train": 2, "test": 1})
    archive = _tar(base, tmp_path / "set.tar.gz", "w:gz")
    cache = tmp_path / "cache"
    first = _load(archive, cache)
    assert [p.suffix for p in cache.iterdir()] == [".npz"]  # no temp files left behind

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(imagefolder, "_decode_root", no_decoding)
    cached = _load(archive, cache)
    np.testing.assert_array_equal(first.train.x, cached.train.x)
    assert cached.mean == first.mean and cached.class_names == first.class_names

    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        _load(archive, cache)
    with pytest.raises(AssertionError, match="decoded again"):
        _load(archive, cache, image_size=4)


def test_imagefolder_folder_cache_sees_added_files(tmp_path: Path) -> None:
    base = tmp_path / "set"
    _make_split_tree(base, {"train": 2, "test": 1})
    cache = tmp_path / "cache"
    assert len(_load(base, cache).train) == 6
    _save(base / "train" / "cat" / "extra.png", 3)
    assert len(_load(base, cache).train) == 7


def test_imagefolder_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    base = tmp_path / "set"
    _make_split_tree(base, {"train": 2, "test": 1})
    cache = tmp_path / "cache"
    _load(base, cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"garbage")
    assert len(_load(base, cache).train) == 6


def test_imagefolder_default_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "set"
    _make_split_tree(base, {"train": 1, "test": 1})
    monkeypatch.setenv("FEDLT_CACHE", str(tmp_path / "envcache"))
    load_dataset("imagefolder", root=str(base))
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1


def test_imagefolder_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    base = tmp_path / "mixed"
    _save(base / "a" / "0.png", 10, size=8)
    _save(base / "a" / "1.png", 20, size=8)
    _save(base / "b" / "0.png", 30, size=12)
    _save(base / "b" / "1.jpg", 40, size=6, fmt="JPEG")
    _save(base / "b" / "2.png", 50, size=8, mode="L")
    with pytest.raises(ImageFolderError, match=r"data\.image_size") as excinfo:
        _load(base, tmp_path / "cache")
    assert excinfo.value.key == "data.image_size"
    ds = _load(base, tmp_path / "cache", image_size=5, test_fraction=0.4)
    assert ds.input_shape == (3, 5, 5)
    assert len(ds.train) + len(ds.test) == 5
    # Grayscale becomes RGB with equal channels.
    gray = np.concatenate([ds.train.x, ds.test.x])[np.concatenate([ds.train.x, ds.test.x])[:, 0, 2, 2] == 50]
    assert len(gray) == 1 and np.all(gray[0] == 50)


def test_imagefolder_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root"):
        load_dataset("imagefolder", root=None, cache_dir=str(tmp_path))  # root is required
    with pytest.raises(ImageFolderError, match=r"data\.root") as excinfo:
        _load(tmp_path / "absent.tar.gz", tmp_path / "cache")
    assert excinfo.value.key == "data.root"
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ImageFolderError, match="No image files"):
        _load(tmp_path / "empty", tmp_path / "cache")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ImageFolderError, match=r"data\.root"):
        _load(tmp_path / "file.txt", tmp_path / "cache")


def test_dataset_names_cover_the_registry() -> None:
    assert (
        DATASET_NAMES
        == DATASETS.names
        == (
            "digits",
            "synthetic",
            "cifar10",
            "cifar100",
            "mnist",
            "fashion_mnist",
            "imagefolder",
        )
    )


def test_imagefolder_undecodable_file_is_named(tmp_path: Path) -> None:
    base = tmp_path / "set"
    _save(base / "a" / "0.png", 1)
    _save(base / "b" / "0.png", 2)
    (base / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageFolderError, match=r"b/broken\.jpg"):
        _load(base, tmp_path / "cache")


# --------------------------------------------------------------------------- the data a run uses


def _tiny(**stream) -> dict:
    return {
        "seed": 4,
        "data": {"dataset": "digits"},
        "partition": {"kind": "iid", "n_clients": 3},
        "stream": stream,
    }


def test_shared_schedule_is_one_class_order_for_every_client() -> None:
    from fedlt.data.federated import build_federated_data
    from fedlt.scenario.config import load_scenario

    # All classes disjoint, 2 tasks, i-blurry: the schedule cuts the 10 classes into 5 + 5.
    stream = {"kind": "i-blurry", "n_tasks": 2, "disjoint_percent": 100, "schedule": "shared"}
    data = build_federated_data(load_scenario(_tiny(**stream)))
    assert data.schedule is not None
    first, second = data.schedule.classes(0), data.schedule.classes(1)
    assert len(first) == len(second) == 5 and sorted(first + second) == list(range(10))
    labels = data.y_train_np
    for stream_k in data.streams:
        for task, owned in zip(stream_k.tasks, (first, second), strict=True):
            assert set(labels[task.indices].tolist()) <= set(owned)  # no class before its task
    own = build_federated_data(load_scenario(_tiny(kind="i-blurry", n_tasks=2, disjoint_percent=100)))
    assert own.schedule is None


def test_describe_reports_tasks_settings_and_schedule() -> None:
    from fedlt.data.federated import build_federated_data
    from fedlt.scenario.config import load_scenario

    stream = {"kind": "si-blurry", "n_tasks": 3, "schedule": "shared"}
    data = build_federated_data(load_scenario(_tiny(**stream)))
    info = data.describe()
    assert info["stream"]["schedule"] == "shared" and info["stream"]["n_tasks"] == 3
    assert info["schedule"]["n_tasks"] == 3 and len(info["schedule"]["tasks"]) == 3
    for client in info["clients"]:
        assert len(client["tasks"]) == 3
        assert sum(t["size"] for t in client["tasks"]) == client["n_samples"]
        totals = np.sum([t["class_counts"] for t in client["tasks"]], axis=0)
        assert totals.tolist() == client["class_counts"]  # every sample lands in exactly one task
        assert "indices" not in client
    full = data.describe(with_indices=True)
    for k, client in enumerate(full["clients"]):
        assert client["indices"] == data.client_indices[k].tolist()
        visited = [i for t in client["tasks"] for i in t["indices"]]
        assert visited == data.streams[k].indices.tolist()
    offline = build_federated_data(load_scenario(_tiny())).describe()
    assert "stream" not in offline and "schedule" not in offline and "tasks" not in offline["clients"][0]


def test_more_tasks_than_a_client_has_samples_names_stream_n_tasks() -> None:
    from fedlt.data.federated import build_federated_data
    from fedlt.errors import ScenarioError
    from fedlt.scenario.config import load_scenario

    # iid over 3 clients splits the 1257 training digits into 419 each.
    with pytest.raises(ScenarioError, match="at most 419, the sample count") as excinfo:
        build_federated_data(load_scenario(_tiny(kind="si-blurry", n_tasks=420)))
    assert (excinfo.value.key, excinfo.value.value) == ("stream.n_tasks", 420)
    assert len(build_federated_data(load_scenario(_tiny(kind="si-blurry", n_tasks=419))).streams) == 3


def test_data_that_cannot_fit_in_memory_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedlt.data.federated as federated
    from fedlt.errors import ScenarioError
    from fedlt.scenario.config import load_scenario

    monkeypatch.setattr(federated, "available_memory", lambda: 2**30)  # 1 GiB free
    fits = {"dataset": "synthetic", "n_train": 10000, "n_test": 1000, "shape": [3, 32, 32]}
    federated.check_data_feasible(load_scenario({"data": fits}))  # 11000 x 3072 x 8 B = 0.25 GiB
    big = {**fits, "shape": [3, 64, 64]}  # 11000 x 12288 x 8 B = 1.007 GiB
    with pytest.raises(ScenarioError) as excinfo:
        federated.check_data_feasible(load_scenario({"data": big}))
    assert excinfo.value.key == "data.n_train"
    assert "1.0 GiB of memory available" in str(excinfo.value)
    assert "data.shape [3, 64, 64] need about 1.0 GiB" in str(excinfo.value)


def test_available_memory_is_at_most_the_total() -> None:
    from fedlt.data.federated import available_memory

    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo here")
    total = next(
        int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines() if "MemTotal" in line
    )
    available = available_memory()
    assert available is not None and 0 < available <= total


def test_digits_read_from_the_file_equal_sklearns_load_digits() -> None:
    # fedlt reads sklearn's bundled file without importing sklearn; the data must be identical.
    from sklearn.datasets import load_digits

    from fedlt.data.datasets import digits_arrays

    pixels, labels = digits_arrays()
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(labels, bunch.target)
    assert labels.dtype == np.int64
