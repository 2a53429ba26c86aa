"""Recovery: resume with changed settings, signals on a running ``fedlt run``, Ray worker failures.

- ``fedlt resume RUN --set`` continues a run with more rounds or a new learning rate (the change is
  written into the folder's scenario.toml) and refuses, with exit 2 naming the key, any change of
  the data, the model, the seed or the plugins, touching nothing in the folder.
- SIGINT and SIGTERM stop a ``fedlt run`` subprocess with exit 130 and the exact ``fedlt resume``
  command for its folder; on Ray (``slow``) no Ray process it started outlives it. SIGKILL leaves
  some behind (documented in docs/engines.md); they are Ray's, and stop when killed by pid.
- A plugin that cannot be built on a Ray worker fails the run with its own error, quickly
  (``slow``); ``check_plugin`` passes its serial == Ray check for a stateful plugin (``slow``).

Processes are found through /proc as descendants of the process a test started, and only those
are stopped: never every Ray on the machine (``ray stop`` would stop other people's too).
"""

from __future__ import annotations

import copy
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
from support.processes import alive, command, descendants, private_ray_tmpdir
from support.scenarios import TINY

import fedlt
from fedlt.cli import main
from fedlt.scenario.config import scenario_to_toml

TESTS = Path(__file__).resolve().parent


def _scenario(rounds: int = 3, **sections: Any) -> dict[str, Any]:
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=rounds, eval_every=1)
    s["engine"] = {"threads": 1}
    for key, value in sections.items():
        s[key] = {**s.get(key, {}), **value} if isinstance(value, dict) else value
    return s


def _toml(path: Path, scenario: dict[str, Any]) -> Path:
    path.write_text(scenario_to_toml(fedlt.load_scenario(scenario)))
    return path


def _lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _scenario_file(run: Path) -> dict[str, Any]:
    return tomllib.loads((run / "scenario.toml").read_text())


def _without(tree: dict[str, Any], section: str, key: str) -> dict[str, Any]:
    out = copy.deepcopy(tree)
    del out[section][key]
    return out


# --------------------------------------------------------------------------- resume --set


def test_resume_a_finished_run_with_more_rounds(tmp_path: Path, capsys, restore_threads) -> None:
    fedlt.run(_scenario(rounds=3), out=tmp_path / "run")
    fedlt.run(_scenario(rounds=5), out=tmp_path / "five")
    before = _scenario_file(tmp_path / "run")

    assert main(["resume", str(tmp_path / "run"), "--set", "federation.rounds=5", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("tiny: 5 rounds in ")
    after = _scenario_file(tmp_path / "run")
    assert after["federation"]["rounds"] == 5
    assert _without(after, "federation", "rounds") == _without(before, "federation", "rounds")
    # Three rounds, then two more, are the five rounds of a run that had five from the start.
    assert _lines(tmp_path / "run") == _lines(tmp_path / "five")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == summary["rounds_run"] == 5
    assert summary["final"] == json.loads((tmp_path / "five" / "summary.json").read_text())["final"]

    # Now it has finished again: a plain resume says so and trains nothing.
    assert main(["resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert "this run has finished; nothing to resume" in capsys.readouterr().err
    assert len(_lines(tmp_path / "run")) == 5


def test_resume_after_an_interruption_with_a_new_learning_rate(
    tmp_path: Path, interrupted_run, restore_threads
) -> None:
    reference = tmp_path / "lr0.1"
    fedlt.run(_scenario(), out=reference)
    interrupted_run(_scenario(), tmp_path / "cli", 1)
    shutil.copytree(tmp_path / "cli", tmp_path / "api")
    before = _scenario_file(tmp_path / "cli")

    assert main(["resume", str(tmp_path / "cli"), "--set", "train.lr=0.05", "--quiet"]) == 0
    after = _scenario_file(tmp_path / "cli")
    assert after["train"]["lr"] == 0.05
    assert _without(after, "train", "lr") == _without(before, "train", "lr")
    cut, full = _lines(tmp_path / "cli"), _lines(reference)
    assert [r["round"] for r in cut] == [1, 2, 3]
    assert cut[0] == full[0]  # round 1 ran before the change, at lr 0.1
    for new, old in zip(cut[1:], full[1:], strict=True):
        assert new["train_loss"] != old["train_loss"]  # rounds 2 and 3 trained at lr 0.05

    # The Python API does the same.
    fedlt.resume(tmp_path / "api", train__lr=0.05)
    assert _lines(tmp_path / "api") == cut
    assert _scenario_file(tmp_path / "api") == after


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A focal run of 3 rounds stopped after round 1 (what resume would continue)."""
    from fedlt.driver.runner import Run

    folder = tmp_path_factory.mktemp("stopped") / "run"
    threads = torch.get_num_threads()
    run = Run.create(fedlt.load_scenario(_scenario(plugins=[{"name": "focal", "gamma": 2.0}])), folder)

    class Stop(Exception):
        pass

    def stop(r: int, record: Any) -> None:
        raise Stop

    run.on_round = stop
    try:
        with pytest.raises(Stop):
            run.execute()
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.hidden=[16]", "model.hidden"),
        ("model.width=8", "model.width"),
        ("model.name=cnn", "model.name"),
        ("data.test_fraction=0.2", "data.test_fraction"),
        ("data.dataset=synthetic", "data.dataset"),
        ("long_tail.imbalance_factor=50", "long_tail.imbalance_factor"),
        ("partition.alpha=0.1", "partition.alpha"),
        ("partition.n_clients=5", "partition.n_clients"),
        ("stream.kind=si-blurry", "stream.kind"),
        ("seed=4", "seed"),
        ("name=other", "name"),
        ("plugins.0.gamma=1.0", "plugins[0].gamma"),
        ("plugins.0.name=ldam", "plugins[0].name"),
        ("plugins.1.name=balanced-softmax", "plugins[1].name"),
    ],
)
def test_resume_refuses_a_change_of_data_model_seed_or_plugins(
    stopped_run: Path, tmp_path: Path, capsys, override: str, key: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    code = main(["resume", str(run), "--set", override, "--quiet"])
    message = " ".join(capsys.readouterr().err.split())
    assert code == 2, message
    assert message.startswith("error: ") and "Traceback" not in message
    # The key as the user typed it, or as scenario errors write list items.
    dotted = key.replace("[", ".").replace("]", "")
    assert f"'{key}'" in message or f"'{dotted}'" in message, message
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files  # nothing trained, nothing rewritten


# --------------------------------------------------------------------------- signals


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedlt.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(proc: subprocess.Popen, pattern: str, cwd: Path, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(cwd.glob(pattern))
        if found:
            return found[0].parent
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint after {timeout} s")


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run did not stop on {signal.Signals(sig).name}") from None
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_serial_run_naming_its_folder(tmp_path: Path, sig: int, restore_threads) -> None:
    # Far more rounds than the test waits for, evaluated only at the end: the run is mid-way when hit.
    scenario = _toml(tmp_path / "s.toml", _scenario(rounds=100_000, federation={"eval_every": 0}))
    proc = _cli(["run", str(scenario), "--quiet"], cwd=tmp_path)
    folder = _wait_for_checkpoint(proc, "runs/*/checkpoint.pt", tmp_path)
    code, err = _stop(proc, sig)
    assert code == 130, err
    relative = folder.relative_to(tmp_path)
    assert f"interrupted; continue with `fedlt resume {relative}`" in err
    assert "Traceback" not in err
    assert not (folder / "fedlt.lock").exists(), "the run released its folder"

    # The folder is resumable from what the stopped run left: finish it one round later.
    done = torch.load(folder / "checkpoint.pt", weights_only=True)["round"]
    assert main(["resume", str(folder), "--set", f"federation.rounds={done + 1}", "--quiet"]) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds_run"] == done + 1 and summary["final"]["accuracy"] is not None


@pytest.fixture
def ray_tmp(monkeypatch) -> Iterator[Path]:
    """A private ``$RAY_TMPDIR`` for this test and the processes it starts (removed afterwards)."""
    pytest.importorskip("ray")
    with private_ray_tmpdir() as folder:
        monkeypatch.setenv("RAY_TMPDIR", str(folder))
        monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        yield folder


def _ray_scenario(tmp_path: Path) -> Path:
    engine = {"kind": "ray", "num_workers": 2, "threads": 1}
    return _toml(tmp_path / "s.toml", _scenario(rounds=100_000, federation={"eval_every": 0}, engine=engine))


def _is_ray(pid: int) -> bool:
    cmd = command(pid)
    return any(part in cmd for part in ("ray::", "raylet", "gcs_server", "default_worker", "/ray/", "ray."))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_ray_run_and_leaves_no_ray_process(tmp_path: Path, sig: int, ray_tmp: Path) -> None:
    out = tmp_path / "run"
    proc = _cli(["run", str(_ray_scenario(tmp_path)), "--out", str(out), "--quiet"], tmp_path)
    _wait_for_checkpoint(proc, "run/checkpoint.pt", tmp_path)
    started = [p for p in descendants(proc.pid) if p != proc.pid]
    kinds = " ".join(command(p) for p in started)
    assert "raylet" in kinds and "gcs_server" in kinds, kinds  # the tree holds the run's Ray
    code, err = _stop(proc, sig)
    assert code == 130, err
    assert f"interrupted; continue with `fedlt resume {out}`" in err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in started):
        time.sleep(0.5)
    left = {p: command(p) for p in started if alive(p)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"Ray processes outlived the run: {left}"


@pytest.mark.slow
def test_sigkill_of_a_ray_run_leaves_only_ray_processes_that_die_by_pid(
    tmp_path: Path, ray_tmp: Path, restore_threads
) -> None:
    """What docs/engines.md says: after SIGKILL of the driver, Ray's agents (and possibly workers)
    stay, re-parented; they are Ray's own processes and stop when killed by pid. The folder
    resumes."""
    out = tmp_path / "run"
    proc = _cli(["run", str(_ray_scenario(tmp_path)), "--out", str(out), "--quiet"], tmp_path)
    _wait_for_checkpoint(proc, "run/checkpoint.pt", tmp_path)
    started = [p for p in descendants(proc.pid) if p != proc.pid]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    time.sleep(5)  # what exits by itself has exited by now
    left = {p: command(p) for p in started if alive(p)}
    try:
        assert all(_is_ray(p) for p in left), left
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in left):
        time.sleep(0.2)
    assert not [p for p in left if alive(p)]

    # The killed driver's lock is stale (its OS lock died with it): resume takes the folder over.
    done = torch.load(out / "checkpoint.pt", weights_only=True)["round"]
    argv = [
        "resume",
        str(out),
        "--quiet",
        "--set",
        "engine.kind=serial",
        "--set",
        f"federation.rounds={done + 1}",
    ]
    with pytest.warns(RuntimeWarning, match="stale lock"):
        assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["rounds_run"] == done + 1


# --------------------------------------------------------------------------- Ray workers


@pytest.mark.slow
def test_a_plugin_that_cannot_be_built_on_a_ray_worker_fails_the_run_with_its_error(
    tmp_path: Path, monkeypatch, ray_tmp: Path, restore_threads
) -> None:
    from fedlt.driver.runner import Run
    from fedlt.errors import PluginError

    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", "driver-only=support.worker_plugins:DriverOnly")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("FEDLT_TEST_DRIVER_PID", str(os.getpid()))
    engine = {"kind": "ray", "num_workers": 2, "threads": 1, "max_retries": 1}
    scenario = fedlt.load_scenario(_scenario(plugins=[{"name": "driver-only"}], engine=engine))
    run = Run.create(scenario, tmp_path / "run")  # the driver builds it: the plugin works here
    t0 = time.monotonic()
    with pytest.raises(PluginError) as info:
        run.execute()
    elapsed = time.monotonic() - t0
    err = info.value
    assert err.plugin == "driver-only" and err.hook == "configure_model", repr(err)
    assert "cannot be built on a worker" in str(err) and "on a Ray worker" in str(err)
    assert elapsed < 120, f"took {elapsed:.0f} s: workers were replaced over and over"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_check_plugin_passes_serial_equals_ray_for_a_stateful_plugin(
    monkeypatch, ray_tmp: Path, restore_threads
) -> None:
    from support.test_plugins import LocalCounter

    from fedlt.testing import check_plugin

    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    report = check_plugin(LocalCounter, engines=("serial", "ray"))
    assert report["checks"] == [
        "registration",
        "fresh instances and checked results",
        "self lives where it is read",
        "state round-trip",
        "resume == uninterrupted",
        "has an effect",
        "serial == Ray",
    ]
    assert report["skipped"] == []


@pytest.mark.slow
def test_a_ray_run_without_address_starts_a_ray_of_its_own(
    tmp_path: Path, monkeypatch, restore_threads
) -> None:
    """engine.address unset means "start a local Ray" (docs/engines.md), even where Ray's
    ``ray_current_cluster`` names a cluster, as every ``ray start`` on the machine leaves it
    (here a dead one), which ``ray.init()`` without an address would join."""
    pytest.importorskip("ray")
    serial = fedlt.run(_scenario(), out=tmp_path / "serial")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gone = f"127.0.0.1:{s.getsockname()[1]}"
    with private_ray_tmpdir(stale_address=gone) as folder:
        monkeypatch.setenv("RAY_TMPDIR", str(folder))
        monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        engine = {"kind": "ray", "num_workers": 2, "threads": 1}
        on_ray = fedlt.run(_scenario(engine=engine), out=tmp_path / "ray")
    assert on_ray["final"] == serial["final"]
