"""How much memory there is, and how much a stretch of work took at its peak.

Used to refuse data that cannot fit before loading it, to size vectorized groups, and to record
each round's peak in the summary.
"""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path

import torch

__all__ = ["PeakMemory", "available_memory", "device_free_memory"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def available_memory() -> int | None:
    """Bytes of memory the system can give this process now, or None where that is unknown.

    Linux's ``MemAvailable`` (free memory plus what the kernel can reclaim); elsewhere the free
    physical pages ``os.sysconf`` reports.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def device_free_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device``: CUDA's free memory (plus what torch's caching allocator
    holds unused), or the system's available memory for a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + reserved)
    return available_memory()


def _rss_peak_kib() -> int | None:
    """The process's peak resident set (``VmHWM``) in KiB, or None where /proc is missing."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """The peak memory of a stretch of work: :meth:`start`, work, :meth:`peak_mb`.

    On CUDA the peak of tensor memory allocated on the device (reset at each start). On a CPU the
    process's peak resident set: reset at each start where Linux allows it (``/proc/self/clear_refs``),
    else the peak since the process started (``kind`` says which). On a CPU, stretches shorter than
    ``interval`` seconds (an asynchronous run's server updates) share a measurement: a start within
    ``interval`` of the last reset does not reset, and the peak is read at most once an interval,
    so the two /proc calls do not cost more than the work they measure.
    """

    def __init__(self, device: torch.device, interval: float = 0.25) -> None:
        self.device = device
        self.interval = interval
        self._reset_at = self._read_at = -math.inf
        self._last: float | None = None
        if device.type == "cuda":
            self.kind = "cuda allocated"
        else:
            self.kind = "process rss" if self._reset() else "process rss since start"

    @staticmethod
    def _reset() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "process rss" and time.monotonic() - self._reset_at >= self.interval:
            self._reset()
            self._reset_at = time.monotonic()

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if self._last is not None and time.monotonic() - self._read_at < self.interval:
            return self._last
        kib = _rss_peak_kib()
        if kib is None:
            usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            kib = int(usage)
        self._last, self._read_at = round(kib / 1024, 1), time.monotonic()
        return self._last
