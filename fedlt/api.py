"""The Python API for scenario scripts: ``fedlt.run(path_or_scenario, **overrides)`` and friends."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from fedlt.scenario.config import Scenario, load_scenario

__all__ = ["history", "resume", "run"]


def run(
    scenario: str | Path | Mapping[str, Any] | Scenario = "quickstart",
    *,
    out: str | Path | None = None,
    if_exists: Literal["error", "overwrite", "resume"] = "error",
    progress: bool = False,
    on_round: Callable[[int, dict[str, Any] | None], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run a scenario to the end and return its summary (also written to ``out/summary.json``).

    Parameters
    ----------
    scenario : path, built-in name, dict or Scenario, default="quickstart"
        What to run.
    out : path, optional
        Run folder (default ``runs/<name>-<plugins>-<timestamp>``).
    if_exists : {"error", "overwrite", "resume"}, default="error"
        When ``out`` already holds a run: refuse, delete its files and start again, or continue
        it from its checkpoint (returning its summary at once if it has finished).
    progress : bool, default=False
        Show a progress bar.
    on_round : callable, optional
        Called after every round with ``(round, record)``; ``record`` is the round's evaluation
        (what metrics.jsonl gets) or ``None`` when the round was not evaluated.
    **overrides
        Dotted keys, written with ``__`` for ``.`` (``federation__rounds=3``) or passed as
        ``**{"federation.rounds": 3}``.

    Examples
    --------
    >>> summary = fedlt.run("quickstart", out="runs/qs", federation__rounds=5)  # doctest: +SKIP
    >>> summary["final"]["balanced_accuracy"]  # doctest: +SKIP
    >>> fedlt.history("runs/qs")[-1]["accuracy"]  # doctest: +SKIP
    """
    from fedlt.driver.runner import SCENARIO, Run, finished_summary
    from fedlt.errors import ScenarioError
    from fedlt.store.rundir import artefacts_in

    if if_exists not in ("error", "overwrite", "resume"):
        raise ScenarioError("if_exists", if_exists, "'error', 'overwrite' or 'resume'")
    if isinstance(scenario, Scenario):
        scenario = scenario.model_dump()
        for spec in scenario["plugins"]:
            spec.update(spec.pop("params"))
    resolved = load_scenario(scenario, overrides)
    run_dir = None if out is None else Path(out)
    if run_dir is not None and run_dir.is_dir() and artefacts_in(run_dir):
        if if_exists == "resume" and (run_dir / SCENARIO).is_file():
            done = finished_summary(run_dir)
            if done is not None:
                return done
            return _execute(Run.open(run_dir, progress), on_round)
        if if_exists == "overwrite":
            for name in artefacts_in(run_dir):
                target = run_dir / name
                if name != "fedlt.lock":
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return _execute(Run.create(resolved, run_dir, progress, key="out="), on_round)


def _execute(run: Any, on_round: Callable[[int, dict[str, Any] | None], None] | None) -> dict[str, Any]:
    run.on_round = on_round
    return run.execute()


def resume(
    run_dir: str | Path,
    *,
    progress: bool = False,
    on_round: Callable[[int, dict[str, Any] | None], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Continue a run folder from its last checkpoint; returns the summary.

    ``overrides`` may change settings that keep the checkpoint valid (learning rate, rounds,
    engine...; see ``fedlt.driver.runner.RESUMABLE_KEYS``), written as for :func:`run`.
    """
    from fedlt.driver.runner import Run, finished_summary

    if not overrides:
        done = finished_summary(Path(run_dir))
        if done is not None:
            return done
    return _execute(Run.open(Path(run_dir), progress, overrides), on_round)


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every evaluation record of a run folder, in order (the lines of its metrics.jsonl)."""
    from fedlt.store.checkpoint import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")
