"""One run per folder: used folders are refused up front, and a running run holds its folder.

The claim tests use real processes: a child that holds a claim while the parent tries, a child
killed with SIGKILL (its OS lock goes, its lock file stays), and a lock file naming a pid that has
exited. Children import only ``fedlt.store.rundir`` (and ``fedlt.errors``), not the whole package, so
each starts in a fraction of a second instead of the seconds torch takes to import.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedlt.store.rundir import (
    FEDLT_ARTEFACTS,
    LOCK,
    RunDirError,
    RunLock,
    artefacts_in,
    check_fresh_dir,
    claim,
)

ROOT = Path(__file__).resolve().parent.parent

#: Child preamble: a bare ``fedlt`` package object, so ``import fedlt.store.rundir`` skips fedlt/__init__.
_LIGHT_IMPORT = f"""
import sys, types
pkg = types.ModuleType("fedlt")
pkg.__path__ = [{str(ROOT / "fedlt")!r}]
sys.modules["fedlt"] = pkg
from fedlt.store.rundir import claim
"""


def _holder(run_dir: Path) -> subprocess.Popen[str]:
    """A child process that claims ``run_dir``, says so, and holds it until its stdin closes."""
    code = _LIGHT_IMPORT + textwrap.dedent(
        f"""
        lock = claim({str(run_dir)!r}, command="holder-test")
        print("claimed", flush=True)
        sys.stdin.read()
        lock.release()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    line = child.stdout.readline()
    assert line == "claimed\n", f"the child failed to claim (exit {child.poll()})"
    return child


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "started": "2024-01-01T00:00:00",
        "command": "x",
    }
    (run_dir / LOCK).write_text(json.dumps(info))


# --------------------------------------------------------------------------- artefacts


def test_artefacts_in_lists_only_what_fedlt_writes(tmp_path):
    for name in ("scenario.toml", "checkpoint.pt.123.abcd.tmp", "summary.json", "notes.txt", "data.csv"):
        (tmp_path / name).write_text("x")
    (tmp_path / "tensorboard").mkdir()
    assert artefacts_in(tmp_path) == [
        "checkpoint.pt.123.abcd.tmp",
        "scenario.toml",
        "summary.json",
        "tensorboard",
    ]
    assert artefacts_in(tmp_path / "missing") == []
    assert LOCK in FEDLT_ARTEFACTS and "metrics.jsonl" in FEDLT_ARTEFACTS


# --------------------------------------------------------------------------- fresh folders


def test_a_new_or_empty_folder_is_accepted_and_nothing_is_created(tmp_path):
    check_fresh_dir(tmp_path / "a" / "b" / "c")
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("mine")  # the user's own files are fine
    check_fresh_dir(tmp_path / "empty")
    assert os.listdir(tmp_path / "empty") == ["README.md"]


@pytest.mark.parametrize("artefact", ["scenario.toml", "metrics.jsonl", "checkpoint.pt", "starts.json"])
def test_a_folder_holding_a_run_is_refused_naming_what_it_holds(tmp_path, artefact):
    (tmp_path / artefact).write_text("x")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(RunDirError) as info:
        check_fresh_dir(tmp_path, key="--out")
    message = str(info.value)
    assert f"The --out folder {tmp_path}" in message
    assert artefact in message and "summary.json" in message
    assert f"fedlt resume {tmp_path}" in message
    assert info.value.exit_status == 2


def test_a_folder_holding_only_a_lock_is_left_to_the_claim(tmp_path):
    # A run killed while its data was built (or a full disk when the lock was written) leaves only
    # fedlt.lock: that is no run, and claim() takes it over when stale or names a live holder.
    (tmp_path / LOCK).write_text("")
    check_fresh_dir(tmp_path, key="--out")
    with pytest.warns(RuntimeWarning, match="stale lock"):
        lock = claim(tmp_path, fresh=True)
    lock.release()
    assert os.listdir(tmp_path) == []


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        check_fresh_dir(tmp_path / "f", key="out=")


def test_a_folder_under_a_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError) as info:
        check_fresh_dir(tmp_path / "f" / "run")
    assert f"{tmp_path / 'f'} is a file, not a folder" in str(info.value)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root ignores file permissions, so a read-only folder is writable and cannot be tested",
)
@pytest.mark.parametrize("sub", ["", "new"])
def test_a_read_only_folder_is_refused(tmp_path, sub):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(RunDirError, match="not writable"):
            check_fresh_dir(folder / sub if sub else folder)
    finally:
        folder.chmod(0o755)
    assert os.listdir(folder) == []


# --------------------------------------------------------------------------- claims


def test_claim_creates_the_lock_and_release_removes_it(tmp_path):
    run_dir = tmp_path / "run"
    with claim(run_dir, command="fedlt run x") as lock:
        assert isinstance(lock, RunLock) and lock.held
        info = json.loads((run_dir / LOCK).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["command"] == "fedlt run x" and info["started"]
        (run_dir / "metrics.jsonl").write_text("")
    assert not lock.held and not (run_dir / LOCK).exists()
    lock.release()  # twice is harmless
    assert run_dir.is_dir()  # it holds the run's files, so it stays


def test_a_folder_the_claim_created_and_nobody_used_is_removed_on_release(tmp_path):
    claim(tmp_path / "unused").release()
    assert not (tmp_path / "unused").exists()
    (tmp_path / "existing").mkdir()
    claim(tmp_path / "existing").release()
    assert (tmp_path / "existing").is_dir()  # the user's folder is never removed


def test_a_second_claim_in_the_same_process_is_refused_naming_the_pid(tmp_path):
    with claim(tmp_path, command="first"):
        with pytest.raises(RunDirError) as info:
            claim(tmp_path)
        message = str(info.value)
        assert f"held by pid {os.getpid()} on host {socket.gethostname()} since" in message
        assert str(tmp_path) in message and "command: first" in message
        assert info.value.exit_status == 2
        assert (tmp_path / LOCK).exists()  # the refused claim did not disturb the held one
    with claim(tmp_path):  # free again once released
        pass


def test_a_dropped_claim_gives_the_folder_back(tmp_path):
    lock = claim(tmp_path)
    del lock
    gc.collect()
    assert not (tmp_path / LOCK).exists()
    claim(tmp_path).release()


def test_a_claim_held_by_a_live_process_is_refused(tmp_path):
    child = _holder(tmp_path)
    try:
        with pytest.raises(RunDirError, match=rf"held by pid {child.pid} on host .* since .*holder-test"):
            claim(tmp_path)
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    assert not (tmp_path / LOCK).exists()
    claim(tmp_path).release()


def test_a_claim_left_by_a_killed_process_is_taken_over(tmp_path):
    child = _holder(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert (tmp_path / LOCK).exists()  # SIGKILL leaves the file; the OS lock is gone with the process
    with pytest.warns(RuntimeWarning, match=rf"pid {child.pid} .* has exited"):
        lock = claim(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_stale_lock_from_a_dead_pid_is_taken_over_with_a_warning(tmp_path):
    pid = _dead_pid()
    _write_lock(tmp_path, pid)
    with pytest.warns(RuntimeWarning, match=rf"Taking over the stale lock .*pid {pid}"):
        lock = claim(tmp_path)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize("content", ["", "{not json", '{"pid": "x"}', "[1, 2]"])
def test_an_unreadable_lock_is_taken_over_with_a_warning(tmp_path, content):
    (tmp_path / LOCK).write_text(content)
    with pytest.warns(RuntimeWarning, match="content is unreadable"):
        claim(tmp_path).release()


def test_a_live_pid_without_the_os_lock_still_holds_the_folder(tmp_path):
    """A lock file naming a running process on this host is respected even without flock."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, sleeper.pid)
        with pytest.raises(RunDirError, match=rf"held by pid {sleeper.pid}.*pid was reused"):
            claim(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == sleeper.pid  # untouched


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    _write_lock(tmp_path, _dead_pid(), host="some-other-host.invalid")
    with pytest.raises(RunDirError, match=r"some-other-host\.invalid.*cannot be checked"):
        claim(tmp_path)


def test_only_one_of_many_simultaneous_claims_wins(tmp_path):
    """Children race to claim one folder: exactly one wins, the others are refused."""
    code = _LIGHT_IMPORT + textwrap.dedent(
        f"""
        from fedlt.store.rundir import RunDirError
        sys.stdin.readline()  # start together
        try:
            lock = claim({str(tmp_path)!r})
        except RunDirError:
            print("refused", flush=True)
        else:
            print("won", flush=True)
            sys.stdin.read()
            lock.release()
        """
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    outcomes = [child.stdout.readline().strip() for child in children]
    for child in children:
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    assert sorted(outcomes) == ["refused", "refused", "refused", "won"]


def test_a_fresh_claim_refuses_a_folder_that_gained_a_run(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(RunDirError, match=r"already holds a fedlt run \(checkpoint\.pt\)"):
        claim(tmp_path, fresh=True)
    assert not (tmp_path / LOCK).exists()  # the claim was given back
    claim(tmp_path).release()  # resuming claims the same folder without complaint
