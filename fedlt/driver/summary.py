"""A run's summary.json: the final metrics, the continual metrics of a stream, provenance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedlt.base.provenance import now, provenance
from fedlt.metrics.continual import a_auc, a_avg, f_last
from fedlt.store.checkpoint import json_safe

__all__ = ["build_summary", "continual_summary", "time_to_accuracy"]


def build_summary(run: Any, wall: float, stopped: str | None, starts: dict[str, Any]) -> dict[str, Any]:
    """What summary.json holds for ``run`` (a :class:`~fedlt.driver.runner.Run`): the last full
    evaluation's metrics (and in a stream the continual ones), how each round was trained, the
    wall time, where the numbers came from (``provenance``: the first start's time and command)
    and every resume (``resumes``: the round resumed from and the settings it changed, from
    :mod:`fedlt.store.starts`). JSON-ready (NaN and inf as None)."""
    full = [h for h in run.history if "accuracy" in h]
    final = dict(full[-1]) if full else {}
    final.pop("round", None)
    final["train_class_counts"] = run.data.train_class_counts.tolist()
    if run.views.streaming:
        final.update(continual_summary(run.history), eval_period=run.schedule.period)
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
            "command": starts.get("command"),
            "started": starts.get("started"),
            "ended": now(),
        },
        "resumes": starts.get("resumes", []),
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

    - ``a_auc``: mean over the A_auc points, the multiples ``k P`` of ``stream.eval_period``
      the federation's sample count reached (``eval_points`` of each record: a round that
      reached several counts once per point, with the accuracy of the model it produced), so
      rounds that read nothing add nothing and every point weighs the same number of samples;
    - ``a_last``: the anytime accuracy of the final evaluation;
    - ``a_avg``: mean of the accuracies at the federation's task ends (by samples read);
    - ``f_last``: forgetting over the per-class accuracies at the task ends and the final
      evaluation; ``task_class_accuracy``: those rows (task x class);
    - ``client_f_last``: each client's forgetting, from its personalised per-class accuracies
      on its local view at the same evaluations;
    - ``anytime_history``: ``[k P, anytime accuracy]`` per A_auc point, the anytime curve.
    """
    anytime = [h for h in history if "anytime_accuracy" in h]
    # One entry per A_auc point (records before eval_points existed: one per periodic record).
    points = [
        (x, h) for h in anytime if h.get("periodic") for x in h.get("eval_points") or [h.get("samples_seen")]
    ]
    ends = [h for h in anytime if h.get("task_end")]
    final = anytime[-1] if anytime else None
    rows = list(ends) + ([final] if final is not None and final not in ends else [])
    out: dict[str, Any] = {}
    for suffix, key in (("", "anytime_accuracy"), ("_personalized", "anytime_personalized_accuracy")):
        out[f"a_auc{suffix}"] = a_auc([h[key] for _, h in points if h.get(key) is not None])
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
    out["anytime_history"] = [[x, h.get("anytime_accuracy")] for x, h in points]
    return out
