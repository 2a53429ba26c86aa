"""The Python API for scenario scripts: ``fedlt.run(path_or_scenario, **overrides)``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlt.config import Scenario, load_scenario
from fedlt.runner import Run

__all__ = ["resume", "run"]


def run(
    scenario: str | Path | Mapping[str, Any] | Scenario = "quickstart",
    *,
    out: str | Path | None = None,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run a scenario to the end and return its summary (also written to ``out/summary.json``).

    Parameters
    ----------
    scenario : path, built-in name, dict or Scenario, default="quickstart"
        What to run.
    out : path, optional
        Run folder (default ``runs/<name>-<timestamp>``).
    progress : bool, default=False
        Show a progress bar.
    **overrides
        Dotted keys, written with ``__`` for ``.`` (``federation__rounds=3``) or passed as
        ``**{"federation.rounds": 3}``.

    Examples
    --------
    >>> summary = fedlt.run("scenarios/quickstart.toml", federation__rounds=5)  # doctest: +SKIP
    >>> summary["final"]["balanced_accuracy"]  # doctest: +SKIP
    """
    if isinstance(scenario, Scenario):
        scenario = scenario.model_dump()
        for spec in scenario["plugins"]:
            spec.update(spec.pop("params"))
    resolved = load_scenario(scenario, overrides)
    return Run.create(resolved, None if out is None else Path(out), progress).execute()


def resume(run_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Continue a run folder from its last checkpoint; returns the summary."""
    return Run.open(Path(run_dir), progress).execute()
