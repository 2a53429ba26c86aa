"""One run, round by round: select → configure → train → aggregate → evaluate → checkpoint.

Rounds are numbered from 1. After round ``r`` the run directory holds a checkpoint of round
``r`` (every ``checkpoint.every`` rounds) and, on evaluation rounds, a line in metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlt.aggregation import FedAvg
from fedlt.checkpoint import load_checkpoint, save_checkpoint, truncate_metrics
from fedlt.client import ClientTask
from fedlt.config import Scenario, load_scenario, scenario_to_toml
from fedlt.context import RoundContext, frozen_config
from fedlt.data.federated import FederatedData, build_federated_data
from fedlt.engines import make_engine
from fedlt.errors import NonFiniteLossError, ScenarioError
from fedlt.evaluation import Evaluator
from fedlt.pluginmanager import HookSet, build_hooks
from fedlt.seeding import numpy_rng
from fedlt.worker import aggregated_keys, build_run_model, setup_context

__all__ = ["Run", "select_clients"]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SCENARIO = "scenario.toml"


def select_clients(seed: int, round: int, n_clients: int, fraction: float) -> list[int]:
    """The round's participants: ``max(1, floor(n * fraction))`` clients drawn from (seed, round)."""
    k = max(1, int(n_clients * fraction + 1e-9))
    if k >= n_clients:
        return list(range(n_clients))
    chosen = numpy_rng(seed, "select", round).choice(n_clients, size=k, replace=False)
    return sorted(int(c) for c in chosen)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError("engine.device", name, "'cpu' on this machine (CUDA is not available)")
    return torch.device(name)


class Run:
    """A prepared run: everything validated and built, nothing trained yet.

    Parameters
    ----------
    scenario : Scenario
        The validated scenario.
    run_dir : Path
        Output folder; created if needed.
    progress : bool
        Show a progress bar over rounds with live metrics.
    """

    def __init__(self, scenario: Scenario, run_dir: Path, progress: bool = False) -> None:
        self.scenario = scenario
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.device = resolve_device(scenario.engine.device)
        # Validate plugins before any data is loaded or work starts.
        self.hooks: HookSet = build_hooks(scenario.plugins)
        self.data: FederatedData = build_federated_data(scenario, self.device)
        self.model = build_run_model(scenario, self.data, self.hooks, self.device)
        self.evaluator = Evaluator(scenario, self.data, self.hooks)
        self.client_states: dict[int, dict[str, dict[str, Any]]] = {}
        self.on_round: Callable[[int, dict[str, Any] | None], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, scenario: Scenario, run_dir: Path | None = None, progress: bool = False) -> Run:
        """A fresh run in ``run_dir`` (default ``runs/<name>-<timestamp>``); refuses a used folder."""
        if run_dir is None:
            base = Path("runs") / f"{scenario.name}-{datetime.now():%Y%m%d-%H%M%S}"
            run_dir, n = base, 1
            while run_dir.exists():
                n += 1
                run_dir = base.with_name(f"{base.name}-{n}")
        run_dir = Path(run_dir)
        if (run_dir / SCENARIO).exists():
            raise ScenarioError(
                "--out",
                str(run_dir),
                "a new or empty folder",
                hint=f"It holds a run already: continue it with `fedlt resume {run_dir}`.",
            )
        run = cls(scenario, run_dir, progress)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SCENARIO).write_text(scenario_to_toml(scenario))
        return run

    @classmethod
    def open(cls, run_dir: Path, progress: bool = False) -> Run:
        """Reopen a run folder written by :meth:`create` to continue it."""
        run_dir = Path(run_dir)
        if not (run_dir / SCENARIO).is_file():
            raise ScenarioError("run_dir", str(run_dir), f"a run folder holding {SCENARIO}")
        return cls(load_scenario(run_dir / SCENARIO), run_dir, progress)

    def execute(self) -> dict[str, Any]:
        """Run (or continue) to the last round; returns the summary written to summary.json."""
        s = self.scenario
        ckpt = load_checkpoint(self.run_dir)
        self.hooks.server_setup.all(
            model=self.model, ctx=setup_context(s, self.data, self.device), states=None
        )
        start, elapsed, history = 1, 0.0, []
        if ckpt is not None:
            self.model.load_state_dict(ckpt["global"])
            self.hooks.load_state_dict(ckpt["plugins"])
            self.client_states = ckpt["client_states"]
            start, elapsed = ckpt["round"] + 1, ckpt["elapsed"]
            history = truncate_metrics(self.run_dir / METRICS, ckpt["round"])
        elif (self.run_dir / METRICS).exists():
            (self.run_dir / METRICS).unlink()

        engine = make_engine(s, self.data, self.hooks, self.device)
        t0 = time.perf_counter()
        bar = self._progress_bar(start)
        try:
            for r in range(start, s.federation.rounds + 1):
                loss = self._round(engine, r)
                record = None
                if self._eval_due(r):
                    record = {
                        "round": r,
                        "train_loss": loss,
                        **self.evaluator.evaluate(self.model, r, self.client_states),
                    }
                    history.append(record)
                    with open(self.run_dir / METRICS, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if r % s.checkpoint.every == 0 or r == s.federation.rounds:
                    self._checkpoint(r, elapsed + time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
                    if record is not None:
                        bar.set_postfix(
                            acc=f"{record['accuracy']:.3f}",
                            bacc=f"{record['balanced_accuracy']:.3f}",
                            loss=f"{loss:.3f}",
                        )
                if self.on_round is not None:
                    self.on_round(r, record)
        finally:
            engine.close()
            if bar is not None:
                bar.close()
        return self._summary(history, elapsed + time.perf_counter() - t0)

    # ------------------------------------------------------------------ one round

    def _round(self, engine: Any, r: int) -> float:
        s, d = self.scenario, self.data
        selected = select_clients(s.seed, r, d.n_clients, s.federation.fraction_clients)
        config: dict[str, Any] = {"round": r}
        ctx = RoundContext(
            r,
            s.seed,
            d.num_classes,
            tuple(selected),
            frozen_config(config),
            d.train_class_counts,
            d.client_counts,
        )
        if self.hooks.server_configure_round:
            for _, extra in self.hooks.server_configure_round.all(ctx=ctx, states=None):
                config.update(extra or {})
            ctx = RoundContext(
                r,
                s.seed,
                d.num_classes,
                tuple(selected),
                frozen_config(config),
                d.train_class_counts,
                d.client_counts,
            )
        global_state = self.model.state_dict()
        aggregator = (
            self.hooks.server_make_aggregator.first(ctx=ctx, states=None)
            if self.hooks.server_make_aggregator
            else None
        )
        if aggregator is None:
            aggregator = FedAvg({k: global_state[k] for k in aggregated_keys(self.model)})
        tasks = [ClientTask(c, r, ctx.config, self.client_states.setdefault(c, {})) for c in selected]
        payloads: dict[str, dict[int, Any]] = {name: {} for name in self.hooks.names}
        losses = []
        for result in engine.train_round(tasks, global_state):
            if not math.isfinite(result.loss):
                raise NonFiniteLossError(r, result.client_id, self.hooks.names, result.loss)
            aggregator.add(result.weights, result.n_samples, result.client_id)
            self.client_states[result.client_id] = result.states
            for name, payload in result.payloads.items():
                payloads[name][result.client_id] = payload
            losses.append(result.loss)
        new = aggregator.result()
        if new is not None:
            with torch.no_grad():
                for k, v in new.items():
                    global_state[k].copy_(v)
        if self.hooks.server_after_aggregate:
            self.hooks.server_after_aggregate.all(
                per_plugin={name: {"payloads": p} for name, p in payloads.items()},
                model=self.model,
                ctx=ctx,
                states=None,
            )
        return float(np.mean(losses)) if losses else float("nan")

    def _eval_due(self, r: int) -> bool:
        every = self.scenario.federation.eval_every
        return r == self.scenario.federation.rounds or (every > 0 and r % every == 0)

    def _checkpoint(self, r: int, elapsed: float) -> None:
        save_checkpoint(
            self.run_dir,
            {
                "round": r,
                "elapsed": elapsed,
                "global": self.model.state_dict(),
                "plugins": self.hooks.state_dict(),
                "client_states": self.client_states,
            },
        )

    def _progress_bar(self, start: int) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.scenario.federation.rounds, initial=start - 1, desc=self.scenario.name, unit="round"
        )

    def _summary(self, history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        final = dict(history[-1]) if history else {}
        final.pop("round", None)
        summary = {
            "scenario": self.scenario.name,
            "rounds": self.scenario.federation.rounds,
            "engine": self.scenario.engine.kind,
            "seed": self.scenario.seed,
            "plugins": self.hooks.names,
            "final": final,
            "wall_seconds": round(wall, 3),
        }
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        return summary
