"""End-to-end runs: outputs, determinism, resume equivalence, non-finite loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import fedlt
from fedlt import Plugin, hookimpl
from fedlt.base.seeding import torch_generator
from fedlt.driver.observers import Observer
from fedlt.driver.runner import Run, select_clients
from fedlt.errors import NonFiniteLossError


def _final(summary):
    return {k: v for k, v in summary["final"].items()}


def test_outputs_and_summary_shape(tiny, tmp_path):
    summary = fedlt.run(tiny, out=tmp_path / "r")
    out = tmp_path / "r"
    assert (out / "scenario.toml").is_file() and (out / "checkpoint.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text()) == summary
    final = summary["final"]
    for key in (
        "accuracy",
        "balanced_accuracy",
        "head_accuracy",
        "medium_accuracy",
        "tail_accuracy",
        "auroc_macro",
        "personalized_accuracy",
    ):
        assert isinstance(final[key], float), key
    assert len(final["per_class_accuracy"]) == 10
    assert final["shot_rule"]["rule"] == "count" and final["shot_rule"]["thresholds"] == [60.0, 20.0]
    assert summary["scenario"] == "tiny" and summary["rounds"] == 3 and summary["wall_seconds"] > 0
    # The resolved scenario reproduces the run's configuration exactly, with the thread count the
    # run picked ("auto") written in, so a resume uses the same one.
    resolved = fedlt.load_scenario(out / "scenario.toml")
    assert isinstance(resolved.engine.threads, int) and resolved.engine.threads >= 1
    assert summary["provenance"]["threads"] == resolved.engine.threads
    assert resolved == fedlt.load_scenario(tiny, {"engine.threads": resolved.engine.threads})


def test_same_seed_same_numbers_different_seed_different(tiny, tmp_path):
    a = fedlt.run(tiny, out=tmp_path / "a")
    b = fedlt.run(tiny, out=tmp_path / "b")
    c = fedlt.run(tiny, out=tmp_path / "c", seed=4)
    assert _final(a) == _final(b)
    assert _final(a) != _final(c)


def test_eval_every_and_selection(tiny, tmp_path):
    tiny["federation"].update(rounds=5, eval_every=2)
    fedlt.run(tiny, out=tmp_path / "r")
    rounds = [json.loads(x)["round"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [2, 4, 5]
    assert select_clients(0, 1, 10, 0.3) == select_clients(0, 1, 10, 0.3)
    assert len(select_clients(0, 1, 10, 0.3)) == 3
    assert select_clients(0, 1, 10, 1.0) == list(range(10))
    rounds_differ = {tuple(select_clients(0, r, 10, 0.3)) for r in range(1, 20)}
    assert len(rounds_differ) > 5


def test_resume_after_interruption_matches_uninterrupted(tiny, tmp_path, interrupted_run):
    tiny["federation"].update(rounds=5, eval_every=1)
    full = fedlt.run(tiny, out=tmp_path / "full")

    interrupted_run(tiny, tmp_path / "cut", after=3)
    resumed = fedlt.resume(tmp_path / "cut")
    assert _final(resumed) == _final(full)
    cut_lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in cut_lines] == [json.loads(x) for x in full_lines]


SUPPORT = Path(__file__).parent / "support"


def _kill_and_resume(scenario: dict, tmp_path: Path, monkeypatch) -> tuple[dict, dict, int]:
    """Run a scenario cleanly, and again in a CLI process SIGKILLed mid-run then resumed."""
    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", "pause=support.test_plugins:Pause")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT.parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(SUPPORT.parent))
    scenario["plugins"] = [*scenario.get("plugins", []), {"name": "pause", "seconds": 0.3}]
    path = tmp_path / "s.toml"
    path.write_text(fedlt.scenario.config.scenario_to_toml(fedlt.load_scenario(scenario)))
    full = fedlt.run(path, out=tmp_path / "full")

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedlt.cli", "run", str(path), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.02)
    time.sleep(0.15)  # somewhere inside a later round (each round pauses 0.3 s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(out / "checkpoint.pt", weights_only=True)["round"]
    result = subprocess.run(
        [sys.executable, "-m", "fedlt.cli", "resume", str(out), "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return full, json.loads((out / "summary.json").read_text()), done


def test_resume_after_sigkill_matches_uninterrupted(tiny, tmp_path, monkeypatch):
    """Kill the CLI process with SIGKILL mid-run, resume, and compare with a clean run."""
    tiny["federation"].update(rounds=6, eval_every=1)
    full, resumed, done = _kill_and_resume(tiny, tmp_path, monkeypatch)
    assert done < 6, "the kill came too late to test anything"
    assert _final(resumed) == _final(full)
    lines = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines("killed") == lines("full")


def test_continual_quick_scenario_resumes_after_sigkill(tmp_path, monkeypatch):
    """The shipped Si-Blurry quick scenario, killed mid-run and resumed: the same numbers."""
    import tomllib

    raw = tomllib.loads((Path(__file__).parents[1] / "scenarios" / "siblurry_quick.toml").read_text())
    raw["federation"]["rounds"] = 5
    full, resumed, done = _kill_and_resume(raw, tmp_path, monkeypatch)
    assert done < 5
    for key in ("a_auc", "a_last", "a_avg", "f_last", "a_auc_personalized", "anytime_history", "accuracy"):
        assert resumed["final"][key] == full["final"][key], key
    assert full["final"]["a_auc"] is not None and 0 < full["final"]["a_auc"] <= 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    tiny["federation"].update(rounds=6)
    tiny["train"]["lr"] = 1e6
    with pytest.raises(NonFiniteLossError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    err = info.value
    assert err.round >= 1 and err.client in (None, 0, 1, 2, 3)
    assert f"round {err.round}" in str(err)
    assert (f"client {err.client}" if err.client is not None else "global model") in str(err)
    if err.round > 1:
        ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
        assert ckpt["round"] == err.round - 1
        assert all(torch.isfinite(v).all() for v in ckpt["global"].values() if v.is_floating_point())


def test_refuses_to_overwrite_a_run_naming_out(tiny, tmp_path):
    from fedlt.store.rundir import RunDirError

    fedlt.run(tiny, out=tmp_path / "r")
    with pytest.raises(RunDirError, match=r"out=.*fedlt resume"):
        fedlt.run(tiny, out=tmp_path / "r")


def test_api_overwrites_or_resumes_a_folder_when_asked(tiny, tmp_path):
    first = fedlt.run(tiny, out=tmp_path / "r")
    same = fedlt.run(tiny, out=tmp_path / "r", if_exists="resume")  # finished: returned at once
    assert same["final"] == first["final"]
    tiny["seed"] = 5
    other = fedlt.run(tiny, out=tmp_path / "r", if_exists="overwrite")
    assert other["seed"] == 5 and other["final"] != first["final"]
    assert [r["round"] for r in fedlt.history(tmp_path / "r")] == [1, 2, 3]


def test_on_round_callback_sees_every_round_and_its_record(tiny, tmp_path):
    seen = []
    tiny["federation"]["eval_every"] = 2
    fedlt.run(
        tiny,
        out=tmp_path / "r",
        on_round=lambda r, rec: seen.append((r, None if rec is None else rec["round"])),
    )
    assert seen == [(1, None), (2, 2), (3, 3)]


def test_quickstart_learns(tmp_path):
    """The embedded default scenario, as shipped: accuracy far above chance (0.1)."""
    summary = fedlt.run("quickstart", out=tmp_path / "q")
    assert summary["final"]["accuracy"] > 0.6
    assert summary["final"]["balanced_accuracy"] > 0.6
    assert summary["final"]["personalized_accuracy"] > 0.6
    assert os.path.getsize(tmp_path / "q" / "metrics.jsonl") > 0


def test_nan_loss_names_round_client_and_plugins(install_plugins, tiny, tmp_path):
    from fedlt.hooks.plugin import Plugin, hookimpl

    class NanInRound2(Plugin):
        @hookimpl
        def client_sample_weights(self, y, ctx):
            return torch.full(y.shape, float("nan") if ctx.round == 2 else 1.0)

    install_plugins(**{"nan-in-round-2": NanInRound2})
    tiny["plugins"] = [{"name": "focal", "gamma": 0.0}, {"name": "nan-in-round-2"}]
    with pytest.raises(NonFiniteLossError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert info.value.round == 2 and info.value.client == select_clients(3, 2, 4, 0.5)[0]
    assert "focal, nan-in-round-2" in str(info.value)
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["round"] == 1


# --------------------------------------------------------------------------- the loop and its watchers


class Recorder(Observer):
    """Writes down every event of a run, in order."""

    wants_clients = True

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def run_started(self, start, rounds):
        self.events.append(("run_started", start, rounds))

    def round_started(self, round, n_clients):
        self.events.append(("round_started", round, n_clients))

    def client_trained(self, index, result):
        self.events.append(("client_trained", index, result.client_id))

    def evaluated(self, round, record):
        self.events.append(("evaluated", round, record["round"]))

    def round_ended(self, round, loss, record):
        self.events.append(("round_ended", round, record is not None))

    def run_ended(self, summary):
        self.events.append(("run_ended", summary["rounds_run"]))

    def close(self):
        self.events.append(("close",))


def test_observers_see_the_runs_events_in_order(tiny, tmp_path):
    tiny["federation"]["eval_every"] = 2
    run = Run.create(fedlt.load_scenario(tiny), tmp_path / "r")
    recorder = Recorder()
    run.observers.add(recorder)
    run.execute()
    selected = {r: select_clients(3, r, 4, 0.5) for r in (1, 2, 3)}
    expected = [("run_started", 1, 3)]
    for r in (1, 2, 3):
        expected.append(("round_started", r, 2))
        expected += [("client_trained", i, c) for i, c in enumerate(selected[r])]
        if r != 1:
            expected.append(("evaluated", r, r))
        expected.append(("round_ended", r, r != 1))
    expected += [("close",), ("run_ended", 3)]
    assert recorder.events == expected


def test_the_round_loop_reads_in_one_screen():
    import inspect

    from fedlt.driver.runner import Run

    lines = inspect.getsource(Run._loop).splitlines()
    assert len(lines) <= 45, f"Run._loop is {len(lines)} lines: move work out of the loop"


class RecordsPersonalization(Plugin):
    """Writes down what client_personalize sees: its config and its generator's first draw."""

    seen: ClassVar[dict] = {}

    @hookimpl
    def server_configure_round(self, ctx):
        return {"shared": ctx.round}

    @hookimpl
    def server_configure_client(self, client_id):
        return {"mine": client_id}

    @hookimpl
    def client_personalize(self, ctx):
        RecordsPersonalization.seen[(ctx.round, ctx.client_id)] = (
            dict(ctx.config),
            torch.rand(1, generator=ctx.generator).item(),
        )


def test_personalisation_sees_the_config_the_server_gave(tiny, tmp_path, install_plugins):
    # client_personalize used to see an empty ctx.config.
    install_plugins(**{"records": RecordsPersonalization})
    tiny["plugins"] = [{"name": "records"}]
    RecordsPersonalization.seen = {}
    fedlt.run(tiny, out=tmp_path / "r", federation__rounds=1)
    selected = select_clients(3, 1, 4, 0.5)
    seen = RecordsPersonalization.seen
    assert {k for k, _ in seen} == {1}
    for (r, client), (config, draw) in seen.items():
        if client in selected:  # the round's config with its own entries
            assert config == {"round": 1, "shared": 1, "mine": client}
        else:  # not trained this round: the config every client got
            assert config == {"round": 1, "shared": 1}
        # its own generator: not the one the client's training drew from in this round
        training = torch.rand(1, generator=torch_generator(3, "client", r, client)).item()
        own = torch.rand(1, generator=torch_generator(3, "personalize", r, client)).item()
        assert draw == own != training
