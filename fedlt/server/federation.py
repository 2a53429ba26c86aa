"""How server updates happen on a virtual clock: ``federation.mode`` (docs/async.md).

One :class:`Federation` per run advances the virtual clock from server update to server update.
Every mode starts clients the same way (select, configure, train from the current global
weights) and applies updates through the same aggregation (:func:`aggregate_round`); they
differ only in when clients start and which arrivals make an update:

- ``sync``: a round waits for every selected client (today's FedAvg rounds);
- ``deadline``: a round keeps the first ``k`` arrivals before the deadline (over-selecting);
- ``async``: every arrival is mixed in at once (FedAsync), ``concurrency`` clients in flight;
- ``buffered``: every ``buffer_size`` arrivals make one step (FedBuff).

Events are ordered by virtual time, ties by client id, never by when an engine returns, so every
engine gives the same numbers. A client's update is a pure function of the global weights it
starts from, its data, its state and its seeds, so when it is computed does not change it: a
round's clients train together (sync, deadline), an asynchronous client trains when it arrives,
from the weights it started from. A client that drops out, goes offline or would miss a deadline
is not trained (its state and stream stay as they were: the server never hears of that work).
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from fedlt.base.seeding import hash_uniform, numpy_rng
from fedlt.data.federated import FederatedData
from fedlt.data.views import ClientViews
from fedlt.hooks.context import Arrival, RoundContext
from fedlt.hooks.dispatch import HookSet
from fedlt.server.aggregation import FedAsync, FedAvg, FedBuff
from fedlt.server.rounds import aggregate_round, choose_clients, configure_round, round_context
from fedlt.server.staleness import staleness_weight
from fedlt.system.devices import Devices
from fedlt.training.round import ClientResult, ClientTask

__all__ = ["Federation", "FederationStalled", "ServerUpdate", "make_federation"]

#: Trains tasks from global weights, yielding results in task order (live weights): the engine,
#: wrapped by the driver so stream positions advance and observers see each client.
Train = Callable[[list[ClientTask], Mapping[str, torch.Tensor]], Iterator[ClientResult]]
#: Writes one event of the run's timeline (:class:`fedlt.store.events.EventLog`).
Emit = Callable[..., None]


class FederationStalled(Exception):
    """No client can ever start again (an availability trace has ended): the run stops early."""


class ServerUpdate(NamedTuple):
    """What one server update did: its mean client loss, the configs its clients got, its clock."""

    loss: float
    round_config: Mapping[str, Any]
    client_configs: Mapping[int, Mapping[str, Any]]
    virtual_time: float
    arrivals: int


@dataclass
class _Flight:
    """A started client: when it started and is due, whether it arrives, and (once it has arrived
    and trained, while it waits in FedBuff's buffer) its update."""

    client: int
    dispatch: int
    base_version: int
    start: float
    due: float
    config: Mapping[str, Any]
    arrives: bool
    result: ClientResult | None = None

    def state(self) -> dict[str, Any]:
        r = self.result
        held = None
        if r is not None:
            held = {
                "weights": dict(r.weights), "n_samples": r.n_samples, "loss": r.loss, "n_steps": r.n_steps,
                "payloads": r.payloads, "states": r.states,
            }  # fmt: skip
        return {
            "client": self.client, "dispatch": self.dispatch, "base_version": self.base_version,
            "start": self.start, "due": self.due, "config": dict(self.config), "arrives": self.arrives,
            "result": held,
        }  # fmt: skip

    @classmethod
    def from_state(cls, s: Mapping[str, Any], device: torch.device) -> _Flight:
        held = s["result"]
        result = None
        if held is not None:
            weights = {k: v.to(device) for k, v in held["weights"].items()}
            result = ClientResult(
                s["client"],
                weights,
                held["n_samples"],
                held["loss"],
                held["n_steps"],
                held["payloads"],
                held["states"],
            )
        return cls(
            s["client"],
            s["dispatch"],
            s["base_version"],
            s["start"],
            s["due"],
            s["config"],
            s["arrives"],
            result,
        )


def _pack(bases: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Weights of one model at several versions as one ``[versions, numel]`` tensor per dtype, so a
    checkpoint of many base versions saves a few records (torch.save's cost is per record)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for weights in bases:
        for t in weights.values():
            groups.setdefault(str(t.dtype).removeprefix("torch."), []).append(t.detach().reshape(-1))
    return {dtype: torch.cat(parts).reshape(len(bases), -1) for dtype, parts in groups.items()}


def _unflatten(
    flat: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """The weights :func:`_flatten` packed, shaped as ``like`` (the model's entries, in key order)."""
    offsets = dict.fromkeys(flat, 0)
    out = {}
    for key, ref in like.items():
        dtype = str(ref.dtype).removeprefix("torch.")
        start = offsets[dtype]
        out[key] = flat[dtype][start : start + ref.numel()].reshape(ref.shape).to(device).clone()
        offsets[dtype] = start + ref.numel()
    return out


def _unpacked_bases(
    saved: Mapping[Any, Any], like: Mapping[str, torch.Tensor], device: torch.device, version: int
) -> dict[int, dict[str, torch.Tensor]]:
    """The bases :meth:`Asynchronous._packed_bases` saved (``like``: the restored global weights),
    or those of a checkpoint written before they were packed (``{version: flat}``)."""
    if "versions" not in saved:
        return {int(v): _unflatten(w, like, device) for v, w in saved.items()}
    bases = {
        int(v): _unflatten({dtype: rows[i] for dtype, rows in saved["packed"].items()}, like, device)
        for i, v in enumerate(saved["versions"])
    }
    if saved.get("current"):
        bases[version] = {k: v.detach().to(device).clone() for k, v in like.items()}
    return bases


def _copy(result: ClientResult) -> ClientResult:
    """A result whose weights outlive the engine's next client (engines yield live tensors)."""
    weights = {k: v.detach().clone() for k, v in result.weights.items()}
    return replace(result, weights=weights)


@dataclass
class Federation(ABC):
    """The server's side of a run on the virtual clock; :meth:`update` performs server update ``r``.

    Parameters are the run's parts: scenario, data, plugins, the server's model and the keys
    clients train, the simulated devices, the stream views, each client's plugin state, how to
    train (``train``) and where events go (``emit``).
    """

    scenario: Any
    data: FederatedData
    hooks: HookSet
    model: nn.Module
    keys: Sequence[str]
    devices: Devices
    views: ClientViews
    client_states: dict[int, dict[str, dict[str, Any]]]
    train: Train
    emit: Emit
    clock: float = 0.0
    dispatches: int = 0
    n_rounds: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_rounds = self.scenario.federation.rounds
        #: Events so far by kind (start, arrive, drop, late, refresh, update) and arrivals by staleness.
        self.counts: dict[str, int] = {}
        self.staleness: dict[int, int] = {}

    @property
    def mode(self) -> str:
        return self.scenario.federation.mode

    @abstractmethod
    def update(self, r: int) -> ServerUpdate:
        """Advance the clock through server update ``r`` (from 1); the model then holds its result."""

    # ------------------------------------------------------------------ shared parts

    def note(self, event: str, t: float, **fields: Any) -> None:
        """Count an event and write it to the timeline."""
        self.counts[event] = self.counts.get(event, 0) + 1
        if event == "arrive":
            self.staleness[fields["staleness"]] = self.staleness.get(fields["staleness"], 0) + 1
        self.emit(event, t, **fields)

    def report(self) -> dict[str, Any]:
        """What summary.json says of the federation: mode, clock, events, staleness of arrivals."""
        arrived = sum(self.staleness.values())
        mean = sum(k * v for k, v in self.staleness.items()) / arrived if arrived else None
        return {
            "mode": self.mode,
            "virtual_time": round(self.clock, 6),
            "starts": self.counts.get("start", 0),
            "arrivals": self.counts.get("arrive", 0),
            "dropped": self.counts.get("drop", 0),
            "late": self.counts.get("late", 0),
            "refreshed": self.counts.get("refresh", 0),
            "staleness_mean": mean,
            "staleness_max": max(self.staleness, default=None),
            "staleness_histogram": {str(k): self.staleness[k] for k in sorted(self.staleness)},
        }

    def per_round(self) -> int:
        """``k``: clients per round, ``max(1, floor(n_clients * fraction_clients))``."""
        return max(1, int(self.data.n_clients * self.scenario.federation.fraction_clients + 1e-9))

    def samples(self, client: int, r: int | None = None) -> int:
        """Samples a client-round of ``client`` (in round ``r``) trains on by the scenario's plan
        (for its duration; a stream slice depends on the round under proportional pacing)."""
        t = self.scenario.train
        if self.views.streaming:
            part = self.views.next_slice(client, r)
            return len(part.indices) * self.scenario.stream.online_iter
        if t.local_steps is not None:
            return t.local_steps * t.batch_size
        return t.local_epochs * len(self.data.client_indices[client])

    def context(self, r: int, selected: Sequence[int] = (), **when: Any) -> RoundContext:
        """A context of server update ``r`` at the current clock (no config beyond the round)."""
        when.setdefault("virtual_time", self.clock)
        return round_context(
            self.scenario.seed,
            self.data,
            r,
            self.n_rounds,
            selected,
            {"round": r},
            mode=self.mode,
            system=self.devices,
            **when,
        )

    def configure(self, r: int, chosen: Sequence[int]) -> tuple[RoundContext, dict[int, Mapping[str, Any]]]:
        return configure_round(
            self.hooks,
            self.scenario.seed,
            self.data,
            r,
            self.n_rounds,
            chosen,
            mode=self.mode,
            virtual_time=self.clock,
            system=self.devices,
        )

    def plan(self, client: int, dispatch: int, r: int) -> tuple[float, bool]:
        """When a client started now is due, and whether it arrives (False: it drops out then)."""
        duration = self.devices.duration(client, self.samples(client, r))
        end = self.clock + duration
        share = self.devices.drops(client, dispatch)
        offline = self.devices.online_until(client, self.clock, end, r)
        if share is not None:
            return float(min(self.clock + share * duration, offline)), False
        return float(offline), bool(offline >= end)

    def global_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        return {k: state[k] for k in self.keys}

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "clock": self.clock,
            "dispatches": self.dispatches,
            "counts": dict(self.counts),
            "staleness": dict(self.staleness),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clock = float(state.get("clock", 0.0))
        self.dispatches = int(state.get("dispatches", 0))
        self.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
        self.staleness = {int(k): int(v) for k, v in state.get("staleness", {}).items()}


# =========================================================================== rounds


class Rounds(Federation):
    """``sync`` and ``deadline``: rounds that start ``k`` (over-selected: ``m``) clients together."""

    def _online(self, r: int) -> np.ndarray | None:
        if self.devices.cfg.availability == "always":
            return None
        return self.devices.available_mask(self.clock, r)

    def _default(self, r: int, online: np.ndarray | None, want: int) -> list[int]:
        """Today's seeded uniform choice, among the online clients when some are not."""
        pool = None if online is None else np.flatnonzero(online)
        size = self.data.n_clients if pool is None else len(pool)
        if want >= size:
            return list(range(size)) if pool is None else pool.tolist()
        picked = numpy_rng(self.scenario.seed, "select", r).choice(size, size=want, replace=False)
        return picked.tolist() if pool is None else pool[picked].tolist()

    def _select(self, r: int, want: int) -> list[int]:
        """Who starts round ``r``: waits on the clock (windowed availability) while nobody is online."""
        for _ in range(10_000):
            online = self._online(r)
            if online is None or online.any():
                ctx = self.context(r)
                return choose_clients(
                    self.hooks,
                    lambda o=online: range(self.data.n_clients) if o is None else np.flatnonzero(o).tolist(),
                    want,
                    ctx,
                    lambda o=online: self._default(r, o, want),
                )
            later = self.devices.next_change(self.clock)
            if later is None:
                return []
            self.clock = later
        return []

    def want(self) -> int:
        return self.per_round()

    def keep(
        self, arrivals: list[tuple[float, int]], t0: float, last: float
    ) -> tuple[list[tuple[float, int]], float]:
        """The arrivals the round aggregates and when it ends (``last``: its last arrival or drop)."""
        return arrivals, last

    def update(self, r: int) -> ServerUpdate:
        chosen = self._select(r, self.want())
        t0 = self.clock
        if not chosen:
            self.note("update", self.clock, version=r, arrivals=0)
            return ServerUpdate(math.nan, {"round": r}, {}, self.clock, 0)
        ctx, configs = self.configure(r, chosen)
        due: dict[int, float] = {}
        arriving: list[tuple[float, int]] = []
        for c in chosen:
            self.dispatches += 1
            at, arrives = self.plan(c, self.dispatches, r)
            due[c] = at
            self.note("start", t0, client=c, version=r - 1)
            if arrives:
                arriving.append((at, c))
            else:
                self.note("drop", at, client=c)
        arriving.sort()
        kept, end = self.keep(arriving, t0, max(due.values()))
        for at, c in arriving[len(kept) :]:
            self.note("late", min(at, end), client=c)
        order = [c for _, c in kept] if self.mode == "deadline" else sorted(c for _, c in kept)
        state = self.global_state()
        arrivals = tuple(Arrival(c, r - 1, 0, t0, due[c], state) for c in order)
        tasks = [ClientTask(c, r, configs[c], self.client_states.get(c) or {}) for c in order]
        ctx = replace(ctx, arrivals=arrivals, virtual_time=end)
        loss = math.nan
        if tasks:
            results = self.train(tasks, state)
            loss, _ = aggregate_round(self.hooks, self.model, self.keys, ctx, results, self.client_states)
        for a in arrivals:
            self.note("arrive", a.arrived_at, client=a.client_id, staleness=0)
        self.clock = end
        self.note("update", end, version=r, arrivals=len(tasks))
        return ServerUpdate(loss, ctx.config, {c: configs[c] for c in order}, end, len(tasks))


class Sync(Rounds):
    """``sync``: a round ends when its last selected client arrives or drops out."""


class Deadline(Rounds):
    """``deadline``: select ``ceil(over_selection * k)``, keep the first ``k`` arrivals before the
    deadline; the round ends at the ``k``-th arrival, or at the deadline (Bonawitz et al. 2019)."""

    def want(self) -> int:
        return min(
            self.data.n_clients, math.ceil(self.scenario.federation.over_selection * self.per_round() - 1e-9)
        )

    def keep(
        self, arrivals: list[tuple[float, int]], t0: float, last: float
    ) -> tuple[list[tuple[float, int]], float]:
        limit = t0 + self.scenario.federation.deadline
        on_time = [(at, c) for at, c in arrivals if at <= limit][: self.per_round()]
        end = on_time[-1][0] if len(on_time) == self.per_round() else limit
        return on_time, end


# =========================================================================== asynchronous


class Asynchronous(Federation):
    """``async`` and ``buffered``: ``concurrency`` clients in flight; a slot refills at each arrival or
    drop; every ``buffer`` arrivals make one server update.

    A client is trained when it arrives, from the global weights it started from (kept per
    version while some client in flight started from them): the same update as training it at
    its start, with no work spent on clients that never arrive, and a checkpoint that holds the
    weights clients started from rather than their updates (re-run on resume, deterministically).
    """

    buffer_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.scenario.federation
        self.concurrency = f.concurrency or self.per_round()
        self.weight = staleness_weight(f.staleness, f.staleness_a, f.staleness_b)
        self.version = 0
        self.flights: dict[int, _Flight] = {}
        self.queue: list[tuple[float, int, int]] = []  # (due, client, dispatch): ties by client id
        self.buffer: list[_Flight] = []
        self.bases: dict[int, dict[str, torch.Tensor]] = {}
        self._state: dict[str, torch.Tensor] | None = None  # the model's live weights, when known

    # ------------------------------------------------------------------ starting clients

    def _pick(self, r: int, free: int) -> list[int]:
        """Up to ``free`` idle, online clients: the plugin's choice or a seeded uniform one, found by
        rejection sampling so a start costs the same with 100 or 100,000 clients."""
        n, seed, key = self.data.n_clients, self.scenario.seed, self.dispatches

        def online(c: int) -> bool:
            return c not in self.flights and self.devices.available(c, self.clock, r)

        def candidates() -> list[int]:
            mask = self.devices.available_mask(self.clock, r)
            return [int(c) for c in np.flatnonzero(mask) if int(c) not in self.flights]

        def default() -> list[int]:
            chosen: list[int] = []
            for attempt in range(32 * free + 64):
                c = min(n - 1, int(hash_uniform(seed, "async-select", key, attempt) * n))
                if c not in chosen and online(c):
                    chosen.append(c)
                    if len(chosen) == free:
                        return chosen
            rest = [c for c in candidates() if c not in chosen]  # most clients busy or offline
            if rest:
                order = numpy_rng(seed, "async-select", key).permutation(len(rest))
                chosen += [rest[i] for i in order[: free - len(chosen)]]
            return chosen

        if self.hooks.server_select_clients:
            pool = candidates()
            if not pool:
                return []
            return choose_clients(self.hooks, lambda: pool, min(free, len(pool)), self.context(r), default)
        return sorted(default())

    def _fill(self, r: int) -> None:
        """Start clients for server update ``r`` until ``concurrency`` are in flight (or none is free)."""
        free = min(self.concurrency, self.data.n_clients) - len(self.flights)
        if free <= 0:
            return
        chosen = self._pick(r, free)
        if not chosen:
            return
        _, configs = self.configure(r, chosen)
        for c in chosen:
            self.dispatches += 1
            at, arrives = self.plan(c, self.dispatches, r)
            self.note("start", self.clock, client=c, version=self.version)
            if arrives and self.version not in self.bases:
                state = self._state if self._state is not None else self.global_state()
                self.bases[self.version] = {k: v.detach().clone() for k, v in state.items()}
            self.flights[c] = _Flight(c, self.dispatches, self.version, self.clock, at, configs[c], arrives)
            heapq.heappush(self.queue, (at, c, self.dispatches))

    def _trained(self, flight: _Flight) -> ClientResult:
        """The update ``flight``'s client makes from the weights it started from."""
        states = self.client_states.get(flight.client) or {}
        c, r = flight.client, flight.base_version + 1
        task = ClientTask(c, r, flight.config, states, dispatch=flight.dispatch)
        keep = _copy if self.buffer_size > 1 else lambda res: res  # async applies it before training again
        (result,) = [keep(res) for res in self.train([task], self.bases[flight.base_version])]
        return result

    # ------------------------------------------------------------------ the clock

    def update(self, r: int) -> ServerUpdate:
        self._state = None  # evaluation and checkpoints ran since the last update
        self._fill(r)
        while len(self.buffer) < self.buffer_size:
            if not self.queue:
                later = self.devices.next_change(self.clock)
                if later is None:
                    raise FederationStalled(
                        f"no client can start after virtual time {self.clock:g} s and none is training "
                        f"(system.availability = {self.devices.cfg.availability!r} has no later online time)"
                    )
                self.clock = later
                self._fill(r)
                continue
            at, c, _ = heapq.heappop(self.queue)
            self.clock = at
            flight = self.flights.pop(c)
            if not flight.arrives:
                self.note("drop", at, client=c)
            else:
                self.note("arrive", at, client=c, staleness=self.version - flight.base_version)
                flight.result = self._trained(flight)
                if any(flight.result.states.values()):  # the client's own state is current at once
                    self.client_states[c] = flight.result.states
                self.buffer.append(flight)
                if len(self.buffer) >= self.buffer_size:
                    break
            self._fill(r)
        loss, round_config, configs = self._apply(r)
        self.version = r
        used = {f.base_version for f in self.flights.values() if f.arrives}
        self.bases = {v: w for v, w in self.bases.items() if v in used}
        self._fill(r + 1)
        return ServerUpdate(loss, round_config, configs, self.clock, len(configs))

    def _apply(self, r: int) -> tuple[float, Mapping[str, Any], dict[int, Mapping[str, Any]]]:
        """Server update ``r`` from the buffer: refresh stale updates, aggregate, load."""
        full = self.model.state_dict()
        current = {k: full[k] for k in self.keys}
        arrivals: list[Arrival] = []
        for flight in self.buffer:
            assert flight.result is not None
            arrival = Arrival(
                flight.client, flight.base_version, self.version - flight.base_version, flight.start,
                flight.due, self.bases[flight.base_version],
            )  # fmt: skip
            if arrival.staleness > 0 and self.hooks.server_refresh_update:
                new = self.hooks.server_refresh_update(
                    weights=flight.result.weights, arrival=arrival, global_weights=current,
                    n_samples=flight.result.n_samples, n_steps=flight.result.n_steps, ctx=self.context(r),
                )  # fmt: skip
                if new is not None:
                    flight.result = replace(flight.result, weights=dict(new))
                    arrival = replace(
                        arrival, staleness=0, base_version=self.version, base_weights=current, refreshed=True
                    )
                    self.note("refresh", self.clock, client=flight.client)
            arrivals.append(arrival)
        ctx = self.context(r, [f.client for f in self.buffer], arrivals=tuple(arrivals))
        f = self.scenario.federation
        rule: Callable[[Mapping[str, torch.Tensor]], Any]
        if self.mode == "async":
            rule = lambda like: FedAsync(like, f.async_alpha, self.weight, ctx.arrivals, in_place=True)  # noqa: E731
        else:
            rule = lambda like: FedBuff(like, f.server_lr, self.weight, ctx.arrivals)  # noqa: E731
        results = [flight.result for flight in self.buffer if flight.result is not None]
        loss, _ = aggregate_round(
            self.hooks, self.model, self.keys, ctx, results, self.client_states, rule, state=full
        )
        configs = {flight.client: flight.config for flight in self.buffer}
        # The model's tensors now hold the new weights; without server_after_aggregate nothing can
        # have replaced them, so the next start's snapshot needs no new state_dict.
        self._state = current if not self.hooks.server_after_aggregate else None
        self.buffer = []
        self.note("update", self.clock, version=r, arrivals=len(arrivals))
        return loss, ctx.config, configs

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        used = {f.base_version for f in self.flights.values() if f.arrives} | {
            f.base_version for f in self.buffer
        }
        return {
            **super().state_dict(),
            "version": self.version,
            "flights": [self.flights[c].state() for c in sorted(self.flights)],
            "buffer": [f.state() for f in self.buffer],
            "bases": self._packed_bases(used),
        }

    def _packed_bases(self, used: set[int]) -> dict[str, Any]:
        """The weights in-flight clients started from, as few records as possible: one tensor per
        dtype for all versions (torch.save's cost is per record), leaving out the current
        version's when it equals the global weights the checkpoint holds anyway."""
        state, base = self.global_state(), self.bases.get(self.version)
        current = (
            self.version in used
            and base is not None
            and all(torch.equal(state[k], b) for k, b in base.items())
        )
        versions = sorted(v for v in used if v in self.bases and not (current and v == self.version))
        packed = _pack([self.bases[v] for v in versions]) if versions else {}
        return {"versions": versions, "packed": packed, "current": current}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        device = next(iter(self.global_state().values())).device
        self.version = int(state.get("version", 0))
        self.flights = {int(s["client"]): _Flight.from_state(s, device) for s in state.get("flights", [])}
        self.buffer = [_Flight.from_state(s, device) for s in state.get("buffer", [])]
        like = self.global_state()
        self.bases = _unpacked_bases(state.get("bases", {}), like, device, self.version)
        self.queue = [(f.due, f.client, f.dispatch) for f in self.flights.values()]
        heapq.heapify(self.queue)


class Async(Asynchronous):
    """``async``: FedAsync, each arrival mixed in at once (Xie et al. 2019)."""


class Buffered(Asynchronous):
    """``buffered``: FedBuff, one server step per ``buffer_size`` arrivals (Nguyen et al. 2022)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.buffer_size = self.scenario.federation.buffer_size


MODES: dict[str, type[Federation]] = {
    "sync": Sync,
    "deadline": Deadline,
    "async": Async,
    "buffered": Buffered,
}


def make_federation(**parts: Any) -> Federation:
    """The federation of ``parts["scenario"].federation.mode`` (see :class:`Federation`)."""
    return MODES[parts["scenario"].federation.mode](**parts)


__all__ += ["Async", "Buffered", "Deadline", "FedAvg", "Sync"]
