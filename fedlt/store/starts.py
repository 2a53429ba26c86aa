"""starts.json: when and how a run folder was started, and every resume since.

A resume may change settings (``fedlt resume --set train.lr=0.5``); scenario.toml then holds the
new values, so the folder must also say from which round they apply, or a reader would take the
last values for the whole run. ``summary.json`` copies this record (``provenance.started``,
``provenance.command`` of the first start, ``resumes``), and ``fedlt compare`` flags runs whose
settings changed mid-run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlt.base.provenance import now
from fedlt.store.checkpoint import write_file

__all__ = ["STARTS", "read_starts", "record_resume", "record_start", "resume_comment"]

STARTS = "starts.json"


def record_start(run_dir: Path, command: str | None = None) -> dict[str, Any]:
    """Write a fresh run's starts.json: its start time and command, no resumes yet."""
    command = command if command is not None else " ".join(sys.argv)
    info = {"started": now(), "command": command, "resumes": []}
    _write(Path(run_dir), info)
    return info


def read_starts(run_dir: Path) -> dict[str, Any]:
    """The folder's starts.json; for a folder an older fedlt wrote, what its summary.json kept."""
    path = Path(run_dir) / STARTS
    try:
        info = json.loads(path.read_text())
        if isinstance(info, dict):
            info.setdefault("resumes", [])
            return info
    except (OSError, json.JSONDecodeError):
        pass
    try:
        old = json.loads((Path(run_dir) / "summary.json").read_text()).get("provenance", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        old = {}
    return {"started": old.get("started"), "command": old.get("command"), "resumes": []}


def record_resume(
    run_dir: Path, round: int, overrides: Mapping[str, Any], command: str | None = None
) -> dict[str, Any]:
    """Append a resume from checkpoint round ``round`` with the settings it changed
    (``{"train.lr": 0.5}``; empty when none) to starts.json; returns the entry."""
    info = read_starts(run_dir)
    entry = {
        "round": int(round),
        "overrides": dict(overrides),
        "command": command if command is not None else " ".join(sys.argv),
        "time": now(),
    }
    info["resumes"].append(entry)
    _write(Path(run_dir), info)
    return entry


def resume_comment(entry: Mapping[str, Any], before: Mapping[str, Any]) -> str:
    """The scenario.toml comment line for a resume that changed settings: from which round on
    each new value applies, and the value it replaced."""
    changes = ", ".join(
        f"{k} = {json.dumps(v)} (was {json.dumps(before.get(k))})" for k, v in entry["overrides"].items()
    )
    r = entry["round"]
    return f"# Resumed after round {r} ({entry['time']}): from round {r + 1}, {changes}"


def _write(run_dir: Path, info: Mapping[str, Any]) -> None:
    write_file(run_dir / STARTS, json.dumps(info, indent=2, default=str) + "\n", STARTS)
