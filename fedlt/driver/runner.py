"""One run, server update by server update: select → configure → train → aggregate → evaluate →
checkpoint, on a virtual clock (:mod:`fedlt.server.federation` decides when clients start and
which arrivals make an update: ``federation.mode``).

Rounds are numbered from 1. After round ``r`` the run directory holds a checkpoint of round
``r`` (every ``checkpoint.every`` rounds) and, on evaluation rounds, a line in metrics.jsonl.
A run claims its folder for its lifetime (:mod:`fedlt.store.rundir`), so two runs never mix their
files, and it loads checkpoints only as plain data (:mod:`fedlt.store.checkpoint`).

The loop (:meth:`Run._loop`) is the recipe, one line a step; the rest lives where it belongs:
preparation in :mod:`fedlt.prepare`, the server's side of a round in :mod:`fedlt.server.rounds`,
client training in the engines, when to evaluate in :mod:`fedlt.driver.schedule`, resuming in
:mod:`fedlt.driver.resume`, the summary in :mod:`fedlt.driver.summary`, and whatever watches the
run (progress bar, loggers, callbacks) in :mod:`fedlt.driver.observers`.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedlt.base.memory import PeakMemory
from fedlt.base.provenance import now
from fedlt.data.views import ClientViews
from fedlt.driver.loggers import loggers_for
from fedlt.driver.observers import Callback, HookLoggers, Observers, ProgressBar
from fedlt.driver.resume import (
    METRICS,
    RESUMABLE_KEYS,
    ROUNDS,
    SCENARIO,
    SUMMARY,
    finished_summary,
    flat_settings,
    read_checkpoint,
    restore,
    resume_overrides,
    setting_changes,
)
from fedlt.driver.schedule import Due, EvalSchedule, memory_class_counts
from fedlt.driver.summary import build_summary, continual_summary
from fedlt.driver.threads import CoreSampler, auto_threads
from fedlt.engines import make_engine
from fedlt.errors import FedltError, NonFiniteLossError, ScenarioError
from fedlt.evaluation.evaluator import Configs, Evaluator
from fedlt.hooks.dispatch import HookSet
from fedlt.hooks.state import check_checkpoint_states
from fedlt.metrics.continual import federation_task_ends
from fedlt.prepare import prepare
from fedlt.scenario.config import Scenario, load_scenario, scenario_to_toml
from fedlt.server.federation import Federation, FederationStalled, ServerUpdate, make_federation
from fedlt.server.rounds import select_clients
from fedlt.store.checkpoint import (
    BackgroundWriter,
    append_metrics,
    encode_checkpoint,
    load_checkpoint,
    read_metrics,
    remove_stale_temps,
    write_checkpoint,
    write_file,
)
from fedlt.store.events import EventLog
from fedlt.store.rundir import RunDirError, RunLock, check_fresh_dir, claim
from fedlt.store.safefile import refuse_link
from fedlt.store.starts import read_starts, record_resume, record_start, resume_comment
from fedlt.training.context import setup_context
from fedlt.training.round import ClientResult, ClientTask

__all__ = [
    "RESUMABLE_KEYS",
    "Run",
    "RunDirError",
    "continual_summary",
    "default_run_dir",
    "finished_summary",
    "read_metrics",
    "select_clients",
]


def default_run_dir(scenario: Scenario, base: Path = Path("runs")) -> Path:
    """``runs/<name>[-<plugins>]-<timestamp>``, unused (``-2``, ``-3``... when taken)."""
    plugins = "-".join(p.name for p in scenario.plugins)
    stem = "-".join(filter(None, [scenario.name, plugins]))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem)[:80].strip("-.") or "run"
    first = base / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir, n = first, 1
    while run_dir.exists():
        n += 1
        run_dir = first.with_name(f"{first.name}-{n}")
    return run_dir


_UNREAD = object()  # Run._ckpt before Run.open read the checkpoint


class _Stop(Exception):
    """Raised in the driver's thread on SIGTERM, so cleanup (workers, Ray) runs as on Ctrl-C."""


class Run:
    """A prepared run: everything validated and built, nothing trained yet.

    Parameters
    ----------
    scenario : Scenario
        The validated scenario.
    run_dir : Path
        Output folder (claimed by ``lock``).
    progress : bool
        Show a progress bar over rounds, with progress inside each round.
    lock : RunLock, optional
        The claim on ``run_dir``; released when the run ends.

    Attributes
    ----------
    history : list of dict
        Every evaluation record so far (what metrics.jsonl holds).
    training : list of dict
        Per round: how its clients were trained (vectorized or not, and why) and its peak memory;
        checkpointed and written to summary.json.
    observers : Observers
        What watches the run: the loggers (always), the progress bar, callbacks.
    on_round : callable, optional
        Called after each round with ``(round, record or None)``.
    """

    def __init__(
        self, scenario: Scenario, run_dir: Path, progress: bool = False, lock: RunLock | None = None
    ) -> None:
        self.scenario, self.run_dir, self.lock = scenario, Path(run_dir), lock
        cores = CoreSampler()  # how busy the machine is while this run builds its data and model
        self.prepared = p = prepare(scenario)  # every check, then data, plugins (params spelled out), model
        self.device, self.hooks, self.data, self.model, self.keys = p.device, p.hooks, p.data, p.model, p.keys
        streaming = scenario.stream.kind != "none"
        self.views = ClientViews(self.data, scenario.stream.samples_per_round if streaming else None)
        self.evaluator = Evaluator(scenario, self.data, self.hooks, self.views)
        ends = federation_task_ends([s.boundaries for s in self.data.streams]) if self.data.streams else []
        self.schedule = EvalSchedule(scenario, ends, streaming)
        if scenario.engine.threads == "auto" and scenario.engine.kind == "serial":
            # Fixed for the run and recorded in its scenario.toml, so a resume uses the same count.
            scenario.engine.threads = auto_threads(cores, p)
        if isinstance(scenario.engine.threads, int):
            torch.set_num_threads(scenario.engine.threads)
        self.loggers = HookSet(loggers_for(scenario.log, scenario.model_dump(mode="json")))
        self.observers = Observers(
            [HookLoggers([self.hooks, self.loggers], self.run_dir, scenario.name, scenario.federation.rounds)]
        )
        if progress:
            self.observers.add(ProgressBar(scenario.name, scenario.train.batch_size))
        self.client_states: dict[int, dict[str, dict[str, Any]]] = {}
        self.history: list[dict[str, Any]] = []
        self.training: list[dict[str, Any]] = []
        self.engine: Any = None
        self.events = EventLog(self.run_dir, scenario.log.events)
        self.federation: Federation | None = None
        self._r = 0
        self.starts: dict[str, Any] = {"started": now(), "command": None, "resumes": []}
        self._losses: list[dict[str, Any]] = []  # rounds.jsonl lines not yet written (at checkpoints)
        self._writer = BackgroundWriter()  # checkpoints' disk work, overlapping the next round
        self._ckpt: Any = _UNREAD
        self._peak = PeakMemory(self.device)
        self._on_round: Callable[[int, dict[str, Any] | None], None] | None = None

    @property
    def on_round(self) -> Callable[[int, dict[str, Any] | None], None] | None:
        return self._on_round

    @on_round.setter
    def on_round(self, fn: Callable[[int, dict[str, Any] | None], None] | None) -> None:
        self._on_round = fn
        self.observers.items = [o for o in self.observers.items if not isinstance(o, Callback)]
        if fn is not None:
            self.observers.add(Callback(fn))

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        scenario: Scenario,
        run_dir: Path | None = None,
        progress: bool = False,
        key: str = "--out",
        command: str | None = None,
        lock: RunLock | None = None,
    ) -> Run:
        """A fresh run in ``run_dir`` (default ``runs/<name>-<plugins>-<timestamp>``).

        Refuses (exit 2, naming ``key``) a folder that is a file, lies under a file, cannot be
        written, holds another run's files, or is held by a running run — before any data is
        built. ``command`` is what started it, for the record (default: this process's argv).
        ``lock``: the folder's claim, already held (``if_exists="overwrite"`` claims before it
        deletes); released if the run cannot be created.
        """
        run_dir = default_run_dir(scenario) if run_dir is None else Path(run_dir)
        try:
            check_fresh_dir(run_dir, key)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        lock = claim(run_dir, fresh=True, key=key) if lock is None else lock
        try:
            run = cls(scenario, run_dir, progress, lock)
            write_file(run_dir / SCENARIO, scenario_to_toml(scenario))
            run.starts = record_start(run_dir, command)
        except BaseException:
            lock.release()
            raise
        return run

    @classmethod
    def open(
        cls,
        run_dir: Path,
        progress: bool = False,
        overrides: Iterable[str] | Mapping[str, Any] = (),
        command: str | None = None,
    ) -> Run:
        """Reopen a run folder written by :meth:`create` to continue it.

        ``overrides`` change settings that keep the checkpoint valid (:data:`RESUMABLE_KEYS`:
        learning rate, rounds, engine...), never ``federation.rounds`` below the rounds already
        run. They are written into the folder's scenario.toml, under a comment saying from which
        round they apply; every resume is appended to starts.json (summary.json's ``resumes``).
        """
        run_dir = Path(run_dir)
        if not (run_dir / SCENARIO).is_file():
            hint = None
            if run_dir.is_dir():  # e.g. only the fedlt.lock of a run killed before its first round
                hint = (
                    f"There is nothing to resume in {run_dir}: no run got as far as writing its "
                    f"{SCENARIO}. Start one there with `fedlt run SCENARIO --out {run_dir}`."
                )
            raise ScenarioError("RUN_DIR", str(run_dir), f"a run folder holding {SCENARIO}", hint=hint)
        scenario = load_scenario(run_dir / SCENARIO)
        changed = resume_overrides(scenario, overrides)
        changes = setting_changes(scenario, changed) if changed is not None else {}
        lock = claim(run_dir, key="RUN_DIR")
        try:
            remove_stale_temps(run_dir)
            ckpt = load_checkpoint(run_dir)
            done = ckpt["round"] if ckpt is not None else 0
            if changed is not None and changed.federation.rounds < done:
                raise ScenarioError(
                    "federation.rounds",
                    changed.federation.rounds,
                    f"at least {done}, the rounds this run has already run (its checkpoint's round)",
                    hint="A resumed run only continues; for a shorter run start a new one, or read this "
                    "run's metrics.jsonl up to that round.",
                )
            run = cls(changed or scenario, run_dir, progress, lock)
            run._ckpt = read_checkpoint(run_dir, run.model, ckpt)  # another model's: refused before records
            if ckpt is not None:  # plugin state as each plugin declares it (replay indices its own)
                check_checkpoint_states(run.hooks.plugins, ckpt, run.data)
            entry = record_resume(run_dir, done, changes, command)
            run.starts = read_starts(run_dir)
            if changed is not None:
                old_text = (run_dir / SCENARIO).read_text()
                notes = [line for line in old_text.splitlines() if line.startswith("# Resumed after round")]
                notes.append(resume_comment(entry, flat_settings(scenario)))
                write_file(run_dir / SCENARIO, "\n".join(notes) + "\n" + scenario_to_toml(changed))
        except BaseException:
            lock.release()
            raise
        return run

    def execute(self) -> dict[str, Any]:
        """Run (or continue) to the last round; returns the summary written to summary.json.

        SIGTERM stops it as Ctrl-C does (``KeyboardInterrupt``), so workers and Ray shut down.
        """
        self._main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if self._main_thread else None
        if previous is not None:
            signal.signal(signal.SIGTERM, _raise_stop)
        try:
            return self._execute()
        except _Stop:
            raise KeyboardInterrupt from None
        except NonFiniteLossError as exc:  # say which checkpoint is kept, or that none is yet
            raise exc.at_checkpoint(self._checkpoint_round()) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if self.lock is not None:
                self.lock.release()

    def _checkpoint_round(self) -> int | None:
        """The round of the folder's checkpoint; ``None`` without one (-1: unreadable)."""
        try:
            ckpt = load_checkpoint(self.run_dir)
        except FedltError:
            return -1
        return None if ckpt is None else int(ckpt["round"])

    def _execute(self) -> dict[str, Any]:
        ckpt = read_checkpoint(self.run_dir, self.model, None if self._ckpt is _UNREAD else self._ckpt)
        setup = setup_context(self.scenario, self.data, self.device, self.run_dir)
        for hooks in (self.hooks, self.loggers):  # on resume, before their state is restored
            if hooks.server_setup:
                hooks.server_setup(model=self.model, ctx=setup)
        point = restore(ckpt, self.run_dir, self.model, self.hooks, self.views)
        self.history, self.training, self.client_states = point.history, point.training, point.client_states
        self.federation = make_federation(
            scenario=self.scenario,
            data=self.data,
            hooks=self.hooks,
            model=self.model,
            keys=self.keys,
            devices=self.prepared.devices,
            views=self.views,
            client_states=self.client_states,
            train=self._train,
            emit=self.events,
        )
        self.events.restart(ckpt.get("events") if ckpt is not None else None)
        if self.prepared.devices is not None:  # for the timeline plot's offline stretches
            self.prepared.devices.save(refuse_link(self.run_dir / "system.npz"))
        if ckpt is not None:
            self.federation.load_state_dict(ckpt.get("federation", {}))
        start, stopped, rounds = point.round + 1, None, self.scenario.federation.rounds
        if ckpt is not None and self.views.exhausted():
            start, stopped = rounds + 1, "every client's stream was exhausted"
        self.engine = make_engine(self.prepared)
        if self._main_thread:  # Ray installs a handler that aborts the process: put ours back
            signal.signal(signal.SIGTERM, _raise_stop)
        if self.observers.wants_clients:
            self.engine.on_step = self.observers.client_step
        self.observers.run_started(start, rounds)
        t0 = time.perf_counter()
        try:
            stopped = self._loop(start, lambda: point.elapsed + time.perf_counter() - t0) or stopped
            self._writer.wait()  # the last checkpoint is on disk before the summary says it is done
        finally:
            self._writer.close()  # unwinding from another error: that one is reported
            self.engine.close()
            self.events.close()
            self.observers.close()
        summary = build_summary(self, point.elapsed + time.perf_counter() - t0, stopped, self.starts)
        write_file(self.run_dir / SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")
        self.observers.run_ended(summary)
        return summary

    # ------------------------------------------------------------------ the loop

    def _loop(self, start: int, elapsed: Callable[[], float]) -> str | None:
        """Rounds ``start``..``rounds``; returns why the run stopped early (None: it did not)."""
        s = self.scenario
        for r in range(start, s.federation.rounds + 1):
            before = self.views.consumed()
            try:
                done = self._round(r)  # select, configure, train, aggregate (on the virtual clock)
            except FederationStalled as exc:
                print(f"fedlt: {exc}; stopping after round {r - 1}.", file=sys.stderr)
                return str(exc)
            self._losses.append(
                {"round": r, "train_loss": done.loss, "virtual_time": round(done.virtual_time, 6)}
            )
            exhausted = self.views.exhausted()
            due = self.schedule.due(r, before, self.views.consumed(), exhausted)
            record = None if due is None else self._evaluate(r, done, due)
            if record is not None:
                self.history.append(record)
                append_metrics(self.run_dir / METRICS, record)
                self.observers.evaluated(r, record)  # loggers, before the checkpoint
            if r % self._checkpoint_every() == 0 or r == s.federation.rounds or exhausted:
                self._checkpoint(r, elapsed())
            self.observers.round_ended(r, done.loss, record)
            if exhausted and r < s.federation.rounds:
                stopped = f"every client's stream was exhausted after round {r}"
                print(
                    f"fedlt: {stopped} ({self.views.consumed()} samples); stopping, as later rounds "
                    "would train nothing.",
                    file=sys.stderr,
                )
                return stopped
        return None

    def _checkpoint_every(self) -> int:
        """``checkpoint.every``, or by default every round (every ``concurrency`` async updates)."""
        s = self.scenario
        if s.checkpoint.every is not None:
            return s.checkpoint.every
        if s.federation.mode == "async":
            return getattr(self.federation, "concurrency", 1)
        return 1

    def _round(self, r: int) -> ServerUpdate:
        """Server update ``r``: the federation starts clients, trains them (:meth:`_train`) and
        applies what arrives; recorded with how its clients were trained and its peak memory."""
        assert self.federation is not None
        self._r = r
        self._peak.start()
        done = self.federation.update(r)
        self._record_training(
            r, {**self.engine.round_report(), "memory": self._peak.kind}, self._peak.peak_mb()
        )
        return done

    def _record_training(self, r: int, report: dict[str, Any], peak: float | None) -> None:
        """Round ``r``'s training report; rounds trained alike share one record (``round`` to
        ``through``, the largest peak), so a run of 100,000 server updates keeps a short log."""
        last = self.training[-1] if self.training else None
        same = (
            last is not None
            and last.get("through", last.get("round")) == r - 1
            and all(last.get(k) == v for k, v in report.items())
        )
        if same:
            assert last is not None
            last["through"] = r
            if peak is not None:
                last["peak_memory_mb"] = max(last.get("peak_memory_mb") or 0.0, peak)
        else:
            self.training.append({"round": r, "through": r, **report, "peak_memory_mb": peak})

    def _train(self, tasks: list[ClientTask], state: Mapping[str, torch.Tensor]) -> Iterator[ClientResult]:
        """The engine trains ``tasks`` from ``state``; in a stream each reads its next slice."""
        ends = self.views.assign(tasks)
        self.observers.round_started(self._r, len(tasks))
        yield from self.observers.watch(self.engine.train_round(tasks, state))
        self.views.advance(ends)

    def _evaluate(self, r: int, done: ServerUpdate, due: Due) -> dict[str, Any]:
        """Round ``r``'s record: its loss, its virtual time and what ``due`` asks to measure."""
        configs = Configs(done.round_config, done.client_configs)
        metrics = self.evaluator.evaluate(
            self.model,
            r,
            self.client_states,
            due.full,
            due.anytime,
            per_client_classes=due.anytime,  # per-client anytime curves and forgetting
            configs=configs,
        )
        record: dict[str, Any] = {
            "round": r,
            "train_loss": done.loss,
            "virtual_time": round(done.virtual_time, 6),
        }
        if self.views.streaming:
            record.update(samples_seen=due.samples_seen, periodic=due.periodic, eval_points=due.points)
            record.update(task_end=due.task_end or None, final=due.last)
        record.update(metrics)
        if self.views.streaming and due.anytime:
            record.update(memory_class_counts(self.hooks, self.client_states, self.data.num_classes))
        return record

    def _checkpoint(self, r: int, elapsed: float) -> None:
        """Snapshot round ``r`` now; write it (after its rounds.jsonl lines) on the writer's thread."""
        data = encode_checkpoint(
            {
                "round": r,
                "elapsed": elapsed,
                "global": self.model.state_dict(),
                "plugins": self.hooks.state_dict(),
                "client_states": self.client_states,
                "stream_pos": self.views.state_dict(),
                "training": self.training,
                "federation": self.federation.state_dict() if self.federation is not None else {},
                "events": self.events.offset(),
            }
        )
        losses, self._losses = self._losses, []

        def write() -> None:
            if losses:  # before the checkpoint, as metrics.jsonl, so it never gets ahead of them
                append_metrics(self.run_dir / ROUNDS, losses)
            write_checkpoint(self.run_dir, data)

        self._writer.submit(write)


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop
