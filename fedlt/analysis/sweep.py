"""A sweep: a grid of settings x seeds, each an independent run, in local processes or on Ray.

Every point of the grid gets its own run folder under the sweep's folder, named after its
settings, so a sweep is resumable by construction: a finished run is skipped, an interrupted one
resumed from its checkpoint, a missing one started. Independent runs are where a Ray cluster
pays off for research (one run per core or GPU fraction), so ``run_ray`` sends each run as a
Ray task with its own resources. The sweep ends with the ``fedlt compare`` table.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlt.errors import FedltError, ScenarioError
from fedlt.scenario.config import load_scenario, parse_value

__all__ = ["Job", "Sweep", "parse_grid", "parse_seeds", "run_job"]


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["train.lr=0.1,0.01", "plugins.0.name=focal,ldam"]`` -> ``{key: [values]}`` (TOML literals)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ScenarioError("--grid", item, "KEY=V1,V2,... e.g. train.lr=0.1,0.01")
        grid[key.strip()] = [parse_value(v.strip()) for v in _split_values(values)]
    return grid


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so ``[32,64],[64,128]`` is two values."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"1,5,9"`` -> [1, 5, 9]."""
    try:
        if re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", text):
            lo, hi = (int(t) for t in text.split("-"))
            if hi < lo:
                raise ValueError
            return list(range(lo, hi + 1))
        seeds = [int(t) for t in text.split(",") if t.strip()]
        if not seeds or any(s < 0 for s in seeds):
            raise ValueError
        return seeds
    except ValueError:
        raise ScenarioError("--seeds", text, "a range like 0-4 or a list like 0,1,2 of seeds >= 0") from None


def _slug(setting: Mapping[str, Any]) -> str:
    text = "_".join(f"{k.split('.')[-1] if k.count('.') < 2 else k}={v}" for k, v in setting.items())
    return re.sub(r"[^A-Za-z0-9=.,_+-]+", "", text.replace(" ", ""))[:120] or "base"


@dataclass(frozen=True)
class Job:
    """One run of the sweep: its folder and the overrides that make its scenario."""

    run_dir: Path
    overrides: dict[str, Any]


def run_job(scenario: str, job: Job, threads: int | None = None) -> str:
    """Run, resume or skip one job; returns a one-line report. Safe to call in a fresh process."""
    from fedlt.driver.runner import SCENARIO, Run, finished_summary

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if finished_summary(job.run_dir) is not None:
        return f"skipped {job.run_dir.name} (finished)"
    if (job.run_dir / SCENARIO).is_file():
        Run.open(job.run_dir).execute()
        return f"resumed {job.run_dir.name}"
    overrides = dict(job.overrides)
    if threads is not None:
        overrides.setdefault("engine.threads", threads)
    run = Run.create(load_scenario(scenario, overrides), job.run_dir)
    run.execute()
    return f"ran {job.run_dir.name}"


class Sweep:
    """The grid x seeds of a scenario, run as independent, resumable runs under ``out``.

    Parameters
    ----------
    scenario : str or Path
        Scenario file or built-in name.
    out : Path
        The sweep's folder: one run folder per grid point and seed.
    grid : mapping of str to list
        Swept keys and their values (the product of all is swept).
    seeds : list of int
        Seeds, each run for every grid point.
    fixed : list of str
        ``key=value`` overrides applied to every run.
    """

    def __init__(
        self,
        scenario: str | Path,
        out: Path,
        grid: Mapping[str, Sequence[Any]],
        seeds: Sequence[int],
        fixed: Sequence[str] = (),
    ) -> None:
        path = Path(scenario)
        self.scenario = str(path.resolve()) if path.exists() else str(scenario)
        self.out = Path(out)
        self.fixed = {}
        for item in fixed:
            key, sep, value = item.partition("=")
            if not sep:
                raise ScenarioError("--set", item, "of the form key.sub=value")
            self.fixed[key.strip()] = parse_value(value.strip())
        self.jobs: list[Job] = []
        keys = list(grid)
        for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            setting = dict(zip(keys, values, strict=True))
            for seed in seeds:
                overrides = {**self.fixed, **setting, "seed": seed}
                name = f"{_slug(setting)}-seed{seed}" if setting else f"seed{seed}"
                self.jobs.append(Job(self.out / name, overrides))
        # Validate every point before running any: a bad grid value stops the sweep at once.
        for job in self.jobs:
            load_scenario(self.scenario, job.overrides)
        if self.out.exists() and not self.out.is_dir():
            raise ScenarioError("--out", str(self.out), "a folder for the sweep's runs")

    def run_local(self, jobs: int = 1) -> list[str]:
        """Run every job here (``jobs == 1``) or in ``jobs`` processes, one torch thread share each."""
        if jobs < 1:
            raise ScenarioError("--jobs", jobs, "an integer >= 1")
        self.out.mkdir(parents=True, exist_ok=True)
        if jobs == 1:
            return [_attempt(lambda job=job: run_job(self.scenario, job), job) for job in self.jobs]
        threads = max(1, (os.cpu_count() or 1) // jobs)
        lines = []
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, self.scenario, job, threads): job for job in self.jobs}
            for future in as_completed(futures):
                lines.append(_attempt(future.result, futures[future]))
        return lines

    def run_ray(self, address: str, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0) -> list[str]:
        """Run every job as a Ray task with ``cpus_per_run`` / ``gpus_per_run`` (``address``:
        ``"local"`` starts a local Ray, ``"auto"`` or host:port joins a cluster)."""
        try:
            import ray
        except ImportError:
            raise ScenarioError(
                "--ray", address, "used with Ray installed", hint="pip install 'fedlt[ray]'"
            ) from None
        self.out.mkdir(parents=True, exist_ok=True)
        # Keep Ray from rewriting CUDA_VISIBLE_DEVICES for CPU-only tasks (and from warning about it).
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        started = False
        if not ray.is_initialized():
            init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            # Ray's "local" starts a new local Ray; no address would join whatever cluster
            # /tmp/ray/ray_current_cluster names (another `ray start`, or a dead one: a hang).
            init["address"] = address
            ray.init(**init)
            started = True
        try:
            threads = max(1, int(cpus_per_run))
            remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(run_job)
            refs = {remote.remote(self.scenario, job, threads): job for job in self.jobs}
            lines = []
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    lines.append(ray.get(ready[0]))
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, FedltError) else exc
                    lines.append(f"failed {refs[ready[0]].run_dir.name}: {cause}")
            return lines
        finally:
            if started:
                ray.shutdown()

    def table(self, baseline: str | None = None) -> Any:
        """The comparison table of the sweep's finished runs (``fedlt compare``)."""
        from fedlt.analysis.compare import collect_runs, compare

        return compare(
            collect_runs([job.run_dir for job in self.jobs if (job.run_dir / "summary.json").is_file()]),
            baseline=baseline,
        )


def _attempt(call: Callable[[], str], job: Job) -> str:
    """A job's report line; a job that fails (for any reason but an interrupt) is reported as
    ``failed NAME: error`` and the sweep goes on with the others."""
    try:
        return call()
    except FedltError as exc:
        return f"failed {job.run_dir.name}: {exc}"
    except Exception as exc:
        return f"failed {job.run_dir.name}: {type(exc).__name__}: {exc}"
