"""Keep freed tensor memory in the process instead of returning it to the OS after every step.

glibc's default malloc hands blocks above a dynamic threshold back to the kernel with
``munmap``/``trim`` as soon as they are freed. A training step allocates and frees the same
activation and gradient buffers every batch, so each step then page-faults its buffers back in:
on the W1 benchmark that was ~1M page faults for fedlt against ~160k for the plain loop, about
10% of the run. Raising the mmap and trim thresholds (what ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` do at process start) lets freed blocks be reused.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Tune glibc malloc for a training process; True when applied (Linux/glibc only, once)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    _done = bool(ok)
    return _done
