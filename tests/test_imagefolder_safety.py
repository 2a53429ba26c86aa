"""imagefolder on hostile or broken input: a named ImageFolderError or a warning, never a traceback.

Each test builds real files under tmp_path (forged tar headers, cut archives, symlink loops,
decompression bombs) and loads them through :func:`load_imagefolder`; nothing is stubbed.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedlt.data.imagefolder import (
    ImageFolderError,
    ImageFolderWarning,
    SymlinkSkippedWarning,
    UnsafeMemberWarning,
    load_imagefolder,
)

MIB = 2**20
BIG = 200 * MIB  # a declared member size that must never be read


def _png_bytes(value: int, size: int = 8, noise: bool = False) -> bytes:
    """A real PNG; ``noise`` makes its pixels incompressible (for stored gzip blocks)."""
    if noise:
        pixels = np.random.default_rng(value).integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        pixels = np.full((size, size, 3), value, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _tree(base: Path, classes: dict[str, tuple[str, ...]], n: int = 3) -> Path:
    """base/<split>/<class>/<i>.png for each split and its classes (split "" for a flat layout)."""
    for split, names in classes.items():
        for c, name in enumerate(names):
            folder = base / split / name if split else base / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i}.png").write_bytes(_png_bytes(10 * c + i))
    return base


def _members(n: int = 3, noise: bool = False) -> list[tuple[str, bytes]]:
    """The members of a clean cifar/{train,test}/{a,b} archive."""
    return [
        (
            f"cifar/{split}/{cls}/{i}.png",
            _png_bytes(10 * c + i + (100 if split == "test" else 0), noise=noise),
        )
        for split in ("train", "test")
        for c, cls in enumerate(("a", "b"))
        for i in range(n)
    ]


def _write_tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w", **kw: int) -> Path:
    """A tar with exactly these member names (tarfile's add() would strip a leading '/')."""
    with tarfile.open(path, mode, **kw) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _load(root: Path, tmp_path: Path, **kw) -> object:
    return load_imagefolder(root, cache_dir=tmp_path / "cache", **kw)


def _forged_tar(members: list[tuple[str, bytes]], info: tarfile.TarInfo) -> bytes:
    """A tar of ``members`` followed by ``info``'s header and only 16 bytes of its declared data.

    Reading that member would hit the end of the file, so a cap error (rather than a truncation
    error) proves the size was refused from the header alone.
    """
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        end = tar.offset  # before the end-of-archive blocks that close() writes
    return body.getvalue()[:end] + info.tobuf(tarfile.GNU_FORMAT) + b"\x89PNG" + bytes(12)


# --------------------------------------------------------------------------- 1. archive byte caps


@pytest.mark.parametrize("compress", [False, True])
def test_oversized_member_is_refused_from_its_header_without_reading(tmp_path: Path, compress: bool) -> None:
    big = tarfile.TarInfo("cifar/train/a/big.png")
    big.size = BIG
    raw = _forged_tar(_members(), big)
    archive = tmp_path / ("forged.tar.gz" if compress else "forged.tar")
    archive.write_bytes(gzip.compress(raw) if compress else raw)
    assert archive.stat().st_size < 64 * 1024
    with pytest.raises(ImageFolderError) as info:
        _load(archive, tmp_path)
    err = info.value
    assert err.key == "data.max_image_bytes" and err.value == 64 * MIB
    assert "'cifar/train/a/big.png'" in str(err) and str(BIG) in str(err) and str(64 * MIB) in str(err)
    assert "not read" in str(err)


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced on demand so writing a 200 MB member needs no 200 MB buffer."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_sparse_gzip_member_is_refused_without_allocating_it(tmp_path: Path) -> None:
    # A real 200 MB member of zeros compresses to a few hundred KB: the shape of the reported bomb.
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for name, data in _members():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("cifar/train/b/huge.png")
        info.size = BIG
        tar.addfile(info, io.BufferedReader(_Zeros(BIG), buffer_size=MIB))
    assert archive.stat().st_size < 2 * MIB
    tracemalloc.start()
    try:
        with pytest.raises(ImageFolderError, match=r"'cifar/train/b/huge\.png' of .* is 209715200 bytes"):
            _load(archive, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB  # the member was never read into memory


def test_total_cap_stops_before_the_member_that_would_pass_it(tmp_path: Path) -> None:
    members = _members()
    archive = _write_tar(tmp_path / "set.tar", members)
    sizes = [len(data) for _, data in sorted(members)]
    total = sum(sizes)
    ds = _load(archive, tmp_path, max_total_bytes=total)  # exactly enough: loads
    assert ds.class_names == ("a", "b")
    with pytest.raises(ImageFolderError) as info:
        _load(archive, tmp_path / "other", max_total_bytes=total - 1)
    err = info.value
    assert err.key == "data.max_total_bytes" and err.value == total - 1
    last_name, last_data = members[-1]  # the archive's last member is the one that passes the cap
    assert repr(last_name) in str(err) and f"({len(last_data)} bytes)" in str(err)
    assert f"total read to {total} bytes" in str(err)


def test_a_gzip_bomb_is_refused_by_its_expansion_before_the_second_member_is_read(tmp_path: Path) -> None:
    # Three members of 40 MiB of zeros: gzip makes them a few hundred kB on disk.
    archive = tmp_path / "bomb.tar.gz"
    zeros = bytes(40 * MIB)
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"set/{'ab'[i % 2]}/{i}.png")
            info.size = len(zeros)
            tar.addfile(info, io.BytesIO(zeros))
    del zeros
    size = archive.stat().st_size
    cap = max(64 * MIB, 100 * size)  # the rule, written out: 100x the archive, at least 64 MiB
    assert cap < 80 * MIB  # so the second member (40 + 40 MiB) is the one refused
    tracemalloc.start()
    try:
        with pytest.raises(ImageFolderError) as info:
            _load(archive, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = info.value
    assert err.key == "data.max_expansion" and err.value == 100
    assert f"total read to {80 * MIB} bytes" in str(err) and f"(cap {cap};" in str(err)
    assert f"the archive's {size} bytes on disk" in str(err)
    # One member read (tarfile's stream read holds it about twice while joining chunks), never two.
    assert peak < 100 * MIB, peak
    # a larger ratio lets it through to the next cap
    with pytest.raises(ImageFolderError) as info:
        _load(archive, tmp_path / "other", max_expansion=10**6, max_total_bytes=80 * MIB - 1)
    assert info.value.key == "data.max_total_bytes"


def test_the_member_count_is_capped_before_any_member_is_read(tmp_path: Path) -> None:
    members = _members(n=3)  # 12 members
    archive = _write_tar(tmp_path / "set.tar", members)
    assert _load(archive, tmp_path, max_members=12).class_names == ("a", "b")
    with pytest.raises(ImageFolderError) as info:
        _load(archive, tmp_path / "other", max_members=11)
    assert info.value.key == "data.max_members" and info.value.value == 11
    assert "holds more than 11 members" in str(info.value)


def test_a_compressed_archive_of_many_empty_members_is_refused_in_proportion_to_its_size(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "many.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(10_500):
            info = tarfile.TarInfo(f"set/{'ab'[i % 2]}/{i}.png")
            tar.addfile(info, io.BytesIO(b""))
    size = archive.stat().st_size
    cap = max(10_000, size // 20)  # one member per 20 compressed bytes, at least 10,000
    assert cap < 10_500, size
    with pytest.raises(ImageFolderError) as info:
        _load(archive, tmp_path)
    assert info.value.key == "data.max_members" and info.value.value == 10**6
    assert f"holds more than {cap} members ({size} bytes on disk" in str(info.value)


def test_forged_pax_header_size_is_refused_before_tarfile_reads_it(tmp_path: Path) -> None:
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = BIG
    archive = tmp_path / "pax.tar"
    archive.write_bytes(_forged_tar(_members(), pax))
    with pytest.raises(ImageFolderError, match="metadata header") as info:
        _load(archive, tmp_path)
    assert info.value.key == "data.max_image_bytes" and str(BIG) in str(info.value)


@pytest.mark.parametrize(
    "cap", ["max_image_bytes", "max_total_bytes", "max_decoded_bytes", "max_members", "max_expansion"]
)
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_caps_must_be_positive_ints(tmp_path: Path, cap: str, bad: object) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    with pytest.raises(ImageFolderError) as info:
        _load(base, tmp_path, **{cap: bad})
    assert info.value.key == f"data.{cap}" and info.value.value == bad


# --------------------------------------------------------------------------- 2. decoded size


def test_decoded_cap_is_checked_from_the_header_before_decoding(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    # A 4000x4000 PNG cut after its header: opening reads the size, decoding it would fail.
    out = io.BytesIO()
    Image.new("RGB", (4000, 4000)).save(out, format="PNG")
    (base / "a" / "9-huge.png").write_bytes(out.getvalue()[:200])
    with pytest.raises(ImageFolderError) as info:
        _load(base, tmp_path, max_decoded_bytes=10 * MIB)
    err = info.value
    assert err.key == "data.max_decoded_bytes" and err.value == 10 * MIB
    assert "'a/9-huge.png' (4000x4000)" in str(err)


def test_decoded_cap_covers_the_resized_arrays(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    with pytest.raises(ImageFolderError, match=r"6 images at data\.image_size 1024") as info:
        _load(base, tmp_path, image_size=1024, max_decoded_bytes=MIB)
    assert info.value.key == "data.max_decoded_bytes"
    ds = _load(base, tmp_path, image_size=16, max_decoded_bytes=MIB)
    assert ds.input_shape == (3, 16, 16)


@pytest.mark.parametrize(
    "size",
    [(10_000, 9_000), (14_000, 14_000)],  # PIL warns above MAX_IMAGE_PIXELS (89.5 M), raises above 2x
    ids=["over-limit-warns-in-pil", "over-twice-raises-in-pil"],
)
def test_decompression_bomb_is_a_named_error_even_with_warnings_as_errors(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    Image.new("1", size).save(base / "b" / "bomb.png")  # a few KB on disk
    assert size[0] * size[1] > Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under `python -W error`: a leaked warning would crash
        with pytest.raises(ImageFolderError) as info:
            _load(base, tmp_path)
    err = info.value
    assert err.key == "data.root" and "decompression-bomb" in str(err)
    assert "'b/bomb.png'" in str(err)


# --------------------------------------------------------------------------- 3. unsafe member names


@pytest.mark.parametrize("evil", ["/etc/evil.png", "../evil.png", "cifar/train/a/../../../evil.png"])
def test_unsafe_member_is_ignored_with_one_warning_and_layout_unchanged(tmp_path: Path, evil: str) -> None:
    clean = _write_tar(tmp_path / "clean.tar", _members())
    hostile = _write_tar(tmp_path / "hostile.tar", [*_members(), (evil, _png_bytes(200))])
    expected = _load(clean, tmp_path)
    with pytest.warns(UnsafeMemberWarning) as record:
        got = _load(hostile, tmp_path)
    assert len([w for w in record if issubclass(w.category, ImageFolderWarning)]) == 1
    assert repr(evil) in str(record[0].message) and "1 (" in str(record[0].message)
    assert got.class_names == expected.class_names == ("a", "b")
    np.testing.assert_array_equal(got.train.x, expected.train.x)
    np.testing.assert_array_equal(got.test.y, expected.test.y)


def test_many_unsafe_members_give_one_warning_with_the_count(tmp_path: Path) -> None:
    evil = ["/etc/a.png", "/etc/b.png", "../c.png", "x/../../d.png"]
    hostile = _write_tar(tmp_path / "hostile.tar.gz", [*_members(), *[(e, b"x") for e in evil]], "w:gz")
    with pytest.warns(UnsafeMemberWarning) as record:
        ds = _load(hostile, tmp_path)
    assert len(record) == 1 and "Ignored 4 (" in str(record[0].message)
    assert ds.class_names == ("a", "b")


# --------------------------------------------------------------------------- 4. broken archives


def _clean_bytes(tmp_path: Path, mode: str, **kw: int) -> bytes:
    return _write_tar(tmp_path / "src.tar", _members(n=6, noise=True), mode, **kw).read_bytes()


def _cut_at_member_boundary(tmp_path: Path) -> bytes:
    raw = _clean_bytes(tmp_path, "w")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        third = tar.getmembers()[3]
    return raw[: third.offset]  # whole members only, and no end-of-archive blocks


def _zip_bytes(tmp_path: Path) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in _members():
            z.writestr(name, data)
    return out.getvalue()


BROKEN = {
    "tar.gz cut in half": (".tar.gz", lambda p: (b := _clean_bytes(p, "w:gz"))[: len(b) // 2], "truncated"),
    "tar cut mid-member": (".tar", lambda p: (b := _clean_bytes(p, "w"))[: len(b) // 2 + 600], "truncated"),
    "tar cut at a member boundary": (".tar", _cut_at_member_boundary, "truncated"),
    "gzip trailer cut": (".tar.gz", lambda p: _clean_bytes(p, "w:gz")[:-4], "truncated"),
    "random bytes": (".tar.gz", lambda p: np.random.default_rng(0).bytes(5000), "not a tar archive"),
    "random bytes .tar": (".tar", lambda p: np.random.default_rng(1).bytes(5000), "not a tar archive"),
    "empty file": (".tar.gz", lambda p: b"", "not a tar archive"),
    "zip named .tar.gz": (".tar.gz", _zip_bytes, "not a tar archive"),
    "gzip of non-tar": (".tgz", lambda p: gzip.compress(b"hello " * 1000), "not a tar archive"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_archive_is_a_named_error_not_a_traceback(tmp_path: Path, case: str) -> None:
    suffix, make, says = BROKEN[case]
    archive = tmp_path / f"broken{suffix}"
    archive.write_bytes(make(tmp_path))
    with pytest.raises(ImageFolderError) as info:
        _load(archive, tmp_path)
    err = info.value
    assert err.key == "data.root" and err.value == str(archive)
    assert err.allowed.endswith(says), err.allowed
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing half-read was cached


def test_gzip_crc_mismatch_is_corrupt(tmp_path: Path) -> None:
    # Stored (level 0) blocks: a flipped byte inside a member leaves tar and deflate intact,
    # so only gzip's CRC can notice; tarfile's own stream reader would not.
    raw = bytearray(_clean_bytes(tmp_path, "w:gz", compresslevel=0))
    raw[len(raw) // 2] ^= 0xFF
    archive = tmp_path / "flipped.tar.gz"
    archive.write_bytes(bytes(raw))
    with pytest.raises(ImageFolderError) as info:
        _load(archive, tmp_path)
    assert info.value.allowed.endswith("corrupt") and "CRC" in str(info.value)


# --------------------------------------------------------------------------- 5. cache_dir


def test_cache_dir_that_is_a_file_or_under_one_fails_before_decoding(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    (base / "b" / "broken.png").write_bytes(b"not a png")  # decoding first would name this instead
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    for cache, says in [(blocker, "It is a file"), (blocker / "sub" / "cache", "is under a file")]:
        with pytest.raises(ImageFolderError) as info:
            load_imagefolder(base, cache_dir=cache)
        err = info.value
        assert err.key == "data.cache_dir" and err.value == str(cache)
        assert says in str(err) and "broken" not in str(err)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_cache_dir_without_write_permission(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for cache in (locked, locked / "sub"):
            with pytest.raises(ImageFolderError, match="Writing there fails") as info:
                load_imagefolder(base, cache_dir=cache)
            assert info.value.key == "data.cache_dir"
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_cache_dir_on_an_unwritable_filesystem(tmp_path: Path) -> None:
    # /proc refuses new folders even to root, so this runs where chmod cannot deny writes.
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    with pytest.raises(ImageFolderError, match="Writing there fails") as info:
        load_imagefolder(base, cache_dir="/proc/self/fedlt-cache")
    assert info.value.key == "data.cache_dir"


# --------------------------------------------------------------------------- 6. symlinks


def test_symlink_loop_is_skipped_with_a_warning(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    (base / "a" / "loop").symlink_to("..")  # a -> set -> a -> ... forever
    (base / "b" / "again").symlink_to(base / "a")  # a second way into a folder already in the tree
    with pytest.warns(SymlinkSkippedWarning) as record:
        ds = _load(base, tmp_path)
    message = str(record[0].message)
    assert "'a/loop'" in message and "'b/again'" in message and "Skipped 2 (" in message
    assert ds.class_names == ("a", "b") and len(ds.train) + len(ds.test) == 6


def test_symlinked_folder_outside_the_tree_is_still_followed(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    outside = _tree(tmp_path / "elsewhere", {"": ("c",)})
    (base / "c").symlink_to(outside / "c")
    (outside / "c" / "self").symlink_to(outside / "c")  # a loop outside the tree
    with pytest.warns(SymlinkSkippedWarning, match="'c/self'"):
        ds = _load(base, tmp_path)
    assert ds.class_names == ("a", "b", "c") and len(ds.train) + len(ds.test) == 9


def test_symlink_into_a_hidden_folder_of_the_tree_is_followed(tmp_path: Path) -> None:
    # Hidden folders are not walked, so a link to one is the only way to its images: keep it.
    base = _tree(tmp_path / "set", {"": ("a",)})
    _tree(base / ".store", {"": ("b",)})
    (base / "b").symlink_to(".store/b")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageFolderWarning)
        ds = _load(base, tmp_path)
    assert ds.class_names == ("a", "b") and len(ds.train) + len(ds.test) == 6


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_like_an_image_is_skipped_not_read(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    os.mkfifo(base / "a" / "pipe.png")  # opening it to read would block forever
    with pytest.warns(ImageFolderWarning, match="'a/pipe.png'"):
        ds = _load(base, tmp_path)
    assert len(ds.train) + len(ds.test) == 6


def test_broken_symlink_image_is_named(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    (base / "b" / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(ImageFolderError, match=r"'b/gone\.png'"):
        _load(base, tmp_path)


# --------------------------------------------------------------------------- 7. class folders


def test_one_class_is_an_error(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"": ("x",)}, n=5)
    with pytest.raises(ImageFolderError) as info:
        _load(base, tmp_path)
    assert "at least 2 class folders" in str(info.value) and "Found 1: 'x'" in str(info.value)
    archive = _write_tar(tmp_path / "one.tar", [(f"data/x/{i}.png", _png_bytes(i)) for i in range(4)])
    with pytest.raises(ImageFolderError, match="Found 1: 'x'"):
        _load(archive, tmp_path)


def test_train_and_test_must_hold_the_same_classes(tmp_path: Path) -> None:
    base = _tree(tmp_path / "set", {"train": ("a", "b", "c"), "test": ("a", "b")})
    with pytest.raises(ImageFolderError) as info:
        _load(base, tmp_path)
    assert "same class folders" in str(info.value) and "test/ lacks 'c'" in str(info.value)
    _tree(base, {"test": ("c", "d")})  # now test/ has every train class, plus one train/ lacks
    with pytest.raises(ImageFolderError, match=r"train/ lacks 'd'\.$"):
        _load(base, tmp_path)


# --------------------------------------------------------------------------- 8. undecodable images


@pytest.mark.parametrize(
    "content",
    [b"not a png at all", _png_bytes(5, noise=True)[:-60]],
    ids=["garbage", "truncated-png"],
)
def test_corrupt_image_is_named_and_stops_the_load(tmp_path: Path, content: bytes) -> None:
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    (base / "b" / "broken.png").write_bytes(content)
    with pytest.raises(ImageFolderError) as info:
        _load(base, tmp_path)
    assert info.value.key == "data.root" and "'b/broken.png'" in str(info.value)
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_other_formats_behind_an_image_name_are_never_decoded(tmp_path: Path) -> None:
    # PIL sniffs content, not names: EPS in a .png would go to Ghostscript. Only listed formats open.
    base = _tree(tmp_path / "set", {"": ("a", "b")})
    eps = base / "a" / "eps.png"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    with Image.open(eps) as img:
        assert img.format == "EPS"  # what an unrestricted open would hand to Ghostscript
    with pytest.raises(ImageFolderError, match=r"'a/eps\.png': cannot identify image file"):
        _load(base, tmp_path)


# --------------------------------------------------------------------------- the error itself


def test_error_pickles_with_its_attributes() -> None:
    err = ImageFolderError("an int >= 1 (bytes)", "hint text", key="data.max_image_bytes", value=3)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError)
    assert (back.allowed, back.hint, back.key, back.value) == (err.allowed, err.hint, err.key, err.value)
    assert (
        str(back)
        == str(err)
        == ("The 'data.max_image_bytes' value must be an int >= 1 (bytes). Got 3 instead. hint text")
    )


def test_safe_archive_still_loads_and_caches(tmp_path: Path) -> None:
    archive = _write_tar(tmp_path / "set.tar.gz", _members(), "w:gz")
    first = _load(archive, tmp_path, max_image_bytes=4096, max_total_bytes=MIB, max_decoded_bytes=MIB)
    assert first.class_names == ("a", "b") and len(first.train) == 6 and len(first.test) == 6
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = _load(archive, tmp_path)
    np.testing.assert_array_equal(first.train.x, again.train.x)
