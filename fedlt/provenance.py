"""What machine produced a number: recorded beside every benchmark and study result."""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_model", "gpu_model"]


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_model() -> str | None:
    """The first CUDA device's name, or None on a machine without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
