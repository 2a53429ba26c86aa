"""Continuing a run: what may change on resume, the state a checkpoint restores, a finished run.

A run folder is continued from its checkpoint (:func:`restore`): the global weights, every
plugin's state, the clients' per-plugin state, the stream positions and the per-round training
log, and metrics.jsonl cut back to the checkpoint's round, so a resumed run writes exactly what an
uninterrupted one would have. ``fedlt resume --set`` may change only the settings that keep the
checkpoint valid (:data:`RESUMABLE_KEYS`, :func:`resume_overrides`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fedlt.data.views import ClientViews
from fedlt.errors import FedltError, ScenarioError
from fedlt.hooks.dispatch import HookSet
from fedlt.scenario.config import Scenario, load_scenario
from fedlt.store.checkpoint import CHECKPOINT, check_compatible, load_checkpoint, truncate_metrics

__all__ = [
    "METRICS",
    "RESUMABLE_KEYS",
    "ROUNDS",
    "SCENARIO",
    "SUMMARY",
    "ResumePoint",
    "finished_summary",
    "flat_settings",
    "read_checkpoint",
    "restore",
    "resume_overrides",
    "setting_changes",
]

METRICS = "metrics.jsonl"
#: Every server update's training loss and virtual time (metrics.jsonl: evaluations only).
ROUNDS = "rounds.jsonl"
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


@dataclass
class ResumePoint:
    """Where a run continues: after round ``round`` (0: a fresh run), with what it had then."""

    round: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    client_states: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)


def read_checkpoint(
    run_dir: Path, model: nn.Module, loaded: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The folder's checkpoint as plain data (``loaded``: already read), checked to fit ``model``
    (None: a fresh run)."""
    ckpt = load_checkpoint(run_dir) if loaded is None else loaded
    if ckpt is not None:
        check_compatible(ckpt, model.state_dict(), run_dir / CHECKPOINT)
    return ckpt


def restore(
    ckpt: dict[str, Any] | None, run_dir: Path, model: nn.Module, hooks: HookSet, views: ClientViews
) -> ResumePoint:
    """Load ``ckpt`` into the model, the plugins and the stream positions and cut metrics.jsonl
    back to its round; without one, clear a previous attempt's metrics and summary."""
    if ckpt is None:
        for stale in (METRICS, ROUNDS, SUMMARY):
            (run_dir / stale).unlink(missing_ok=True)
        return ResumePoint()
    model.load_state_dict(ckpt["global"])
    hooks.load_state_dict(ckpt["plugins"])
    views.load_state_dict(ckpt.get("stream_pos", {}))
    if (run_dir / ROUNDS).is_file():
        truncate_metrics(run_dir / ROUNDS, ckpt["round"])
    return ResumePoint(
        ckpt["round"],
        ckpt["elapsed"],
        truncate_metrics(run_dir / METRICS, ckpt["round"]),
        [
            {**t, "through": min(t.get("through", t["round"]), ckpt["round"])}
            for t in ckpt.get("training", [])
            if t.get("round", 0) <= ckpt["round"]
        ],
        ckpt["client_states"],
    )


def resume_overrides(scenario: Scenario, overrides: Iterable[str] | Mapping[str, Any]) -> Scenario | None:
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


def setting_changes(before: Scenario, after: Scenario) -> dict[str, Any]:
    """The settings ``after`` changes, as dotted keys (``"train.lr"``) to their new values."""
    old = dict(_flatten(before.model_dump(mode="json")))
    new = dict(_flatten(after.model_dump(mode="json")))
    return {k: new.get(k) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def flat_settings(scenario: Scenario) -> dict[str, Any]:
    """Every setting of ``scenario`` as a dotted key (``"train.lr"``, ``"plugins[0].gamma"``)."""
    return dict(_flatten(scenario.model_dump(mode="json")))


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
