"""How many torch threads a run uses by default: the cores nobody else is using when it starts.

torch's default (one intra-op thread per core) thrashes when other processes compete for the
cores: measured on 2 cores with two busy processes, the quickstart's rounds took 16.9 s with 2
threads and 8.1 s with 1. One thread everywhere would waste a quiet many-core machine. So the
default (``engine.threads = "auto"``) measures, over the run's own start-up (data and model
building), how busy the other processes keep the cores; with more than one idle core it then times
a few of the run's own training steps with 1 thread and with the idle cores, alternating, and keeps
more threads only when they are clearly (10%) faster: small models (the quickstart's MLP) run
slower with 2 threads than with 1 even on a quiet machine (1.29 vs 0.96 s of rounds, measured).
``OMP_NUM_THREADS``, when set, overrides both measurements. The count is fixed for the run and
written into its scenario.toml, so a resumed run uses the same one (BLAS sums in a
thread-count-dependent order, so the thread count is part of what makes two runs bit-identical;
set ``engine.threads`` explicitly to pin it across machines).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["CoreSampler", "available_cores", "fastest_threads", "idle_cores", "pinned_threads"]

#: More threads are kept only when their step is at least this much faster than 1 thread's.
CLEARLY_FASTER = 0.9


def pinned_threads() -> int | None:
    """The thread count the user pinned with ``OMP_NUM_THREADS``, or None."""
    pinned = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(pinned) if pinned.isdigit() and int(pinned) >= 1 else None


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from /proc/stat, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class CoreSampler:
    """Measures how many cores *other* processes keep busy between ``start`` and ``idle``."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._ticks = _busy_ticks()
        self._own = _own_seconds()
        self._wall = time.monotonic()

    def others_busy(self, min_seconds: float = 0.2) -> float | None:
        """Cores used by other processes since :meth:`start` (waits until ``min_seconds`` have
        passed), or ``None`` where the OS does not tell (then assume none)."""
        if self._ticks is None:
            return None
        wait = min_seconds - (time.monotonic() - self._wall)
        if wait > 0:
            time.sleep(wait)
        now = _busy_ticks()
        if now is None:
            return None
        busy, total = now[0] - self._ticks[0], now[1] - self._ticks[1]
        if total <= 0:
            return None
        cores = os.cpu_count() or 1
        busy_cores = cores * busy / total
        own = (_own_seconds() - self._own) / max(time.monotonic() - self._wall, 1e-9)
        return max(0.0, busy_cores - own)

    def idle(self) -> int:
        """Idle cores available to this process (at least 1); ``OMP_NUM_THREADS``, when set, is the
        user's own choice and wins."""
        pinned = pinned_threads()
        if pinned is not None:
            return pinned
        cores = available_cores()
        busy = self.others_busy()
        if busy is None:
            return cores
        return max(1, min(cores, int(cores - busy + 0.5)))


def idle_cores(seconds: float = 0.2) -> int:
    """Idle cores measured over ``seconds`` from now (at least 1)."""
    sampler = CoreSampler()
    time.sleep(seconds)
    return sampler.idle()


def fastest_threads(step: Callable[[], None], candidates: Sequence[int], budget_s: float = 1.0) -> int:
    """The thread count in ``candidates`` whose ``step`` runs fastest, preferring the fewest.

    Each count is timed on repeated calls of ``step`` (batched so that a sample lasts >= 20 ms),
    counts alternating in a rotating order so that noise hits all alike, for about ``budget_s``
    seconds; medians decide. A count above the smallest must be ``CLEARLY_FASTER`` than it: fewer
    threads lose less when other processes start competing for the cores later.
    """
    import torch

    before = torch.get_num_threads()
    order = sorted(set(candidates))
    times: dict[int, list[float]] = {c: [] for c in order}
    try:
        reps = 1
        for c in order:  # warm-up: first-call allocations, thread pool start
            torch.set_num_threads(c)
            t = time.perf_counter()
            step()
            reps = max(reps, int(0.02 / max(time.perf_counter() - t, 1e-6)))
        reps = min(reps, 1000)
        deadline = time.monotonic() + budget_s
        for turn in range(5):
            for c in order[turn % len(order) :] + order[: turn % len(order)]:
                torch.set_num_threads(c)
                t = time.perf_counter()
                for _ in range(reps):
                    step()
                times[c].append(time.perf_counter() - t)
            if turn >= 2 and time.monotonic() > deadline:
                break
    finally:
        torch.set_num_threads(before)
    fewest = order[0]
    best = min(order, key=lambda c: (statistics.median(times[c]), c))
    if statistics.median(times[best]) > CLEARLY_FASTER * statistics.median(times[fewest]):
        return fewest
    return best
