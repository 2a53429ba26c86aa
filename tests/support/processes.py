"""Process trees from /proc, so tests can find (and stop) exactly the processes they started; a
private Ray temp folder, so tests neither see nor leave Ray's machine-wide state."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def marked(variable: str, value: str) -> list[int]:
    """Every running process whose environment holds ``variable=value``: what a test started with
    that mark and whatever those processes started, even once orphaned (adopted by init, so no
    longer below the test's process)."""
    needle = f"{variable}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


def command(pid: int) -> str:
    """The command line of ``pid`` (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def private_ray_tmpdir(stale_address: str | None = None) -> Iterator[Path]:
    """A fresh folder for ``$RAY_TMPDIR`` (short: Ray's socket paths must fit in 107 bytes).

    Ray keeps its sessions and ``ray_current_cluster`` (the address of the last ``ray start``,
    which ``ray.init()`` without an address joins) under ``$RAY_TMPDIR/ray``. With
    ``stale_address`` that file names a cluster that is gone, as a ``ray start`` whose processes
    were killed leaves it. The folder is removed afterwards.
    """
    folder = Path(tempfile.mkdtemp(prefix="fedlt-ray-", dir="/tmp"))
    try:
        if stale_address is not None:
            (folder / "ray").mkdir()
            (folder / "ray" / "ray_current_cluster").write_text(stale_address)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
