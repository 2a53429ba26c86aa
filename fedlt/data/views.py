"""A client's view of its data: what it trains on this round and what it has read so far.

Offline, a client always sees all of its indices. In a continual scenario it reads its stream
``samples_per_round`` at a time, and everything that touches the client (the round's task, the
personalised evaluation, the anytime metrics, checkpoints) must agree on how far it has read:
that position lives here, in :class:`ClientViews`, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlt.data.federated import FederatedData
from fedlt.data.stream import ProportionalPacing

__all__ = ["ClientViews", "RoundSlice"]


@dataclass(frozen=True)
class RoundSlice:
    """A client's stream slice for one round.

    Attributes
    ----------
    indices : np.ndarray
        Dataset indices the client reads this round, in stream order.
    seen_before : np.ndarray
        ``(C,)`` class counts of what it had read before this slice.
    end : int
        Its stream position after the round.
    """

    indices: np.ndarray
    seen_before: np.ndarray
    end: int


class ClientViews:
    """How far every client has read its stream (sparse: only clients that have read something).

    Parameters
    ----------
    data : FederatedData
        The run's data (its ``streams`` are ``None`` offline).
    samples_per_round : int or None
        Stream samples a selected client reads per round.
    """

    def __init__(self, data: FederatedData, samples_per_round: int | None) -> None:
        self.data = data
        self.samples_per_round = samples_per_round
        self.positions: dict[int, int] = {}
        settings = data.stream_settings or {}
        #: ``stream.pacing = "proportional"``: where each client should stand after each round.
        self.pacing = (
            ProportionalPacing.of(data.streams, samples_per_round)
            if data.streams is not None and samples_per_round is not None
            and settings.get("pacing") == "proportional"
            else None
        )

    @property
    def streaming(self) -> bool:
        return self.data.streams is not None

    def position(self, client: int) -> int:
        """Samples of its stream the client has read (offline: all of its samples)."""
        if not self.streaming:
            return len(self.data.client_indices[client])
        return self.positions.get(client, 0)

    def stream_length(self, client: int) -> int:
        assert self.data.streams is not None
        return len(self.data.streams[client].indices)

    def next_slice(self, client: int, round: int | None = None) -> RoundSlice:
        """The slice the client reads if trained in round ``round`` (nothing is advanced yet):
        ``samples_per_round`` more, or with proportional pacing up to where the pacing puts it
        after that round (what it missed while not selected included)."""
        assert self.data.streams is not None and self.samples_per_round is not None
        stream = self.data.streams[client].indices
        pos = self.positions.get(client, 0)
        if self.pacing is not None and round is not None:
            end = max(pos, self.pacing.position(client, round))
        else:
            end = min(pos + self.samples_per_round, len(stream))
        return RoundSlice(stream[pos:end], self.seen_counts(client), end)

    def assign(self, tasks: Iterable[Any]) -> dict[int, int]:
        """In a stream, give each task (a :class:`~fedlt.training.round.ClientTask`) its client's
        next slice and the counts read before it; returns the positions the clients reach, for
        :meth:`advance` once the round is done. Offline: nothing to do, ``{}``."""
        ends: dict[int, int] = {}
        if not self.streaming:
            return ends
        for task in tasks:
            part = self.next_slice(task.client_id, task.round)
            task.indices, task.seen_counts = part.indices, part.seen_before
            ends[task.client_id] = part.end
        return ends

    def advance(self, ends: Mapping[int, int]) -> None:
        """Record the positions reached by the clients trained in a finished round."""
        self.positions.update({c: e for c, e in ends.items() if e > 0})

    def seen_indices(self, client: int) -> np.ndarray:
        """Dataset indices the client has read so far (offline: all of its indices)."""
        if not self.streaming:
            return self.data.client_indices[client]
        assert self.data.streams is not None
        return self.data.streams[client].indices[: self.positions.get(client, 0)]

    def seen_counts(self, client: int) -> np.ndarray:
        """``(C,)`` class counts of what the client has read so far."""
        if not self.streaming:
            return self.data.client_counts[client]
        return np.bincount(self.data.y_train_np[self.seen_indices(client)], minlength=self.data.num_classes)

    def exposed_classes(self) -> np.ndarray:
        """Boolean ``(C,)``: classes some client has read (all present classes offline)."""
        exposed = np.zeros(self.data.num_classes, dtype=bool)
        clients = self.positions if self.streaming else range(self.data.n_clients)
        for c in clients:
            exposed |= self.seen_counts(c) > 0
        return exposed

    def consumed(self) -> int:
        """Stream samples read by the whole federation so far."""
        return int(sum(self.positions.values())) if self.streaming else 0

    def exhausted(self) -> bool:
        """Every client has read its whole stream (always False offline)."""
        if not self.streaming:
            return False
        return all(self.positions.get(c, 0) >= self.stream_length(c) for c in range(self.data.n_clients))

    def state_dict(self) -> dict[int, int]:
        return dict(self.positions)

    def load_state_dict(self, positions: Mapping[int, int]) -> None:
        self.positions = {int(c): int(p) for c, p in positions.items()}
