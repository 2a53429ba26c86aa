"""The researcher's tools through the real command line: plot, inspect --plot, compare, loggers, progress.

Runs are real tiny runs on digits (a fraction of a second each). Every number a tool prints or
writes is checked against the run folders it read: compare's statistics against means, standard
deviations and t intervals computed here by hand, metrics.csv, TensorBoard and W&B against
metrics.jsonl, the printed continual metrics against summary.json.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import platform
import re
import socket
import struct
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from support.scenarios import TINY

import fedlt
from fedlt import Plugin, hookimpl
from fedlt.cli import main
from fedlt.scenario.config import scenario_to_toml
from fedlt.store.checkpoint import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SIBLURRY = ROOT / "scenarios" / "siblurry_quick.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: t_{0.975, 1}: the 95% interval of a mean of two values is mean +- 12.7062 * std / sqrt(2).
T975_DF1 = 12.706204736174707


def _scenario(**changes: Any) -> dict[str, Any]:
    """The tiny digits scenario, two rounds evaluated each round, one thread (runs compare equal)."""
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=2, eval_every=1)
    s["engine"] = {"threads": 1}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            s.setdefault(section, {})[name] = value
        else:
            s[section] = value
    return s


def _toml(folder: Path, **changes: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.toml"
    path.write_text(scenario_to_toml(fedlt.load_scenario(_scenario(**changes))))
    return path


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def _valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def _numeric_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A record's scalar entries as the loggers see them, worked out here: nested tables flattened
    with dots, lists left out, booleans and strings kept."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_numeric_scalars(value, f"{prefix}{key}."))
        elif not isinstance(value, list):
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four finished runs in one folder: train.lr in {0.1, 0.05} x seeds {0, 1}."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("compare")
    try:
        for lr in (0.1, 0.05):
            for seed in (0, 1):
                fedlt.run(_scenario(seed=seed, train__lr=lr), out=root / f"lr{lr}-s{seed}")
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def continual(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The shipped Si-Blurry quick scenario cut to 4 rounds, run through the CLI: (folder, stdout)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("continual") / "run"
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
            argv = ["run", str(SIBLURRY), "--out", str(out), "--quiet"]
            code = main([*argv, "--set", "federation.rounds=4", "--set", "federation.eval_every=2"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out, buffer.getvalue()


# --------------------------------------------------------------------------- fedlt plot


def test_plot_two_runs_writes_every_figure_they_have_data_for(runs: Path, tmp_path: Path, capsys) -> None:
    a, b = runs / "lr0.1-s0", runs / "lr0.05-s0"
    assert "confusion_matrix" in _summary(a)["final"]  # what the confusion figure draws
    out = tmp_path / "figs"
    assert main(["plot", str(a), str(b), "--out", str(out), "--labels", "lr 0.1,lr 0.05"]) == 0
    stdout, stderr = capsys.readouterr()
    expected = ["accuracy", "shot_accuracy", "per_class_vs_count", "head_vs_tail", "confusion_matrix"]
    expected += ["virtual_time_accuracy", "client_timeline"]  # a sync run has a clock, no stale update
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in expected)
    for name in expected:
        width, height = _valid_png(out / f"{name}.png")
        assert width >= 300 and height >= 200
        assert f"wrote {out / name}.png" in stdout
    # Offline runs have no continual figures: each is named as skipped, with the reason.
    assert "anytime_accuracy.png skipped: no continual run" in stderr
    assert "task_class_accuracy.png skipped" in stderr
    assert "confusion_matrix.png skipped" not in stderr


def test_plot_a_continual_run_draws_its_anytime_accuracy(continual, tmp_path: Path, capsys) -> None:
    run, _ = continual
    assert main(["plot", str(run), "--out", str(tmp_path)]) == 0
    _valid_png(tmp_path / "anytime_accuracy.png")
    _valid_png(tmp_path / "accuracy.png")
    assert "anytime_accuracy.png skipped" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["not-a-run", "missing"])
def test_plot_of_a_folder_that_is_not_a_run_exits_2_naming_it(
    runs: Path, tmp_path: Path, capsys, bad: str
) -> None:
    folder = tmp_path / bad
    if bad == "not-a-run":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
    out = tmp_path / "figs"
    assert main(["plot", str(runs / "lr0.1-s0"), str(folder), "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: ") and f"{folder} is not a run folder" in err
    assert "Traceback" not in err
    assert not out.exists(), "nothing is drawn when one of the folders is not a run"


def test_plot_with_a_wrong_number_of_labels_exits_2(runs: Path, tmp_path: Path, capsys) -> None:
    code = main(["plot", str(runs / "lr0.1-s0"), str(runs / "lr0.1-s1"), "--labels", "one", "--out", "x"])
    assert code == 2
    assert "--labels gives 1 labels for 2 runs" in capsys.readouterr().err


# --------------------------------------------------------------------------- fedlt inspect --plot


def test_inspect_plot_draws_the_client_split(tmp_path: Path, capsys) -> None:
    assert main(["inspect", "quickstart", "--plot", str(tmp_path / "q")]) == 0
    assert [p.name for p in (tmp_path / "q").iterdir()] == ["client_class_counts.png"]
    _valid_png(tmp_path / "q" / "client_class_counts.png")
    assert f"wrote {tmp_path / 'q' / 'client_class_counts.png'}" in capsys.readouterr().err


def test_inspect_plot_of_a_continual_scenario_adds_the_stream_timeline(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(SIBLURRY), "--plot", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["client_class_counts.png", "stream_timeline.png"]
    for name in names:
        _valid_png(tmp_path / name)
    assert "streams (per task" in capsys.readouterr().out  # the text report is printed as well


# --------------------------------------------------------------------------- fedlt compare


def _by_hand(runs: Path, metric: str) -> dict[str, dict[str, float]]:
    """Mean, std, CI and paired difference (vs lr=0.1) of ``metric`` over the two seeds."""
    value = {(lr, s): _summary(runs / f"lr{lr}-s{s}")["final"][metric] for lr in (0.1, 0.05) for s in (0, 1)}
    out = {}
    for lr in (0.1, 0.05):
        v0, v1 = value[(lr, 0)], value[(lr, 1)]
        mean, std = (v0 + v1) / 2, abs(v0 - v1) / math.sqrt(2)
        half = T975_DF1 * std / math.sqrt(2)
        d0, d1 = v0 - value[(0.1, 0)], v1 - value[(0.1, 1)]
        out[f"train.lr={lr}"] = {
            "mean": mean,
            "std": std,
            "ci_low": max(mean - half, 0.0),  # these metrics lie in [0, 1]: compare clips to it
            "ci_high": min(mean + half, 1.0),
            "diff_mean": (d0 + d1) / 2,
            "diff_std": abs(d0 - d1) / math.sqrt(2),
        }
    return out


def test_compare_json_equals_hand_computed_statistics(runs: Path, capsys) -> None:
    assert main(["compare", str(runs), "--format", "json", "--baseline", "train.lr=0.1"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["baseline"] == "train.lr=0.1"
    assert [g["label"] for g in table["groups"]] == ["train.lr=0.1", "train.lr=0.05"]
    assert all(sorted(g["seeds"]) == [0, 1] and len(g["runs"]) == 2 for g in table["groups"])
    assert table["metrics"][:3] == ["accuracy", "balanced_accuracy", "head_accuracy"]
    for metric in ("accuracy", "balanced_accuracy", "tail_accuracy", "auroc_macro"):
        hand = _by_hand(runs, metric)
        for row in (r for r in table["rows"] if r["metric"] == metric):
            want = hand[row["group"]]
            assert row["n"] == 2
            assert row["mean"] == want["mean"]
            for key in ("std", "ci_low", "ci_high"):
                assert row[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), (metric, key)
            if row["group"] == "train.lr=0.1":
                assert row["diff"] is None  # the baseline
            else:
                assert row["diff"]["n"] == 2 and row["diff"]["seeds"] == [0, 1]
                assert row["diff"]["mean"] == pytest.approx(want["diff_mean"], rel=1e-12, abs=1e-15)
                assert row["diff"]["std"] == pytest.approx(want["diff_std"], rel=1e-9, abs=1e-12)


def test_compare_csv_and_markdown_hold_the_same_numbers(runs: Path, tmp_path: Path, capsys) -> None:
    hand = _by_hand(runs, "accuracy")
    out = tmp_path / "table.csv"
    argv = ["compare", str(runs), "--baseline", "lr=0.1", "--metrics", "accuracy,tail_accuracy"]
    assert main([*argv, "--format", "csv", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""  # written to the file instead
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [(r["group"], r["metric"]) for r in rows] == [
        ("train.lr=0.1", "accuracy"),
        ("train.lr=0.05", "accuracy"),
        ("train.lr=0.1", "tail_accuracy"),
        ("train.lr=0.05", "tail_accuracy"),
    ]
    for row in rows[:2]:
        want = hand[row["group"]]
        assert int(row["n"]) == 2 and float(row["mean"]) == want["mean"]
        assert float(row["ci_high"]) == pytest.approx(want["ci_high"], rel=1e-9)
    assert rows[0]["diff_mean"] == "" and float(rows[1]["diff_mean"]) == pytest.approx(
        hand["train.lr=0.05"]["diff_mean"], rel=1e-12, abs=1e-15
    )

    assert main([*argv, "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert "| train.lr=0.1 (baseline) | 2 | 0, 1 |" in text
    section = text[text.index("### accuracy") : text.index("### tail_accuracy")]
    line = next(x for x in section.splitlines() if x.startswith("| train.lr=0.05 | 2 |"))
    assert f"| {hand['train.lr=0.05']['mean']:.4f} |" in line
    assert f"| {hand['train.lr=0.05']['diff_mean']:+.4f} |" in line
    assert "### accuracy" in text and "### tail_accuracy" in text and "### balanced" not in text


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--baseline", "lr=0.3"], "baseline 'lr=0.3' matches no group"),
        (["--baseline", "train.lr"], "matches several groups"),
    ],
)
def test_compare_with_a_bad_baseline_exits_2(runs: Path, capsys, argv: list[str], fragment: str) -> None:
    assert main(["compare", str(runs), *argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert fragment in err and "train.lr=0.05" in err  # the groups there are


def test_compare_of_a_folder_without_runs_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(tmp_path)]) == 2
    assert str(tmp_path) in " ".join(capsys.readouterr().err.split())


# --------------------------------------------------------------------------- loggers


def _csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_csv_equals_jsonl(run: Path) -> None:
    records, rows = read_metrics(run / "metrics.jsonl"), _csv_rows(run)
    assert len(rows) == len(records) >= 2
    columns = set(rows[0])
    for record, row in zip(records, rows, strict=True):
        scalars = _numeric_scalars(record)
        assert set(scalars) <= columns
        for key, cell in row.items():
            value = scalars.get(key)
            if value is None:
                assert cell == "", (key, cell)  # absent in this record, or undefined (null)
            elif isinstance(value, bool | str):
                assert cell == str(value), key
            else:
                assert float(cell) == value, (key, cell, value)  # written exactly (shortest repr)


def test_metrics_csv_rows_equal_metrics_jsonl(runs: Path) -> None:
    _assert_csv_equals_jsonl(runs / "lr0.1-s0")


def test_metrics_csv_of_a_continual_run_has_every_key_of_every_record(continual) -> None:
    run, _ = continual
    records = read_metrics(run / "metrics.jsonl")
    # Anytime-only records lack the offline metrics; the header is the union of all records' keys.
    assert any("accuracy" not in r for r in records) and any("accuracy" in r for r in records)
    _assert_csv_equals_jsonl(run)


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    fedlt.run(_scenario(federation__rounds=3), out=run, **{"log.tensorboard": True})
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = read_metrics(run / "metrics.jsonl")
    numbers = [
        {k: v for k, v in _numeric_scalars(r).items() if type(v) in (int, float) and k != "round"}
        for r in records
    ]
    assert set(events.Tags()["scalars"]) == set().union(*numbers)
    for tag in events.Tags()["scalars"]:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        # TensorBoard stores scalars as float32.
        want = [(r["round"], _float32(n[tag])) for r, n in zip(records, numbers, strict=True)]
        assert logged == want, tag


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _wandb_records(path: Path) -> list[Any]:
    """The records of a W&B offline run file (its LevelDB-style log: a 7-byte header, then 32 KiB
    blocks of chunks, each with a CRC, a length and a FULL/FIRST/MIDDLE/LAST type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_logged_history(tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    for var, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(var, value)
    run = tmp_path / "run"
    try:
        fedlt.run(_scenario(federation__rounds=3), out=run, **{"log.wandb": True})
    finally:
        wandb.teardown()
    [offline] = list((run / "wandb").glob("offline-run-*"))
    [log] = list(offline.glob("run-*.wandb"))
    history = {}
    for record in _wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            # An item names its key in `key` or, as wandb-core writes it, in `nested_key`.
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = items
    records = read_metrics(run / "metrics.jsonl")
    assert sorted(history) == [r["round"] for r in records] == [1, 2, 3]
    for record in records:
        numbers = {k: v for k, v in _numeric_scalars(record).items() if type(v) in (int, float)}
        logged = {k: v for k, v in history[record["round"]].items() if not k.startswith("_")}
        assert logged == numbers


SEEN: dict[str, list[Any]] = {"records": [], "rounds": [], "dirs": [], "summaries": []}


class Recorder(Plugin):
    """A user's logger: keeps what its two hooks receive."""

    @hookimpl
    def server_log_metrics(self, record, ctx):
        SEEN["records"].append(copy.deepcopy(dict(record)))
        SEEN["rounds"].append(ctx.round)
        SEEN["dirs"].append(ctx.run_dir)

    @hookimpl
    def server_end(self, summary, ctx):
        SEEN["summaries"].append(copy.deepcopy(dict(summary)))


def test_a_user_logger_plugin_receives_every_record_and_the_summary(tmp_path: Path, install_plugins) -> None:
    for seen in SEEN.values():
        seen.clear()
    install_plugins(recorder=Recorder)
    run = tmp_path / "run"
    summary = fedlt.run(_scenario(federation__rounds=3, plugins=[{"name": "recorder"}]), out=run)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert SEEN["records"] == records
    assert SEEN["rounds"] == [1, 2, 3] and SEEN["dirs"] == [run] * 3
    assert SEEN["summaries"] == [summary] == [_summary(run)]


# --------------------------------------------------------------------------- what a run prints


def test_progress_shows_clients_done_and_samples_per_second(tmp_path: Path, capsys, restore_threads) -> None:
    scenario = _toml(tmp_path)
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    # TINY selects half of its 4 clients per round; tqdm redraws its line on stderr. While a client
    # trains, the line may also name its step.
    step = r"(?: \(client \d+: step \d+/\d+\))?"
    assert re.search(rf"clients 1/2{step}, ~?[\d,]+ samples/s", err), err[-2000:]
    assert re.search(rf"clients 2/2{step}, ~?[\d,]+ samples/s", err)
    assert "2/2 [" in err and "loss=" in err  # the round bar itself, and its closing postfix


def test_quiet_run_prints_no_progress(tmp_path: Path, capsys, restore_threads) -> None:
    scenario = _toml(tmp_path)
    assert main(["run", str(scenario), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "samples/s" not in err and err.strip() == f"run folder: {tmp_path / 'run'}"


def test_a_continual_run_prints_its_anytime_metrics_at_the_end(continual) -> None:
    run, stdout = continual
    final = _summary(run)["final"]
    printed = dict(re.findall(r"^  (\w+) +(-?[\d.]+|-)$", stdout, re.M))
    for key in ("a_auc", "a_last", "a_avg", "f_last", "accuracy"):
        assert final[key] is not None, key
        assert printed[key] == f"{final[key]:.4f}", key
    assert stdout.startswith("siblurry-quick: 4 rounds in ")


def test_summary_records_provenance(runs: Path) -> None:
    summary = _summary(runs / "lr0.1-s0")
    p = summary["provenance"]
    assert p["fedlt"] == fedlt.__version__
    assert p["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", p["git_commit"])
    assert p["torch"] == torch.__version__ and p["python"] == platform.python_version()
    assert p["device"] == "cpu" and p["host"] == socket.gethostname()
    scenario = tomllib.loads((runs / "lr0.1-s0" / "scenario.toml").read_text())
    assert p["threads"] == scenario["engine"]["threads"] == 1
    started, ended = datetime.fromisoformat(p["started"]), datetime.fromisoformat(p["ended"])
    assert started <= ended <= started + timedelta(minutes=5)
    assert summary["wall_seconds"] <= (ended - started).total_seconds() + 1
    assert summary["seed"] == 0 and summary["engine"] == "serial" and summary["rounds_run"] == 2


def test_default_run_folder_is_named_after_scenario_and_plugins(tmp_path: Path, monkeypatch, capsys) -> None:
    scenario = _toml(tmp_path / "scenarios")
    monkeypatch.chdir(tmp_path)
    before = datetime.now().replace(microsecond=0)
    argv = ["run", str(scenario), "--quiet", "--set", "plugins.0.name=focal"]
    assert main([*argv, "--set", "plugins.1.name=balanced-softmax"]) == 0
    [folder] = list((tmp_path / "runs").iterdir())
    match = re.fullmatch(r"tiny-focal-balanced-softmax-(\d{8}-\d{6})", folder.name)
    assert match, folder.name
    stamp = datetime.strptime(match.group(1), "%Y%m%d-%H%M%S")
    assert before <= stamp <= datetime.now()
    assert f"run folder: {Path('runs') / folder.name}" in capsys.readouterr().err
    assert _summary(folder)["plugins"] == ["focal", "balanced-softmax"]
