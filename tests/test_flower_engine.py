"""The Flower engine: same numbers as the serial engine, state sent once, errors located, flwr run.

One Flower simulation (and so one Ray start) serves the whole module; the serial references
run once per module too. Both sides train with one torch thread: BLAS reduction order depends
on the thread count, and bit-identical results need the same order.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

flwr = pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import ArrayRecord, Message, RecordDict  # noqa: E402
from support.scenarios import TINY  # noqa: E402

import fedlt  # noqa: E402
from fedlt.cli import main as cli_main  # noqa: E402
from fedlt.driver.runner import Run  # noqa: E402
from fedlt.errors import PluginError, ScenarioError  # noqa: E402
from fedlt.flower import engine as flower_engine  # noqa: E402
from fedlt.flower import wire  # noqa: E402
from fedlt.flower.export import export_flower  # noqa: E402
from fedlt.flower.simulation import FlowerSimulation  # noqa: E402
from fedlt.training.round import ClientResult, ClientTask  # noqa: E402

SUPPORT = Path(__file__).parent / "support"
STATEFUL = [
    {"name": "balanced-softmax", "prior": "local"},
    {"name": "local-counter"},
    {"name": "gla-fr"},
]


def _flower(s: dict[str, Any], **engine: Any) -> dict[str, Any]:
    s = copy.deepcopy(s)
    s["engine"] = {"kind": "flower", "threads": 1, **engine}
    return s


def _serial(s: dict[str, Any]) -> dict[str, Any]:
    s = copy.deepcopy(s)
    s["engine"] = {"kind": "serial", "threads": 1}
    return s


def _stateful() -> dict[str, Any]:
    s = copy.deepcopy(TINY)
    s["federation"]["rounds"] = 4
    s["plugins"] = copy.deepcopy(STATEFUL)
    return s


def _ckpt(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def _assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Equal nested states: tensors bit for bit, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def support_plugins():
    """The test plugins, importable here and in the Ray workers the simulation starts."""
    old = {k: os.environ.get(k) for k in ("FEDLT_EXTRA_PLUGINS", "PYTHONPATH")}
    os.environ["FEDLT_EXTRA_PLUGINS"] = (
        "always-fails=support.test_plugins:AlwaysFails,local-counter=support.test_plugins:LocalCounter"
    )
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SUPPORT.parent), old["PYTHONPATH"]]))
    sys.path.insert(0, str(SUPPORT.parent))
    yield
    sys.path.remove(str(SUPPORT.parent))
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def simulation(support_plugins):
    """One Flower simulation (4 SuperNodes, 2 workers) shared by every Flower run of the module."""
    with FlowerSimulation(num_supernodes=4, num_workers=2, num_cpus=1.0) as sim:
        yield sim


pytestmark = pytest.mark.usefixtures("restore_threads")


def _serial_reference(s: dict[str, Any], out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A serial run's summary and checkpoint; torch's thread count is put back afterwards."""
    n = torch.get_num_threads()
    try:
        return fedlt.run(_serial(s), out=out), _ckpt(out)
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def serial_plain(tmp_path_factory, support_plugins):
    return _serial_reference(TINY, tmp_path_factory.mktemp("serial-plain"))


@pytest.fixture(scope="module")
def serial_stateful(tmp_path_factory, support_plugins):
    return _serial_reference(_stateful(), tmp_path_factory.mktemp("serial-stateful"))


# --------------------------------------------------------------------------- wire format (no Flower run)


def _task() -> ClientTask:
    import numpy as np

    config = {"round": 3, "lr": 0.5, "name": "x", "flag": True, "blob": b"\x00", "none": None}
    config |= {"pair": (1, 2), "table": {"a": [1, 2], 7: 1.5}, "w": torch.arange(4.0), "inf": float("inf")}
    states = {"gla-fr": {"local_weight": torch.randn(3, 2)}, "counter": {"rounds": 2, "hist": [1, 2]}}
    return ClientTask(5, 3, config, states, np.array([4, 9, 2]), np.array([0, 1, 2]), dispatch=17)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_task_survives_the_wire_as_records_with_types_and_order():
    task = _task()
    content = wire.encode_task(task, ArrayRecord({}), "name = 'x'", "tok", send_state=True)
    # Only Flower records of plain values travel: no pickles in either direction.
    for record in content.config_records.values():
        assert all(isinstance(v, str | int | float | bool) for v in record.values())
    back = wire.decode_task(content, stored_states=None)
    assert (back.client_id, back.round, back.dispatch) == (5, 3, 17)
    assert _same(back.config, task.config) and _same(back.states, task.states)
    assert back.indices.tolist() == [4, 9, 2] and back.seen_counts.tolist() == [0, 1, 2]
    # Without state, the node's stored state is used, or the node asks for it (None).
    content = wire.encode_task(task, ArrayRecord({}), "name = 'x'", "tok", send_state=False)
    assert wire.decode_task(content, stored_states=None) is None
    assert wire.decode_task(content, stored_states={"p": {}}).states == {"p": {}}


def test_forged_tree_is_refused_without_running_anything():
    from fedlt.base.safe import decode_tree

    with pytest.raises(ValueError, match="unknown tag"):
        decode_tree('{"py": "os.system"}', [])
    with pytest.raises(ValueError, match="bad dict key"):
        decode_tree('{"d": [[[1], 2]]}', [])


def test_result_and_errors_survive_the_wire(monkeypatch):
    # Messages take their run id from the process's Flower task identity, which a run would set.
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name) or 1)
    result = ClientResult(
        2, {"w": torch.ones(2)}, 10, 0.5, 3, {"creff": {1: (torch.ones(2), torch.zeros(1))}}, {"p": {"n": 1}}
    )
    msg = Message(wire.encode_result(result), reply_to=_fake_message())
    back = wire.decode_result(msg)
    assert (back.client_id, back.n_samples, back.loss, back.n_steps) == (2, 10, 0.5, 3)
    assert _same(back.payloads, result.payloads) and _same(back.states, result.states)
    assert torch.equal(back.weights["w"], torch.ones(2))
    error = PluginError("focal", "client_loss", "boom", 2, 4)
    msg = Message(wire.encode_error(error, 2, 4), reply_to=_fake_message())
    got = wire.decode_error(msg, 2, 4)
    assert isinstance(got, PluginError) and (got.plugin, got.hook, got.client, got.round) == (
        "focal",
        "client_loss",
        2,
        4,
    )
    assert str(got) == str(error)
    msg = Message(wire.encode_error(KeyError("x"), 2, 4), reply_to=_fake_message())
    assert "KeyError" in str(wire.decode_error(msg, 2, 4))


def _fake_message() -> Message:
    from flwr.app import MessageType

    return Message(RecordDict({}), 1, MessageType.TRAIN)


# --------------------------------------------------------------------------- on Flower's simulation


def test_identical_to_serial_engine(simulation, serial_plain, tmp_path):
    serial, serial_ckpt = serial_plain
    summary = fedlt.run(_flower(TINY), out=tmp_path / "flower")
    assert summary["engine"] == "flower"
    assert summary["final"] == serial["final"]
    _assert_same_tensors(serial_ckpt["global"], _ckpt(tmp_path / "flower")["global"], "global")
    lines = (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == TINY["federation"]["rounds"]


def test_stateful_plugins_identical_and_state_sent_once(simulation, serial_stateful, tmp_path, monkeypatch):
    sent: list[tuple[int, int, bool]] = []
    real = flower_engine.encode_task

    def spy(task, arrays, scenario_toml, token, send_state):
        sent.append((task.round, task.client_id, send_state))
        return real(task, arrays, scenario_toml, token, send_state)

    monkeypatch.setattr(flower_engine, "encode_task", spy)
    serial, serial_ckpt = serial_stateful
    summary = fedlt.run(_flower(_stateful()), out=tmp_path / "flower")
    assert summary["final"] == serial["final"]
    ckpt = _ckpt(tmp_path / "flower")
    _assert_same_tensors(serial_ckpt["client_states"], ckpt["client_states"], "client_states")
    _assert_same_tensors(serial_ckpt["global"], ckpt["global"], "global")
    assert any(s.get("gla-fr") for s in ckpt["client_states"].values())  # gla-fr's local heads came back
    # The state travels to a node only on first contact; later rounds use the node's context.state.
    first = {}
    for rnd, client, with_state in sent:
        first.setdefault(client, rnd)
        assert with_state == (rnd == first[client]), (rnd, client)


def test_resumed_run_resends_state_and_matches(simulation, serial_stateful, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_2(r: int, record: Any) -> None:
        if r == 2:
            raise Stop

    run = Run.create(fedlt.load_scenario(_flower(_stateful())), tmp_path / "flower")
    run.on_round = stop_after_2
    with pytest.raises(Stop):
        run.execute()
    resumed = fedlt.resume(tmp_path / "flower")
    serial, serial_ckpt = serial_stateful
    assert resumed["final"] == serial["final"]
    _assert_same_tensors(serial_ckpt["client_states"], _ckpt(tmp_path / "flower")["client_states"], "states")


def test_continual_stream_with_replay_memory_identical(simulation, tmp_path):
    """Stream slices and a replay memory (client state) travel through Flower unchanged."""
    s = copy.deepcopy(TINY)
    s["stream"] = {"kind": "si-blurry", "n_tasks": 2, "samples_per_round": 32, "online_iter": 2}
    s["plugins"] = [{"name": "replay"}]
    serial, serial_ckpt = _serial_reference(s, tmp_path / "serial")
    flower = fedlt.run(_flower(s), out=tmp_path / "flower")
    assert flower["final"] == serial["final"] and "a_auc" in flower["final"]
    ckpt = _ckpt(tmp_path / "flower")
    assert ckpt["stream_pos"] == serial_ckpt["stream_pos"]
    assert any(st.get("replay") for st in ckpt["client_states"].values())  # a memory was kept
    _assert_same_tensors(serial_ckpt["client_states"], ckpt["client_states"], "client_states")


def test_buffered_async_with_dropouts_identical_on_flower(simulation, tmp_path):
    """An asynchronous run: every start (its dispatch number in the seeds) travels; same numbers."""
    s = _stateful()
    s["federation"].update(mode="buffered", concurrency=3, buffer_size=2, rounds=4, eval_every=2)
    s["system"] = {"speed": "lognormal", "speed_sigma": 0.8, "dropout": 0.2}
    serial, serial_ckpt = _serial_reference(s, tmp_path / "serial")
    flower = fedlt.run(_flower(s), out=tmp_path / "flower")
    assert flower["final"] == serial["final"] and flower["federation"] == serial["federation"]
    _assert_same_tensors(serial_ckpt["global"], _ckpt(tmp_path / "flower")["global"], "global")
    events = lambda d: (tmp_path / d / "events.jsonl").read_text()  # noqa: E731
    assert events("serial") == events("flower")


def test_plugin_error_is_retried_then_names_client_round_plugin(simulation, tiny, tmp_path):
    tiny["plugins"] = [{"name": "always-fails"}]
    run = Run.create(fedlt.load_scenario(_flower(tiny, max_retries=1)), tmp_path / "r")
    with pytest.raises(PluginError) as info:
        run.execute()
    err = info.value
    assert err.plugin == "always-fails" and err.hook == "client_loss"
    assert err.round == 1 and err.client is not None
    assert "deliberate failure" in str(err) and f"client {err.client} in round 1" in str(err)
    assert run.engine.retried >= 1  # re-sent (with its state) before giving up


def test_more_clients_than_the_shared_simulation_has_nodes(simulation, tiny, tmp_path):
    tiny["partition"]["n_clients"] = 5
    with pytest.raises(ScenarioError, match=r"partition\.n_clients.*4 SuperNodes"):
        fedlt.run(_flower(tiny), out=tmp_path / "r")


# --------------------------------------------------------------------------- export-flower and flwr run


def test_export_flower_writes_a_flower_app(tiny, tmp_path, capsys):
    tiny["name"] = "tiny run_1"
    (tmp_path / "s.toml").write_text(fedlt.scenario.config.scenario_to_toml(fedlt.load_scenario(tiny)))
    app = tmp_path / "tiny-app"
    assert (
        cli_main(["export-flower", str(tmp_path / "s.toml"), str(app), "--set", "federation.rounds=2"]) == 0
    )
    assert "num-supernodes=4" in capsys.readouterr().out
    project = tomllib.loads((app / "pyproject.toml").read_text())
    flwr_app = project["tool"]["flwr"]["app"]
    assert project["project"]["name"] == "fedlt-tiny-run-1"
    assert flwr_app["components"] == {"serverapp": "fedlt_app:serverapp", "clientapp": "fedlt_app:clientapp"}
    assert flwr_app["config"] == {
        "scenario": "scenario.toml",
        "out-dir": str(app / "runs" / "fedlt-tiny-run-1"),
    }
    written = fedlt.load_scenario(app / "scenario.toml")
    assert written.engine.kind == "flower" and written.federation.rounds == 2
    assert "flwr run" in (app / "README.md").read_text()
    import importlib.util

    spec = importlib.util.spec_from_file_location("exported_app", app / "fedlt_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.clientapp, flwr.clientapp.ClientApp)
    assert isinstance(module.serverapp, flwr.serverapp.ServerApp)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quickstart", "bad_name"], "valid Flower app folder name"),
        (["quickstart", "used"], "new or empty folder"),
        (["quickstart", "app", "--set", "plugins.0.name=nope"], "nope"),
        (["nope.toml", "app"], "scenario"),
    ],
)
def test_export_flower_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    assert cli_main(["export-flower", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "app").exists() and not (tmp_path / "bad_name").exists()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _our_superlinks(flwr_home: Path) -> list[int]:
    """Pids of SuperLinks started for this FLWR_HOME (their command line names its log file)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "flower-superlink" in cmd and str(flwr_home) in cmd:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_flwr_run_runs_the_exported_app(serial_plain, tmp_path):
    """`flwr run` on the exported project: the same model as the serial engine (about a minute)."""
    # Both are environment faults, not reasons to pass silently: the dev extra installs flwr's
    # commands beside this Python, and the test needs the SuperLink ports to start its own.
    flwr_cli = Path(sys.executable).with_name("flwr")
    assert flwr_cli.exists() and shutil.which("flower-superlink", path=str(flwr_cli.parent)), (
        f"flwr and flower-superlink must be installed beside {sys.executable} (pip install -e '.[flower]')"
    )
    assert _port_free(39091) and _port_free(39093), (
        "ports 39091/39093 are taken, most likely by a SuperLink an earlier `flwr run` left running;"
        " stop it (pkill -f flower-superlink) and rerun"
    )
    app = export_flower(_flower(TINY), tmp_path / "tiny-app")
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": os.pathsep.join([str(flwr_cli.parent), os.environ.get("PATH", "")]),
    }
    command = [str(flwr_cli), "run", str(app), "--federation-config", "num-supernodes=4", "--stream"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    finally:
        for pid in _our_superlinks(home):  # flwr leaves its SuperLink running; stop ours by pid
            os.kill(pid, 15)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = app / "runs" / "fedlt-tiny"
    summary = (run_dir / "summary.json").read_text()
    assert '"engine": "flower"' in summary
    _, serial_ckpt = serial_plain
    _assert_same_tensors(serial_ckpt["global"], _ckpt(run_dir)["global"], "global")
