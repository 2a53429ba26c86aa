"""The Ray engine: same numbers as the serial engine, state shipped, retries, dead workers replaced."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import fedlt  # noqa: E402
from fedlt.driver.runner import Run  # noqa: E402
from fedlt.errors import PluginError  # noqa: E402

SUPPORT = Path(__file__).parent


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local Ray for the module, with the test plugins importable in its workers."""
    old = {k: os.environ.get(k) for k in ("FEDLT_EXTRA_PLUGINS", "PYTHONPATH")}
    os.environ["FEDLT_EXTRA_PLUGINS"] = (
        "always-fails=support.test_plugins:AlwaysFails,local-counter=support.test_plugins:LocalCounter"
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUPPORT), old["PYTHONPATH"]]))
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    import sys

    sys.path.insert(0, str(SUPPORT))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    sys.path.remove(str(SUPPORT))
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _ray(s, **engine):
    s = dict(s)
    s["engine"] = {"kind": "ray", "num_workers": 2, **engine}
    return s


def _one_thread(s):
    """Serial training with the workers' thread count: BLAS reduction order depends on it."""
    s = dict(s)
    s["engine"] = {"kind": "serial", "threads": 1}
    return s


pytestmark = pytest.mark.usefixtures("restore_threads")


def test_identical_metrics_to_serial_with_stateful_plugins(tiny, tmp_path):
    tiny["federation"]["rounds"] = 4
    tiny["plugins"] = [{"name": "balanced-softmax", "prior": "local"}, {"name": "local-counter"}]
    serial = fedlt.run(_one_thread(tiny), out=tmp_path / "serial")
    distributed = fedlt.run(_ray(tiny), out=tmp_path / "ray")
    assert distributed["final"] == serial["final"]
    import torch

    a = torch.load(tmp_path / "serial" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "ray" / "checkpoint.pt", weights_only=True)
    assert a["client_states"].keys() == b["client_states"].keys()
    for c in a["client_states"]:
        sa, sb = a["client_states"][c], b["client_states"][c]
        if sa:
            assert sa["local-counter"]["rounds"] == sb["local-counter"]["rounds"] >= 1
            assert torch.equal(sa["local-counter"]["bias"], sb["local-counter"]["bias"])
    for k in a["global"]:
        assert torch.equal(a["global"][k], b["global"][k]), k


def test_failing_task_is_retried_then_names_client_round_plugin(tiny, tmp_path):
    tiny["plugins"] = [{"name": "always-fails"}]
    with pytest.raises(PluginError) as info:
        fedlt.run(_ray(tiny, max_retries=2), out=tmp_path / "r")
    err = info.value
    assert err.plugin == "always-fails" and err.hook == "client_loss"
    assert err.round == 1 and err.client is not None
    assert "deliberate failure" in str(err) and f"client {err.client} in round 1" in str(err)


def test_killed_worker_is_replaced_and_result_unchanged(tiny, tmp_path):
    tiny["federation"]["rounds"] = 4
    serial = fedlt.run(_one_thread(tiny), out=tmp_path / "serial")
    run = Run.create(fedlt.load_scenario(_ray(tiny)), tmp_path / "ray")
    killed = []

    def kill_a_worker(r, record):
        if r == 2:
            pid = run.engine.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    run.on_round = kill_a_worker
    summary = run.execute()
    assert killed and run.engine.replaced >= 1
    assert summary["final"] == serial["final"]


def test_bfloat16_autocast_is_the_serial_engines_on_ray(tiny, tmp_path):
    # engine.dtype used to be ignored with kind = "ray": the workers now drive the same client
    # round, which autocasts each step, so the numbers are the serial engine's bit for bit.
    tiny["federation"]["rounds"] = 2
    serial = _one_thread(tiny)
    serial["engine"]["dtype"] = "bfloat16"
    s = fedlt.run(serial, out=tmp_path / "serial")
    r = fedlt.run(_ray(tiny, threads=1, dtype="bfloat16"), out=tmp_path / "ray")
    assert r["final"] == s["final"]
    plain = fedlt.run(_one_thread(tiny), out=tmp_path / "fp32")
    assert plain["final"]["train_loss"] != s["final"]["train_loss"]  # autocast took effect


def test_buffered_async_with_dropouts_and_stateful_plugins_matches_serial(tiny, tmp_path):
    """Asynchronous events are ordered by virtual time, not by when Ray returns: the same numbers."""
    tiny["partition"]["n_clients"] = 4
    tiny["federation"].update(mode="buffered", concurrency=3, buffer_size=2, rounds=5, eval_every=2)
    tiny["system"] = {"speed": "lognormal", "speed_sigma": 0.8, "dropout": 0.2, "latency": 0.1}
    tiny["plugins"] = [{"name": "local-counter"}]
    serial = fedlt.run(_one_thread(tiny), out=tmp_path / "serial")
    distributed = fedlt.run(_ray(tiny), out=tmp_path / "ray")
    assert distributed["final"] == serial["final"] and distributed["federation"] == serial["federation"]
    import torch

    a = torch.load(tmp_path / "serial" / "checkpoint.pt", weights_only=True)["global"]
    b = torch.load(tmp_path / "ray" / "checkpoint.pt", weights_only=True)["global"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = lambda d: (tmp_path / d / "events.jsonl").read_text()  # noqa: E731
    assert events("serial") == events("ray")
