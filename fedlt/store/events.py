"""events.jsonl: the run's timeline, one JSON line per event, for the timeline and staleness plots.

Events: ``start`` (a client starts training from a server version), ``arrive`` (its update
reaches the server, with its staleness), ``drop`` (it dropped out or went offline; its update
never arrives), ``late`` (it missed a deadline round), ``refresh`` (a plugin rewrote a stale
update) and ``update`` (the server applied an update: ``version``). Every line has ``t``, the
virtual time in seconds. A checkpoint records the file's length, and a resume cuts the file
back to it, so a resumed run's timeline is the one an uninterrupted run writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from fedlt.store.safefile import open_nofollow, refuse_link

__all__ = ["EVENTS", "EventLog", "read_events"]

EVENTS = "events.jsonl"


class EventLog:
    """Appends events to ``run_dir/events.jsonl`` (nothing when ``enabled`` is False)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / EVENTS
        self.enabled = enabled
        self._fh: IO[str] | None = None

    def __call__(self, event: str, t: float, **fields: Any) -> None:
        if not self.enabled:
            return
        if self._fh is None:
            fd = open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._fh = os.fdopen(fd, "a", encoding="utf-8")
        # Written by hand (the fields are ints and one name): json.dumps per event would cost as much
        # as an asynchronous server update's own bookkeeping.
        extra = "".join(f',"{k}":{int(v)}' for k, v in fields.items())
        self._fh.write(f'{{"event":"{event}","t":{round(float(t), 6)!r}{extra}}}\n')

    def offset(self) -> int:
        """The file's length once everything written so far is on disk (for the checkpoint)."""
        if self._fh is not None:
            self._fh.flush()
        return self.path.stat().st_size if self.path.exists() else 0

    def restart(self, offset: int | None) -> None:
        """Cut the file back to ``offset`` (a checkpoint's), or remove it (None: a fresh run)."""
        self.close()
        refuse_link(self.path)  # truncating would cut the link's target
        if offset is None or not self.path.exists():
            self.path.unlink(missing_ok=True)
            return
        with self.path.open("r+b") as fh:
            fh.truncate(offset)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """A run's events, in the order they happened (an empty list when it wrote none)."""
    path = Path(run_dir) / EVENTS
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
