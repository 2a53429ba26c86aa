"""One run per folder: refuse a used folder up front, and claim a folder for the life of a run.

Two runs writing into one folder interleave metrics lines and replace each other's checkpoints:
both results are lost without any error. So ``fedlt run`` first checks the folder is new
(:func:`check_fresh_dir`, before any data is built, so the mistake costs nothing), and every run
(fresh or resumed) holds an exclusive claim on its folder while it works (:func:`claim`).

The claim is a lock file created atomically (``O_CREAT | O_EXCL``) holding who holds it, and,
where the OS has ``flock``, an OS lock on that file: the OS drops it when the holder dies, even
by SIGKILL, so a lock file left by a crash is recognised as stale and taken over, while one whose
holder still runs is refused with the holder's pid, host and start time.

A folder holding only a lock (a run killed while its data was built, or a full disk when the
lock was written) holds no run: :func:`check_fresh_dir` lets it through and :func:`claim` takes
the stale lock over. The lock is never opened through a symbolic link, and a claim refuses a
folder in which any fedlt artefact is a link (:mod:`fedlt.store.safefile`): a run folder may
have been made by someone else, and writing through a link would overwrite a file not the run's.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from fedlt.base.warn import user_stacklevel
from fedlt.errors import FedltError
from fedlt.store.safefile import check_no_links, open_nofollow

try:
    import fcntl
except ImportError:  # Windows: the pid check alone guards the folder
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FEDLT_ARTEFACTS",
    "LOCK",
    "RunDirError",
    "RunLock",
    "artefacts_in",
    "check_fresh_dir",
    "check_output_folder",
    "claim",
]

#: Name of the lock file a running run holds in its folder.
LOCK = "fedlt.lock"

#: Names (glob patterns) of what a run writes in its folder; any of them marks the folder as used.
FEDLT_ARTEFACTS: tuple[str, ...] = (
    "scenario.toml",
    "metrics.jsonl",
    "metrics.jsonl.*.tmp",
    "metrics.jsonl.tmp",
    "metrics.csv",
    "metrics.csv.*.tmp",
    "summary.json",
    "summary.json.*.tmp",
    "scenario.toml.*.tmp",
    "wandb-id.*.tmp",
    "rounds.jsonl",
    "rounds.jsonl.*.tmp",
    "starts.json",
    "starts.json.*.tmp",
    "events.jsonl",
    "system.npz",
    "wandb-id",
    "wandb",
    "checkpoint.pt",
    "checkpoint.pt.*.tmp",
    "checkpoint.pt.tmp",
    LOCK,
    "tensorboard",
)

_CREATE_RETRIES = 5  # a lock file that vanishes or is replaced between our steps is looked at again


class RunDirError(FedltError):
    """A run folder cannot be used: not a folder, not writable, already used, or held by a live run.

    Exit status 2: it is found before any work starts.
    """

    exit_status = 2


def artefacts_in(run_dir: Path) -> list[str]:
    """Sorted names of the fedlt artefacts (:data:`FEDLT_ARTEFACTS`) present in ``run_dir``.

    An empty list when the folder does not exist or cannot be listed as a folder.
    """
    try:
        names = os.listdir(run_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in FEDLT_ARTEFACTS))


def check_fresh_dir(run_dir: Path, key: str = "--out") -> None:
    """Refuse ``run_dir`` as the folder of a new run unless a run could write there without harm.

    Meant to be called before any data is built, so a wrong folder costs nothing. It creates
    nothing but a probe file (removed at once) in the folder or its nearest existing parent.

    Parameters
    ----------
    run_dir : Path
        The folder a new run would write into (it need not exist yet).
    key : str
        How the user named the folder (``--out``, ``out=``), to say it in the message.

    Raises
    ------
    RunDirError
        The path is a file, lies under a file, is not writable, or already holds fedlt artefacts
        other than a lock (the message names them and says that ``fedlt resume DIR`` continues
        that run). A lock alone is left to :func:`claim`.
    """
    run_dir = Path(run_dir)
    label = f"The {key} folder {run_dir}"
    check_output_folder(run_dir, key, "the run's outputs")
    try:
        # A lock alone is no run: left by a run killed before it wrote anything, or by a full disk.
        # claim() takes it over if its holder is gone and refuses it (naming the holder) if not.
        found = [n for n in artefacts_in(run_dir) if n != LOCK]
    except OSError as exc:
        raise RunDirError(f"{label} cannot be listed: {exc.strerror or exc}.") from None
    if found:
        raise RunDirError(
            f"{label} already holds a fedlt run ({', '.join(found)}). "
            f"Continue it with `fedlt resume {run_dir}`, or choose a new or empty folder."
        )


def check_output_folder(folder: Path, key: str, what: str = "the outputs") -> None:
    """Refuse ``folder`` as one to write into unless it is, or can be made, a writable folder.

    For every command that writes files into a folder (``--out``, ``--plot``): called before
    any work, so a folder that is a file, lies under a file or cannot be written costs nothing.
    Creates nothing but a probe file, removed at once.

    Raises
    ------
    RunDirError
        Naming ``key`` and the path at fault.
    """
    folder = Path(folder)
    label = f"The {key} folder {folder}"
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{label} is a file, not a folder. Choose a folder for {what}.")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise RunDirError(f"{label} cannot be created: {existing} is a file, not a folder.")
    if not _writable(existing):
        why = "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
        raise RunDirError(f"{label} {why} by this user. Choose another folder or fix its permissions.")


def _writable(folder: Path) -> bool:
    """Whether this process can create (and delete) a file in ``folder``; tried, not guessed.

    ``os.access`` is wrong under root, ACLs, read-only mounts and some network filesystems.
    """
    probe = folder / f".fedlt-probe.{os.getpid()}.{time.monotonic_ns()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()
    return True


class RunLock:
    """The claim of a run folder, held from :func:`claim` until :meth:`release`.

    Use it as a context manager, or call :meth:`release` (safe to call more than once). If the
    process dies without releasing, the lock file remains but the OS lock goes with the process,
    and the next :func:`claim` takes the folder over.

    Attributes
    ----------
    path : Path
        The lock file.
    info : dict
        What the lock file holds: ``pid``, ``host``, ``started`` (ISO time), ``command``.
    """

    def __init__(self, path: Path, fd: int, info: dict[str, Any], created_dir: bool) -> None:
        self.path = path
        self.info = info
        self._fd: int | None = fd
        self._created_dir = created_dir

    @property
    def held(self) -> bool:
        """Whether this claim is still held (not yet released)."""
        return self._fd is not None

    def release(self) -> None:
        """Give the folder up: remove the lock file, then drop the OS lock.

        Removal comes first so that a waiting claimer that obtains the OS lock finds the file
        gone (or replaced) and starts over instead of taking a lock file nobody holds. A folder
        the claim created and nothing else wrote into is removed too, so a run refused before it
        wrote anything leaves no empty folder behind.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(FileNotFoundError):
                if _same_file(self.path, fd):
                    self.path.unlink()
        finally:
            os.close(fd)  # drops the flock
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only succeeds when empty

    def __del__(self) -> None:
        # A claim nobody references any more (a Run dropped without finishing) gives the folder
        # back, as a dropped file object closes, instead of blocking later claims in this process.
        with contextlib.suppress(Exception):
            self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"RunLock({str(self.path)!r}, {state}, pid={self.info.get('pid')})"


def claim(run_dir: Path, command: str | None = None, fresh: bool = False, key: str = "--out") -> RunLock:
    """Claim ``run_dir`` for one run, creating the folder if needed.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    command : str, optional
        Recorded in the lock file for whoever finds it held (default: this process's argv).
    fresh : bool
        Also refuse, once the claim is held, a folder holding fedlt artefacts other than the lock
        (what :func:`check_fresh_dir` refuses): closes the gap between that early check and the
        claim, in which another run could have come and gone.
    key : str
        How the user named the folder, for the ``fresh`` message.

    Returns
    -------
    RunLock
        Held until released; release it when the run ends (it is a context manager).

    Raises
    ------
    RunDirError
        The folder is held by a live run (naming its pid, host and start time), or held by a run
        on another host whose liveness cannot be checked, or the folder cannot be created.
    LinkError
        The lock or another fedlt artefact in the folder is a symbolic link (naming it).
    """
    run_dir = Path(run_dir)
    created_dir = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"The run folder {run_dir} cannot be created: {exc.strerror or exc}.") from None
    path = run_dir / LOCK
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    lock: RunLock | None = None
    for _ in range(_CREATE_RETRIES):
        lock = _try_create(path, info, created_dir) or _try_take_over(path, info, created_dir)
        if lock is not None:
            break
    if lock is None:
        raise RunDirError(f"Could not claim the run folder {run_dir}: its lock file {path} kept changing.")
    try:
        check_no_links(run_dir, artefacts_in(run_dir))  # before any data is built or round trained
    except BaseException:
        lock.release()
        raise
    if fresh:
        found = [n for n in artefacts_in(run_dir) if n != LOCK]
        if found:
            lock.release()
            raise RunDirError(
                f"The {key} folder {run_dir} already holds a fedlt run ({', '.join(found)}). "
                f"Continue it with `fedlt resume {run_dir}`, or choose a new or empty folder."
            )
    return lock


def _try_create(path: Path, info: dict[str, Any], created_dir: bool) -> RunLock | None:
    """Create the lock file exclusively; ``None`` if it exists already."""
    try:
        fd = open_nofollow(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    except OSError as exc:
        raise RunDirError(f"Cannot create the lock file {path}: {exc.strerror or exc}.") from None
    if not _flock(fd):
        # Between our create and our flock, another claimer saw an empty lock file, judged it
        # stale and took it: it holds the folder now.
        os.close(fd)
        raise _held_error(path, _read_info(path))
    try:
        _write_info(fd, info)
    except OSError as exc:  # a full disk: leave no lock behind, so the folder stays usable
        with contextlib.suppress(OSError):
            if _same_file(path, fd):
                path.unlink()
        os.close(fd)
        if created_dir:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only succeeds when empty
        raise RunDirError(f"Cannot write the lock file {path}: {exc.strerror or exc}.") from None
    return RunLock(path, fd, info, created_dir)


def _try_take_over(path: Path, info: dict[str, Any], created_dir: bool) -> RunLock | None:
    """Take an existing lock file over if its holder is gone; ``None`` to start over.

    Raises :class:`RunDirError` when the holder is alive (or may be: another host).
    """
    try:
        fd = open_nofollow(path, os.O_RDWR)  # a linked lock would have us empty the link's target
    except FileNotFoundError:
        return None  # released meanwhile: try creating again
    except OSError as exc:
        raise RunDirError(f"Cannot open the lock file {path}: {exc.strerror or exc}.") from None
    keep = False
    try:
        if not _flock(fd):
            raise _held_error(path, _read_info(path))
        if not _same_file(path, fd):
            return None  # released (or taken over and released) while we waited: start over
        old = _read_info(path)
        if old is not None and old.get("pid") == os.getpid() and old.get("host") == info["host"]:
            raise _held_error(path, old)  # this very process holds it without flock (no fcntl)
        if old is not None and old.get("host") != info["host"]:
            raise _held_error(
                path,
                old,
                f" Whether that run is still going cannot be checked from {info['host']}; if it is not, "
                f"delete {path} and try again.",
            )
        if old is not None and _pid_alive(old.get("pid")):
            raise _held_error(
                path,
                old,
                f" If that process is not a fedlt run (its pid was reused), delete {path} and try again.",
            )
        if old is None:
            reason = "its content is unreadable"
        else:
            reason = f"pid {old.get('pid')} on host {old.get('host')} (since {old.get('started')}) has exited"
        warnings.warn(
            f"Taking over the stale lock {path}: {reason}; that run ended without releasing it.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),  # the user's call (fedlt.run), not a line of fedlt's
        )
        try:
            _write_info(fd, info)
        except OSError as exc:  # a full disk: the stale lock stays stale, taken over next time
            raise RunDirError(f"Cannot write the lock file {path}: {exc.strerror or exc}.") from None
        keep = True
        return RunLock(path, fd, info, created_dir)
    finally:
        if not keep:
            os.close(fd)


def _flock(fd: int) -> bool:
    """Take the OS lock without waiting; ``False`` if another open file holds it.

    Where ``flock`` is missing or unsupported by the filesystem, answers ``True``: the pid check
    then guards the folder alone.
    """
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK and friends on some network filesystems
        return True
    return True


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed or replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _write_info(fd: int, info: dict[str, Any]) -> None:
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _read_info(path: Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or ``None`` if it cannot be read as such."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or type(info.get("pid")) is not int:
        return None
    if not isinstance(info.get("host"), str):
        return None
    return info


def _pid_alive(pid: Any) -> bool:
    """Whether a process ``pid`` runs on this host (a zombie counts as exited)."""
    if type(pid) is not int or pid <= 0:
        return False
    if os.name != "posix":
        return True  # no safe probe (os.kill would kill it): assume alive, the user can delete the lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _held_error(path: Path, info: dict[str, Any] | None, extra: str = "") -> RunDirError:
    folder = path.parent
    if info is None:
        who = "another process (its lock file is being written)"
    else:
        who = f"pid {info.get('pid')} on host {info.get('host')} since {info.get('started')}"
        if info.get("command"):
            who += f" (command: {info['command']})"
    return RunDirError(
        f"The run folder {folder} is in use: held by {who}. Two runs in one folder would overwrite "
        f"each other's checkpoints and metrics; wait for it to finish or choose another folder.{extra}"
    )
