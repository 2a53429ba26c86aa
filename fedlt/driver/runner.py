"""One run, round by round: select → configure → train → aggregate → evaluate → checkpoint.

Rounds are numbered from 1. After round ``r`` the run directory holds a checkpoint of round
``r`` (every ``checkpoint.every`` rounds) and, on evaluation rounds, a line in metrics.jsonl.
A run claims its folder for its lifetime (:mod:`fedlt.store.rundir`), so two runs never mix their
files, and it loads checkpoints only as plain data (:mod:`fedlt.store.checkpoint`).
"""

from __future__ import annotations

import copy
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedlt.base.memory import PeakMemory
from fedlt.base.provenance import now, provenance
from fedlt.data.views import ClientViews
from fedlt.driver.loggers import loggers_for
from fedlt.driver.threads import CoreSampler, fastest_threads, pinned_threads
from fedlt.engines import make_engine
from fedlt.errors import FedltError, ScenarioError
from fedlt.evaluation.evaluator import Evaluator
from fedlt.hooks.context import LogContext
from fedlt.hooks.dispatch import HookSet
from fedlt.metrics.continual import a_auc, a_avg, crossed, f_last, federation_task_ends, periodic_due
from fedlt.prepare import prepare
from fedlt.scenario.config import Scenario, load_scenario, scenario_to_toml
from fedlt.server.rounds import aggregate_round, configure_round, select_clients
from fedlt.store.checkpoint import (
    CHECKPOINT,
    append_metrics,
    check_compatible,
    json_safe,
    load_checkpoint,
    read_metrics,
    remove_stale_temps,
    save_checkpoint,
    truncate_metrics,
)
from fedlt.store.rundir import RunDirError, RunLock, check_fresh_dir, claim
from fedlt.training.context import setup_context
from fedlt.training.round import ClientResult, ClientTask

__all__ = ["RESUMABLE_KEYS", "Run", "continual_summary", "select_clients"]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SCENARIO = "scenario.toml"

#: Settings ``fedlt resume --set`` may change: they change neither the data nor the model's
#: shape, so the checkpoint still fits (prefixes of dotted keys).
RESUMABLE_KEYS = (
    "train.lr",
    "train.momentum",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.optimizer",
    "train.local_epochs",
    "train.local_steps",
    "train.batch_size",
    "federation.rounds",
    "federation.eval_every",
    "checkpoint.every",
    "engine.",
    "eval.batch_size",
    "log.",
)

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
    on_round : callable, optional
        Called after each round with ``(round, record or None)``.
    """

    def __init__(
        self, scenario: Scenario, run_dir: Path, progress: bool = False, lock: RunLock | None = None
    ) -> None:
        self.scenario = scenario
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.lock = lock
        cores = CoreSampler()  # how busy the machine is while this run builds its data and model
        prepared = prepare(scenario)  # every check first, then data, plugins (params spelled out), model
        self.device, self.hooks, self.data = prepared.device, prepared.hooks, prepared.data
        self.model, self.keys = prepared.model, prepared.keys  # keys: what clients train, the server averages
        self.loggers = HookSet(loggers_for(scenario.log, scenario.model_dump(mode="json")))
        streaming = scenario.stream.kind != "none"
        self.views = ClientViews(self.data, scenario.stream.samples_per_round if streaming else None)
        self.evaluator = Evaluator(scenario, self.data, self.hooks, self.views)
        self.task_ends = (
            federation_task_ends([s.boundaries for s in self.data.streams]) if self.data.streams else []
        )
        if scenario.engine.threads == "auto" and scenario.engine.kind == "serial":
            # Fixed for the run and recorded in its scenario.toml, so a resume uses the same count.
            scenario.engine.threads = self._auto_threads(cores)
        if isinstance(scenario.engine.threads, int):
            torch.set_num_threads(scenario.engine.threads)
        self.client_states: dict[int, dict[str, dict[str, Any]]] = {}
        self.history: list[dict[str, Any]] = []
        #: Per round: how its clients were trained (vectorized or not, and why; groups) and the
        #: round's peak memory. Checkpointed, and written to summary.json as ``training``.
        self.training: list[dict[str, Any]] = []
        self._peak = PeakMemory(self.device)
        self.on_round: Callable[[int, dict[str, Any] | None], None] | None = None
        self.engine: Any = None
        self.started = now()
        self._bar: Any = None

    def _auto_threads(self, cores: CoreSampler) -> int:
        """``engine.threads = "auto"``: the idle cores, if the run's own step is faster with them."""
        idle = cores.idle()
        if idle <= 1 or pinned_threads() is not None or self.device.type != "cpu":
            return idle
        probe = copy.deepcopy(self.model).train()
        n = min(self.scenario.train.batch_size, len(self.data.y_train))
        x, y = self.data.x_train[:n], self.data.y_train[:n]

        def step() -> None:
            probe.zero_grad(set_to_none=True)
            F.cross_entropy(probe(x), y).backward()

        with torch.random.fork_rng(devices=[]):  # dropout in the probe draws no run randomness
            return fastest_threads(step, (1, idle))

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        scenario: Scenario,
        run_dir: Path | None = None,
        progress: bool = False,
        key: str = "--out",
    ) -> Run:
        """A fresh run in ``run_dir`` (default ``runs/<name>-<plugins>-<timestamp>``).

        Refuses (exit 2, naming ``key``) a folder that is a file, lies under a file, cannot be
        written, holds another run's files, or is held by a running run — before any data is
        built.
        """
        run_dir = default_run_dir(scenario) if run_dir is None else Path(run_dir)
        check_fresh_dir(run_dir, key)
        lock = claim(run_dir, fresh=True, key=key)
        try:
            run = cls(scenario, run_dir, progress, lock)
            (run_dir / SCENARIO).write_text(scenario_to_toml(scenario))
        except BaseException:
            lock.release()
            raise
        return run

    @classmethod
    def open(
        cls, run_dir: Path, progress: bool = False, overrides: Iterable[str] | Mapping[str, Any] = ()
    ) -> Run:
        """Reopen a run folder written by :meth:`create` to continue it.

        ``overrides`` change settings that keep the checkpoint valid (:data:`RESUMABLE_KEYS`:
        learning rate, rounds, engine...); they are written into the folder's scenario.toml.
        """
        run_dir = Path(run_dir)
        if not (run_dir / SCENARIO).is_file():
            raise ScenarioError("RUN_DIR", str(run_dir), f"a run folder holding {SCENARIO}")
        scenario = load_scenario(run_dir / SCENARIO)
        changed = _resume_overrides(scenario, overrides)
        lock = claim(run_dir, key="RUN_DIR")
        try:
            remove_stale_temps(run_dir)
            run = cls(changed or scenario, run_dir, progress, lock)
            if changed is not None:
                (run_dir / SCENARIO).write_text(scenario_to_toml(changed))
        except BaseException:
            lock.release()
            raise
        return run

    def execute(self) -> dict[str, Any]:
        """Run (or continue) to the last round; returns the summary written to summary.json."""
        self._main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if self._main_thread else None
        if previous is not None:
            signal.signal(signal.SIGTERM, _raise_stop)
        try:
            return self._execute()
        except _Stop:
            raise KeyboardInterrupt from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if self.lock is not None:
                self.lock.release()

    def _execute(self) -> dict[str, Any]:
        s = self.scenario
        ckpt = load_checkpoint(self.run_dir)
        if ckpt is not None:
            check_compatible(ckpt, self.model.state_dict(), self.run_dir / CHECKPOINT)
        setup = setup_context(s, self.data, self.device, self.run_dir)
        for hooks in (self.hooks, self.loggers):
            if hooks.server_setup:
                hooks.server_setup(model=self.model, ctx=setup)
        start, elapsed = 1, 0.0
        if ckpt is not None:
            self.model.load_state_dict(ckpt["global"])
            self.hooks.load_state_dict(ckpt["plugins"])
            self.client_states = ckpt["client_states"]
            self.views.load_state_dict(ckpt.get("stream_pos", {}))
            self.training = [t for t in ckpt.get("training", []) if t.get("round", 0) <= ckpt["round"]]
            start, elapsed = ckpt["round"] + 1, ckpt["elapsed"]
            self.history = truncate_metrics(self.run_dir / METRICS, ckpt["round"])
        else:
            for stale in (METRICS, SUMMARY):
                (self.run_dir / stale).unlink(missing_ok=True)
        stopped: str | None = None
        if ckpt is not None and self.views.streaming and self.views.exhausted():
            stopped = "every client's stream was exhausted"
            start = s.federation.rounds + 1
        engine = self.engine = make_engine(s, self.data, self.hooks, self.device)
        if self._main_thread:
            # Ray installs a handler of its own that aborts the process: put ours back, so SIGTERM
            # stops the run cleanly (workers and Ray shut down) as Ctrl-C does.
            signal.signal(signal.SIGTERM, _raise_stop)
        t0 = time.perf_counter()
        self._bar = self._progress_bar(start)
        try:
            for r in range(start, s.federation.rounds + 1):
                before = self.views.consumed()
                loss = self._round(engine, r)
                exhausted = self.views.streaming and self.views.exhausted()
                record = self._evaluate(r, loss, before, self.views.consumed(), last=exhausted)
                if record is not None:
                    self.history.append(record)
                    append_metrics(self.run_dir / METRICS, record)
                    safe = json_safe(record)
                    for hooks in (self.hooks, self.loggers):
                        if hooks.server_log_metrics:
                            hooks.server_log_metrics(record=safe, ctx=self._log_context(r))
                if r % s.checkpoint.every == 0 or r == s.federation.rounds or exhausted:
                    self._checkpoint(r, elapsed + time.perf_counter() - t0)
                self._show(r, loss, record)
                if self.on_round is not None:
                    self.on_round(r, record)
                if exhausted and r < s.federation.rounds:
                    stopped = f"every client's stream was exhausted after round {r}"
                    print(
                        f"fedlt: {stopped} ({self.views.consumed()} samples); stopping, as later rounds "
                        "would train nothing.",
                        file=sys.stderr,
                    )
                    break
        finally:
            engine.close()
            if self._bar is not None:
                self._bar.close()
        summary = self._summary(elapsed + time.perf_counter() - t0, stopped)
        for hooks in (self.hooks, self.loggers):
            if hooks.server_end:
                hooks.server_end(summary=summary, ctx=self._log_context(None))
        return summary

    def _log_context(self, r: int | None) -> LogContext:
        return LogContext(self.run_dir, self.scenario.name, r, self.scenario.federation.rounds)

    # ------------------------------------------------------------------ one round

    def _round(self, engine: Any, r: int) -> float:
        s, d = self.scenario, self.data
        selected = select_clients(s.seed, r, d.n_clients, s.federation.fraction_clients)
        ctx, configs = configure_round(self.hooks, s.seed, d, r, s.federation.rounds, selected)
        tasks = [ClientTask(c, r, configs[c], self.client_states.get(c) or {}) for c in selected]
        ends = {}
        if self.views.streaming:
            for task in tasks:
                part = self.views.next_slice(task.client_id)
                task.indices, task.seen_counts = part.indices, part.seen_before
                ends[task.client_id] = part.end
        state = self.model.state_dict()
        self._peak.start()
        results = engine.train_round(tasks, {k: state[k] for k in self.keys})
        if self._bar is not None:
            results = self._track(results, len(tasks))
        loss, _ = aggregate_round(self.hooks, self.model, self.keys, ctx, results, self.client_states)
        self.training.append(
            {
                "round": r,
                **engine.round_report(),
                "peak_memory_mb": self._peak.peak_mb(),
                "memory": self._peak.kind,
            }
        )
        self.views.advance(ends)
        return loss

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, r: int, loss: float, before: int, after: int, last: bool) -> dict[str, Any] | None:
        s = self.scenario
        last = last or r == s.federation.rounds
        full = last or (s.federation.eval_every > 0 and r % s.federation.eval_every == 0)
        anytime = periodic = False
        task_end: list[int] = []
        if self.views.streaming:
            periodic = periodic_due(before, after, s.stream.eval_period)
            task_end = crossed(before, after, self.task_ends)
            anytime = periodic or bool(task_end) or last
        if not full and not anytime:
            return None
        metrics = self.evaluator.evaluate(
            self.model, r, self.client_states, full, anytime, per_client_classes=bool(task_end) or last
        )
        record: dict[str, Any] = {"round": r, "train_loss": loss}
        if self.views.streaming:
            record["samples_seen"] = after
            record["periodic"] = periodic
            record["task_end"] = task_end or None
            record["final"] = last
        record.update(metrics)
        return record

    def _checkpoint(self, r: int, elapsed: float) -> None:
        save_checkpoint(
            self.run_dir,
            {
                "round": r,
                "elapsed": elapsed,
                "global": self.model.state_dict(),
                "plugins": self.hooks.state_dict(),
                "client_states": self.client_states,
                "stream_pos": self.views.state_dict(),
                "training": self.training,
            },
        )

    # ------------------------------------------------------------------ progress

    def _progress_bar(self, start: int) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.scenario.federation.rounds, initial=start - 1, desc=self.scenario.name, unit="round"
        )

    def _track(self, results: Iterator[ClientResult], n: int) -> Iterator[ClientResult]:
        """Pass results through, showing clients done / selected and samples/s inside the round
        (and, for engines that train in-process, the steps of the client in training)."""
        t0, samples = time.perf_counter(), 0
        rate = "-"

        def show(done: int, extra: str = "") -> None:
            self._bar.set_postfix_str(f"clients {done}/{n}{extra}, {rate} samples/s", refresh=True)

        if self.engine is not None:
            self.engine.on_step = lambda i, step, steps: show(i, f" (client {i + 1}: step {step}/{steps})")
        show(0)
        batch = self.scenario.train.batch_size
        for i, result in enumerate(results, 1):
            samples += result.n_steps * batch  # samples trained on (the last batches may be smaller)
            rate = f"~{samples / max(time.perf_counter() - t0, 1e-9):,.0f}"
            show(i)
            yield result

    def _show(self, r: int, loss: float, record: dict[str, Any] | None) -> None:
        if self._bar is None:
            return
        self._bar.update(1)
        shown = {"acc": "accuracy", "bacc": "balanced_accuracy", "anytime": "anytime_accuracy"}
        values = {k: record.get(m) for k, m in shown.items()} if record else {}
        text = ", ".join(f"{k}={v:.3f}" for k, v in values.items() if isinstance(v, float))
        self._bar.set_postfix_str(f"loss={loss:.3f}" + (f", {text}" if text else ""), refresh=True)

    # ------------------------------------------------------------------ summary

    def _summary(self, wall: float, stopped: str | None) -> dict[str, Any]:
        full = [h for h in self.history if "accuracy" in h]
        final = dict(full[-1]) if full else {}
        final.pop("round", None)
        final["train_class_counts"] = self.data.train_class_counts.tolist()
        if self.views.streaming:
            final.update(continual_summary(self.history))
        rounds_run = max((h["round"] for h in self.history), default=0)
        summary = {
            "scenario": self.scenario.name,
            "rounds": self.scenario.federation.rounds,
            "rounds_run": rounds_run,
            "finished": True,
            "stopped_early": stopped,
            "engine": self.scenario.engine.kind,
            "seed": self.scenario.seed,
            "plugins": self.hooks.names,
            "final": final,
            "training": self.training,
            "wall_seconds": round(wall, 3),
            "provenance": {
                **provenance(str(self.device), torch.get_num_threads()),
                "started": self.started,
                "ended": now(),
            },
        }
        summary = json_safe(summary)
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        return summary


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def _resume_overrides(scenario: Scenario, overrides: Iterable[str] | Mapping[str, Any]) -> Scenario | None:
    """The scenario with resume-time overrides applied, or ``None`` without overrides.

    Only :data:`RESUMABLE_KEYS` may change: anything else would change the data or the model the
    checkpoint belongs to (checked on the resolved scenarios, so indirect changes count too).
    """
    if not (overrides.items() if isinstance(overrides, Mapping) else list(overrides)):
        return None
    raw = scenario.model_dump(mode="json")
    for spec in raw["plugins"]:
        spec.update(spec.pop("params"))
    new = load_scenario(raw, overrides)
    before = dict(_flatten(scenario.model_dump(mode="json")))
    after = dict(_flatten(new.model_dump(mode="json")))
    given = [
        (k.replace("__", ".") if isinstance(overrides, Mapping) else k.partition("=")[0].strip())
        for k in (overrides if isinstance(overrides, Mapping) else list(overrides))
    ]
    given = [re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", g) for g in given]  # plugins.0.x -> plugins[0].x

    def named_first(key: str) -> tuple[bool, str]:  # a key the user set before its consequences
        return (not any(key == g or key.startswith(g + ".") for g in given), key)

    changed = (k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    for key in sorted(changed, key=named_first):
        if not any(key == ok or (ok.endswith(".") and key.startswith(ok)) for ok in RESUMABLE_KEYS):
            raise ScenarioError(
                key,
                after.get(key),
                "unchanged on resume; only settings that keep the checkpoint valid may change: "
                + ", ".join(k + "*" if k.endswith(".") else k for k in RESUMABLE_KEYS),
                hint="Data, model, seed, stream and plugin settings cannot change on resume; start a "
                "new run.",
            )
    return new


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")
        elif k == "plugins" and not prefix and isinstance(v, list):
            for i, spec in enumerate(v):  # plugins[i].name and plugins[i].<parameter>
                yield f"plugins[{i}].name", spec.get("name")
                yield from _flatten(spec.get("params") or {}, f"plugins[{i}].")
        else:
            yield f"{prefix}{k}", v


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run folder whose run has finished (nothing left to resume), else None."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not summary.get("finished"):
        return None
    try:
        scenario = load_scenario(Path(run_dir) / SCENARIO)
    except FedltError:
        return None
    if summary.get("stopped_early") is None and summary.get("rounds_run") != scenario.federation.rounds:
        return None  # resumed with more rounds
    return summary


def continual_summary(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The continual metrics of a run from its anytime evaluations.

    - ``a_auc``: mean of the periodic anytime accuracies (one each time the federation read
      another ``stream.eval_period`` samples), so rounds that read nothing add nothing;
    - ``a_last``: the anytime accuracy of the final evaluation;
    - ``a_avg``: mean of the accuracies at the federation's task ends (by samples read);
    - ``f_last``: forgetting over the per-class accuracies at the task ends and the final
      evaluation; ``task_class_accuracy``: those rows (task x class);
    - ``client_f_last``: each client's forgetting, from its personalised per-class accuracies
      on its local view at the same evaluations;
    - ``anytime_history``: ``[samples seen, anytime accuracy]`` of the periodic evaluations.
    """
    anytime = [h for h in history if "anytime_accuracy" in h]
    periodic = [h for h in anytime if h.get("periodic")]
    ends = [h for h in anytime if h.get("task_end")]
    final = anytime[-1] if anytime else None
    rows = list(ends) + ([final] if final is not None and final not in ends else [])
    out: dict[str, Any] = {}
    for suffix, key in (("", "anytime_accuracy"), ("_personalized", "anytime_personalized_accuracy")):
        out[f"a_auc{suffix}"] = a_auc([h[key] for h in periodic if h.get(key) is not None])
        out[f"a_last{suffix}"] = final.get(key) if final is not None else None
        # A round that passes several task ends counts once per task ended.
        out[f"a_avg{suffix}"] = a_avg([h[key] for h in ends for _ in h["task_end"] if h.get(key) is not None])
    out["task_class_accuracy"] = [h["anytime_per_class_accuracy"] for h in ends for _ in h["task_end"]]
    out["f_last"] = f_last([h["anytime_per_class_accuracy"] for h in rows])
    per_client: dict[str, list[Any]] = {}
    for h in rows:
        for client, accs in (h.get("anytime_client_per_class") or {}).items():
            per_client.setdefault(client, []).append(accs)
    out["client_f_last"] = {c: f_last(r) for c, r in sorted(per_client.items(), key=lambda kv: int(kv[0]))}
    out["anytime_history"] = [[h.get("samples_seen"), h.get("anytime_accuracy")] for h in periodic]
    return out


__all__ += ["RunDirError", "default_run_dir", "finished_summary", "read_metrics"]
