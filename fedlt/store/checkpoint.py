"""Checkpoints and metrics that survive kills, full disks and forged files.

A checkpoint is serialised in memory, checked against the free space, written to a temporary
file with a unique name in the run folder, flushed to disk and renamed over the previous one, so
the file on disk is always a complete checkpoint of some finished round: a kill (even SIGKILL) or
a full disk at any moment leaves the previous checkpoint as it was, and two writers never share a
temporary file.

Loading never runs code: the file is read with ``torch.load(weights_only=True)``, which builds
only tensors and plain data, so a forged checkpoint is refused instead of executed. Whatever is
wrong with the file (empty, truncated, garbage, forged, not a fedlt checkpoint, written by a newer
fedlt, for another model) surfaces as one :class:`CheckpointError` naming the file and the problem,
which the CLI prints without a traceback.

Metrics lines are strict JSON: NaN and infinities become ``null``, since ``NaN`` is not JSON and
breaks every other reader of ``metrics.jsonl``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import math
import os
import queue
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedlt.base.safe import describe_type, find_unsafe
from fedlt.errors import FedltError
from fedlt.store.safefile import open_nofollow, refuse_link

__all__ = [
    "CHECKPOINT",
    "FORMAT",
    "BackgroundWriter",
    "CheckpointError",
    "DiskFullError",
    "append_metrics",
    "check_compatible",
    "encode_checkpoint",
    "json_safe",
    "load_checkpoint",
    "read_metrics",
    "remove_stale_temps",
    "save_checkpoint",
    "truncate_metrics",
    "write_checkpoint",
    "write_file",
]

CHECKPOINT = "checkpoint.pt"

#: Version of the checkpoint layout written by :func:`save_checkpoint`. Checkpoints written before
#: the key existed count as format 0 and load as long as they hold only plain data. Bump it when the
#: layout changes incompatibly, so an older fedlt refuses a newer file with a clear message instead
#: of misreading it.
FORMAT = 1

#: Keys every fedlt checkpoint has (besides ``format``, absent in format 0).
REQUIRED_KEYS = ("round", "elapsed", "global", "plugins", "client_states")

#: Temporary files a writer of this module may leave behind when killed mid-write.
TEMP_PATTERNS = (
    "checkpoint.pt.*.tmp",
    "checkpoint.pt.tmp",
    "metrics.jsonl.*.tmp",
    "metrics.jsonl.tmp",
    "rounds.jsonl.*.tmp",
    "starts.json.*.tmp",
    "metrics.csv.*.tmp",
    "summary.json.*.tmp",
    "scenario.toml.*.tmp",
    "wandb-id.*.tmp",
)

_DISK_FULL = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
_CHUNK = 1 << 20  # write in 1 MiB pieces, so a full disk is met part-way as it is in reality
_FORGED = (
    "refused to load: it contains objects other than tensors and plain data "
    "(forged or from an incompatible version)"
)
_START_AGAIN = "Restore it from a backup, or start the run again in a new folder with `fedlt run`."


class CheckpointError(FedltError):
    """A checkpoint file cannot be resumed from: it is damaged, forged, foreign or too new.

    Raised on load (and by :func:`check_compatible`) instead of whatever torch or pickle would
    raise, so the user reads which file is wrong and why rather than a traceback. Exit status 2:
    it is bad input found before any work.

    Parameters
    ----------
    path : Path or str
        The checkpoint file.
    problem : str
        What is wrong with it, a clause with its subject ("the file is empty (0 bytes)",
        "refused to load: ...").
    hint : str, optional
        What to do about it.
    """

    exit_status = 2

    def __init__(self, path: Path | str, problem: str, hint: str | None = _START_AGAIN) -> None:
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        message = f"Cannot resume from {self.path}: {problem}."
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def __reduce__(self):  # picklable across processes (Ray workers), attributes included
        return (CheckpointError, (self.path, self.problem, self.hint))


class DiskFullError(FedltError):
    """The disk (or the user's quota) has no room for a checkpoint or metrics file.

    Nothing is half-written: the temporary file is removed and the previous checkpoint is left as
    it was, so the run resumes with ``fedlt resume`` once space is freed. Exit status 1: a failure
    while running, not bad input.

    Parameters
    ----------
    folder : Path or str
        Where the file was being written.
    needed : int
        Bytes the file needs.
    free : int or None
        Bytes free there when the write failed (``None`` if unknown).
    what : str
        What was being written, e.g. ``"the checkpoint"``.
    """

    exit_status = 1

    def __init__(
        self, folder: Path | str, needed: int, free: int | None, what: str = "the checkpoint"
    ) -> None:
        self.folder = str(folder)
        self.needed = needed
        self.free = free
        self.what = what
        have = "an unknown amount" if free is None else _size(free)
        super().__init__(
            f"Not enough free disk space in {self.folder} to write {what}: it needs {_size(needed)} "
            f"and {have} is free. Nothing was half-written and the previous checkpoint is intact; "
            f"free at least {_size(needed)} there and continue with `fedlt resume {self.folder}`."
        )

    def __reduce__(self):
        return (DiskFullError, (self.folder, self.needed, self.free, self.what))


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run_dir: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as the run's checkpoint, atomically, adding the ``format`` key.

    :func:`encode_checkpoint` then :func:`write_checkpoint`: a caller that wants the disk's work off
    its own thread (:class:`BackgroundWriter`) calls the two apart.

    Raises
    ------
    TypeError
        Something in ``payload`` is not a plain tree (see :mod:`fedlt.base.safe`), naming where, e.g.
        ``client_states[3]['replay']['memory'] is a function``. The engine checks plugin state
        earlier and names the plugin; this is the last line of defence, because such a file could
        not be loaded with ``weights_only=True`` and the run would be lost.
    DiskFullError
        No room for the file; the previous checkpoint is left intact and no temporary file remains.
    """
    write_checkpoint(run_dir, encode_checkpoint(payload))


def encode_checkpoint(payload: Mapping[str, Any]) -> memoryview:
    """``payload`` (plus ``format``) serialised: a snapshot, so the tensors may change afterwards.

    Raises ``TypeError`` as :func:`save_checkpoint` says.
    """
    data: dict[str, Any] = {"format": FORMAT}
    for key, value in payload.items():
        if type(key) is not str:
            raise TypeError(f"checkpoint key {key!r} is a {describe_type(key)}; top-level keys must be str")
        if key == "format":
            continue
        # ``model.state_dict()`` is an OrderedDict (with ``_metadata`` that load_state_dict uses);
        # weights_only loads it as it is, so it is checked as a plain dict but saved unchanged.
        tree = dict(value) if key == "global" and type(value) is collections.OrderedDict else value
        problem = find_unsafe(tree, key)
        if problem is not None:
            raise TypeError(f"cannot checkpoint: {problem}")
        data[key] = value
    buffer = io.BytesIO()
    torch.save(data, buffer)  # in memory first: the exact size is known before touching the disk
    return buffer.getbuffer()


def write_checkpoint(run_dir: Path, data: bytes | memoryview) -> None:
    """Replace the run's checkpoint by ``data`` (from :func:`encode_checkpoint`), atomically.

    Raises :class:`DiskFullError` as :func:`save_checkpoint` says.
    """
    _atomic_write(Path(run_dir) / CHECKPOINT, data, "the checkpoint")


class BackgroundWriter:
    """Runs write jobs one at a time on a background thread, so a checkpoint's disk work (writes and
    fsyncs, most of its cost for a small model) overlaps the next round's training.

    The caller snapshots first (:func:`encode_checkpoint`) and submits only disk work; jobs run in
    submission order, since :meth:`submit` waits for the previous one. A job's exception is raised
    in the caller's thread by the next :meth:`submit` or :meth:`wait`. What a kill leaves is what a
    synchronous writer leaves: each file is replaced atomically, so a kill mid-write keeps the
    previous checkpoint, as a kill just before the write would. One thread serves every job (a
    thread started per checkpoint cost about half a millisecond each).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` once the previous job is done (raising that job's error, if it failed)."""
        self.wait()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="fedlt-checkpoint-writer", daemon=True)
            self._thread.start()
        self._idle.clear()
        self._jobs.put(job)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                self._idle.set()

    def wait(self, raise_error: bool = True) -> None:
        """Block until the pending job is on disk; raise its error (unless ``raise_error`` is False,
        for a caller already unwinding from another error)."""
        self._idle.wait()
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error

    def close(self) -> None:
        """Finish the pending job (its error, if any, is dropped: call :meth:`wait` first to get it)
        and stop the thread."""
        self.wait(raise_error=False)
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The run's last checkpoint, or ``None`` if it never finished a round.

    Only tensors and plain data are built (``weights_only=True``); the result is checked to have
    the layout :func:`save_checkpoint` writes. Pass it to :func:`check_compatible` with the run's
    model before loading the weights.

    Raises
    ------
    CheckpointError
        The file is empty, truncated, garbage, forged, not a fedlt checkpoint or of a newer format.
    """
    path = Path(run_dir) / CHECKPOINT
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():
        raise CheckpointError(path, "it is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(path, f"the file cannot be read ({exc.strerror or exc})", hint=None) from None
    if size == 0:
        raise CheckpointError(path, "the file is empty (0 bytes): the write that made it was cut off")
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                path,
                f"the file is truncated or damaged: an incomplete archive of {_size(size)} "
                "(an interrupted write or copy?)",
            )
    elif not head.startswith(b"\x80"):  # neither torch's zip archive nor a (legacy) pickle stream
        raise CheckpointError(path, f"the file is not a PyTorch checkpoint (its first bytes are {head!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/pickle raise many kinds; all mean "this file cannot be resumed"
        raise CheckpointError(path, _load_problem(exc)) from None
    _check_layout(path, obj)
    return obj


def _load_problem(exc: Exception) -> str:
    """What a ``torch.load`` failure says about the file, in one clause."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
        return _FORGED
    if isinstance(exc, EOFError):
        return "the file is truncated (it ends in the middle of the data)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"the file is damaged and cannot be read ({type(exc).__name__}: {first[:200]})"


def _check_layout(path: Path, obj: Any) -> None:
    """Raise :class:`CheckpointError` unless ``obj`` has the layout :func:`save_checkpoint` writes."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            path, f"it holds a {describe_type(obj)}, not a fedlt checkpoint (a dict of run state)"
        )
    version = obj.get("format", 0)
    if type(version) is not int or version < 0:
        raise CheckpointError(path, f"it has an invalid 'format' entry {version!r} (expected an int >= 0)")
    if version > FORMAT:
        raise CheckpointError(
            path,
            f"it was written by a newer fedlt (checkpoint format {version}; "
            f"this fedlt reads formats up to {FORMAT})",
            hint="Upgrade fedlt to resume it.",
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(
            path,
            f"it is not a fedlt checkpoint: it lacks the keys {missing} (it has {sorted(map(str, obj))[:8]})",
        )
    problem = None
    if type(obj["round"]) is not int or obj["round"] < 0:
        problem = f"'round' is {obj['round']!r}, not an int >= 0"
    elif type(obj["elapsed"]) not in (int, float) or not math.isfinite(obj["elapsed"]) or obj["elapsed"] < 0:
        problem = f"'elapsed' is {obj['elapsed']!r}, not a finite number of seconds >= 0"
    elif not isinstance(obj["global"], dict) or not all(
        type(k) is str and isinstance(v, torch.Tensor) for k, v in obj["global"].items()
    ):
        problem = "'global' is not a state dict (parameter names -> tensors)"
    elif not isinstance(obj["plugins"], dict) or not all(type(k) is str for k in obj["plugins"]):
        problem = "'plugins' is not a dict keyed by plugin name"
    elif not isinstance(obj["client_states"], dict) or not all(
        type(k) is int and isinstance(v, dict) for k, v in obj["client_states"].items()
    ):
        problem = "'client_states' is not a dict from client id (int) to per-plugin state"
    elif "stream_pos" in obj and (
        not isinstance(obj["stream_pos"], dict)
        or not all(type(k) is int and type(v) is int for k, v in obj["stream_pos"].items())
    ):
        problem = "'stream_pos' is not a dict from client id (int) to stream position (int)"
    elif "training" in obj and (
        not isinstance(obj["training"], list) or not all(isinstance(t, dict) for t in obj["training"])
    ):
        problem = "'training' is not a list of per-round records"
    if problem is not None:
        raise CheckpointError(path, f"it is not a valid fedlt checkpoint: {problem}")


def check_compatible(
    ckpt: Mapping[str, Any], model_state: Mapping[str, torch.Tensor], path: Path | str | None = None
) -> None:
    """Refuse a checkpoint whose global weights do not fit the run's model.

    Another scenario's (or another model's) checkpoint copied into the folder would otherwise
    fail deep inside ``load_state_dict`` with a wall of key names, or, worse, load partly.

    Parameters
    ----------
    ckpt : Mapping
        What :func:`load_checkpoint` returned.
    model_state : Mapping[str, Tensor]
        The run's ``model.state_dict()``.
    path : Path or str, optional
        The checkpoint file, to name it in the message (default: ``checkpoint.pt``).

    Raises
    ------
    CheckpointError
        Naming the first key the checkpoint lacks, has in excess, or holds with another shape.
    """
    where = path if path is not None else CHECKPOINT
    saved = ckpt["global"]
    hint = (
        "The run's scenario builds a different model: resume with the scenario that wrote it, or start anew."
    )
    for key, tensor in model_state.items():
        if key not in saved:
            raise CheckpointError(
                where, f"it was written for another model: it lacks weights for {key!r}", hint
            )
        have, want = tuple(saved[key].shape), tuple(tensor.shape)
        if have != want:
            raise CheckpointError(
                where,
                f"it was written for another model: {key!r} has shape {have} there "
                f"but {want} in this run's model",
                hint,
            )
    extra = [k for k in saved if k not in model_state]
    if extra:
        raise CheckpointError(
            where,
            f"it was written for another model: it has weights {extra[0]!r} this run's model lacks",
            hint,
        )


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Delete temporary files that killed writers left in ``run_dir``; returns their names.

    Call it only while holding the folder's claim (:func:`fedlt.store.rundir.claim`): then no other
    writer is active there, so every such file is debris from a crash and never a live write.
    """
    removed = []
    for pattern in TEMP_PATTERNS:
        for tmp in Path(run_dir).glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp.name)
    return sorted(removed)


# --------------------------------------------------------------------------- metrics


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively.

    ``json.dumps`` writes those as the bare words ``NaN`` / ``Infinity``, which are not JSON:
    ``jq``, JavaScript, pandas' strict readers and many others then reject the whole file.
    Dicts, lists and tuples are rebuilt (tuples as lists, as JSON has them); other values are
    returned unchanged.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(dict(record)), allow_nan=False) + "\n"


def append_metrics(path: Path, record: Mapping[str, Any] | list[Mapping[str, Any]]) -> None:
    """Append ``record`` (or several) to a metrics file as strict JSON lines (NaN/inf written as
    ``null``), with one write and one flush.

    The line is flushed to disk before returning, so a checkpoint written afterwards never gets
    ahead of the metrics it follows. On a full disk the partial line is cut off again, so the file
    stays a sequence of whole lines, and :class:`DiskFullError` is raised.
    """
    path = Path(path)
    records = record if isinstance(record, list) else [record]
    line = "".join(_json_line(r) for r in records).encode()
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, line)
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if exc.errno in _DISK_FULL:
                raise DiskFullError(path.parent, len(line), _free_bytes(path.parent), f"{path.name}") from exc
            raise
    finally:
        os.close(fd)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a metrics file (a torn last line from a kill is skipped)."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_metrics(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep only evaluations up to ``last_round`` (the checkpoint's), so a resumed run rewrites
    exactly what an uninterrupted run would have written.

    The file is replaced atomically through a uniquely named temporary file; lines written by an
    older fedlt with ``NaN`` come back as ``null``.
    """
    kept = [r for r in read_metrics(path) if r["round"] <= last_round]
    text = "".join(_json_line(r) for r in kept)
    _atomic_write(Path(path), text.encode(), Path(path).name)
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------- writing


def _size(n: int) -> str:
    """``n`` bytes for people: ``"512 B"``, ``"3.4 MB"``."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"  # unreachable


def _free_bytes(folder: Path) -> int | None:
    """Bytes the current user may write in ``folder``, or ``None`` where the OS cannot tell."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` in chunks (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | memoryview, what: str) -> None:
    """Replace ``path`` by ``data`` atomically: all of it or, on any failure, the old file untouched.

    The temporary file is ``<name>.<pid>.<random>.tmp`` in the same folder (same filesystem, so the
    rename is atomic; unique, so two writers never share one) and is removed on every failure.
    """
    refuse_link(path)  # os.replace would not follow it, but a link here is not the run's file
    folder = path.parent
    needed = len(data)
    free = _free_bytes(folder)
    if free is not None and free < needed:
        raise DiskFullError(folder, needed, free, what)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o644)  # mkstemp makes it owner-only; a run's files are meant to be shared
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            _discard(tmp)
            raise DiskFullError(folder, needed, _free_bytes(folder), what) from exc
        raise
    finally:
        _discard(tmp)
    _fsync_dir(folder)


def write_file(path: Path, data: bytes | str, what: str | None = None) -> None:
    """Replace ``path`` by ``data`` atomically (world-readable, 0644), refusing a link at ``path``.

    Full disks raise :class:`DiskFullError` with the old file intact.
    """
    raw = data.encode() if isinstance(data, str) else data
    _atomic_write(refuse_link(path), raw, what or Path(path).name)


def _discard(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
