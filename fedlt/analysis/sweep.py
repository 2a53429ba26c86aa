"""A sweep: a grid of settings x seeds, each an independent run, in local processes or on Ray.

Every point of the grid gets its own run folder under the sweep's folder, named after its
settings, so a sweep is resumable by construction: a finished run is skipped, an interrupted one
resumed from its checkpoint, a missing one started. Independent runs are where a Ray cluster
pays off for research (one run per core or GPU fraction), so ``run_ray`` sends each run as a
Ray task with its own resources. Each job reports a line as it finishes (``progress``: index of
total, its settings, its final metric or failure, how long it took); the sweep ends with the
``fedlt compare`` table. Grid points that would share a run or a folder are refused; local
workers (``--jobs N``) stop with the sweep however it stops (see ``_Pool``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from fedlt.errors import FedltError, ScenarioError
from fedlt.scenario.config import load_scenario, parse_value

__all__ = ["Job", "Sweep", "parse_grid", "parse_seeds", "point_names", "progress_line", "run_job"]


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["train.lr=0.1,0.01", "plugins.0.name=focal,ldam"]`` -> ``{key: [values]}`` (TOML literals).

    A key given twice, or two values that read as the same literal (``0.1,0.10``), would run one
    point twice into one folder: both are refused, as is ``seed`` (the sweep's ``--seeds``).
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ScenarioError("--grid", item, "KEY=V1,V2,... e.g. train.lr=0.1,0.01")
        if key == "seed":
            raise ScenarioError("--grid", item, "a key other than seed", hint="Give seeds with --seeds.")
        if key in grid:
            raise ScenarioError(
                "--grid", item, f"a key not swept already: {key} is given twice (list its values once)"
            )
        texts = [v.strip() for v in _split_values(values)]
        parsed = [parse_value(t) for t in texts]
        seen: dict[str, str] = {}
        for text, value in zip(texts, parsed, strict=True):
            same = seen.setdefault(_canonical(value), text)
            if same != text or texts.count(text) > 1:
                raise ScenarioError(
                    "--grid", item, f"distinct values of {key}: {same} and {text} are both {value!r}"
                )
        grid[key] = parsed
    return grid


def _canonical(value: Any) -> str:
    """A value as one string, equal only for equal values of one type (``1`` is not ``1.0``)."""
    return json.dumps(value, sort_keys=True, default=str)


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


#: Longest folder name a grid point gets (before ``-seedN``); longer ones are cut and get a digest.
NAME_LIMIT = 120


def _digest(setting: Mapping[str, Any]) -> str:
    """8 hex digits that tell grid points apart when their readable names do not."""
    return hashlib.sha256(_canonical(dict(setting)).encode()).hexdigest()[:8]


def _slug(setting: Mapping[str, Any]) -> str:
    """A grid point's readable folder name: ``lr=0.1_plugins.0.name=focal``; cut to
    :data:`NAME_LIMIT` characters with the point's digest when longer."""
    text = "_".join(f"{k.split('.')[-1] if k.count('.') < 2 else k}={v}" for k, v in setting.items())
    text = re.sub(r"[^A-Za-z0-9=.,_+-]+", "", text.replace(" ", "")) or "base"
    return text if len(text) <= NAME_LIMIT else f"{text[: NAME_LIMIT - 9]}-{_digest(setting)}"


def point_names(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The folder name of each grid point, distinct even where the file system ignores case.

    Readable names that would collide (characters a folder name cannot hold are dropped, so
    ``"a b"`` and ``"ab"`` read alike; ``Focal`` and ``focal`` are one folder on macOS) get the
    point's digest appended; names are then checked to be distinct.
    """
    names = [_slug(s) for s in settings]
    count = collections.Counter(n.casefold() for n in names)
    names = [
        f"{n}-{_digest(s)}" if count[n.casefold()] > 1 else n for n, s in zip(names, settings, strict=True)
    ]
    if len({n.casefold() for n in names}) < len(names):
        clash = collections.Counter(n.casefold() for n in names).most_common(1)[0][0]
        raise FedltError(f"two grid points get the folder name {clash!r}; change one of their values")
    return names


@dataclass(frozen=True)
class Job:
    """One run of the sweep: its folder, the overrides that make its scenario, and the part of
    them that tells it apart from the other jobs (its grid point and seed)."""

    run_dir: Path
    overrides: dict[str, Any]
    setting: dict[str, Any] = field(default_factory=dict)


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


def _timed_job(scenario: str, job: Job, threads: int | None = None) -> tuple[str, float]:
    """:func:`run_job` and its wall seconds (measured where it ran: a pool or Ray worker)."""
    start = time.perf_counter()
    report = run_job(scenario, job, threads)
    return report, time.perf_counter() - start


#: The metric a progress line shows, the first a run has (long-tail runs: balanced accuracy).
PROGRESS_METRICS = ("balanced_accuracy", "accuracy", "a_auc")


def _final_metric(run_dir: Path) -> str:
    """``balanced_accuracy 0.4123`` from the run's summary.json, or ``""`` when it has none."""
    try:
        final = json.loads((run_dir / "summary.json").read_text()).get("final") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    for key in PROGRESS_METRICS:
        value = final.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{key} {value:.4f}"
    return ""


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_line(
    index: int, total: int, job: Job, report: str, seconds: float | None, since_start: float
) -> str:
    """One finished job, as the sweep prints it on stderr.

    ``[2/4] train.lr=0.05, seed=1: ran lr=0.05-seed1, balanced_accuracy 0.4123 (3.1 s; 0:00:07 elapsed)``,
    or ``[3/4] train.lr=0.1, seed=0: failed lr=0.1-seed0: <error> (0:00:09 elapsed)``.

    Parameters
    ----------
    index, total : int
        How many jobs have finished, this one included, of how many.
    job : Job
    report : str
        What :func:`run_job` returned (``ran``, ``resumed``, ``skipped`` or ``failed ...``).
    seconds : float or None
        The job's own wall time (None when it failed before reporting one).
    since_start : float
        Seconds since the sweep started.
    """
    what = ", ".join(f"{k}={v}" for k, v in job.setting.items()) or job.run_dir.name
    text = f"[{index}/{total}] {what}: {' '.join(report.split())}"  # one line, whatever the error
    if not report.startswith("failed "):
        metric = _final_metric(job.run_dir)
        text += f", {metric}" if metric else ""
    took = "" if seconds is None else f"{seconds:.1f} s; "
    return f"{text} ({took}{_clock(since_start)} elapsed)"


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
        if "seed" in self.fixed:
            seed = f"seed={self.fixed['seed']}"
            raise ScenarioError("--set", seed, "a key other than seed", hint="Give seeds with --seeds.")
        self.jobs: list[Job] = []
        keys = list(grid)
        settings = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
        for setting, stem in zip(settings, point_names(settings), strict=True):
            for seed in seeds:
                overrides = {**self.fixed, **setting, "seed": seed}
                name = f"{stem}-seed{seed}" if setting else f"seed{seed}"
                self.jobs.append(Job(self.out / name, overrides, {**setting, "seed": seed}))
        self._check_points()
        if self.out.exists() and not self.out.is_dir():
            raise ScenarioError("--out", str(self.out), "a folder for the sweep's runs")

    def _check_points(self) -> None:
        """Validate every point before running any (a bad grid value stops the sweep at once), and
        refuse two points that resolve to one scenario (``1`` and ``1.0`` for a float key): they
        would be one experiment counted twice."""
        seen: dict[str, Job] = {}
        for job in self.jobs:
            resolved = _canonical(load_scenario(self.scenario, job.overrides).model_dump(mode="json"))
            other = seen.setdefault(resolved, job)
            if other is not job:
                differ = [k for k, v in job.setting.items() if _canonical(v) != _canonical(other.setting[k])]
                pair = " and ".join(", ".join(f"{k}={p.setting[k]!r}" for k in differ) for p in (other, job))
                raise ScenarioError(
                    "--grid",
                    " ".join(f"{k}={job.setting[k]}" for k in differ),
                    f"values that make different runs: {pair} resolve to the same scenario",
                )

    def run_local(self, jobs: int = 1, progress: Callable[[str], None] | None = None) -> list[str]:
        """Run every job here (``jobs == 1``) or in ``jobs`` processes, one torch thread share each.

        ``progress`` receives a :func:`progress_line` as each job finishes (in finishing order);
        the return value is the jobs' reports (``ran NAME``, ``failed NAME: error``...) in that order.
        SIGTERM (in the main thread) stops the sweep as Ctrl-C does: ``KeyboardInterrupt``, once every
        worker and what it started is stopped.
        """
        if jobs < 1:
            raise ScenarioError("--jobs", jobs, "an integer >= 1")
        self.out.mkdir(parents=True, exist_ok=True)
        report = self._reporter(progress)
        with _sigterm_interrupts():
            if jobs == 1:
                return [
                    report(job, _attempt(lambda job=job: _timed_job(self.scenario, job), job))
                    for job in self.jobs
                ]
            threads = max(1, (os.cpu_count() or 1) // jobs)
            return _Pool(self.scenario, threads).run(self.jobs, jobs, report)

    def _reporter(
        self, progress: Callable[[str], None] | None
    ) -> Callable[[Job, tuple[str, float | None]], str]:
        """``report(job, (line, seconds))``: passes the job's progress line on; returns ``line``."""
        start, done = time.perf_counter(), [0]

        def report(job: Job, result: tuple[str, float | None]) -> str:
            line, seconds = result
            done[0] += 1
            if progress is not None:
                progress(
                    progress_line(done[0], len(self.jobs), job, line, seconds, time.perf_counter() - start)
                )
            return line

        return report

    def run_ray(
        self,
        address: str,
        cpus_per_run: float = 1.0,
        gpus_per_run: float = 0.0,
        progress: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Run every job as a Ray task with ``cpus_per_run`` / ``gpus_per_run`` (``address``:
        ``"local"`` starts a local Ray, ``"auto"`` or host:port joins a cluster); ``progress`` as
        for :meth:`run_local`. The resources are checked before Ray starts."""
        check_ray_resources(cpus_per_run, gpus_per_run)
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
            remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(_timed_job)
            refs = {remote.remote(self.scenario, job, threads): job for job in self.jobs}
            report = self._reporter(progress)
            lines = []
            pending = list(refs)
            try:
                with _sigterm_interrupts():
                    while pending:
                        ready, pending = ray.wait(pending, num_returns=1)
                        job = refs[ready[0]]
                        try:
                            result: tuple[str, float | None] = ray.get(ready[0])
                        except ray.exceptions.RayTaskError as exc:
                            cause = exc.cause if isinstance(exc.cause, FedltError) else exc
                            result = (f"failed {job.run_dir.name}: {cause}", None)
                        lines.append(report(job, result))
            except BaseException:  # stopped: a joined cluster would otherwise run the rest
                for ref in pending:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
                raise
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


#: The smallest resource amount Ray can reserve (it counts in units of 1/10000).
RAY_RESOURCE_UNIT = 1e-4


def check_ray_resources(cpus_per_run: float, gpus_per_run: float) -> None:
    """Refuse what Ray would refuse only once started (a negative or non-finite amount, or one
    below its unit), and zero CPUs (Ray would then start every run at once)."""
    checks = (("--cpus-per-run", cpus_per_run, False), ("--gpus-per-run", gpus_per_run, True))
    for key, value, zero_ok in checks:
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if finite and (value >= RAY_RESOURCE_UNIT or (zero_ok and value == 0)):
            continue
        allowed = f"a number >= {RAY_RESOURCE_UNIT:g} (Ray's smallest amount)"
        raise ScenarioError(
            key, value, f"0 or {allowed}" if zero_ok else allowed, hint="A fraction shares one device."
        )


def _attempt(call: Callable[[], tuple[str, float]], job: Job) -> tuple[str, float | None]:
    """A job's (report line, seconds); a job that fails (for any reason but an interrupt) is
    reported as ``failed NAME: error`` and the sweep goes on with the others."""
    try:
        return call()
    except FedltError as exc:
        return f"failed {job.run_dir.name}: {exc}", None
    except Exception as exc:
        return f"failed {job.run_dir.name}: {type(exc).__name__}: {exc}", None


# --------------------------------------------------------------------------- local worker processes
#
# Stopping a sweep stops every process it started, however it is stopped:
# - Ctrl-C, SIGTERM or an error in the sweep: the sweep stops its workers itself (SIGTERM to each
#   worker's process group, so a run ends as on Ctrl-C; SIGKILL to what is left after a grace time).
# - SIGKILL of the sweep (or any death that runs no code): each worker watches its parent. A thread
#   polls ``os.getppid()``, which changes when the parent dies (the orphan is adopted by init or a
#   subreaper) on Linux and macOS alike; the worker then stops itself and its process group. An
#   idle worker also sees its job pipe close. Workers get jobs one at a time from the sweep, so a
#   worker never starts a queued job on its own.

#: Seconds between a worker's checks that the sweep is still there, and that a stopping worker
#: (or its run) gets to end on its own before it is killed.
PARENT_POLL_S = 0.2
STOP_GRACE_S = 3.0


class _Stop(BaseException):
    """SIGTERM arrived (raised from the handler, turned into KeyboardInterrupt by the sweep); not
    an Exception, so no job's error handling can take it for that job's failure."""


def _raise_stop(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise _Stop


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops the sweep as Ctrl-C does (``KeyboardInterrupt``), so it stops its workers
    on the way out; outside the main thread (no signal handlers there) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    except _Stop:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _kill_own_group() -> None:
    """SIGKILL this process and, when it leads its process group, everything in that group."""
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _follow_parent(parent: int) -> None:
    """A worker's watch: once the sweep that started it is gone, stop (its run as on Ctrl-C)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    _kill_own_group()


def _worker(conn: Connection, parent: int, scenario: str, threads: int) -> None:
    """A ``--jobs N`` worker: runs the jobs the sweep sends, one at a time, until it sends None,
    closes the pipe, or dies; then leaves at once.

    Each run closes its files in its own cleanup (also when SIGTERM stops it), so the worker skips
    the interpreter's final garbage collection: after a run it takes seconds, a stopping sweep's
    grace time.
    """
    os.setpgid(0, 0)  # its own group: the sweep stops it and whatever it starts together
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's to handle
    threading.Thread(target=_follow_parent, args=(parent,), name="fedlt-follow-sweep", daemon=True).start()
    code = 0
    try:
        _serve(conn, scenario, threads)
    except BaseException:  # a fault of the worker itself: shown, and the sweep reports the job failed
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _serve(conn: Connection, scenario: str, threads: int) -> None:
    while True:
        try:
            job = conn.recv()
            if job is None:
                return
            conn.send(_attempt(lambda job=job: _timed_job(scenario, job, threads), job))
        except (EOFError, OSError):  # the sweep is gone
            return
        except KeyboardInterrupt:  # SIGTERM from the sweep (or from the watch): the run stopped cleanly
            return


def _signal_worker(proc: multiprocessing.process.BaseProcess, sig: int) -> None:
    """``sig`` to a worker's process group (to the worker alone before it has made its group)."""
    pid = proc.pid
    if pid is None or proc.exitcode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _send(conn: Connection, job: Job | None) -> None:
    """Hand a worker its next job (None: stop); one that just died shows up in ``wait`` instead."""
    with contextlib.suppress(OSError):
        conn.send(job)


class _Pool:
    """``--jobs N`` local worker processes (spawned: no state copied from this process), fed one
    job at a time, and stopped with everything they started when the sweep ends in any way."""

    def __init__(self, scenario: str, threads: int) -> None:
        self.scenario, self.threads = scenario, threads
        self.context = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []

    def _start(self) -> Connection:
        mine, theirs = self.context.Pipe()
        proc = self.context.Process(
            target=_worker, args=(theirs, os.getpid(), self.scenario, self.threads), name="fedlt-sweep-worker"
        )
        proc.start()
        theirs.close()  # only the worker holds its end: the pipe closes when this process dies
        self.procs.append(proc)
        return mine

    def run(self, jobs: Sequence[Job], workers: int, report: Callable[[Job, Any], str]) -> list[str]:
        """Every job on ``workers`` processes; ``report(job, (line, seconds))`` as each finishes."""
        todo, lines = list(reversed(jobs)), []
        busy: dict[Connection, tuple[multiprocessing.process.BaseProcess, Job]] = {}
        try:
            for _ in range(min(workers, len(todo))):
                conn = self._start()
                busy[conn] = (self.procs[-1], todo.pop())
                _send(conn, busy[conn][1])
            while busy:
                for conn in wait(list(busy)):
                    proc, job = busy.pop(conn)
                    result, alive = self._result(conn, proc, job)
                    lines.append(report(job, result))
                    if todo and not alive:  # a worker that died (killed, out of memory) is replaced
                        conn, proc = self._start(), self.procs[-1]
                    if todo:
                        busy[conn] = (proc, todo.pop())
                        _send(conn, busy[conn][1])
                    elif alive:
                        _send(conn, None)
            self._join(STOP_GRACE_S)
        finally:
            self.stop()
        return lines

    def _result(
        self, conn: Connection, proc: multiprocessing.process.BaseProcess, job: Job
    ) -> tuple[tuple[str, float | None], bool]:
        """The job's (line, seconds), and whether its worker is still there to take another."""
        try:
            return conn.recv(), True
        except (EOFError, OSError):
            conn.close()
            proc.join(STOP_GRACE_S)
            died = f"failed {job.run_dir.name}: its worker process died (exit code {proc.exitcode})"
            return (died, None), False

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Stop every worker still running and what it started: SIGTERM (a run ends as on
        Ctrl-C, its checkpoint kept), then SIGKILL after :data:`STOP_GRACE_S`."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                _signal_worker(proc, sig)
            self._join(STOP_GRACE_S if sig == signal.SIGTERM else 1.0)
