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
from support.processes import alive, descendants, private_ray_tmpdir
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
    assert sorted(line for line in stderr.splitlines() if line.startswith("ran ")) == [
        f"ran {n}" for n in NAMES
    ]
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


def test_sweep_again_skips_every_finished_run(swept, tmp_path: Path) -> None:
    scenario, _, first_table, _ = swept
    out = _copy(swept, tmp_path)
    before = {n: (out / n / "summary.json").read_bytes() for n in NAMES}
    code, stdout, stderr = _cli(["sweep", str(scenario), *GRID, "--out", str(out)])
    assert code == 0, stderr
    assert sorted(stderr.splitlines()) == [f"skipped {n} (finished)" for n in NAMES]
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
    assert sorted(stderr.splitlines()) == [
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
    lines = sorted(stderr.splitlines())
    assert code == 1, stderr
    assert [x.split(":")[0] for x in lines] == ["failed seed0", "failed seed1"], stderr
    assert all("Plugin 'always-fails' in hook 'client_loss'" in x for x in lines)
    assert "Traceback" not in stderr


def test_sweep_into_a_file_exits_2(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    code, _, stderr = _cli(["sweep", "quickstart", "--out", str(tmp_path / "taken")])
    assert code == 2 and "'--out'" in stderr


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
    assert sorted(line for line in stderr.splitlines() if line.startswith("ran ")) == [
        f"ran {n}" for n in NAMES
    ]
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
    assert sorted(line for line in stderr.splitlines() if line.startswith("ran ")) == [
        f"ran {n}" for n in NAMES
    ]
    assert _finals(out) == _finals(local)
    assert again[0] == 0
    assert sorted(x for x in again[2].splitlines() if x.startswith("skipped")) == [
        f"skipped {n} (finished)" for n in NAMES
    ]
