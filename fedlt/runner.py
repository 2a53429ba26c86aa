"""One run, round by round: select → configure → train → aggregate → evaluate → checkpoint.

Rounds are numbered from 1. After round ``r`` the run directory holds a checkpoint of round
``r`` (every ``checkpoint.every`` rounds) and, on evaluation rounds, a line in metrics.jsonl.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlt.checkpoint import load_checkpoint, save_checkpoint, truncate_metrics
from fedlt.client import ClientTask
from fedlt.config import Scenario, load_scenario, scenario_to_toml
from fedlt.continual_metrics import a_auc, a_avg, a_last, f_last, task_end_rounds
from fedlt.data.federated import FederatedData, build_federated_data
from fedlt.engines import check_engine_available, make_engine
from fedlt.errors import PluginError, ScenarioError
from fedlt.evaluation import Evaluator
from fedlt.pluginmanager import HookSet, build_hooks
from fedlt.rounds import aggregate_round, configure_round
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


#: What a plugin may list in ``requires``, and how each is checked before a run starts.
REQUIREMENTS = {
    "head": (
        "a model with a linear `head`",
        lambda s, m: isinstance(getattr(m, "head", None), torch.nn.Linear),
    ),
    "stream": ("a continual scenario ([stream] kind set)", lambda s, m: s.stream.kind != "none"),
    "prompts": ("a model with a prompt slot (model.name = 'vit')", lambda s, m: hasattr(m, "prompter")),
}


def check_requirements(scenario: Scenario, hooks: HookSet, model: torch.nn.Module) -> None:
    """Every plugin's declared ``requires`` hold for this scenario and model, or a clear error."""
    for i, plugin in enumerate(hooks.plugins):
        for req in sorted(plugin.requires):
            if req not in REQUIREMENTS:
                raise PluginError(
                    plugin.name, None, f"requires unknown capability {req!r}; known: {sorted(REQUIREMENTS)}"
                )
            what, holds = REQUIREMENTS[req]
            if not holds(scenario, model):
                raise ScenarioError(
                    f"plugins[{i}].name", plugin.name, f"used with {what}", hint="It requires it."
                )


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
        check_engine_available(scenario.engine.kind)
        # Validate plugins before any data is loaded or work starts.
        self.hooks: HookSet = build_hooks(scenario.plugins)
        self.data: FederatedData = build_federated_data(scenario, self.device)
        self.model = build_run_model(scenario, self.data, self.hooks, self.device)
        self.keys = aggregated_keys(self.model)  # what clients train and the server averages
        check_requirements(scenario, self.hooks, self.model)
        self.evaluator = Evaluator(scenario, self.data, self.hooks)
        self.client_states: dict[int, dict[str, dict[str, Any]]] = {}
        #: Continual runs: how far each client has consumed its stream.
        self.stream_pos: dict[int, int] = {}
        self.on_round: Callable[[int, dict[str, Any] | None], None] | None = None
        self.engine: Any = None

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
            self.stream_pos = ckpt.get("stream_pos", {})
            start, elapsed = ckpt["round"] + 1, ckpt["elapsed"]
            history = truncate_metrics(self.run_dir / METRICS, ckpt["round"])
        elif (self.run_dir / METRICS).exists():
            (self.run_dir / METRICS).unlink()

        engine = self.engine = make_engine(s, self.data, self.hooks, self.device)
        t0 = time.perf_counter()
        bar = self._progress_bar(start)
        try:
            for r in range(start, s.federation.rounds + 1):
                loss = self._round(engine, r)
                record = self._evaluate(r, loss)
                if record is not None:
                    history.append(record)
                    with open(self.run_dir / METRICS, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if r % s.checkpoint.every == 0 or r == s.federation.rounds:
                    self._checkpoint(r, elapsed + time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
                    if record is not None:
                        shown = {
                            "acc": "accuracy",
                            "bacc": "balanced_accuracy",
                            "anytime": "anytime_accuracy",
                        }
                        bar.set_postfix(
                            loss=f"{loss:.3f}",
                            **{k: f"{record[m]:.3f}" for k, m in shown.items() if record.get(m) is not None},
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
        ctx = configure_round(self.hooks, s.seed, d, r, selected)
        tasks = [ClientTask(c, r, ctx.config, self.client_states.setdefault(c, {})) for c in selected]
        new_pos = self._attach_stream(tasks)
        results = engine.train_round(tasks, self.model.state_dict())
        loss, _ = aggregate_round(self.hooks, self.model, self.keys, ctx, results, self.client_states)
        self.stream_pos.update(new_pos)
        return loss

    # ------------------------------------------------------------------ streams

    def _attach_stream(self, tasks: list[ClientTask]) -> dict[int, int]:
        """Give each task its next stream slice; returns the positions after this round."""
        streams = self.data.streams
        if streams is None:
            return {}
        per_round = self.scenario.stream.samples_per_round
        new_pos = {}
        for task in tasks:
            stream = streams[task.client_id].indices
            pos = self.stream_pos.get(task.client_id, 0)
            end = min(pos + per_round, len(stream))
            task.indices = stream[pos:end]
            task.seen_counts = self._seen_counts(task.client_id, end)
            new_pos[task.client_id] = end
        return new_pos

    def _seen_counts(self, client: int, pos: int) -> np.ndarray:
        seen = self.data.streams[client].indices[:pos]
        return np.bincount(self.data.y_train_np[seen], minlength=self.data.num_classes)

    def _client_seen(self) -> list[np.ndarray]:
        return [self._seen_counts(k, self.stream_pos.get(k, 0)) > 0 for k in range(self.data.n_clients)]

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, r: int, loss: float) -> dict[str, Any] | None:
        s = self.scenario
        full = self._eval_due(r)
        anytime = task_end = None
        if self.data.streams is not None:
            ends = task_end_rounds(s.federation.rounds, s.stream.n_tasks)
            task_end = ends.index(r) if r in ends else None
            if r % s.stream.eval_period == 0 or r == s.federation.rounds or task_end is not None:
                anytime = self._client_seen()
        if not full and anytime is None:
            return None
        exposed = None if anytime is None else np.logical_or.reduce(anytime)
        metrics = self.evaluator.evaluate(self.model, r, self.client_states, full, exposed, anytime)
        record: dict[str, Any] = {"round": r, "train_loss": loss}
        if anytime is not None:
            record["periodic"] = r % s.stream.eval_period == 0 or r == s.federation.rounds
            record["task_end"] = task_end
        record.update(metrics)
        return record

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
                "stream_pos": self.stream_pos,
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
        full = [h for h in history if "accuracy" in h]
        final = dict(full[-1]) if full else {}
        final.pop("round", None)
        if self.data.streams is not None:
            final.update(continual_summary(history))
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


def continual_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """A_auc, A_last, A_avg and F_last (global and personalised) from the anytime evaluations.

    A_auc and A_last use the periodic evaluations (every ``eval_period`` rounds and the last);
    A_avg and F_last use the evaluations at the global task ends (see ``task_end_rounds``).
    """
    periodic = [h for h in history if h.get("periodic")]
    ends = [h for h in history if h.get("task_end") is not None]
    out: dict[str, Any] = {}
    for suffix, key in (("", "anytime_accuracy"), ("_personalized", "anytime_personalized_accuracy")):
        series = [h[key] for h in periodic if h.get(key) is not None]
        end_series = [h[key] for h in ends if h.get(key) is not None]
        out[f"a_auc{suffix}"] = a_auc(series)
        out[f"a_last{suffix}"] = a_last(series)
        out[f"a_avg{suffix}"] = a_avg(end_series)
    out["f_last"] = f_last([h["anytime_per_class_accuracy"] for h in ends])
    out["anytime_history"] = [[h["round"], h.get("anytime_accuracy")] for h in periodic]
    return out
