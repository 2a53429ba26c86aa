"""How many torch threads a run uses by default: the cores nobody else is using when it starts.

torch's default (one intra-op thread per core) thrashes when other processes compete for the
cores: measured on 2 cores with two busy processes, the quickstart's rounds took 16.9 s with 2
threads and 8.1 s with 1. One thread everywhere would waste a quiet many-core machine. So the
default (``engine.threads = "auto"``) measures, over the run's own start-up (data and model
building), how busy the other processes keep the cores; with more than one idle core it then times
a few of the run's own training steps with 1 thread and with the idle cores, alternating, and keeps
more threads only when they are clearly (10%) faster: small models (the quickstart's MLP) run
slower with 2 threads than with 1 even on a quiet machine (1.29 vs 0.96 s of rounds, measured).
The timing is remembered per machine, torch version and model (``~/.cache/fedlt/threads.json``,
or ``$FEDLT_CACHE_DIR``), so only the first run of a model on a machine pays for it.
``OMP_NUM_THREADS``, when set, overrides both measurements. The count is fixed for the run and
written into its scenario.toml, so a resumed run uses the same one (BLAS sums in a
thread-count-dependent order, so the thread count is part of what makes two runs bit-identical;
set ``engine.threads`` explicitly to pin it across machines).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CoreSampler",
    "auto_threads",
    "available_cores",
    "cache_dir",
    "fastest_threads",
    "idle_cores",
    "pinned_threads",
    "remembered_fastest",
]

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

    def others_busy(self, min_seconds: float = 0.05) -> float | None:
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


# --------------------------------------------------------------------------- the run's choice


def cache_dir() -> Path:
    """Where fedlt keeps what it measured on this machine: ``$FEDLT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/fedlt``, else ``~/.cache/fedlt``."""
    if os.environ.get("FEDLT_CACHE_DIR"):
        return Path(os.environ["FEDLT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedlt"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    """Best effort (a read-only home loses nothing but the next run's shortcut)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        return


def remembered_fastest(
    key: Mapping[str, Any], step: Callable[[], None], candidates: Sequence[int]
) -> tuple[int, bool]:
    """:func:`fastest_threads`, remembered on this machine for ``key`` (the machine, torch, the
    model and batch it times, the candidates): the first run of a model on a machine times it,
    later ones read the answer. Returns (thread count, whether it was remembered)."""
    import torch

    full = {
        **key,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "candidates": list(candidates),
    }
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir() / "threads.json"
    cache = _read_cache(path)
    entry = cache.get(digest)
    if isinstance(entry, dict) and entry.get("threads") in candidates:
        return int(entry["threads"]), True
    best = fastest_threads(step, candidates)
    cache[digest] = {"threads": best, "key": full}
    _write_cache(path, cache)
    return best, False


def auto_threads(cores: CoreSampler, prepared: Any) -> int:
    """``engine.threads = "auto"`` for a prepared run: the idle cores, if the run's own training
    step is clearly faster with them than with one thread (timed once per machine and model, then
    remembered, so a run pays nothing for it after the first)."""
    import torch
    import torch.nn.functional as F

    idle = cores.idle()
    if idle <= 1 or pinned_threads() is not None or prepared.device.type != "cpu":
        return idle
    scenario, data = prepared.scenario, prepared.data
    n = min(scenario.train.batch_size, len(data.y_train))
    key = {
        "model": scenario.model.name,
        "params": scenario.model.params(),
        "input": list(data.input_shape),
        "classes": data.num_classes,
        "batch": n,
        "plugins": [p.name for p in scenario.plugins],
    }
    state: dict[str, Any] = {}

    def step() -> None:
        if "probe" not in state:  # built only when the answer is not remembered
            state["probe"] = copy.deepcopy(prepared.model).train()
        probe = state["probe"]
        probe.zero_grad(set_to_none=True)
        F.cross_entropy(probe(data.x_train[:n]), data.y_train[:n]).backward()

    with torch.random.fork_rng(devices=[]):  # dropout in the probe draws no run randomness
        return remembered_fastest(key, step, (1, idle))[0]
