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

Input may be hostile or broken, so nothing is trusted: archive members are size-checked from
their tar headers before they are read (``max_image_bytes``, ``max_total_bytes``), a compressed
archive may expand only ``max_expansion`` times its size on disk (at least 64 MiB) and hold only
so many members (``max_members``, and one per 20 compressed bytes, at least 10,000), decoded
sizes are checked from image headers before decoding (``max_decoded_bytes`` and PIL's
decompression-bomb limit), absolute and ``..`` member names are ignored, truncated archives are
reported rather than half-read, symlinked folders are never walked twice, and only the formats
of :data:`IMAGE_EXTENSIONS` are decoded (PIL would otherwise sniff, e.g., EPS content in a
``.png`` and run Ghostscript on it). Every problem is an :class:`ImageFolderError` naming the
file or member at fault; the data-loading boundary turns it into a ``ScenarioError``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import stat
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from PIL import Image

from fedlt.base.seeding import numpy_rng
from fedlt.base.warn import user_stacklevel
from fedlt.data.raw import RawDataset, RawSplit, stratified_split

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderError",
    "ImageFolderWarning",
    "SymlinkSkippedWarning",
    "UnsafeMemberWarning",
    "default_cache_dir",
    "load_imagefolder",
]

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
# The PIL decoders for those extensions (JPEG covers MPO); nothing else is ever tried.
_PIL_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "PPM", "TIFF", "WEBP")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Bump when the cache layout or decoding changes, so stale caches are not read.
_CACHE_VERSION = 1
_ALLOWED_ROOT = "a folder of class subfolders (maybe under train/ and test/) or a .tar/.tar.gz/.tgz of one"
_ALLOWED_ARCHIVE = "a .tar/.tar.gz/.tgz archive that opens; this one is"
_MIB = 2**20
_GIB = 2**30
#: A compressed archive may always expand to this much, whatever its size on disk.
_EXPANSION_FLOOR = 64 * _MIB
#: Compressed bytes an image member costs at least (the smallest PNG is 67 bytes and does not
#: compress much; an empty member's header gzips to about 5), and the members always allowed.
_BYTES_PER_MEMBER = 20
_MEMBERS_FLOOR = 10_000
#: Leading bytes of the compressed formats tarfile's stream reader unpacks (gzip, bzip2, xz).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zX")


class ImageFolderError(ValueError):
    """Bad or unsafe image-folder input, said so that the loading boundary can name the scenario key.

    Parameters
    ----------
    allowed : str
        What is allowed, phrased to follow "The 'data.root' value must be ...".
    hint : str, optional
        The file or member at fault and how to fix it.
    key : str, default="data.root"
        The scenario key at fault: another one only when it caused the error (a cap, the cache).
    value : object, optional
        The offending value of ``key`` (the root, the cap, the cache folder), when known here.
    """

    def __init__(
        self, allowed: str, hint: str | None = None, *, key: str = "data.root", value: Any = None
    ) -> None:
        self.allowed = allowed
        self.hint = hint
        self.key = key
        self.value = value
        message = f"The {key!r} value must be {allowed}."
        if value is not None:
            message += f" Got {value!r} instead."
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def __reduce__(self):  # picklable (Ray workers) with its attributes, not just the message
        return (_rebuild_error, (self.allowed, self.hint, self.key, self.value))


def _rebuild_error(allowed: str, hint: str | None, key: str, value: Any) -> ImageFolderError:
    return ImageFolderError(allowed, hint, key=key, value=value)


class ImageFolderWarning(UserWarning):
    """Something in the input was skipped or not cached; the data loaded without it."""


class UnsafeMemberWarning(ImageFolderWarning):
    """Archive members with absolute or ``..`` paths were ignored."""


class SymlinkSkippedWarning(ImageFolderWarning):
    """Symlinked folders that would revisit a folder (or loop) were not walked."""


def default_cache_dir() -> Path:
    """``$FEDLT_CACHE`` if set, else ``~/.cache/fedlt``."""
    env = os.environ.get("FEDLT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlt"


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(_ARCHIVE_SUFFIXES)


def _hidden(name: str) -> bool:
    # Hidden files and folders and macOS resource forks (._x.jpg, __MACOSX/) that archives often carry.
    return name.startswith(".") or name == "__MACOSX"


def _wanted(rel: str) -> bool:
    if not rel.lower().endswith(IMAGE_EXTENSIONS):
        return False
    return not any(_hidden(p) for p in rel.split("/"))


def _example(items: list[str]) -> str:
    return f"{len(items)} ({', '.join(repr(i) for i in items[:3])}{', ...' if len(items) > 3 else ''})"


# --------------------------------------------------------------------------- listing


def _list_directory(root: Path) -> list[tuple[str, int, int]]:
    """``(relative posix path, size, mtime_ns)`` of every image file under ``root``, sorted.

    Symlinked folders are followed, except those that lead back into the tree or to a folder
    already walked: those would list images twice or recurse forever, so they are skipped with
    one warning. Image-named entries that are not regular files (FIFOs, devices) are skipped too,
    since reading them could block or never end.
    """
    # Plain strings rather than Path objects: this runs on every load to key the cache.
    found: list[tuple[str, int, int]] = []
    base = str(root)
    root_real = os.path.realpath(base)
    stack = [("", root_real)]
    visited = {root_real}
    revisits: list[str] = []
    special: list[str] = []
    while stack:
        rel_dir, real_dir = stack.pop()
        try:
            with os.scandir(os.path.join(base, rel_dir) if rel_dir else base) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            raise ImageFolderError(
                "a folder whose subfolders can all be read", hint=f"{rel_dir or '.'!r}: {exc}", value=base
            ) from exc
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.is_dir():  # follows symlinks
                if _hidden(entry.name):
                    continue  # nothing under it is wanted (.git, __MACOSX): not walked
                link = entry.is_symlink()
                real = os.path.realpath(entry.path) if link else os.path.join(real_dir, entry.name)
                # The plain walk reaches every non-hidden folder of the tree, so a link to one repeats it.
                into_tree = link and (real == root_real or real.startswith(root_real + os.sep))
                if real in visited or (
                    into_tree and not any(map(_hidden, Path(real).relative_to(root_real).parts))
                ):
                    revisits.append(rel)
                    continue
                visited.add(real)
                stack.append((rel, real))
            elif _wanted(rel):
                try:
                    st = entry.stat()  # follows symlinks: a broken link fails here
                except OSError as exc:
                    raise ImageFolderError(
                        "a folder whose image files can all be read", hint=f"{rel!r}: {exc}", value=base
                    ) from exc
                if stat.S_ISREG(st.st_mode):
                    found.append((rel, st.st_size, st.st_mtime_ns))
                else:
                    special.append(rel)
    if revisits:
        warnings.warn(
            f"Skipped {_example(revisits)} symlinked folder(s) under {base!r} that lead back into the "
            "tree or to a folder already walked (their images would count twice, or never end).",
            SymlinkSkippedWarning,
            stacklevel=user_stacklevel(),
        )
    if special:
        warnings.warn(
            f"Skipped {_example(special)} image-named entries under {base!r} that are not regular files.",
            ImageFolderWarning,
            stacklevel=user_stacklevel(),
        )
    found.sort()
    return found


def _clean_member_name(name: str) -> str:
    # "./a/b.jpg" means "a/b.jpg" for layout purposes.
    parts = [p for p in PurePosixPath(name).parts if p not in ("/", ".")]
    return "/".join(parts)


def _unsafe_member_name(name: str) -> bool:
    """Absolute (``/x``, ``\\x``, ``C:x``) or ``..`` names: never part of a dataset's layout."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        return True
    return ".." in name.replace("\\", "/").split("/")


# Header members tarfile reads whole into memory (pax, GNU long names), so a forged size would allocate.
_META_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


def _guarded_tarinfo(max_header_bytes: int, ends: list[str]) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses oversized metadata headers unread and records how reading ended.

    ``ends`` gets "marker" for a proper end-of-archive block and "cut" for an archive that just
    stops, which tarfile otherwise accepts silently (a tar cut at a member boundary loses the rest).
    """

    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            try:
                return super().fromtarfile(tarfile_)
            except tarfile.EOFHeaderError:
                ends.append("marker")
                raise
            except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
                ends.append("cut")
                raise

        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # tarfile's subclass hook
            if self.type in _META_TYPES and self.size > max_header_bytes:
                raise ImageFolderError(
                    "at least the size of every member the archive makes fedlt read (bytes)",
                    hint=f"A metadata header (pax or GNU long name) at byte {self.offset} declares "
                    f"{self.size} bytes, over the cap of {max_header_bytes} bytes.",
                    key="data.max_image_bytes",
                    value=max_header_bytes,
                )
            return super()._proc_member(tarfile_)

    return GuardedTarInfo


def _archive_error(exc: BaseException, last: str | None, ends: list[str], value: str) -> ImageFolderError:
    """Say whether a failed archive is truncated, corrupt, or not a tar archive at all."""
    detail = f"{type(exc).__name__}: {exc}"
    cut = isinstance(exc, EOFError) or "unexpected end of data" in str(exc) or (ends[-1:] == ["cut"])
    if last is None:
        if isinstance(exc, EOFError):
            return ImageFolderError(
                f"{_ALLOWED_ARCHIVE} truncated",
                hint=f"It ends before its first member ({detail}).",
                value=value,
            )
        return ImageFolderError(
            f"{_ALLOWED_ARCHIVE} not a tar archive", hint=f"tarfile cannot read it ({detail}).", value=value
        )
    if cut:
        return ImageFolderError(
            f"{_ALLOWED_ARCHIVE} truncated",
            hint=f"It ends in or after member {last!r} ({detail}); copy or download it again.",
            value=value,
        )
    return ImageFolderError(
        f"{_ALLOWED_ARCHIVE} corrupt", hint=f"Reading failed after member {last!r} ({detail}).", value=value
    )


def _archive_caps(
    path: Path, magic: bytes, max_total_bytes: int, max_members: int, max_expansion: int
) -> tuple[int, int, str]:
    """The total member bytes and member count ``path`` may yield, and the keys that set them.

    A plain tar holds what it yields, so only the given caps apply. A compressed one is capped in
    proportion to its size on disk: image members are compressed already, so an archive that
    expands more than ``max_expansion`` times, or holds more members than its bytes can encode,
    is a decompression bomb; the floors keep small real datasets well clear of both.
    """
    if not magic.startswith(_COMPRESSED_MAGIC):
        return max_total_bytes, max_members, "data.max_total_bytes"
    size = path.stat().st_size
    by_size = max(_EXPANSION_FLOOR, max_expansion * size)
    members = max(_MEMBERS_FLOOR, size // _BYTES_PER_MEMBER)
    total_key = "data.max_expansion" if by_size < max_total_bytes else "data.max_total_bytes"
    return min(by_size, max_total_bytes), min(members, max_members), total_key


def _cap_error(key: str, cap: int, caps: dict[str, int], hint: str) -> ImageFolderError:
    """A cap exceeded, naming the key to raise; ``caps`` are the keys' values."""
    allowed = {
        "data.max_total_bytes": "at least the total size of the image members (bytes)",
        "data.max_expansion": "at least the archive's expansion (uncompressed over compressed size)",
        "data.max_members": "at least the number of members of the archive",
    }[key]
    return ImageFolderError(allowed, hint=f"{hint} (cap {cap}; not read).", key=key, value=caps[key])


def _read_archive(
    path: Path, max_image_bytes: int, max_total_bytes: int, max_members: int = 10**6, max_expansion: int = 100
) -> dict[str, bytes]:
    """Every image member's bytes, streamed in one pass; sizes are checked from headers before reading.

    A gzip archive is decompressed by :mod:`gzip` (which checks the CRC and notices a cut stream),
    not by tarfile's stream reader (which does neither). The member count and the total are
    checked against :func:`_archive_caps` as each header is read, before its data is.
    """
    value = str(path)
    keys = {"data.max_total_bytes": max_total_bytes, "data.max_members": max_members}
    keys["data.max_expansion"] = max_expansion
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise ImageFolderError(f"{_ALLOWED_ARCHIVE} unreadable", hint=str(exc), value=value) from exc
    members: dict[str, bytes] = {}
    unsafe: list[str] = []
    ends: list[str] = []
    last: str | None = None
    total = 0
    with raw:
        magic = raw.read(4)
        raw.seek(0)
        if not magic:
            raise ImageFolderError(
                f"{_ALLOWED_ARCHIVE} not a tar archive", hint="The file is empty.", value=value
            )
        if magic in (b"PK\x03\x04", b"PK\x05\x06"):
            raise ImageFolderError(
                f"{_ALLOWED_ARCHIVE} not a tar archive",
                hint="It is a zip file: unpack it and give the folder, or repack it as .tar.gz.",
                value=value,
            )
        gzipped = magic[:2] == b"\x1f\x8b"
        caps = _archive_caps(path, magic, max_total_bytes, max_members, max_expansion)
        total_cap, member_cap, total_key = caps
        source: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        tarinfo = _guarded_tarinfo(max_image_bytes, ends)
        count = 0
        try:
            with tarfile.open(fileobj=source, mode="r|" if gzipped else "r|*", tarinfo=tarinfo) as archive:
                for member in archive:
                    last = member.name
                    count += 1
                    if count > member_cap:
                        raise _cap_error(
                            "data.max_members",
                            member_cap,
                            keys,
                            f"{value!r} holds more than {member_cap} members ({path.stat().st_size} bytes "
                            f"on disk allow at most {max_members} and one per {_BYTES_PER_MEMBER} compressed "
                            f"bytes, at least {_MEMBERS_FLOOR})",
                        )
                    if _unsafe_member_name(member.name):
                        unsafe.append(member.name)
                        continue
                    if not member.isfile():
                        continue
                    rel = _clean_member_name(member.name)
                    if not _wanted(rel):
                        continue
                    if member.size > max_image_bytes:
                        raise ImageFolderError(
                            "at least the size of the largest image member (bytes)",
                            hint=f"Member {member.name!r} of {value!r} is {member.size} bytes, over the "
                            f"cap of {max_image_bytes} bytes (not read).",
                            key="data.max_image_bytes",
                            value=max_image_bytes,
                        )
                    if total + member.size > total_cap:
                        why = ""
                        if total_key == "data.max_expansion":
                            why = (
                                f", over {max_expansion} times the archive's {path.stat().st_size} bytes "
                                f"on disk (at least {_EXPANSION_FLOOR})"
                            )
                        raise _cap_error(
                            total_key,
                            total_cap,
                            keys,
                            f"Member {member.name!r} of {value!r} ({member.size} bytes) would bring the "
                            f"total read to {total + member.size} bytes{why}",
                        )
                    handle = archive.extractfile(member)
                    if handle is not None:
                        members[rel] = handle.read()
                        total += len(members[rel])
            if ends[-1:] == ["cut"]:
                where = f"after member {last!r}" if last is not None else "before its first member"
                raise ImageFolderError(
                    f"{_ALLOWED_ARCHIVE} truncated",
                    hint=f"It stops {where} without the end-of-archive marker; copy or download it again.",
                    value=value,
                )
            while gzipped and source.read(_MIB):  # to the end, so gzip checks the length and CRC
                pass
        except ImageFolderError:
            raise
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError) as exc:
            raise _archive_error(exc, last, ends, value) from exc
    if unsafe:
        warnings.warn(
            f"Ignored {_example(unsafe)} member(s) of {value!r} with an absolute or '..' path.",
            UnsafeMemberWarning,
            stacklevel=user_stacklevel(),
        )
    return members


# --------------------------------------------------------------------------- layout


def _children(paths: Iterable[tuple[str, ...]]) -> set[str]:
    """Names of the sub-folders at this level (images sitting directly here are ignored)."""
    return {parts[0] for parts in paths if len(parts) > 1}


def _below(paths: list[tuple[str, ...]], folder: str) -> list[tuple[str, ...]]:
    return [p[1:] for p in paths if len(p) > 1 and p[0] == folder]


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in sorted(names))


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
        raise ImageFolderError(
            _ALLOWED_ROOT, hint="No image files were found inside class subfolders.", value=str(root)
        )
    classes = {split: {cls for cls, _ in items} for split, items in splits.items()}
    found = set().union(*classes.values())
    if len(found) < 2:
        # One class: every prediction is right, and a run would report accuracy 1.0.
        raise ImageFolderError(
            "a folder or .tar/.tar.gz/.tgz of at least 2 class folders",
            hint=f"Found {len(found)}: {_names(found)}; a single class makes every prediction right.",
            value=str(root),
        )
    if "train" in classes and classes["train"] != classes["test"]:
        # A class missing from one split makes its accuracy undefined or untrained; say so, do not guess.
        lacks = [
            f"{split}/ lacks {_names(found - classes[split])}"
            for split in ("train", "test")
            if found - classes[split]
        ]
        raise ImageFolderError(
            "a train/ and test/ layout whose splits hold the same class folders",
            hint="; ".join(lacks) + ".",
            value=str(root),
        )
    return splits


# --------------------------------------------------------------------------- decoding


def _pil_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in _PIL_FORMATS if f in Image.OPEN)


def _bomb_error(
    rel: str, size: tuple[int, int] | None, root: Path, exc: BaseException | None
) -> ImageFolderError:
    limit = Image.MAX_IMAGE_PIXELS
    said = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels" if size else str(exc)
    return ImageFolderError(
        f"a folder or archive whose images are each at most {limit} pixels (PIL's decompression-bomb limit)",
        hint=f"{rel!r} is {said}; it was not decoded.",
        value=str(root),
    )


def _decoded_cap_error(cap: int, hint: str) -> ImageFolderError:
    return ImageFolderError(
        "at least the decoded size of the images (bytes: width x height x 3 each, read from their headers)",
        hint=hint + " Raise data.max_decoded_bytes, or use fewer or smaller images.",
        key="data.max_decoded_bytes",
        value=cap,
    )


def _decode(
    items: list[tuple[int, str]],
    read: Callable[[str], bytes | str],
    image_size: int | None,
    root: Path,
    max_decoded_bytes: int = 16 * _GIB,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``(label, rel path)`` items to uint8 NCHW RGB; labels come back as int64.

    Each image is opened lazily first, so its header size is checked against PIL's bomb limit
    and the running ``max_decoded_bytes`` total before a single pixel is decoded.
    """
    n = len(items)
    if image_size is not None and n * 3 * image_size * image_size > max_decoded_bytes:
        raise _decoded_cap_error(
            max_decoded_bytes,
            f"{n} images at data.image_size {image_size} need {n * 3 * image_size * image_size} bytes.",
        )
    formats = _pil_formats()
    x = np.empty((0, 3, 0, 0), dtype=np.uint8)
    first_rel = ""
    decoded = 0
    with warnings.catch_warnings():
        # Over PIL's limit is an error here (below); its warning must not escape or, as an error, crash.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for i, (_, rel) in enumerate(items):
            source = read(rel)
            size: tuple[int, int] | None = None
            try:
                with Image.open(
                    io.BytesIO(source) if isinstance(source, bytes) else source, formats=formats
                ) as img:
                    size = img.size
                    width, height = size
                    limit = Image.MAX_IMAGE_PIXELS
                    if limit is not None and width * height > limit:
                        raise _bomb_error(rel, size, root, None)
                    decoded += 3 * width * height
                    if decoded > max_decoded_bytes:
                        raise _decoded_cap_error(
                            max_decoded_bytes,
                            f"Decoding {rel!r} ({width}x{height}) would bring the total to {decoded} bytes.",
                        )
                    if i == 0 and image_size is None and n * 3 * width * height > max_decoded_bytes:
                        raise _decoded_cap_error(
                            max_decoded_bytes,
                            f"{n} images at {width}x{height} (the size of {rel!r}) need "
                            f"{n * 3 * width * height} bytes.",
                        )
                    if i > 0 and image_size is None and (height, width) != x.shape[2:]:
                        raise ImageFolderError(
                            "an int (pixels per side) when the images differ in size",
                            hint=f"{first_rel!r} is {x.shape[3]}x{x.shape[2]} but {rel!r} is "
                            f"{width}x{height}; set data.image_size to resize them all.",
                            key="data.image_size",
                            value=image_size,
                        )
                    rgb = img.convert("RGB")
            except (ImageFolderError, MemoryError):
                raise
            except Image.DecompressionBombError as exc:
                raise _bomb_error(rel, size, root, exc) from exc
            except Exception as exc:  # hostile bytes make PIL raise anything, not only OSError
                raise ImageFolderError(
                    "a folder or archive whose image files all decode",
                    hint=f"{rel!r}: {exc}",
                    value=str(root),
                ) from exc
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.uint8)
            if i == 0:
                x = np.empty((n, 3, *pixels.shape[:2]), dtype=np.uint8)
                first_rel = rel
            elif pixels.shape[:2] != x.shape[2:]:
                raise ImageFolderError(
                    "an int (pixels per side) when the images differ in size",
                    hint=f"{first_rel!r} is {x.shape[3]}x{x.shape[2]} but {rel!r} is "
                    f"{pixels.shape[1]}x{pixels.shape[0]}; set data.image_size to resize them all.",
                    key="data.image_size",
                    value=image_size,
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


def _decode_root(
    root: Path,
    image_size: int | None,
    listing: list[tuple[str, int, int]] | None = None,
    *,
    max_image_bytes: int = 64 * _MIB,
    max_total_bytes: int = 8 * _GIB,
    max_decoded_bytes: int = 16 * _GIB,
    max_members: int = 10**6,
    max_expansion: int = 100,
) -> dict[str, np.ndarray]:
    """Decode everything under ``root`` into the arrays the cache stores (``listing``: a folder's)."""
    if _is_archive(root):
        members = _read_archive(root, max_image_bytes, max_total_bytes, max_members, max_expansion)
        rels = sorted(members)
        read: Callable[[str], bytes | str] = members.__getitem__
    else:
        rels = [rel for rel, _, _ in (listing if listing is not None else _list_directory(root))]
        read = lambda rel: str(root / rel)  # noqa: E731
    splits = _find_layout(rels, root)
    class_names = sorted({cls for items in splits.values() for cls, _ in items})
    label = {name: i for i, name in enumerate(class_names)}
    order = ("train", "test") if "train" in splits else ("all",)
    # Train rows first, then test; by path within a split, which also groups rows by class.
    items = [(label[cls], rel) for split in order for cls, rel in sorted(splits[split], key=lambda t: t[1])]
    x, y = _decode(items, read, image_size, root, max_decoded_bytes)
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


def _cache_key(root: Path, image_size: int | None, listing: list[tuple[str, int, int]] | None = None) -> str:
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
        files = listing if listing is not None else _list_directory(root)
        signature["listing"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:24]
    return f"imagefolder-{digest}"


def _check_cache_dir(folder: Path) -> None:
    """Fail before decoding (minutes of work) if the decoded arrays could not be written to ``folder``."""
    probe = folder
    while not probe.exists() and probe != probe.parent:  # exists() is False under a file, too
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == folder else f"is under a file, {str(probe)!r}"
        raise ImageFolderError(
            "a folder fedlt can write to (or create)",
            hint=f"It {where}; point data.cache_dir or $FEDLT_CACHE at a folder.",
            key="data.cache_dir",
            value=str(folder),
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fedlt-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ImageFolderError(
            "a folder fedlt can write to (or create)",
            hint=f"Writing there fails: {exc}.",
            key="data.cache_dir",
            value=str(folder),
        ) from exc


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


def _check_cap(key: str, cap: int, unit: str = "bytes") -> None:
    if isinstance(cap, bool) or not isinstance(cap, int | np.integer) or cap < 1:
        raise ImageFolderError(f"an int >= 1 ({unit})", key=key, value=cap)


def load_imagefolder(
    root: str | os.PathLike[str] | None,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    max_image_bytes: int = 64 * _MIB,
    max_total_bytes: int = 8 * _GIB,
    max_decoded_bytes: int = 16 * _GIB,
    max_members: int = 10**6,
    max_expansion: int = 100,
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
    max_image_bytes : int, default=64 MiB
        Archives: largest member read into memory, checked from its tar header before reading.
    max_total_bytes : int, default=8 GiB
        Archives: total bytes of image members read into memory.
    max_decoded_bytes : int, default=16 GiB
        Decoded pixels in all (width x height x 3 per image, from image headers before decoding),
        and the size of the stored arrays.
    max_members : int, default=1,000,000
        Archives: members of any kind (counted from their headers); a compressed archive also
        holds at most one per 20 bytes on disk (at least 10,000).
    max_expansion : int, default=100
        Compressed archives: the image members may total at most this many times the archive's
        size on disk (at least 64 MiB); images are compressed already, so more is a bomb.

    Returns
    -------
    RawDataset
        uint8 RGB ``(N, 3, H, W)`` splits; class names are the sorted subfolder names (the label
        order); mean/std per channel from the train split.

    Raises
    ------
    ImageFolderError
        Missing, unreadable, truncated or unsafe input, one class only, a cap exceeded, or a cache
        folder that cannot be written; it names the scenario key and the file or member at fault.
    """
    if root is None or not Path(root).expanduser().exists():
        raise ImageFolderError(_ALLOWED_ROOT, value=None if root is None else str(root))
    path = Path(root).expanduser().resolve()
    if not (path.is_dir() or _is_archive(path)):
        raise ImageFolderError(_ALLOWED_ROOT, value=str(root))
    if image_size is not None and image_size < 1:
        raise ImageFolderError("an int >= 1 or unset", key="data.image_size", value=image_size)
    if not 0 < test_fraction < 1:
        raise ImageFolderError("a float in (0, 1)", key="data.test_fraction", value=test_fraction)
    _check_cap("data.max_image_bytes", max_image_bytes)
    _check_cap("data.max_total_bytes", max_total_bytes)
    _check_cap("data.max_decoded_bytes", max_decoded_bytes)
    _check_cap("data.max_members", max_members, "members")
    _check_cap("data.max_expansion", max_expansion, "a ratio")

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    listing = (
        _list_directory(path) if path.is_dir() else None
    )  # walked once: keys the cache and feeds decoding
    cache_file = folder / f"{_cache_key(path, image_size, listing)}.npz"
    arrays = _read_cache(cache_file) if cache_file.is_file() else None
    if arrays is None:
        _check_cache_dir(folder)
        arrays = _decode_root(
            path,
            image_size,
            listing,
            max_image_bytes=max_image_bytes,
            max_total_bytes=max_total_bytes,
            max_decoded_bytes=max_decoded_bytes,
            max_members=max_members,
            max_expansion=max_expansion,
        )
        try:
            _write_cache(cache_file, arrays)
        except OSError as exc:  # checked writable above, so a full disk or a race: keep the decode
            warnings.warn(
                f"Could not cache the decoded images in {str(folder)!r} ({exc}); the next load decodes "
                "again.",
                ImageFolderWarning,
                stacklevel=user_stacklevel(),
            )

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
