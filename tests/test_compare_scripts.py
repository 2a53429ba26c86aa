"""Smoke tests of scenarios/compare_remedies.py and scenarios/compare_continual.py (``--quick``)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib
import pytest
import tomli_w

matplotlib.use("Agg")

SCRIPTS = Path(__file__).resolve().parents[1] / "scenarios"

STREAM: dict[str, Any] = {
    "kind": "si-blurry",
    "n_tasks": 2,
    "disjoint_percent": 50,
    "blurry_percent": 10,
    "samples_per_round": 16,
    "online_iter": 1,
    "eval_period": 1,
}


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _write(tmp_path: Path, scenario: dict[str, Any], name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(scenario))
    return path


def test_compare_remedies_quick(tmp_path: Path, tiny: dict[str, Any]) -> None:
    mod = _load("compare_remedies")
    scenario = _write(tmp_path, tiny, "tiny")
    out = tmp_path / "out"
    argv = [str(scenario), "--quick", "--methods", "fedavg", "balanced-softmax"]
    argv += ["--out", str(out), "--runs", str(tmp_path / "runs"), "--set", "federation.rounds=2"]
    assert mod.main(argv) == 0
    table = (out / "remedies-tiny.md").read_text()
    assert "| fedavg |" in table and "| balanced-softmax |" in table
    assert "Δtail vs fedavg" in table and "nproc" in table and "--quick" in table
    assert (out / "remedies-tiny.png").stat().st_size > 1000
    assert (tmp_path / "runs" / "fedavg-s3" / "summary.json").is_file()
    assert (tmp_path / "runs" / "balanced-softmax-s3" / "summary.json").is_file()


def test_compare_continual_quick(tmp_path: Path, tiny: dict[str, Any]) -> None:
    mod = _load("compare_continual")
    scenario = copy.deepcopy(tiny)
    scenario["stream"] = dict(STREAM)
    scenario["train"]["batch_size"] = 8
    path = _write(tmp_path, scenario, "tiny-stream")
    out = tmp_path / "out"
    argv = [str(path), "--quick", "--methods", "er", "gsf-afs-mask", "--memory-size", "20"]
    argv += ["--out", str(out), "--runs", str(tmp_path / "runs")]
    assert mod.main(argv) == 0
    table = (out / "continual-tiny.md").read_text()
    assert "| er |" in table and "| gsf-afs-mask |" in table and "A_auc" in table
    assert (out / "continual-tiny.png").stat().st_size > 1000


def test_unknown_plugin_is_skipped(tmp_path: Path, tiny: dict[str, Any]) -> None:
    mod = _load("compare_remedies")
    methods = {"fedavg": ([], {}), "nope": ([{"name": "no-such-plugin"}], {})}
    results = mod.run_methods(
        str(_write(tmp_path, tiny, "tiny")), methods, [0], {"federation.rounds": 1}, tmp_path / "runs"
    )
    assert results[1].skipped and "not installed" in results[1].skipped
    assert any("nope" in line and "skipped" in line for line in mod.notes(results))


def test_continual_rejects_offline_scenario(tmp_path: Path, tiny: dict[str, Any]) -> None:
    mod = _load("compare_continual")
    with pytest.raises(SystemExit):
        mod.main([str(_write(tmp_path, tiny, "tiny")), "--quick", "--out", str(tmp_path / "o")])
