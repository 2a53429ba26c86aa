"""engine.threads = "auto": idle cores measured, then more threads only when clearly faster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedlt
from fedlt.driver.threads import CoreSampler, fastest_threads, pinned_threads


def sleeper(seconds_by_threads: dict[int, float]):
    """A step whose duration depends on torch's thread count, as a real step's does."""

    def step() -> None:
        time.sleep(seconds_by_threads[torch.get_num_threads()])

    return step


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_more_threads_are_kept_when_clearly_faster(keep_threads) -> None:
    torch.set_num_threads(1)
    assert fastest_threads(sleeper({1: 0.004, 2: 0.002}), (1, 2), budget_s=0.1) == 2
    assert torch.get_num_threads() == 1  # the caller's count is restored


def test_one_thread_when_more_are_not_clearly_faster(keep_threads) -> None:
    # A small model: 2 threads slower than 1 (what the quickstart's MLP measured on 2 cores).
    assert fastest_threads(sleeper({1: 0.002, 2: 0.003}), (1, 2), budget_s=0.1) == 1
    # 2 threads only 2% faster: not worth the exposure to other processes' load.
    assert fastest_threads(sleeper({1: 0.0050, 2: 0.0049}), (1, 2), budget_s=0.1) == 1


def test_omp_num_threads_pins_the_count(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert pinned_threads() == 3
    assert CoreSampler().idle() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert pinned_threads() is None


def test_sampler_sees_a_busy_process(monkeypatch) -> None:
    """One spinning process is about one busy core; where the OS has no /proc/stat the sampler
    says it cannot tell (None) and "auto" then assumes an idle machine."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        sampler = CoreSampler()
        others = sampler.others_busy(min_seconds=0.6)
    finally:
        busy.kill()
        busy.wait()
    if not Path("/proc/stat").exists():
        assert others is None
        return
    assert others is not None and others >= 0.5


def test_auto_records_a_thread_count_the_run_used(tmp_path, monkeypatch, keep_threads) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    summary = fedlt.run("quickstart", out=tmp_path / "run", federation__rounds=1)
    recorded = (tmp_path / "run" / "scenario.toml").read_text()
    used = summary["provenance"]["threads"]
    assert 1 <= used <= len(os.sched_getaffinity(0))
    assert f"threads = {used}" in recorded  # a resume uses the same count


def test_the_thread_choice_is_timed_once_per_machine_and_model(tmp_path, monkeypatch, keep_threads) -> None:
    # The probe (a few training steps with 1 thread and with the idle cores) used to cost every
    # run about 0.2 s; it is now remembered per machine, torch and model.
    import fedlt.driver.threads as threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("FEDLT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(threads.CoreSampler, "idle", lambda self: 2)
    timed = []
    real = threads.fastest_threads

    def counting(step, candidates, budget_s=1.0):
        timed.append(tuple(candidates))
        return real(step, candidates, budget_s=0.1)

    monkeypatch.setattr(threads, "fastest_threads", counting)
    first = fedlt.run("quickstart", out=tmp_path / "a", federation__rounds=1)
    second = fedlt.run("quickstart", out=tmp_path / "b", federation__rounds=1)
    assert timed == [(1, 2)]  # the second run read the answer
    assert first["provenance"]["threads"] == second["provenance"]["threads"]
    other = fedlt.run("quickstart", out=tmp_path / "c", federation__rounds=1, model__hidden=[16])
    assert timed == [(1, 2), (1, 2)] and other["final"]["accuracy"] is not None  # another model: timed
    remembered = json.loads((tmp_path / "cache" / "threads.json").read_text())
    assert len(remembered) == 2 and all(e["threads"] in (1, 2) for e in remembered.values())
