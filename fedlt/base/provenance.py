"""Where a number came from: versions, commit, machine, device and times of a run or benchmark.

Written into every run's summary.json (``provenance``) and beside every benchmark and study
result, so a number can be traced to the code and machine that produced it.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "git_commit", "gpu_model", "now", "provenance"]


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


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout fedlt runs from (``+dirty`` with local changes), or None
    when fedlt is installed from a package rather than run from a repository."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit or None


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def provenance(device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Versions, commit, host and machine of this process, as JSON-ready values."""
    import numpy
    import torch

    from fedlt import __version__

    return {
        "fedlt": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_model(),
        "device": device,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
