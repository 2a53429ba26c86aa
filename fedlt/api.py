"""The Python API for scenario scripts: ``fedlt.run(path_or_scenario, **overrides)`` and friends."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fedlt.scenario.config import Scenario, load_scenario

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["history", "load_model", "resume", "run"]


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
        When ``out`` already holds a run: refuse, delete its files and start again (after
        claiming the folder, so a live run's files are never deleted), or continue it from its
        checkpoint. With ``"resume"``, the folder's own scenario.toml is what continues and the
        ``overrides`` apply as ``fedlt.resume(out, **overrides)`` applies them: settings that keep
        the checkpoint valid change (more rounds continue a finished run), others are refused;
        when they change nothing, a finished run's summary is returned at once.
    progress : bool, default=False
        Show a progress bar.
    on_round : callable, optional
        Called after every round with ``(round, record)``; ``record`` is the round's evaluation
        (what metrics.jsonl gets) or ``None`` when the round was not evaluated.
    **overrides
        Dotted keys, written with ``__`` for ``.`` (``federation__rounds=3``) or passed as
        ``**{"federation.rounds": 3}``.

    Raises
    ------
    TypeError
        ``scenario`` is not a path, name, dict or Scenario, or ``overrides=[...]`` was passed
        (overrides are keyword arguments).

    Examples
    --------
    >>> summary = fedlt.run("quickstart", out="runs/qs", federation__rounds=5)  # doctest: +SKIP
    >>> summary["final"]["balanced_accuracy"]  # doctest: +SKIP
    >>> fedlt.history("runs/qs")[-1]["accuracy"]  # doctest: +SKIP
    """
    from fedlt.driver.runner import SCENARIO, Run
    from fedlt.errors import ScenarioError
    from fedlt.store.rundir import LOCK, artefacts_in, claim

    if not isinstance(scenario, str | Path | Mapping | Scenario):
        raise TypeError(
            f"fedlt.run's 'scenario' must be a path to a scenario TOML file, a built-in scenario name, "
            f"a dict or a fedlt.Scenario. Got {scenario!r} ({type(scenario).__name__}) instead."
        )
    _check_overrides("run", overrides)
    if if_exists not in ("error", "overwrite", "resume"):
        raise ScenarioError("if_exists", if_exists, "'error', 'overwrite' or 'resume'")
    if isinstance(scenario, Scenario):
        scenario = scenario.model_dump()
        for spec in scenario["plugins"]:
            spec.update(spec.pop("params"))
    resolved = load_scenario(scenario, overrides)
    run_dir = None if out is None else Path(out)
    lock = None
    if run_dir is not None and run_dir.is_dir() and artefacts_in(run_dir):
        if if_exists == "resume" and (run_dir / SCENARIO).is_file():
            command = _call("run", scenario, out=str(out), if_exists=if_exists, **overrides)
            return _resume(run_dir, progress, on_round, overrides, command)
        if if_exists == "overwrite":
            lock = claim(run_dir, key="out=")  # refuses a live run's folder before anything is deleted
            try:
                for name in artefacts_in(run_dir):
                    target = run_dir / name
                    if name == LOCK:
                        continue
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    else:
                        target.unlink()  # a link goes, never what it points to
            except BaseException:
                lock.release()
                raise
    command = _call("run", scenario, out=None if out is None else str(out), **overrides)
    return _execute(Run.create(resolved, run_dir, progress, key="out=", command=command, lock=lock), on_round)


def _check_overrides(name: str, overrides: Mapping[str, Any]) -> None:
    """Refuse ``overrides=[...]``: it would be taken for a scenario key named ``overrides``."""
    if "overrides" in overrides:
        raise TypeError(
            f"fedlt.{name} takes overrides as keyword arguments, not as overrides=: write "
            f"federation__rounds=3 (``__`` for ``.``) or **{{'federation.rounds': 3}}. "
            f"Got overrides={overrides['overrides']!r}."
        )


def _resume(
    run_dir: Path,
    progress: bool,
    on_round: Callable[[int, dict[str, Any] | None], None] | None,
    overrides: Mapping[str, Any],
    command: str,
) -> dict[str, Any]:
    """Continue ``run_dir`` with ``overrides`` applied as a resume applies them; a finished run
    whose settings they leave unchanged gives its summary at once."""
    from fedlt.driver.resume import resume_overrides, setting_changes
    from fedlt.driver.runner import SCENARIO, Run, finished_summary

    kept = load_scenario(run_dir / SCENARIO)
    changed = resume_overrides(kept, overrides)  # refuses keys a resume cannot change
    if changed is None or not setting_changes(kept, changed):
        overrides = {}
        done = finished_summary(run_dir)
        if done is not None:
            return done
    return _execute(Run.open(run_dir, progress, overrides, command), on_round)


def _call(name: str, first: Any, **keywords: Any) -> str:
    """How a run was started from Python, as its starts.json records it."""
    if not isinstance(first, str | Path):
        first = getattr(first, "name", None) or (first.get("name") if isinstance(first, Mapping) else None)
    args = [repr(str(first))] if first is not None else []
    args += [f"{k}={v!r}" for k, v in keywords.items() if v is not None]
    return f"fedlt.{name}({', '.join(args)})"


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

    _check_overrides("resume", overrides)
    if not overrides:
        done = finished_summary(Path(run_dir))
        if done is not None:
            return done
    command = _call("resume", run_dir, **overrides)
    return _execute(Run.open(Path(run_dir), progress, overrides, command), on_round)


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every evaluation record of a run folder, in order (the lines of its metrics.jsonl)."""
    from fedlt.store.checkpoint import read_metrics

    return read_metrics(Path(run_dir) / "metrics.jsonl")


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The final global model of a finished run folder, in eval mode (a teacher, a baseline).

    The model is rebuilt from the folder's scenario.toml exactly as the run built it (its data
    for the input shape and classes, its plugins' ``configure_model``), then loaded with the
    global weights of the last checkpoint.

    Parameters
    ----------
    run_dir : path
        A folder written by ``fedlt run`` / :func:`run` whose run has finished.
    device : str or torch.device, default="cpu"
        Where the model is placed.

    Raises
    ------
    FedltError
        ``run_dir`` is not a finished fedlt run (no summary.json saying it finished, no
        scenario.toml, or a checkpoint of an earlier round than the last).
    CheckpointError
        The checkpoint is damaged or holds another model's weights.
    """
    import torch

    from fedlt.driver.resume import finished_summary
    from fedlt.driver.runner import SCENARIO
    from fedlt.errors import FedltError
    from fedlt.prepare import prepare
    from fedlt.store.checkpoint import CHECKPOINT, check_compatible, load_checkpoint

    folder = Path(run_dir)
    summary = finished_summary(folder) if folder.is_dir() else None
    if summary is None:
        raise FedltError(
            f"{str(folder)!r} is not a finished fedlt run: it must be a folder written by `fedlt run` "
            "holding scenario.toml and a summary.json of a run that finished."
        )
    ckpt = load_checkpoint(folder)
    if ckpt is None or ckpt["round"] != summary["rounds_run"]:
        saved = None if ckpt is None else ckpt["round"]
        raise FedltError(
            f"{str(folder)!r} is not a finished fedlt run: its checkpoint holds round {saved}, "
            f"its summary says {summary['rounds_run']} rounds ran."
        )
    prepared = prepare(load_scenario(folder / SCENARIO), torch.device(device), checked=True)
    model = prepared.model
    check_compatible(ckpt, model.state_dict(), folder / CHECKPOINT)
    model.load_state_dict(ckpt["global"])
    return model.eval()
