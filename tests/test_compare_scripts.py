"""scenarios/compare_remedies.py and scenarios/compare_continual.py: runs, reuse, tables, plots."""

from __future__ import annotations

import builtins
import copy
import json
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import matplotlib
import pytest
import tomli_w
from support.scripts import load_script

matplotlib.use("Agg")

SCRIPTS = Path(__file__).resolve().parents[1] / "scenarios"

STREAM: dict[str, Any] = {
    "kind": "si-blurry",
    "n_tasks": 2,
    "disjoint_percent": 50,
    "blurry_percent": 10,
    "samples_per_round": 16,
    "online_iter": 1,
}


def _load(name: str) -> ModuleType:
    return load_script(SCRIPTS / f"{name}.py")


def _write(tmp_path: Path, scenario: dict[str, Any], name: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(scenario))
    return path


def _final(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())["final"]


def _row(table: str, method: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_remedies_quick(tmp_path: Path, tiny: dict[str, Any]) -> None:
    mod = _load("compare_remedies")
    scenario = _write(tmp_path, tiny, "tiny")
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = [str(scenario), "--quick", "--seeds", "0", "1", "--methods", "fedavg", "balanced-softmax"]
    argv += ["--out", str(out), "--runs", str(runs), "--set", "federation.rounds=2"]
    assert mod.main(argv) == 0
    table = (out / "remedies-tiny.md").read_text()
    assert "Δtail vs fedavg" in table and "nproc" in table and "--quick" in table
    assert "## Every metric (`fedlt compare`)" in table and "| fedavg (baseline) | 2 | 0, 1 |" in table
    assert (out / "remedies-tiny.png").stat().st_size > 1000
    for method in ("fedavg", "balanced-softmax"):
        for seed in (0, 1):
            assert (runs / method / f"seed{seed}" / "summary.json").is_file()

    # The cells are the runs' own numbers: mean ± sample std, and the mean of per-seed differences.
    base = [_final(runs / "fedavg" / f"seed{s}") for s in (0, 1)]
    bs = [_final(runs / "balanced-softmax" / f"seed{s}") for s in (0, 1)]
    row = dict(zip(_row(table, "method"), _row(table, "balanced-softmax"), strict=True))
    bal = [100 * f["balanced_accuracy"] for f in bs]
    assert row["bal. acc"] == f"{statistics.fmean(bal):.1f} ± {statistics.stdev(bal):.1f}"
    diffs = [100 * (b["tail_accuracy"] - a["tail_accuracy"]) for a, b in zip(base, bs, strict=True)]
    assert row["Δtail vs fedavg"].startswith(f"{statistics.fmean(diffs):+.1f} [")
    assert row["seeds"] == "0-1" and row["plugins"] == "`balanced-softmax(prior=local)`"

    # fedlt compare's CSV and JSON, and the raw results next to the runs.
    csv_text = (out / "remedies-tiny.csv").read_text()
    assert csv_text.startswith("group,metric,n,mean") and "balanced-softmax,tail_accuracy,2," in csv_text
    data = json.loads((out / "remedies-tiny.json").read_text())
    assert data["baseline"] == "fedavg" and [g["label"] for g in data["groups"]] == [
        "fedavg",
        "balanced-softmax",
    ]
    raw = json.loads((runs / "results.json").read_text())
    assert [r["seed"] for r in raw["methods"]["fedavg"]["runs"]] == [0, 1]
    assert raw["comparison"]["baseline"] == "fedavg"


def test_finished_runs_are_reused_and_other_settings_refused(tmp_path: Path, tiny: dict[str, Any]) -> None:
    mod = _load("compare_remedies")
    scenario = str(_write(tmp_path, tiny, "tiny"))
    runs = tmp_path / "runs"
    common = ["--methods", "fedavg", "--out", str(tmp_path / "out"), "--runs", str(runs), "--no-plot"]
    assert mod.main([scenario, "--seeds", "0", *common, "--set", "federation.rounds=1"]) == 0
    first = (runs / "fedavg" / "seed0" / "summary.json").read_text()
    # More seeds: seed 0 is reused as it is, seed 1 is run.
    assert mod.main([scenario, "--seeds", "0", "1", *common, "--set", "federation.rounds=1"]) == 0
    assert (runs / "fedavg" / "seed0" / "summary.json").read_text() == first
    assert (runs / "fedavg" / "seed1" / "summary.json").is_file()
    assert "| fedavg |" in (tmp_path / "out" / "remedies-tiny.md").read_text()
    # Other settings in the same folders: refused before anything runs or is overwritten.
    with pytest.raises(SystemExit, match="other settings"):
        mod.main([scenario, "--seeds", "0", "1", "2", *common, "--set", "federation.rounds=2"])
    assert not (runs / "fedavg" / "seed2").exists()
    assert (runs / "fedavg" / "seed0" / "summary.json").read_text() == first


def test_missing_matplotlib_stops_before_any_run(
    tmp_path: Path, tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _load("compare_remedies")
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    runs = tmp_path / "runs"
    argv = [str(_write(tmp_path, tiny, "tiny")), "--quick", "--methods", "fedavg"]
    argv += ["--out", str(tmp_path / "out"), "--runs", str(runs)]
    with pytest.raises(SystemExit, match="matplotlib"):
        mod.main(argv)
    assert not runs.exists() and not (tmp_path / "out").exists()
    # --no-plot needs no matplotlib.
    assert mod.main([*argv, "--no-plot", "--set", "federation.rounds=1"]) == 0
    assert (tmp_path / "out" / "remedies-tiny.md").is_file() and (runs / "results.json").is_file()


def test_failing_plot_keeps_results(
    tmp_path: Path, tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _load("compare_remedies")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no display")

    monkeypatch.setattr(mod, "bar_plot", broken)
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = [str(_write(tmp_path, tiny, "tiny")), "--quick", "--methods", "fedavg", "focal"]
    argv += ["--out", str(out), "--runs", str(runs), "--set", "federation.rounds=1"]
    assert mod.main(argv) == 1
    raw = json.loads((runs / "results.json").read_text())
    assert set(raw["methods"]) == {"fedavg", "focal"} and len(raw["methods"]["focal"]["runs"]) == 1
    assert "| focal |" in (out / "remedies-tiny.md").read_text()
    assert not (out / "remedies-tiny.png").exists()


def test_unknown_plugin_is_skipped_and_failures_do_not_stop_the_study(
    tmp_path: Path, tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _load("compare_remedies")
    scenario = str(_write(tmp_path, tiny, "tiny"))
    methods = {
        "fedavg": ([], {}),
        "nope": ([{"name": "no-such-plugin"}], {}),
        "focal": ([{"name": "focal"}], {}),
    }
    results = mod.build_sweeps(scenario, methods, [0], ["federation.rounds=1"], tmp_path / "runs")
    assert results[1].skipped and "not installed" in results[1].skipped and results[1].sweep is None

    import fedlt.analysis.sweep

    real = fedlt.analysis.sweep.run_job

    def crash_focal(scenario: str, job: Any, threads: int | None = None) -> str:
        if "focal" in str(job.run_dir):
            raise ValueError("broken remedy")
        return real(scenario, job, threads)

    monkeypatch.setattr(fedlt.analysis.sweep, "run_job", crash_focal)
    mod.run_sweeps(results)
    assert [p.name for p in results[0].finished] == ["seed0"]
    assert results[2].finished == [] and "broken remedy" in results[2].errors[0]
    lines = mod.notes(results)
    assert any("nope" in line and "skipped" in line for line in lines)
    assert any("focal" in line and "failed" in line for line in lines)


def test_method_overrides_read_back_as_set_values() -> None:
    from fedlt.scenario.config import parse_value

    mod = _load("compare_remedies")
    plugins = [{"name": "replay", "policy": "cbrs", "memory_size": 32, "rate": 0.5, "flag": True}]
    sets = mod.method_overrides(plugins, {"model": {"name": "vit", "dim": 64}})
    parsed = {s.partition("=")[0]: parse_value(s.partition("=")[2]) for s in sets}
    assert parsed == {"plugins": plugins, "model": {"name": "vit", "dim": 64}}


def test_compare_continual_quick(tmp_path: Path, tiny: dict[str, Any]) -> None:
    mod = _load("compare_continual")
    scenario = copy.deepcopy(tiny)
    scenario["stream"] = dict(STREAM)
    scenario["train"]["batch_size"] = 8
    path = _write(tmp_path, scenario, "tiny-stream")
    out = tmp_path / "out"
    argv = [str(path), "--quick", "--methods", "finetune", "er", "gsf-afs-mask", "--memory-size", "20"]
    argv += ["--out", str(out), "--runs", str(tmp_path / "runs")]
    assert mod.main(argv) == 0
    table = (out / "continual-tiny.md").read_text()
    assert "| er |" in table and "| gsf-afs-mask |" in table and "ΔA_auc vs finetune" in table
    assert "at every multiple of ceil(stream length / 50) stream samples read by the federation" in table
    assert (out / "continual-tiny.png").stat().st_size > 1000
    assert (out / "continual-tiny.csv").is_file() and (out / "continual-tiny.json").is_file()


def test_mvp_applies_the_seen_class_mask() -> None:
    mod = _load("compare_continual")
    plugins, extra = mod.continual_methods()["mvp"]
    names = [p["name"] for p in plugins]
    assert "seen-class-mask" in names and names.index("mvp-prompts") < names.index("mvp-mask")
    assert extra == {"model": {"name": "vit"}}


def test_mean_curve_interpolates_on_the_shared_range() -> None:
    mod = _load("compare_continual")
    xs, mean, std = mod.mean_curve([[[10, 0.2], [20, 0.4], [30, 0.6]], [[5, 0.0], [25, 0.4], [40, 0.4]]])
    # Shared range [10, 30]: second curve at 10 -> 0.1, 20 -> 0.3, 30 -> 0.4.
    assert xs == [10.0, 20.0, 30.0]
    assert mean == pytest.approx([0.15, 0.35, 0.5])
    assert std == pytest.approx(
        [statistics.stdev([0.2, 0.1]), statistics.stdev([0.4, 0.3]), statistics.stdev([0.6, 0.4])]
    )


def test_continual_rejects_offline_scenario(tmp_path: Path, tiny: dict[str, Any]) -> None:
    mod = _load("compare_continual")
    with pytest.raises(SystemExit):
        mod.main([str(_write(tmp_path, tiny, "tiny")), "--quick", "--out", str(tmp_path / "o")])


def test_compare_async_runs_methods_at_equal_client_work_and_reuses_runs(tmp_path: Path, tiny: dict) -> None:
    mod = _load("compare_async")
    s = copy.deepcopy(tiny)
    s["federation"] = {"mode": "async", "rounds": 8, "concurrency": 2, "eval_every": 4}
    s["system"] = {"speed": "lognormal", "speed_sigma": 0.8, "tail_slowdown": 5.0}
    s["eval"]["time_to_accuracy"] = [0.05, 0.999]
    scenario = _write(tmp_path, s, "tinyasync")
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = [str(scenario), "--seeds", "0", "1", "--methods", "fedasync", "fedbuff", "deadline", "--no-plot"]
    argv += ["--out", str(out), "--runs", str(runs), "--settings", "intertwined"]
    assert mod.main(argv) == 0
    report = (out / "async-tiny.md").read_text()
    summary = lambda m, k: json.loads((runs / "intertwined" / m / f"seed{k}" / "summary.json").read_text())  # noqa: E731
    sync = [summary("sync", k) for k in (0, 1)]
    fedasync = [summary("fedasync", k) for k in (0, 1)]
    # Equal client work: 4 rounds of 2 clients against 8 async updates; FedBuff 2 updates of 4.
    assert [x["rounds"] for x in sync] == [4, 4] and [x["federation"]["arrivals"] for x in fedasync] == [8, 8]
    fedbuff = summary("fedbuff", 0)
    assert fedbuff["rounds"] == 2 and fedbuff["federation"]["arrivals"] == 8
    deadline = summary("deadline", 0)
    assert deadline["federation"]["mode"] == "deadline"
    row = _row(report.split("### intertwined (")[1], "fedasync")
    tail = lambda x: x["final"]["tail_accuracy"]  # noqa: E731
    tails = [tail(a) - tail(b) for a, b in zip(fedasync, sync, strict=True)]
    assert row[6] == f"{100 * statistics.mean(tails):+.1f}"  # the paired Δtail, from the summaries
    assert row[8] == "never" and "| fedasync (" not in report.split("### intertwined: `fedlt compare`")[0]
    assert "sync (baseline)" in report
    mtimes = {p: p.stat().st_mtime for p in runs.rglob("summary.json")}
    assert mod.main(argv) == 0  # everything reused
    assert {p: p.stat().st_mtime for p in runs.rglob("summary.json")} == mtimes
