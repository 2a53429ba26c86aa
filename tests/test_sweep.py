"""fedlt sweep: a grid x seeds of independent runs, resumable, locally and on Ray (one machine or two nodes).

The local sweep runs once per module (2 learning rates x 2 seeds, ``--jobs 2``); later tests work on
copies of its folder. The Ray sweeps (``slow``) must give the same final metrics as the local one:
every run pins ``engine.threads = 1``, so the sums come out in the same order everywhere.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.processes import alive, command, descendants, marked, private_ray_tmpdir
from support.scenarios import TINY

import fedlt
from fedlt.analysis.sweep import Sweep, parse_grid, parse_seeds
from fedlt.cli import main
from fedlt.driver.runner import Run
from fedlt.scenario.config import scenario_to_toml

GRID = ["--grid", "train.lr=0.1,0.05", "--seeds", "0-1", "--set", "engine.threads=1"]
NAMES = ["lr=0.05-seed0", "lr=0.05-seed1", "lr=0.1-seed0", "lr=0.1-seed1"]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``fedlt ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


#: A progress line: ``[k/N] SETTINGS: REPORT[, METRIC VALUE] ([S s; ]H:MM:SS elapsed)``.
PROGRESS = re.compile(
    r"^\[(?P<k>\d+)/(?P<n>\d+)\] (?P<setting>[^:]*): (?P<report>(?:ran|resumed|skipped|failed) .*?)"
    r"(?:, (?P<metric>balanced_accuracy|accuracy|a_auc) (?P<value>\d\.\d{4}))?"
    r" \((?:(?P<seconds>\d+\.\d) s; )?(?P<elapsed>\d+:\d\d:\d\d) elapsed\)$"
)


def _progress(stderr: str, strict: bool = True) -> list[re.Match[str]]:
    """The progress lines of a sweep's stderr in printed order (``strict``: every line is one;
    Ray may add its own lines)."""
    found = []
    for line in stderr.splitlines():
        match = PROGRESS.match(line)
        assert match is not None or not strict, f"not a progress line: {line!r}"
        if match is not None:
            found.append(match)
    return found


def _reports(stderr: str, strict: bool = True) -> list[str]:
    """The jobs' reports (``ran NAME``, ``skipped NAME (finished)``...) of the progress lines."""
    return [m["report"] for m in _progress(stderr, strict)]


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def _finals(sweep: Path) -> dict[str, dict[str, Any]]:
    return {name: _summary(sweep / name)["final"] for name in NAMES}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """(scenario file, sweep folder, stdout, stderr) of one local sweep with two processes."""
    root = tmp_path_factory.mktemp("sweep")
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=2, eval_every=1)
    scenario = root / "tiny.toml"
    scenario.write_text(scenario_to_toml(fedlt.load_scenario(s)))
    out = root / "local"
    code, stdout, stderr = _cli(["sweep", str(scenario), *GRID, "--out", str(out), "--jobs", "2"])
    assert code == 0, stderr
    return scenario, out, stdout, stderr


def _copy(swept: tuple[Path, Path, str, str], tmp_path: Path) -> Path:
    target = tmp_path / "sweep"
    shutil.copytree(swept[1], target)
    return target


def test_local_sweep_runs_every_point_and_prints_the_comparison(swept) -> None:
    _, out, stdout, stderr = swept
    assert sorted(p.name for p in out.iterdir()) == NAMES
    assert sorted(_reports(stderr)) == [f"ran {n}" for n in NAMES]
    for name in NAMES:
        scenario = tomllib.loads((out / name / "scenario.toml").read_text())
        lr, seed = name.removeprefix("lr=").split("-seed")
        assert scenario["train"]["lr"] == float(lr) and scenario["seed"] == int(seed)
        assert scenario["engine"]["threads"] == 1
        assert _summary(out / name)["finished"] and _summary(out / name)["rounds_run"] == 2
    finals = _finals(out)
    assert "| train.lr=0.1 | 2 | 0, 1 |" in stdout and "| train.lr=0.05 | 2 | 0, 1 |" in stdout
    section = stdout[stdout.index("### accuracy") : stdout.index("### balanced_accuracy")]
    for lr in ("0.1", "0.05"):
        mean = (finals[f"lr={lr}-seed0"]["accuracy"] + finals[f"lr={lr}-seed1"]["accuracy"]) / 2
        assert f"| train.lr={lr} | 2 | {mean:.4f} |" in section


def test_progress_lines_name_index_settings_metric_and_time(swept) -> None:
    """One line per job, numbered in finishing order, with the job's grid point and seed, its final
    balanced accuracy as summary.json holds it, its own seconds and the sweep's elapsed time."""
    _, out, _, stderr = swept
    lines = _progress(stderr)
    assert [(int(m["k"]), int(m["n"])) for m in lines] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for m in lines:
        name = m["report"].removeprefix("ran ")
        lr, seed = name.removeprefix("lr=").split("-seed")
        assert m["setting"] == f"train.lr={lr}, seed={seed}"
        final = _summary(out / name)["final"]
        assert m["metric"] == "balanced_accuracy" and m["value"] == f"{final['balanced_accuracy']:.4f}"
        assert float(m["seconds"]) > 0
    elapsed = [sum(int(x) * 60**i for i, x in enumerate(reversed(m["elapsed"].split(":")))) for m in lines]
    assert elapsed == sorted(elapsed)


def test_sweep_prints_each_job_as_it_finishes(swept, tmp_path: Path, monkeypatch, capsys) -> None:
    """When job k starts, the line of job k - 1 is already on stderr (not held until the end)."""
    import fedlt.analysis.sweep as sweep_module

    scenario = swept[0]
    seen_before: list[str] = []
    real = sweep_module.run_job

    def spy(scenario: str, job: Any, threads: int | None = None) -> str:
        seen_before.append(capsys.readouterr().err)
        return real(scenario, job, threads)

    monkeypatch.setattr(sweep_module, "run_job", spy)
    argv = [
        "sweep",
        str(scenario),
        "--seeds",
        "0-2",
        "--set",
        "engine.threads=1",
        "--set",
        "federation.rounds=1",
    ]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    after = capsys.readouterr().err
    assert seen_before[0] == ""
    assert [_reports(err) for err in seen_before[1:]] == [["ran seed0"], ["ran seed1"]]
    (last,) = _progress(after)
    assert (last["k"], last["n"], last["setting"], last["report"]) == ("3", "3", "seed=2", "ran seed2")


def test_progress_line_of_a_failed_job() -> None:
    from fedlt.analysis.sweep import Job, progress_line

    job = Job(Path("/nowhere/lr=0.1-seed3"), {"train.lr": 0.1, "seed": 3}, {"train.lr": 0.1, "seed": 3})
    line = progress_line(2, 5, job, "failed lr=0.1-seed3: boom\n  at round 2", None, 3725.4)
    assert line == "[2/5] train.lr=0.1, seed=3: failed lr=0.1-seed3: boom at round 2 (1:02:05 elapsed)"
    ran = progress_line(5, 5, job, "ran lr=0.1-seed3", 12.34, 61)  # no summary.json: no metric
    assert ran == "[5/5] train.lr=0.1, seed=3: ran lr=0.1-seed3 (12.3 s; 0:01:01 elapsed)"


def test_sweep_again_skips_every_finished_run(swept, tmp_path: Path) -> None:
    scenario, _, first_table, _ = swept
    out = _copy(swept, tmp_path)
    before = {n: (out / n / "summary.json").read_bytes() for n in NAMES}
    code, stdout, stderr = _cli(["sweep", str(scenario), *GRID, "--out", str(out)])
    assert code == 0, stderr
    assert sorted(_reports(stderr)) == [f"skipped {n} (finished)" for n in NAMES]
    assert {n: (out / n / "summary.json").read_bytes() for n in NAMES} == before
    assert stdout == first_table


def test_sweep_resumes_an_interrupted_run_and_starts_a_missing_one(swept, tmp_path: Path) -> None:
    scenario, original, _, _ = swept
    out = _copy(swept, tmp_path)
    sweep = Sweep(scenario, out, parse_grid(["train.lr=0.1,0.05"]), parse_seeds("0-1"), ["engine.threads=1"])
    jobs = {job.run_dir.name: job for job in sweep.jobs}
    assert sorted(jobs) == NAMES

    # lr=0.05-seed1 was stopped after its first round (a kill leaves the same: no summary.json).
    cut = jobs["lr=0.05-seed1"]
    shutil.rmtree(cut.run_dir)
    run = Run.create(fedlt.load_scenario(sweep.scenario, cut.overrides), cut.run_dir)

    class Stop(Exception):
        pass

    def stop(r: int, record: Any) -> None:
        raise Stop

    run.on_round = stop
    with pytest.raises(Stop):
        run.execute()
    torch.set_num_threads(1)
    assert torch.load(cut.run_dir / "checkpoint.pt", weights_only=True)["round"] == 1
    assert not (cut.run_dir / "summary.json").exists()
    # lr=0.1-seed0 never started.
    shutil.rmtree(jobs["lr=0.1-seed0"].run_dir)

    code, _, stderr = _cli(["sweep", str(scenario), *GRID, "--out", str(out)])
    assert code == 0, stderr
    assert sorted(_reports(stderr)) == [
        "ran lr=0.1-seed0",
        "resumed lr=0.05-seed1",
        "skipped lr=0.05-seed0 (finished)",
        "skipped lr=0.1-seed1 (finished)",
    ]
    assert _finals(out) == _finals(original)
    for name in ("lr=0.05-seed1", "lr=0.1-seed0"):
        assert (out / name / "metrics.jsonl").read_text() == (original / name / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--grid", "train.lr"], "--grid"),
        (["--grid", "train.lr="], "--grid"),
        (["--grid", "=0.1,0.2"], "--grid"),
        (["--grid", "train.lr=-1,0.1"], "train.lr"),
        (["--grid", "trian.lr=0.1,0.2"], "trian"),
        (["--seeds", "3-1"], "--seeds"),
        (["--seeds", "zero"], "--seeds"),
        (["--seeds=-1"], "--seeds"),
        (["--seeds", ","], "--seeds"),
        (["--set", "federation.rounds"], "--set"),
        (["--jobs", "0"], "--jobs"),
    ],
)
def test_bad_sweep_arguments_exit_2_before_any_run(tmp_path: Path, argv: list[str], key: str) -> None:
    out = tmp_path / "sweep"
    code, stdout, stderr = _cli(["sweep", "quickstart", *argv, "--out", str(out)])
    message = " ".join(stderr.split())
    assert code == 2, message
    assert message.startswith("error: ") and f"'{key}" in message and "Traceback" not in message
    assert stdout == ""
    assert not out.exists(), "nothing may be run or created for a bad sweep"


def test_failing_runs_are_reported_each_and_the_sweep_exits_1(swept, tmp_path: Path, monkeypatch) -> None:
    """A run that fails (a plugin raising while training) is one ``failed NAME: error`` line; the
    other runs still run, and the sweep exits 1, with no traceback, even when no run finished."""
    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", "always-fails=support.test_plugins:AlwaysFails")
    scenario = swept[0]
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        str(scenario),
        "--seeds",
        "0,1",
        "--set",
        "plugins.0.name=always-fails",
        "--out",
        str(out),
    ]
    try:
        code, _, stderr = _cli(argv)
    except Exception as exc:  # what fedlt's main lets through becomes a traceback for the user
        pytest.fail(f"fedlt sweep raised {type(exc).__name__}: {exc}")
    lines = sorted(_reports(stderr))
    assert code == 1, stderr
    assert [x.split(":")[0] for x in lines] == ["failed seed0", "failed seed1"], stderr
    assert all("Plugin 'always-fails' in hook 'client_loss'" in x for x in lines)
    assert "Traceback" not in stderr


def test_a_worker_that_dies_fails_its_job_and_is_replaced(tmp_path: Path, monkeypatch) -> None:
    """A worker killed mid-run (SIGKILL, as out of memory) fails that job with its exit code; a new
    worker takes the jobs left, and no worker outlives the sweep."""
    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", "kills-its-process=support.sweep_plugins:KillsItsProcess")
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=1, eval_every=1)
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(scenario_to_toml(fedlt.load_scenario(s)))
    out = tmp_path / "sweep"
    grid = 'plugins=[{name="kills-its-process"}],[],[{name="focal"}]'
    argv = ["sweep", str(scenario), "--grid", grid, "--jobs", "2", "--set", "engine.threads=1"]
    before = set(descendants(os.getpid()))
    code, _, stderr = _cli([*argv, "--out", str(out)])
    lines = [line for line in stderr.splitlines() if line.startswith("[")]  # settings hold ": "
    assert code == 1, stderr
    assert len(lines) == 3 and "Traceback" not in stderr
    (died,) = [line for line in lines if "kills-its-process" in line]
    assert "failed plugins=namekills-its-process-seed0: its worker process died (exit code -9)" in died
    others = [re.search(r", seed=0: (\w+) ", line) for line in lines if line != died]
    assert [m and m[1] for m in others] == ["ran", "ran"], lines
    # multiprocessing's resource tracker lives as long as this process (it ends with a sweep's
    # own process); every worker is gone.
    left = [command(p) for p in set(descendants(os.getpid())) - before if alive(p) and p != os.getpid()]
    assert all("resource_tracker" in c for c in left), left


def test_sweep_into_a_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    code, _, stderr = _cli(["sweep", "quickstart", "--out", str(tmp_path / "taken")])
    assert code == 2 and "'--out'" in stderr


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--grid", "train.lr=0.1,0.10"], ["train.lr", "0.1", "0.10"]),
        (["--grid", "train.lr=0.1,0.05,0.1"], ["train.lr", "0.1"]),
        (["--grid", "train.lr=0.1", "--grid", "train.lr=0.05"], ["train.lr", "given twice"]),
        (["--grid", "train.lr=1,1.0"], ["train.lr", "1", "1.0", "same scenario"]),  # same float
        (["--grid", "seed=1,2"], ["seed=1,2", "--seeds"]),
        (["--set", "seed=3", "--seeds", "0-1"], ["seed=3", "--seeds"]),
    ],
)
def test_grid_points_that_make_one_run_are_refused(tmp_path: Path, argv: list[str], named: list[str]) -> None:
    """Two grid points that are one run (equal literals, or values the scenario resolves alike)
    would be merged into one folder: exit 2 naming the key and the values, before anything runs."""
    out = tmp_path / "sweep"
    code, stdout, stderr = _cli(["sweep", "quickstart", *argv, "--out", str(out)])
    message = " ".join(stderr.split())
    assert code == 2 and stdout == "" and "Traceback" not in message, message
    assert all(word in message for word in named), message
    assert not out.exists()


def _hand_digest(setting: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]


def test_folder_names_are_distinct_where_readable_names_collide() -> None:
    """Names that read alike once unsafe characters go (``"x y"``, ``"xy"``) or once case is
    ignored (macOS) get the point's digest; a name past 120 characters is cut and gets it too;
    names that do not collide stay readable (so existing sweep folders keep resuming)."""
    from fedlt.analysis.sweep import point_names

    points = [{"name": "x y"}, {"name": "xy"}, {"name": "XY"}, {"name": "other"}]
    assert point_names(points) == [
        f"name=xy-{_hand_digest(points[0])}",
        f"name=xy-{_hand_digest(points[1])}",
        f"name=XY-{_hand_digest(points[2])}",
        "name=other",
    ]
    long = [{"plugins.0.note": "a" * 130}, {"plugins.0.note": "a" * 131}]
    names = point_names(long)
    assert names == [f"plugins.0.note={'a' * 96}-{_hand_digest(p)}" for p in long]
    assert all(len(n) == 120 for n in names) and names[0] != names[1]
    with pytest.raises(fedlt.errors.FedltError, match=r"points get the folder name 'a=0\.1-[0-9a-f]{8}'"):
        point_names([{"a": 0.1}, {"a": 0.1}])  # one point twice (Python API: no parse_grid check)


def test_a_sweep_runs_points_with_colliding_names_into_their_own_folders(tmp_path: Path) -> None:
    """``name="x y"`` and ``name="xy"`` (both read ``name=xy``): two folders, each with its own run."""
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=1, eval_every=1)
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(scenario_to_toml(fedlt.load_scenario(s)))
    out = tmp_path / "sweep"
    code, _, stderr = _cli(["sweep", str(scenario), "--grid", 'name="x y","xy"', "--out", str(out)])
    assert code == 0, stderr
    folders = {p.name: tomllib.loads((p / "scenario.toml").read_text())["name"] for p in out.iterdir()}
    assert folders == {
        f"name=xy-{_hand_digest({'name': 'x y'})}-seed0": "x y",
        f"name=xy-{_hand_digest({'name': 'xy'})}-seed0": "xy",
    }


@pytest.mark.parametrize(
    ("argv", "key", "value"),
    [
        (["--cpus-per-run", "-1"], "--cpus-per-run", "-1.0"),
        (["--cpus-per-run", "0"], "--cpus-per-run", "0.0"),
        (["--cpus-per-run", "nan"], "--cpus-per-run", "nan"),
        (["--cpus-per-run", "0.00001"], "--cpus-per-run", "1e-05"),
        (["--gpus-per-run", "-0.5"], "--gpus-per-run", "-0.5"),
        (["--gpus-per-run", "inf"], "--gpus-per-run", "inf"),
    ],
)
def test_bad_ray_resources_exit_2_before_ray_starts(
    tmp_path: Path, monkeypatch, argv: list[str], key: str, value: str
) -> None:
    """Checked before Ray is imported: with Ray made unimportable the error is still about the
    resource (not "Ray is not installed"), so no Ray can have started."""
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "sweep"
    code, stdout, stderr = _cli(["sweep", "quickstart", "--ray", "local", *argv, "--out", str(out)])
    message = " ".join(stderr.split())
    assert code == 2 and stdout == "" and "Traceback" not in message, message
    assert f"'{key}'" in message and f"Got {value} instead" in message and ">= 0.0001" in message, message
    assert not out.exists()


# --------------------------------------------------------------------------- stopping a sweep

MARK = "FEDLT_TEST_SWEEP_MARK"


def _start_long_sweep(tmp_path: Path, mark: str) -> tuple[subprocess.Popen, Path, Path]:
    """``fedlt sweep --jobs 2`` of 6 long runs in a child process whose environment carries
    ``MARK=mark`` (inherited by every process it starts); returns once both workers run a job."""
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=100_000, eval_every=1000)
    scenario = tmp_path / "long.toml"
    scenario.write_text(scenario_to_toml(fedlt.load_scenario(s)))
    out, log = tmp_path / "sweep", tmp_path / "stderr.txt"
    argv = ["sweep", str(scenario), "--seeds", "0-5", "--jobs", "2", "--set", "engine.threads=1"]
    env = {**os.environ, MARK: mark, "OMP_NUM_THREADS": "1"}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedlt.cli", *argv, "--out", str(out)], env=env, stderr=err
        )
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/scenario.toml"))) < 2:  # written once a run's data and model are built
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the sweep's two workers did not start their runs"
        time.sleep(0.1)
    return proc, out, log


def _gone_within(pids: list[int], mark: str, seconds: float) -> list[int]:
    """The processes of ``pids`` (and any with the mark) still running after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = sorted({p for p in pids if alive(p)} | set(marked(MARK, mark)))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"]
)
def test_stopping_a_sweep_stops_every_process_it_started(tmp_path: Path, sig: int) -> None:
    """Kill ``fedlt sweep --jobs 2`` while its two workers each run a job and four jobs wait: every
    process it started (listed from /proc before the kill, and any process carrying the test's
    environment mark, which catches orphans adopted by init) is gone within a few seconds, and no
    waiting job starts. SIGTERM ends it as Ctrl-C (SIGINT) does: exit 130, no traceback."""
    mark = f"{os.getpid()}-{sig}-{time.time_ns()}"
    proc, out, log = _start_long_sweep(tmp_path, mark)
    started: list[int] = []
    try:
        started = descendants(proc.pid)
        workers = [p for p in started if p != proc.pid and "spawn_main" in command(p)]
        assert len(workers) >= 2, [command(p) for p in started]
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        left = _gone_within(started, mark, 8.0)
        assert not left, f"still running after the sweep was stopped: {[(p, command(p)) for p in left]}"
        folders = sorted(p.name for p in out.iterdir())
        time.sleep(1.0)
        assert sorted(p.name for p in out.iterdir()) == folders and len(folders) <= 3
        assert not any((out / name / "summary.json").exists() for name in folders)
        if sig != signal.SIGKILL:
            stderr = log.read_text()
            assert code == 130 and "Traceback" not in stderr, stderr
            assert "interrupted" in stderr and str(out) in stderr
    finally:  # never leave a process behind, even when the test fails
        for pid in {p for p in started if alive(p)} | set(marked(MARK, mark)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


# --------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_sweep_on_a_local_ray_equals_the_local_sweep(swept, tmp_path: Path, monkeypatch) -> None:
    """``--ray local`` starts a Ray of its own, even where ``ray_current_cluster`` names a cluster
    (here a dead one, as a killed ``ray start`` leaves it) that ``ray.init()`` would try to join."""
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # else ray.init warns (an error here)
    scenario, local, _, _ = swept
    out = tmp_path / "ray"
    with private_ray_tmpdir(stale_address=f"127.0.0.1:{_free_port()}") as ray_tmp:
        monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
        code, stdout, stderr = _cli(["sweep", str(scenario), *GRID, "--out", str(out), "--ray", "local"])
    assert code == 0, stderr
    assert sorted(r for r in _reports(stderr, False) if r.startswith("ran ")) == [f"ran {n}" for n in NAMES]
    assert _finals(out) == _finals(local)
    assert "| train.lr=0.05 | 2 | 0, 1 |" in stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _two_node_cluster(logs: Path) -> Iterator[str]:
    """A head and a second node of one CPU each, started with ``ray start --block`` on this machine.

    The recipe of docs/research.md, with two differences for a shared machine: each node's
    ``ray start --block`` stops the Ray processes it started when it gets SIGTERM, so the cluster
    is taken down without ``ray stop --force`` (which stops every Ray on the machine, other
    people's too; anything still alive afterwards is killed by its pid), and ``$RAY_TMPDIR`` is
    private, so no ``ray_current_cluster`` file is left for later ``ray.init()`` calls to find.
    """
    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--block"]
    nodes: list[subprocess.Popen] = []
    tracked: set[int] = set()
    with private_ray_tmpdir() as ray_tmp, open(logs, "w") as log:
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}

        def start(*args: str) -> None:
            cmd = [ray_cli, "start", *args, *common]
            nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))

        def wait_for(nodes_up: int) -> str:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                cmd = [ray_cli, "status", f"--address={address}"]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode == 0 and done.stdout.count(" node_") >= nodes_up:
                    return done.stdout
                time.sleep(1)
            raise AssertionError(f"the Ray cluster at {address} did not get {nodes_up} nodes; see {logs}")

        try:
            start("--head", f"--port={port}", "--include-dashboard=false")
            wait_for(1)
            start(f"--address={address}")
            assert "0.0/2.0 CPU" in wait_for(2)
            for node in nodes:
                tracked.update(descendants(node.pid))
            yield address
        finally:
            for node in nodes:
                tracked.update(descendants(node.pid))
                node.send_signal(signal.SIGTERM)
            for node in nodes:
                try:
                    node.wait(60)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(alive(p) for p in tracked):
                time.sleep(0.5)
            left = [p for p in tracked if alive(p)]
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            assert not left, f"Ray processes outlived their `ray start --block`: {left}"


@pytest.mark.slow
def test_sweep_on_a_two_node_ray_cluster_equals_the_local_sweep(swept, tmp_path: Path, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    scenario, local, _, _ = swept
    out = tmp_path / "cluster"
    with _two_node_cluster(tmp_path / "ray-start.log") as address:
        code, _, stderr = _cli(["sweep", str(scenario), *GRID, "--out", str(out), "--ray", address])
        assert code == 0, stderr
        # Run again: everything is skipped, on the cluster too.
        again = _cli(["sweep", str(scenario), *GRID, "--out", str(out), "--ray", address])
    assert sorted(r for r in _reports(stderr, False) if r.startswith("ran ")) == [f"ran {n}" for n in NAMES]
    assert _finals(out) == _finals(local)
    assert again[0] == 0
    assert sorted(_reports(again[2], False)) == [f"skipped {n} (finished)" for n in NAMES]
