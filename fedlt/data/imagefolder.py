"""Any folder (or tar archive) of class subfolders, decoded once and cached as uint8 arrays.

Accepted layouts, found under ``root`` or under a single top-level folder inside it (descended
as long as there is exactly one folder holding further folders)::

    <base>/train/<class>/**/*.jpg and <base>/test/<class>/**/*.jpg   -> the given splits
    <base>/<class>/**/*.jpg                                          -> a seeded stratified split

Archives are streamed with :mod:`tarfile`, never extracted. Decoding 60,000 JPEGs takes
seconds, so the decoded arrays go to an ``.npz`` in the cache folder, keyed by what can change
them (path, size, mtime, ``image_size``); the seeded train/test split and the train-split
channel statistics are computed from the cached arrays at load time, so a new seed or
``test_fraction`` reuses the same decode.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from fedlt.data.datasets import RawDataset, RawSplit, stratified_split
from fedlt.errors import ScenarioError
from fedlt.seeding import numpy_rng

__all__ = ["IMAGE_EXTENSIONS", "default_cache_dir", "load_imagefolder"]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Bump when the cache layout or decoding changes, so stale caches are not read.
_CACHE_VERSION = 1
_ALLOWED_ROOT = "a folder of class subfolders (maybe under train/ and test/) or a .tar/.tar.gz/.tgz of one"


def default_cache_dir() -> Path:
    """``$FEDLT_CACHE`` if set, else ``~/.cache/fedlt``."""
    env = os.environ.get("FEDLT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlt"


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(_ARCHIVE_SUFFIXES)


def _wanted(rel: str) -> bool:
    # Skip hidden files and macOS resource forks (._x.jpg, __MACOSX/) that archives often carry.
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        return False
    return not any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


# --------------------------------------------------------------------------- listing


def _list_directory(root: Path) -> list[tuple[str, int, int]]:
    """``(relative posix path, size, mtime_ns)`` of every image file under ``root``, sorted."""
    # Plain strings rather than Path objects: this runs on every load to key the cache.
    found: list[tuple[str, int, int]] = []
    stack = [""]
    base = str(root)
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(base, rel_dir) if rel_dir else base) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir():
                    stack.append(rel)
                elif _wanted(rel):
                    st = entry.stat()
                    found.append((rel, st.st_size, st.st_mtime_ns))
    found.sort()
    return found


def _clean_member_name(name: str) -> str:
    # "./a/b.jpg" and "/a/b.jpg" both mean "a/b.jpg" for layout purposes.
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".")]
    return "/".join(parts)


def _read_archive(path: Path) -> dict[str, bytes]:
    """Every image member's bytes, streamed in one pass (JPEG bytes are small next to pixels)."""
    members: dict[str, bytes] = {}
    with tarfile.open(path, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            rel = _clean_member_name(member.name)
            if not _wanted(rel):
                continue
            handle = archive.extractfile(member)
            if handle is not None:
                members[rel] = handle.read()
    return members


# --------------------------------------------------------------------------- layout


def _children(paths: Iterable[tuple[str, ...]]) -> set[str]:
    """Names of the sub-folders at this level (images sitting directly here are ignored)."""
    return {parts[0] for parts in paths if len(parts) > 1}


def _below(paths: list[tuple[str, ...]], folder: str) -> list[tuple[str, ...]]:
    return [p[1:] for p in paths if len(p) > 1 and p[0] == folder]


def _find_layout(rels: list[str], root: Path) -> dict[str, list[tuple[str, str]]]:
    """Locate the class folders: ``{"train" and "test", or "all": [(class name, rel path)]}``."""
    paths = [PurePosixPath(r).parts for r in rels]
    prefix: list[str] = []
    while True:
        folders = _children(paths)
        if {"train", "test"} <= folders:
            splits: dict[str, list[tuple[str, str]]] = {}
            for split in ("train", "test"):
                below = _below(paths, split)
                splits[split] = [(p[0], "/".join([*prefix, split, *p])) for p in below if len(p) > 1]
            break
        # Descend through a lone wrapper folder (e.g. "cifar10-jpeg/"), but not into a class folder.
        if len(folders) == 1:
            (only,) = folders
            below = _below(paths, only)
            if _children(below):
                prefix.append(only)
                paths = below
                continue
        splits = {"all": [(p[0], "/".join([*prefix, *p])) for p in paths if len(p) > 1]}
        break
    if not all(splits.values()):
        raise ScenarioError(
            "data.root", str(root), _ALLOWED_ROOT, hint="No image files were found inside class subfolders."
        )
    return splits


# --------------------------------------------------------------------------- decoding


def _decode(
    items: list[tuple[int, str]], read: Callable[[str], bytes | str], image_size: int | None, root: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``(label, rel path)`` items to uint8 NCHW RGB; labels come back as int64."""
    n = len(items)
    x = np.empty((0, 3, 0, 0), dtype=np.uint8)
    first_rel = ""
    for i, (_, rel) in enumerate(items):
        source = read(rel)
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
                rgb = img.convert("RGB")
        except OSError as exc:  # includes PIL.UnidentifiedImageError
            raise ScenarioError(
                "data.root",
                str(root),
                "a folder or archive whose image files all decode",
                hint=f"{rel!r}: {exc}",
            ) from exc
        if image_size is not None and rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.uint8)
        if i == 0:
            x = np.empty((n, 3, *pixels.shape[:2]), dtype=np.uint8)
            first_rel = rel
        elif pixels.shape[:2] != x.shape[2:]:
            raise ScenarioError(
                "data.image_size",
                image_size,
                "an int (pixels per side) when the images differ in size",
                hint=f"{first_rel!r} is {x.shape[3]}x{x.shape[2]} but {rel!r} is "
                f"{pixels.shape[1]}x{pixels.shape[0]}; set data.image_size to resize them all.",
            )
        x[i] = pixels.transpose(2, 0, 1)
    y = np.array([label for label, _ in items], dtype=np.int64)
    return x, y


def _channel_moments(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-image, per-channel sums and sums of squares (int64, exact) for cheap split statistics."""
    n, c = x.shape[:2]
    sums = np.empty((n, c), dtype=np.int64)
    squares = np.empty((n, c), dtype=np.int64)
    for lo in range(0, n, chunk):
        block = x[lo : lo + chunk].reshape(min(chunk, n - lo), c, -1).astype(np.int64)
        sums[lo : lo + chunk] = block.sum(axis=2)
        squares[lo : lo + chunk] = (block * block).sum(axis=2)
    return sums, squares


def _decode_root(root: Path, image_size: int | None) -> dict[str, np.ndarray]:
    """Decode everything under ``root`` into the arrays the cache stores."""
    if _is_archive(root):
        members = _read_archive(root)
        rels = sorted(members)
        read: Callable[[str], bytes | str] = members.__getitem__
    else:
        rels = [rel for rel, _, _ in _list_directory(root)]
        read = lambda rel: str(root / rel)  # noqa: E731
    splits = _find_layout(rels, root)
    class_names = sorted({cls for items in splits.values() for cls, _ in items})
    label = {name: i for i, name in enumerate(class_names)}
    order = ("train", "test") if "train" in splits else ("all",)
    # Train rows first, then test; by path within a split, which also groups rows by class.
    items = [(label[cls], rel) for split in order for cls, rel in sorted(splits[split], key=lambda t: t[1])]
    x, y = _decode(items, read, image_size, root)
    sums, squares = _channel_moments(x)
    n_train = len(splits["train"]) if "train" in splits else -1
    return {
        "version": np.array(_CACHE_VERSION),
        "x": x,
        "y": y,
        "class_names": np.array(class_names, dtype=np.str_),
        "n_train": np.array(n_train),  # -1: no given split, generate one at load time
        "sums": sums,
        "squares": squares,
    }


# --------------------------------------------------------------------------- cache


def _cache_key(root: Path, image_size: int | None) -> str:
    st = root.stat()
    signature: dict[str, object] = {
        "version": _CACHE_VERSION,
        "path": str(root),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "image_size": image_size,
    }
    if root.is_dir():
        # A folder's own mtime misses edits deeper down, so fold in every image file's stat.
        listing = hashlib.sha256(json.dumps(_list_directory(root)).encode()).hexdigest()
        signature["listing"] = listing
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:24]
    return f"imagefolder-{digest}"


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    required = {"version", "x", "y", "class_names", "n_train", "sums", "squares"}
    if not required <= arrays.keys() or int(arrays["version"]) != _CACHE_VERSION:
        return None
    return arrays


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file, then rename) so a concurrent or killed writer leaves no torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared cache should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- public


def _stats(sums: np.ndarray, squares: np.ndarray, pixels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    n = max(1, len(sums)) * pixels
    mean = sums.sum(axis=0) / n / 255.0
    var = squares.sum(axis=0) / n / 255.0**2 - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    std = np.where(std > 0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_imagefolder(
    root: str | os.PathLike[str] | None,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
) -> RawDataset:
    """Load an image-folder dataset (folder or tar archive), decoding it only on the first call.

    Parameters
    ----------
    root : str or path
        Folder or ``.tar``/``.tar.gz``/``.tgz`` archive; see the module docstring for layouts.
    seed : int, default=0
        Seeds the stratified split when the data has no ``train/``/``test/`` folders.
    test_fraction : float, default=0.3
        Test share of that generated split.
    cache_dir : str or path, optional
        Where decoded arrays are cached (default :func:`default_cache_dir`).
    image_size : int, optional
        Resize every image to this square size; required when image sizes differ.

    Returns
    -------
    RawDataset
        uint8 RGB ``(N, 3, H, W)`` splits; class names are the sorted subfolder names (the label
        order); mean/std per channel from the train split.
    """
    if root is None or not Path(root).expanduser().exists():
        raise ScenarioError("data.root", None if root is None else str(root), _ALLOWED_ROOT)
    path = Path(root).expanduser().resolve()
    if not (path.is_dir() or _is_archive(path)):
        raise ScenarioError("data.root", str(root), _ALLOWED_ROOT)
    if image_size is not None and image_size < 1:
        raise ScenarioError("data.image_size", image_size, "an int >= 1 or unset")
    if not 0 < test_fraction < 1:
        raise ScenarioError("data.test_fraction", test_fraction, "a float in (0, 1)")

    cache_file = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache_file / f"{_cache_key(path, image_size)}.npz"
    arrays = _read_cache(cache_file) if cache_file.is_file() else None
    if arrays is None:
        arrays = _decode_root(path, image_size)
        _write_cache(cache_file, arrays)

    x, y = arrays["x"], arrays["y"]
    n_train = int(arrays["n_train"])
    if n_train >= 0:  # given train/ and test/: train rows come first, so both are views
        train_idx, test_idx = np.arange(n_train), np.arange(n_train, len(y))
        train, test = RawSplit(x[:n_train], y[:n_train]), RawSplit(x[n_train:], y[n_train:])
    else:
        train_idx, test_idx = stratified_split(y, test_fraction, numpy_rng(seed, "imagefolder", "split"))
        train, test = RawSplit(x[train_idx], y[train_idx]), RawSplit(x[test_idx], y[test_idx])
    mean, std = _stats(arrays["sums"][train_idx], arrays["squares"][train_idx], x.shape[2] * x.shape[3])
    class_names = tuple(str(c) for c in arrays["class_names"])
    return RawDataset(
        name="imagefolder",
        train=train,
        test=test,
        num_classes=len(class_names),
        class_names=class_names,
        input_shape=tuple(int(s) for s in x.shape[1:]),
        mean=mean,
        std=std,
    )
