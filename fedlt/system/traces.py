"""User-supplied device traces (CSV), read and checked before a run starts.

``system.speed_trace``: ``client,speed`` (every client once, speed in samples per virtual
second). ``system.availability_trace``: ``client,available_from,available_to`` (virtual
seconds; a client may have several rows, a client without rows is never available). A
problem names the key, the file, the row and what is allowed.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from fedlt.errors import ScenarioError

__all__ = ["read_availability_trace", "read_speed_trace"]


def _rows(key: str, path: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ScenarioError(
            key, path, f"a readable CSV file with columns {','.join(columns)}", "No such file."
        )
    with file.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        if header != list(columns):
            raise ScenarioError(
                key,
                path,
                f"a CSV file whose header is {','.join(columns)}",
                f"Its header is {','.join(header)!r}.",
            )
        return [
            (i + 2, {k.strip(): (v or "").strip() for k, v in row.items()}) for i, row in enumerate(reader)
        ]


def _number(key: str, path: str, line: int, column: str, text: str, minimum: float = 0.0) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < minimum:
        raise ScenarioError(
            key,
            path,
            f"a CSV file whose {column} values are finite numbers >= {minimum:g}",
            f"Line {line} has {column} = {text!r}.",
        )
    return value


def _client(key: str, path: str, line: int, text: str, n_clients: int) -> int:
    try:
        client = int(text)
    except ValueError:
        client = -1
    if not 0 <= client < n_clients:
        raise ScenarioError(
            key,
            path,
            f"a CSV file naming clients 0..{n_clients - 1} (partition.n_clients = {n_clients})",
            f"Line {line} names client {text!r}.",
        )
    return client


def read_speed_trace(path: str, n_clients: int, key: str = "system.speed_trace") -> np.ndarray:
    """Each client's speed from ``path``: ``(n_clients,)`` samples per virtual second."""
    speeds = np.full(n_clients, np.nan)
    for line, row in _rows(key, path, ("client", "speed")):
        client = _client(key, path, line, row["client"], n_clients)
        if not np.isnan(speeds[client]):
            raise ScenarioError(
                key, path, "a CSV file listing every client once", f"Client {client} is listed twice."
            )
        speeds[client] = _number(key, path, line, "speed", row["speed"])
        if speeds[client] <= 0:
            raise ScenarioError(
                key, path, "a CSV file of speeds > 0", f"Line {line} has speed {row['speed']!r}."
            )
    missing = np.flatnonzero(np.isnan(speeds))
    if missing.size:
        raise ScenarioError(
            key,
            path,
            "a CSV file listing every client once",
            f"{missing.size} clients are missing, e.g. {', '.join(map(str, missing[:5]))}.",
        )
    return speeds


def read_availability_trace(
    path: str, n_clients: int, key: str = "system.availability_trace"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The intervals of ``path`` as ``(clients, starts, ends)``, sorted by client then start."""
    clients, starts, ends = [], [], []
    for line, row in _rows(key, path, ("client", "available_from", "available_to")):
        clients.append(_client(key, path, line, row["client"], n_clients))
        start = _number(key, path, line, "available_from", row["available_from"])
        end = _number(key, path, line, "available_to", row["available_to"])
        if end <= start:
            raise ScenarioError(
                key,
                path,
                "a CSV file whose intervals have available_to > available_from",
                f"Line {line} has {start:g} to {end:g}.",
            )
        starts.append(start)
        ends.append(end)
    if not clients:
        raise ScenarioError(key, path, "a CSV file with at least one interval", "It has none.")
    c, s, e = np.asarray(clients, np.int64), np.asarray(starts), np.asarray(ends)
    order = np.lexsort((s, c))
    return c[order], s[order], e[order]
