"""A run's summary.json: the final metrics, the continual metrics of a stream, provenance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedlt.base.provenance import now, provenance
from fedlt.metrics.continual import a_auc, a_avg, f_last
from fedlt.store.checkpoint import json_safe

__all__ = ["build_summary", "continual_summary", "time_to_accuracy"]


def build_summary(run: Any, wall: float, stopped: str | None, started: str) -> dict[str, Any]:
    """What summary.json holds for ``run`` (a :class:`~fedlt.driver.runner.Run`): the last full
    evaluation's metrics (and in a stream the continual ones), how each round was trained, the
    wall time and where the numbers came from. JSON-ready (NaN and inf as None)."""
    full = [h for h in run.history if "accuracy" in h]
    final = dict(full[-1]) if full else {}
    final.pop("round", None)
    final["train_class_counts"] = run.data.train_class_counts.tolist()
    if run.views.streaming:
        final.update(continual_summary(run.history))
    s = run.scenario
    summary = {
        "scenario": s.name,
        "rounds": s.federation.rounds,
        "rounds_run": max((h["round"] for h in run.history), default=0),
        "finished": True,
        "stopped_early": stopped,
        "engine": s.engine.kind,
        "seed": s.seed,
        "plugins": run.hooks.names,
        "final": final,
        "federation": run.federation.report() if run.federation is not None else None,
        "time_to_accuracy": time_to_accuracy(run.history, s.eval.time_to_accuracy),
        "training": run.training,
        "wall_seconds": round(wall, 3),
        "provenance": {
            **provenance(str(run.device), torch.get_num_threads()),
            "started": started,
            "ended": now(),
        },
    }
    return json_safe(summary)


def time_to_accuracy(
    history: Sequence[dict[str, Any]], targets: Sequence[float] | None
) -> dict[str, Any] | None:
    """For each target accuracy, the first evaluation that reached it: ``{"round", "virtual_time"}``,
    or None when none did (None without targets). Offline the test accuracy, in a stream the anytime
    accuracy."""
    if not targets:
        return None
    key = "anytime_accuracy" if any("anytime_accuracy" in h for h in history) else "accuracy"
    out: dict[str, Any] = {}
    for target in targets:
        hit = next((h for h in history if (h.get(key) or 0.0) >= target), None)
        out[f"{target:g}"] = (
            None if hit is None else {"round": hit["round"], "virtual_time": hit.get("virtual_time")}
        )
    return out


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
