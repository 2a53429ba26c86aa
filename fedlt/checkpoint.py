"""Atomic checkpoints: a run killed at any moment (even SIGKILL) resumes from the last good one.

A checkpoint is written to a temporary file, flushed to disk and renamed over the previous
one, so the file on disk is always a complete checkpoint of some finished round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT", "load_checkpoint", "read_metrics", "save_checkpoint", "truncate_metrics"]

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as the run's checkpoint, atomically."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The run's last checkpoint, or ``None`` if it never finished a round."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


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
    exactly what an uninterrupted run would have written."""
    kept = [r for r in read_metrics(path) if r["round"] <= last_round]
    tmp = Path(path).with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept
