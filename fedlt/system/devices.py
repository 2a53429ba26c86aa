"""Simulated devices: how fast each client computes, how long transfers take, when it is online.

Every per-client draw is a counter-based uniform named by ``(seed, purpose, client, ...)``
(:func:`fedlt.base.seeding.hash_uniform`), so a client's speed, its availability in a window
and whether a given start of it drops out are answered in any order, on any engine, after any
resume, and do not change when other clients are added. A client-round's virtual duration is

    download + compute + upload = 2 (latency + model_bytes / bandwidth) + samples / speed

with ``samples`` the samples its plan trains on (``local_epochs`` x its samples, ``local_steps``
x ``batch_size``, or its stream slice x ``online_iter``). Intertwined heterogeneity divides a
client's speed by ``1 + tail_slowdown * t`` and scales its availability by
``1 - tail_unavailability * t``, with ``t`` the share of its samples in tail classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedlt.base.seeding import hash_uniform, hash_uniforms
from fedlt.metrics.classification import shot_groups
from fedlt.system.traces import read_availability_trace, read_speed_trace

__all__ = ["Devices", "tail_shares"]

#: Windows looked at, at most, to find when a Bernoulli-windowed client goes offline.
_MAX_WINDOWS = 100_000


def tail_shares(
    client_counts: np.ndarray, global_counts: np.ndarray, rule: str, thresholds: Any
) -> np.ndarray:
    """Each client's share of samples in tail classes (the global split of ``eval.shot_rule``)."""
    tail = shot_groups(global_counts, rule, thresholds)["tail"]
    counts = np.asarray(client_counts, dtype=np.float64)
    totals = counts.sum(axis=1)
    held = counts[:, tail].sum(axis=1) if len(tail) else np.zeros(len(counts))
    return np.divide(held, totals, out=np.zeros_like(held), where=totals > 0)


def _normal(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normal draws from two uniforms (Box-Muller), one per client."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


class Devices:
    """The simulated devices of a run (``[system]``): speeds, transfer time, availability, dropouts.

    Parameters
    ----------
    cfg : SystemConfig
        The scenario's ``[system]`` table.
    seed : int
        The scenario's seed.
    tail_share : np.ndarray
        ``(n_clients,)`` each client's share of tail-class samples (:func:`tail_shares`).
    model_bytes : int
        Bytes of the entries clients download and upload.
    """

    def __init__(self, cfg: Any, seed: int, tail_share: np.ndarray, model_bytes: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.tail_share = np.asarray(tail_share, dtype=np.float64)
        self.n_clients = n = len(self.tail_share)
        self.model_bytes = int(model_bytes)
        clients = np.arange(n, dtype=np.uint64)
        self.speeds = self._base_speeds(clients) / (1.0 + cfg.tail_slowdown * self.tail_share)
        scale = 1.0 - cfg.tail_unavailability * self.tail_share
        self.p_available = cfg.availability_p * scale
        self.online_share = cfg.availability_online * scale
        self.phase = hash_uniforms(seed, "system-phase", clients) * cfg.availability_period
        per_transfer = cfg.latency + (self.model_bytes / cfg.bandwidth if cfg.bandwidth else 0.0)
        #: Download plus upload, virtual seconds (the same for every client).
        self.transfer_time = 2.0 * per_transfer
        self._intervals: list[tuple[np.ndarray, np.ndarray]] = []
        self._all_starts = np.empty(0)
        self._flat: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if cfg.availability == "trace":
            self._load_intervals(*read_availability_trace(cfg.availability_trace, n))

    # ------------------------------------------------------------------ construction

    def _base_speeds(self, clients: np.ndarray) -> np.ndarray:
        cfg, seed, n = self.cfg, self.seed, len(clients)
        if cfg.speed == "constant":
            return np.full(n, float(cfg.speed_mean))
        if cfg.speed == "trace":
            return read_speed_trace(cfg.speed_trace, n)
        u = hash_uniforms(seed, "system-speed", clients)
        if cfg.speed == "uniform":
            return cfg.speed_low + (cfg.speed_high - cfg.speed_low) * u
        if cfg.speed == "lognormal":
            z = _normal(u, hash_uniforms(seed, "system-speed-2", clients))
            return cfg.speed_mean * np.exp(cfg.speed_sigma * z)
        shares = np.cumsum([t[0] for t in cfg.speed_tiers])
        tier = np.minimum(np.searchsorted(shares, u, side="right"), len(shares) - 1)
        return np.asarray([t[1] for t in cfg.speed_tiers], dtype=np.float64)[tier]

    def _load_intervals(self, clients: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        """Each client's intervals, overlapping or touching ones merged, sorted by start."""
        per: list[list[list[float]]] = [[] for _ in range(self.n_clients)]
        for c, s, e in zip(clients.tolist(), starts.tolist(), ends.tolist(), strict=True):
            own = per[c]
            if own and s <= own[-1][1]:
                own[-1][1] = max(own[-1][1], e)
            else:
                own.append([s, e])
        self._intervals = [
            (np.asarray([iv[0] for iv in own]), np.asarray([iv[1] for iv in own])) for own in per
        ]
        flat_c = np.concatenate([np.full(len(s), c) for c, (s, _) in enumerate(self._intervals)]).astype(
            np.int64
        )
        flat_s = np.concatenate([s for s, _ in self._intervals])
        flat_e = np.concatenate([e for _, e in self._intervals])
        self._flat = (flat_c, flat_s, flat_e)
        self._all_starts = np.sort(flat_s)

    # ------------------------------------------------------------------ time

    @property
    def homogeneous(self) -> bool:
        """Equal speeds, no transfer time, always available, no dropouts: today's federation."""
        c = self.cfg
        return (
            c.speed == "constant"
            and c.tail_slowdown == 0
            and self.transfer_time == 0
            and c.availability == "always"
            and c.dropout == 0
        )

    def compute_time(self, client: int, samples: int) -> float:
        """Virtual seconds ``client`` computes on ``samples`` samples."""
        return float(samples) / float(self.speeds[client])

    def duration(self, client: int, samples: int) -> float:
        """Virtual seconds of a client-round: download, compute on ``samples``, upload."""
        return float(self.transfer_time + self.compute_time(client, samples))

    def drops(self, client: int, dispatch: int) -> float | None:
        """The share of its duration after which start ``dispatch`` of ``client`` drops out, or None."""
        if (
            self.cfg.dropout
            and hash_uniform(self.seed, "system-dropout", client, dispatch) < self.cfg.dropout
        ):
            return hash_uniform(self.seed, "system-drop-at", client, dispatch)
        return None

    # ------------------------------------------------------------------ availability

    def available(self, client: int, t: float, round: int) -> bool:
        """Is ``client`` online at virtual time ``t`` (in server update ``round``)?"""
        kind = self.cfg.availability
        if kind == "always":
            return True
        if kind == "bernoulli":
            return (
                hash_uniform(self.seed, "system-online", client, self._window(t, round))
                < self.p_available[client]
            )
        if kind == "periodic":
            return ((t - self.phase[client]) % self.cfg.availability_period) < self._online(client)
        starts, ends = self._intervals[client]
        i = int(np.searchsorted(starts, t, side="right")) - 1
        return i >= 0 and t < ends[i]

    def available_mask(self, t: float, round: int) -> np.ndarray:
        """``(n_clients,)`` who is online at ``t``: :meth:`available` for every client at once."""
        kind, n = self.cfg.availability, self.n_clients
        if kind == "always":
            return np.ones(n, dtype=bool)
        if kind == "bernoulli":
            draws = hash_uniforms(
                self.seed, "system-online", np.arange(n, dtype=np.uint64), self._window(t, round)
            )
            return draws < self.p_available
        if kind == "periodic":
            period = self.cfg.availability_period
            return ((t - self.phase) % period) < self.online_share * period
        assert self._flat is not None
        c, s, e = self._flat
        mask = np.zeros(n, dtype=bool)
        mask[c[(s <= t) & (t < e)]] = True
        return mask

    def online_until(self, client: int, start: float, end: float, round: int) -> float:
        """When ``client``, online at ``start``, goes offline, if before ``end`` (else ``end``)."""
        kind = self.cfg.availability
        if kind == "always":
            return end
        if kind == "bernoulli":
            window = self.cfg.availability_window
            if window is None:  # one draw per server update: online for the whole of it
                return end
            w, last = int(start // window), int(end // window)
            for nxt in range(w + 1, min(last, w + _MAX_WINDOWS) + 1):
                if hash_uniform(self.seed, "system-online", client, nxt) >= self.p_available[client]:
                    return nxt * window
            return end
        if kind == "periodic":
            phase_in = (start - self.phase[client]) % self.cfg.availability_period
            return float(min(end, start + self._online(client) - phase_in))
        starts, ends = self._intervals[client]
        i = int(np.searchsorted(starts, start, side="right")) - 1
        return min(end, float(ends[i])) if i >= 0 and start < ends[i] else start

    def next_change(self, t: float) -> float | None:
        """The first time after ``t`` at which someone may come online (None: never, by time alone)."""
        kind = self.cfg.availability
        if kind == "bernoulli" and self.cfg.availability_window:
            return (math.floor(t / self.cfg.availability_window) + 1) * self.cfg.availability_window
        if kind == "periodic":
            period = self.cfg.availability_period
            wait = period - ((t - self.phase) % period)
            return t + float(wait[self.online_share > 0].min()) if (self.online_share > 0).any() else None
        if kind == "trace":
            i = int(np.searchsorted(self._all_starts, t, side="right"))
            return float(self._all_starts[i]) if i < len(self._all_starts) else None
        return None

    def _window(self, t: float, round: int) -> int:
        window = self.cfg.availability_window
        return int(t // window) if window else int(round)

    def _online(self, client: int) -> float:
        return float(self.online_share[client]) * self.cfg.availability_period

    # ------------------------------------------------------------------ records

    def expected_durations(self, samples: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(n_clients,)`` durations for per-client sample counts."""
        return self.transfer_time + np.asarray(samples, dtype=np.float64) / self.speeds

    def save(self, path: Path) -> None:
        """What rebuilds these devices without the data (the timeline plot): one small .npz."""
        np.savez_compressed(
            path, tail_share=self.tail_share, model_bytes=self.model_bytes, speeds=self.speeds
        )

    @classmethod
    def load(cls, path: Path, cfg: Any, seed: int) -> Devices:
        """The devices :meth:`save` wrote, for ``cfg`` and ``seed`` (the run's scenario)."""
        with np.load(path) as saved:
            return cls(cfg, seed, saved["tail_share"], int(saved["model_bytes"]))
