"""The fedlt command: exit codes, messages, inspect's JSON shape, plugins listing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedlt.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlt.cli", *args], capture_output=True, text=True)


def test_validate_ok(capsys):
    assert main(["validate", "quickstart"]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["partition.alpha=0"], "'partition.alpha' value must be a number greater than 0. Got 0"),
        (["long_tail.imbalance_factor=0.5"], "'long_tail.imbalance_factor'"),
        (["federation.fraction_clients=2"], "'federation.fraction_clients'"),
        (["partition.n_clients=100000"], "'partition.n_clients' value must be at most the"),
        (["data.dataset=imagenet"], "'data.dataset'"),
        (["model.name=vgg"], "'model.name'"),
        (["data.colour=1"], "Unknown key 'data.colour'"),
        (["plugins.0.name=nope"], "'plugins[0].name' value must be an installed plugin"),
        (["plugins.0.name=focal", "plugins.0.gamma=-2"], "'plugins[0].gamma' value must be a number >= 0"),
    ],
)
def test_bad_input_exits_2_with_message(capsys, overrides, fragment):
    args = ["validate", "quickstart"]
    for o in overrides:
        args += ["--set", o]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ")
    assert fragment in " ".join(err.split())


def test_unknown_plugin_exits_2(tmp_path, capsys):
    s = tmp_path / "s.toml"
    s.write_text('[[plugins]]\nname = "focall"\n')
    assert main(["validate", str(s)]) == 2
    assert "installed plugin" in capsys.readouterr().err


def test_missing_data_root_exits_2_before_work(tmp_path, capsys):
    s = tmp_path / "s.toml"
    s.write_text('[data]\ndataset = "cifar10"\nroot = "no/such/folder"\n')
    assert main(["run", str(s), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "'data.root'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "r").exists(), "nothing may be written before the input is valid"


@pytest.mark.parametrize(("kind", "module"), [("ray", "ray"), ("flower", "flwr")])
def test_engine_without_its_extra_exits_2_before_work(tmp_path, capsys, monkeypatch, kind, module):
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == module else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "r"
    assert main(["run", "quickstart", "--set", f"engine.kind={kind}", "--out", str(out), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'engine.kind'" in err and f"pip install 'fedlt[{kind}]'" in err
    assert not out.exists(), "nothing may be written before the input is valid"
    assert main(["validate", "quickstart", "--set", f"engine.kind={kind}"]) == 2


def test_inspect_json_shape(capsys):
    assert main(["inspect", "quickstart", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_classes"] == 10
    counts = info["train_class_counts"]
    assert (
        len(counts) == 10 and counts[0] > counts[-1] and counts[0] / counts[-1] == pytest.approx(10, rel=0.1)
    )
    assert len(info["clients"]) == 10
    assert [c["id"] for c in info["clients"]] == list(range(10))
    per_class = [sum(c["class_counts"][k] for c in info["clients"]) for k in range(10)]
    assert per_class == counts
    assert all("test_view_size" in c for c in info["clients"])


def test_inspect_text(capsys):
    assert main(["inspect", "quickstart", "--set", "partition.n_clients=3"]) == 0
    out = capsys.readouterr().out
    assert "train class counts" in out and out.count("\n") >= 5


def test_plugins_listing(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["focal"]["distribution"] == "fedlt"
    assert "client_loss" in rows["balanced-softmax"]["hooks"]
    assert rows["balanced-softmax"]["parameters"][0]["name"] == "prior"


def test_run_and_resume_via_console(tmp_path):
    out = tmp_path / "r"
    r = _cli("run", "quickstart", "--set", "federation.rounds=2", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    # resuming a finished run recomputes nothing and reports the same result
    r2 = _cli("resume", str(out), "--quiet")
    assert r2.returncode == 0, r2.stderr
    assert json.loads((out / "summary.json").read_text())["final"] == summary["final"]


def test_inspect_shows_each_clients_stream(capsys):
    assert main(["inspect", "scenarios/siblurry_quick.toml", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for client in info["clients"]:
        tasks = client["tasks"]
        assert len(tasks) == 5
        assert all(
            {"classes", "size", "n_blurry", "disjoint_classes", "blurry_classes"} <= set(t) for t in tasks
        )
        assert sum(t["size"] for t in tasks) == client["n_samples"]
    # task boundaries are drawn per client, so they differ between clients
    assert len({tuple(t["size"] for t in c["tasks"]) for c in info["clients"]}) > 1
    assert main(["inspect", "scenarios/siblurry_quick.toml"]) == 0
    assert "streams (per task" in capsys.readouterr().out


# --------------------------------------------------------------------------- one preparation path


def _without(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )


@pytest.mark.parametrize("command", ["validate", "run", "inspect", "export-flower"])
def test_every_entry_point_refuses_what_run_refuses(command, tmp_path, capsys, monkeypatch):
    # A logger whose package is missing: `validate` once said valid where `run` exited 2.
    _without(monkeypatch, "wandb")
    args = {
        "validate": ["validate", "quickstart"],
        "run": ["run", "quickstart", "--out", str(tmp_path / "r"), "--quiet"],
        "inspect": ["inspect", "quickstart"],
        "export-flower": ["export-flower", "quickstart", str(tmp_path / "app")],
    }[command]
    assert main([*args, "--set", "log.wandb=true"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'log.wandb'" in err and "pip install 'wandb'" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "app").exists()


@pytest.mark.parametrize("command", ["validate", "export-flower"])
def test_plugin_requirements_refused_by_every_entry_point(command, tmp_path, capsys):
    # mvp-prompts needs a ViT: `export-flower` once wrote an app for it on an MLP.
    args = (
        ["validate", "quickstart"]
        if command == "validate"
        else ["export-flower", "quickstart", str(tmp_path / "app")]
    )
    assert main([*args, "--set", "plugins.0.name=mvp-prompts"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'plugins[0].name'" in err and "prompt slot" in err
    assert not (tmp_path / "app").exists()


def test_one_run_checks_the_scenario_once(tmp_path, monkeypatch):
    # Every check in one place, run once per run (the engine check used to run three times), and
    # the plugins discovered once.
    import fedlt
    import fedlt.prepare.build as build
    from fedlt.hooks import discovery

    checks, discoveries = [], []
    real_checks, real_discover = build.checked_plugins, discovery.discover_plugins
    monkeypatch.setattr(build, "checked_plugins", lambda s: checks.append(s.name) or real_checks(s))
    monkeypatch.setattr(discovery, "discover_plugins", lambda: discoveries.append(1) or real_discover())
    fedlt.run("quickstart", out=tmp_path / "r", federation__rounds=1, **{"plugins.0.name": "focal"})
    assert checks == ["quickstart"] and len(discoveries) == 1


def test_every_problem_in_one_message(capsys):
    # Several problems at once are all reported, the first one naming its key.
    assert (
        main(["validate", "quickstart", "--set", "engine.device=cuda:7", "--set", "plugins.0.name=nope"]) == 2
    )
    err = " ".join(capsys.readouterr().err.split())
    if "CUDA is not available" in err:  # a machine without this GPU
        assert "'engine.device'" in err and "Also:" in err and "nope" in err
