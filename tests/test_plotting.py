"""fedlt.analysis.plotting: the figures hold exactly the numbers of the run folders they draw.

Run folders are written by hand here (known numbers) and by real tiny runs on digits. Figures are
checked through their artists (line data, scatter offsets, image arrays), not by pixels.

The example images in docs/images come from :func:`render_examples` (``python tests/test_plotting.py``).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w

from fedlt.analysis.plotting import (
    FIGURE_FILES,
    PlotFiles,
    build_figures,
    client_counts_figure,
    plot_client_class_counts,
    plot_runs,
    plot_stream_timeline,
    require_matplotlib,
    stream_timeline_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- hand-built run folders


def write_run(
    folder: Path,
    records: Sequence[dict[str, Any]],
    final: dict[str, Any] | None = None,
    scenario: dict[str, Any] | None = None,
    summary: bool = True,
) -> Path:
    """A run folder as fedlt writes it: metrics.jsonl, summary.json (final = last full record by
    default, plus ``final``) and optionally scenario.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if scenario is not None:
        (folder / "scenario.toml").write_text(tomli_w.dumps(scenario))
    if summary:
        full = [r for r in records if "accuracy" in r]
        last = dict(full[-1]) if full else {}
        last.pop("round", None)
        last.update(final or {})
        body = {"scenario": "hand", "rounds": len(records), "seed": 0, "plugins": [], "final": last}
        (folder / "summary.json").write_text(json.dumps(body))
    return folder


SHOT = {"rule": "count", "thresholds": [100.0, 20.0], "head": [0, 1], "medium": [2], "tail": [3]}


def record(round: int, acc: float, bacc: float, head: float, medium: float, tail: float | None) -> dict:
    return {
        "round": round,
        "train_loss": 1.0 / round,
        "accuracy": acc,
        "balanced_accuracy": bacc,
        "head_accuracy": head,
        "medium_accuracy": medium,
        "tail_accuracy": tail,
        "shot_rule": SHOT,
    }


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    """Two 3-round runs over 4 classes (counts 400, 150, 50, 10) with known numbers."""
    a = write_run(
        tmp_path / "fedavg",
        [
            record(1, 0.40, 0.30, 0.60, 0.20, 0.00),
            record(2, 0.50, 0.40, 0.70, 0.30, 0.05),
            record(3, 0.60, 0.45, 0.80, 0.35, 0.10),
        ],
        final={"per_class_accuracy": [0.9, 0.7, 0.35, 0.1], "train_class_counts": [400, 150, 50, 10]},
    )
    b = write_run(
        tmp_path / "balanced",
        [
            record(2, 0.35, 0.33, 0.50, 0.30, 0.20),
            record(4, 0.55, 0.52, 0.60, 0.45, None),
            record(6, 0.62, 0.60, 0.65, 0.55, 0.50),
        ],
        final={"per_class_accuracy": [0.7, None, 0.55, 0.5], "train_class_counts": [400, 150, 50, 10]},
    )
    return [a, b]


def _lines(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def _nan_equal(got: Sequence[float], want: Sequence[float | None]) -> bool:
    want = [math.nan if w is None else w for w in want]
    return np.allclose(np.asarray(got, float), np.asarray(want, float), equal_nan=True)


# --------------------------------------------------------------------------- matplotlib is optional


def test_importing_plotting_does_not_import_matplotlib() -> None:
    code = "import sys, fedlt.analysis.plotting, fedlt.analysis.compare; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_matplotlib_is_reported_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        require_matplotlib()
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_runs([tmp_path / "does-not-exist"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- run figures


def test_accuracy_figure_holds_each_runs_curves(two_runs: list[Path]) -> None:
    figures, _ = build_figures(two_runs)
    acc, bacc = figures["accuracy"].axes[:2]
    assert _lines(acc) == {
        "fedavg": ([1, 2, 3], [0.40, 0.50, 0.60]),
        "balanced": ([2, 4, 6], [0.35, 0.55, 0.62]),
    }
    assert _lines(bacc) == {
        "fedavg": ([1, 2, 3], [0.30, 0.40, 0.45]),
        "balanced": ([2, 4, 6], [0.33, 0.52, 0.60]),
    }
    legend = figures["accuracy"].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["fedavg", "balanced"]
    # One colour per run, the same in every figure.
    colors = {k: line.get_color() for line in acc.get_lines() for k in [line.get_label()]}
    shot_head = figures["shot_accuracy"].axes[0]
    assert {line.get_label(): line.get_color() for line in shot_head.get_lines()} == colors
    assert colors["fedavg"] != colors["balanced"]


def test_labels_replace_folder_names_and_must_match_runs(two_runs: list[Path]) -> None:
    figures, _ = build_figures(two_runs, labels=["FedAvg", "Balanced softmax"])
    assert set(_lines(figures["accuracy"].axes[0])) == {"FedAvg", "Balanced softmax"}
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        build_figures(two_runs, labels=["only one"])


def test_repeated_folder_names_get_their_parent(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / p / "seed0", [record(1, 0.5, 0.5, 0.5, 0.5, 0.5)]) for p in ("a", "b")]
    figures, _ = build_figures(runs)
    assert set(_lines(figures["accuracy"].axes[0])) == {"a/seed0", "b/seed0"}


def test_shot_figure_splits_head_medium_tail_and_leaves_gaps(two_runs: list[Path]) -> None:
    figures, _ = build_figures(two_runs)
    head, medium, tail = figures["shot_accuracy"].axes[:3]
    assert _lines(head)["fedavg"] == ([1, 2, 3], [0.60, 0.70, 0.80])
    assert _lines(medium)["balanced"] == ([2, 4, 6], [0.30, 0.45, 0.55])
    # The round-4 record has no tail accuracy: the line skips it.
    assert _lines(tail)["balanced"] == ([2, 6], [0.20, 0.50])
    assert "classes 0, 1" in head.get_title() and "class 3" in tail.get_title()
    assert "count rule" in figures["shot_accuracy"].get_suptitle()


def test_per_class_figure_plots_final_accuracy_against_count(two_runs: list[Path]) -> None:
    figures, _ = build_figures(two_runs)
    ax = figures["per_class_vs_count"].axes[0]
    assert ax.get_xscale() == "log"
    points = {c.get_label(): c.get_offsets() for c in ax.collections}
    # Sorted by count: classes 3, 2, 1, 0. balanced has no accuracy for class 1 (count 150).
    assert np.allclose(points["fedavg"], [[10, 0.1], [50, 0.35], [150, 0.7], [400, 0.9]])
    assert np.allclose(points["balanced"], [[10, 0.5], [50, 0.55], [400, 0.7]])
    # Shot-group boundaries between the groups' counts: sqrt(10 * 50) and sqrt(50 * 150).
    bounds = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":")
    assert np.allclose(bounds, [math.sqrt(500), math.sqrt(7500)])


def test_head_vs_tail_paths_start_and_end(two_runs: list[Path]) -> None:
    figures, _ = build_figures(two_runs)
    ax = figures["head_vs_tail"].axes[0]
    paths = _lines(ax)
    assert paths["fedavg"] == ([0.60, 0.70, 0.80], [0.00, 0.05, 0.10])
    assert paths["balanced"] == ([0.50, 0.65], [0.20, 0.50])  # round 4 has no tail accuracy
    starts = [(list(m.get_xdata()), list(m.get_ydata())) for m in ax.get_lines() if m.get_marker() == "s"]
    ends = [(list(m.get_xdata()), list(m.get_ydata())) for m in ax.get_lines() if m.get_marker() == "*"]
    assert starts == [([0.60], [0.00]), ([0.50], [0.20])]
    assert ends == [([0.80], [0.10]), ([0.65], [0.50])]
    assert ax.get_xlabel() == "head-class accuracy" and ax.get_ylabel() == "tail-class accuracy"


def test_missing_data_skips_figures_with_a_note(two_runs: list[Path], tmp_path: Path) -> None:
    files = plot_runs(two_runs, tmp_path / "png")
    assert isinstance(files, PlotFiles)
    assert [p.name for p in files] == [
        "accuracy.png",
        "shot_accuracy.png",
        "per_class_vs_count.png",
        "head_vs_tail.png",
    ]
    for p in files:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 150_000
    skipped = {n.split(".png")[0] for n in files.notes}
    clock = {"virtual_time_accuracy", "client_timeline", "staleness"}  # hand-written runs have no clock
    study = {"robust", "noise", "ood"}  # no [eval.attack], [noise] or [eval.ood]
    assert skipped == {"confusion_matrix", "anytime_accuracy", "task_class_accuracy", *clock, *study}
    assert any("no run recorded a confusion_matrix" in n for n in files.notes)


def test_png_size_follows_dpi(two_runs: list[Path], tmp_path: Path) -> None:
    from PIL import Image

    (path,) = [p for p in plot_runs(two_runs, tmp_path, dpi=50) if p.name == "accuracy.png"]
    with Image.open(path) as im:
        assert im.size == (500, 210)  # a 10 x 4.2 inch figure


def test_confusion_matrix_is_row_normalised_per_run(tmp_path: Path) -> None:
    cm = [[8, 2, 0], [3, 1, 0], [0, 0, 0]]  # class 2 absent from the test set
    last = {**record(2, 0.5, 0.5, 0.5, 0.5, 0.5), "confusion_matrix": cm}
    run = write_run(tmp_path / "r", [record(1, 0.4, 0.4, 0.4, 0.4, 0.4), last])
    figures, notes = build_figures([run])
    image = figures["confusion_matrix"].axes[0].images[0].get_array()
    want = np.array([[0.8, 0.2, 0.0], [0.75, 0.25, 0.0], [np.nan] * 3])
    assert np.allclose(np.asarray(image, float), want, equal_nan=True)
    texts = [t.get_text() for t in figures["confusion_matrix"].axes[0].texts]
    assert texts[:6] == ["8", "2", "0", "3", "1", "0"]
    assert not any(n.startswith("confusion_matrix") for n in notes)


def continual_records(samples: bool) -> list[dict[str, Any]]:
    """Six rounds, tasks ending at rounds 2, 4 and 6; full evaluations only at 3 and 6."""
    out = []
    anytime = [0.9, 0.6, 0.7, 0.5, 0.55, 0.6]
    for r in range(1, 7):
        rec: dict[str, Any] = {
            "round": r,
            "train_loss": 1.0,
            "periodic": True,
            "task_end": {2: 0, 4: 1, 6: 2}.get(r),
            "anytime_accuracy": anytime[r - 1],
            "exposed_classes": [0, 1],
        }
        if samples:
            rec["samples_seen"] = 100 * r
        if r in (3, 6):
            rec.update(record(r, 0.5, 0.5, 0.6, 0.4, 0.2))
        out.append(rec)
    return out


def test_anytime_figure_uses_samples_seen_and_marks_task_ends(tmp_path: Path) -> None:
    tca = [[0.9, None, None], [0.5, 0.8, None], [0.4, 0.6, 0.7]]
    run = write_run(tmp_path / "c", continual_records(samples=True), final={"task_class_accuracy": tca})
    figures, notes = build_figures([run])
    ax = figures["anytime_accuracy"].axes[0]
    assert _lines(ax)["c"] == ([100, 200, 300, 400, 500, 600], [0.9, 0.6, 0.7, 0.5, 0.55, 0.6])
    ends = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert ends == [200, 400, 600]
    assert ax.get_xlabel() == "training samples seen"
    heat = figures["task_class_accuracy"].axes[0].images[0].get_array()
    assert _nan_equal(np.asarray(heat.filled(np.nan)).ravel(), [v for row in tca for v in row])
    assert heat.mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]
    # Accuracy curves use only the full evaluations (rounds 3 and 6).
    assert _lines(figures["accuracy"].axes[0])["c"] == ([3, 6], [0.5, 0.5])
    clock = ("virtual_time", "client_timeline", "staleness")
    study = ("robust", "noise", "ood")  # no [eval.attack], [noise] or [eval.ood]
    assert not notes or all(any(w in n for w in ("confusion", "per_class", *clock, *study)) for n in notes)


def test_anytime_figure_falls_back_to_rounds(tmp_path: Path) -> None:
    with_samples = write_run(tmp_path / "a", continual_records(samples=True))
    without = write_run(tmp_path / "b", continual_records(samples=False))
    figures, _ = build_figures([with_samples, without])
    ax = figures["anytime_accuracy"].axes[0]
    assert ax.get_xlabel() == "round"  # one run lacks samples_seen: both on rounds
    assert _lines(ax)["a"][0] == [1, 2, 3, 4, 5, 6]


def test_run_in_progress_is_plotted_from_metrics(tmp_path: Path) -> None:
    run = write_run(tmp_path / "live", [record(1, 0.3, 0.2, 0.4, 0.2, 0.1)], summary=False)
    figures, _ = build_figures([run])
    assert _lines(figures["accuracy"].axes[0])["live"] == ([1], [0.3])
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        build_figures([tmp_path / "nothing-here"])


# --------------------------------------------------------------------------- data pictures


def test_client_class_counts_heatmap(tmp_path: Path) -> None:
    counts = np.array([[50, 0, 3], [0, 7, 1]])
    fig = client_counts_figure(counts, class_names=["cat", "dog", "eel"])
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.tolist() == [[50, None, 3], [None, 7, 1]]  # zero cells masked (drawn grey)
    assert [t.get_text() for t in ax.texts] == ["50", "3", "7", "1"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "eel"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0  (n=53)", "1  (n=8)"]
    assert type(ax.images[0].norm).__name__ == "LogNorm"  # 50 / 1 >= 20
    flat = client_counts_figure(np.array([[5, 6], [7, 8]]))
    assert type(flat.axes[0].images[0].norm).__name__ == "Normalize"
    out = plot_client_class_counts(counts, tmp_path / "counts.png")
    assert out == tmp_path / "counts.png" and out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="clients x classes"):
        client_counts_figure(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="2 class names for 3"):
        client_counts_figure(counts, class_names=["a", "b"])


def test_stream_timeline_draws_each_clients_labels_in_order(tmp_path: Path) -> None:
    labels = [[0, 0, 1, 2, 1], [2, 2, 0]]
    ends = [[2, 5], [1, 3]]
    fig = stream_timeline_figure(labels, task_ends=ends, num_classes=4)
    ax = fig.axes[0]
    grid = np.asarray(ax.images[0].get_array().filled(np.nan), float)
    assert _nan_equal(grid[0], [0, 0, 1, 2, 1])
    assert _nan_equal(grid[1], [2, 2, 0, None, None])
    # Inner task ends only (offset 2 of client 0, offset 1 of client 1), each on its own row.
    segments = [seg.tolist() for coll in ax.collections for seg in coll.get_segments()]
    assert segments == [[[2, -0.5], [2, 0.5]], [[1, 0.5], [1, 1.5]]]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1", "2", "3"]
    out = plot_stream_timeline(labels, tmp_path / "stream.png", task_ends=ends)
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        stream_timeline_figure(labels, num_classes=2)
    with pytest.raises(ValueError, match="task ends for 1 clients"):
        stream_timeline_figure(labels, task_ends=[[1]])


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny offline run and a tiny continual run on digits (a few seconds)."""
    from support.scenarios import TINY

    import fedlt

    root = tmp_path_factory.mktemp("real")
    offline = copy.deepcopy(TINY)
    fedlt.run(offline, out=root / "offline")
    stream = copy.deepcopy(TINY)
    stream["stream"] = {"kind": "si-blurry", "n_tasks": 3, "samples_per_round": 20}
    stream["federation"]["rounds"] = 6
    fedlt.run(stream, out=root / "continual")
    return {"offline": root / "offline", "continual": root / "continual"}


def test_real_runs_draw_every_figure_they_have_data_for(real_runs: dict[str, Path], tmp_path: Path) -> None:
    from fedlt.data.federated import build_federated_data
    from fedlt.scenario.config import load_scenario

    runs = [real_runs["offline"], real_runs["continual"]]
    files = plot_runs(runs, tmp_path)
    names = {p.stem for p in files}
    assert {"accuracy", "shot_accuracy", "per_class_vs_count", "head_vs_tail", "anytime_accuracy"} <= names
    assert names <= set(FIGURE_FILES)
    figures, _ = build_figures(runs)
    # Per-class counts are not in metrics.jsonl: they are rebuilt from scenario.toml.
    data = build_federated_data(load_scenario(real_runs["offline"] / "scenario.toml"))
    summary = json.loads((real_runs["offline"] / "summary.json").read_text())
    points = {c.get_label(): c.get_offsets() for c in figures["per_class_vs_count"].axes[0].collections}
    order = np.argsort(data.train_class_counts, kind="stable")
    acc = np.asarray(summary["final"]["per_class_accuracy"], float)
    assert np.allclose(points["offline"], np.c_[data.train_class_counts[order], acc[order]])
    records = [json.loads(x) for x in (real_runs["offline"] / "metrics.jsonl").read_text().splitlines()]
    xs, ys = _lines(figures["accuracy"].axes[0])["offline"]
    assert xs == [r["round"] for r in records] and ys == [r["accuracy"] for r in records]


def test_stream_labels_of_real_continual_data(real_runs: dict[str, Path], tmp_path: Path) -> None:
    from fedlt.analysis.plotting import stream_labels
    from fedlt.data.federated import build_federated_data
    from fedlt.scenario.config import load_scenario

    data = build_federated_data(load_scenario(real_runs["continual"] / "scenario.toml"))
    labels, ends = stream_labels(data)
    for k, stream in enumerate(data.streams):
        want = np.concatenate([data.y_train_np[t.indices] for t in stream.tasks])
        assert np.array_equal(labels[k], want)
        assert ends[k] == list(np.cumsum([len(t.indices) for t in stream.tasks]))
    assert plot_stream_timeline(labels, tmp_path / "s.png", ends, data.num_classes).is_file()
    assert plot_client_class_counts(data.client_counts, tmp_path / "c.png").is_file()


# --------------------------------------------------------------------------- synthetic long tail


def synthetic_runs(root: Path, continual: bool = False) -> list[Path]:
    """Three made-up runs on a 10-class long tail (IF 100): plain FedAvg, a focal-like remedy that
    helps a little, and a balanced-softmax-like one that trades head for tail accuracy. Every
    optional record is present (confusion matrix, samples seen, continual fields)."""
    rng = np.random.default_rng(0)
    c, rounds, test_per_class = 10, 40, 100
    counts = np.round(500 * 100.0 ** (-np.arange(c) / (c - 1))).astype(int)
    split = {
        "head": [i for i in range(c) if counts[i] > 100],
        "tail": [i for i in range(c) if counts[i] < 20],
    }
    split["medium"] = [i for i in range(c) if i not in split["head"] + split["tail"]]
    shot = {"rule": "count", "thresholds": [100.0, 20.0], **split}
    share = np.log(counts) / np.log(counts.max())
    finals = {
        "fedavg": 0.95 * share**2.2,
        "focal": 0.93 * share**1.6,
        "balanced-softmax": 0.85 * share**0.6 + 0.05,
    }
    paths = []
    for name, final in finals.items():
        records = []
        for r in range(1, rounds + 1):
            per = np.clip(final * (1 - np.exp(-r / 8)) + rng.normal(0, 0.015, c), 0, 1)
            rec: dict[str, Any] = {
                "round": r,
                "train_loss": float(2.3 * np.exp(-r / 10) + 0.2),
                "accuracy": float(per.mean()),
                "balanced_accuracy": float(per.mean()),
                "per_class_accuracy": per.tolist(),
                **{f"{g}_accuracy": float(per[ids].mean()) for g, ids in split.items()},
                "shot_rule": shot,
                "samples_seen": 640 * r,
            }
            if continual:
                task = (r - 1) // 8
                rec["anytime_accuracy"] = float(per.mean() * (0.75 + 0.25 * ((r - 1) % 8) / 7))
                rec["periodic"] = True
                rec["task_end"] = task if r % 8 == 0 else None
            records.append(rec)
        # Errors go to classes in proportion to their training counts: the head absorbs the tail.
        hits = np.round(records[-1]["per_class_accuracy"] * np.full(c, test_per_class)).astype(int)
        cm = np.zeros((c, c), dtype=int)
        for i in range(c):
            p = counts.astype(float).copy()
            p[i] = 0
            cm[i] = rng.multinomial(test_per_class - hits[i], p / p.sum())
            cm[i, i] = hits[i]
        records[-1]["confusion_matrix"] = cm.tolist()
        extra: dict[str, Any] = {"train_class_counts": counts.tolist()}
        if continual:
            tca = [[float(final[j] * (0.6 + 0.4 * (t == j // 2))) if j // 2 <= t else None for j in range(c)]
                   for t in range(5)]  # fmt: skip
            extra.update(task_class_accuracy=tca, a_auc=0.5, a_last=0.6, f_last=0.2)
        paths.append(write_run(root / name, records, final=extra))
    return paths


CLOCK_FIGURES = ("virtual_time_accuracy", "client_timeline", "staleness")
STUDY_FIGURES = ("robust", "noise", "ood")


def test_synthetic_long_tail_draws_all_figures(tmp_path: Path) -> None:
    offline = plot_runs(synthetic_runs(tmp_path / "lt"), tmp_path / "offline", dpi=40)
    assert [p.stem for p in offline] == [
        n
        for n in FIGURE_FILES
        if n not in ("anytime_accuracy", "task_class_accuracy", *CLOCK_FIGURES, *STUDY_FIGURES)
    ]
    continual = plot_runs(synthetic_runs(tmp_path / "cl", continual=True), tmp_path / "continual", dpi=40)
    assert [p.stem for p in continual] == [
        n for n in FIGURE_FILES if n not in (*CLOCK_FIGURES, *STUDY_FIGURES)
    ]
    assert {n.split(".png")[0] for n in continual.notes} == {*CLOCK_FIGURES, *STUDY_FIGURES}


def test_clock_figures_of_an_async_run_draw_what_its_files_say(tmp_path: Path) -> None:
    """Accuracy against virtual_time from metrics.jsonl; the staleness histogram and the client
    timeline from events.jsonl (counted here from the file); offline stretches from system.npz."""
    import json

    from support.scenarios import TINY

    import fedlt

    s = copy.deepcopy(TINY)
    s["federation"].update(mode="async", concurrency=3, rounds=12, eval_every=3)
    s["system"] = {"speed": "lognormal", "speed_sigma": 1.0, "dropout": 0.2, "availability": "periodic",
                   "availability_period": 2.0, "availability_online": 0.7}  # fmt: skip
    fedlt.run(s, out=tmp_path / "a")
    s["federation"] = {"rounds": 4, "eval_every": 1, "fraction_clients": 0.5}
    fedlt.run(s, out=tmp_path / "s")
    figures, _ = build_figures([tmp_path / "a", tmp_path / "s"])
    records = fedlt.history(tmp_path / "a")
    assert _lines(figures["virtual_time_accuracy"].axes[0])["a"] == (
        [r["virtual_time"] for r in records],
        [r["accuracy"] for r in records],
    )
    events = [json.loads(x) for x in (tmp_path / "a" / "events.jsonl").read_text().splitlines()]
    stale = [e["staleness"] for e in events if e["event"] == "arrive"]
    bars = figures["staleness"].axes[0].patches
    heights = [b.get_height() for b in bars[: max(stale) + 1]]  # the first run's bars come first
    assert heights == pytest.approx([stale.count(k) / len(stale) for k in range(max(stale) + 1)])
    timeline = figures["client_timeline"].axes[0]
    green = sum(len(c.get_paths()) for c in timeline.collections if c.get_facecolor()[0][1] > 0.4
                and c.get_facecolor()[0][0] < 0.3)  # fmt: skip
    end = max(e["t"] for e in events) * 0.25
    starts = {}
    shown = 0
    for e in events:
        if e["event"] == "start":
            starts[e["client"]] = e["t"]
        elif e["event"] == "arrive" and starts.get(e["client"], end) < end:
            shown += 1
    assert green == shown and (tmp_path / "a" / "system.npz").is_file()
    assert any(c.get_facecolor()[0][0] == pytest.approx(0.82) for c in timeline.collections)  # offline


# --------------------------------------------------------------------------- robust, noise, OOD figures

ROBUST_KEYS = ("accuracy", "head_accuracy", "medium_accuracy", "tail_accuracy", "accuracy_disparity")
STUDY_KEYS = ("noise_memorised", "noise_corrected", "ood_auroc", "ood_auprc", "ood_fpr_at_95_tpr")


def study_records(shift: float, rounds: Sequence[int] = (5, 10, 15)) -> list[dict[str, Any]]:
    """Records of a run with every family: clean and robust accuracy, noise and OOD metrics (each
    a distinct made-up number, so a swapped key shows; all in [0.1, 0.9] for ``shift`` up to 0.12, so
    no 95% band of two seeds 0.01 apart is clipped to [0, 1])."""
    out = []
    for k, r in enumerate(rounds):
        rec = record(r, 0.5 + 0.1 * k, 0.45 + 0.1 * k, 0.8, 0.5 + 0.05 * k, 0.1 * k)
        rec["accuracy_disparity"] = rec["head_accuracy"] - rec["tail_accuracy"]
        for j, key in enumerate(ROBUST_KEYS):
            rec[f"robust_{key}"] = round(0.2 + 0.03 * j + 0.02 * k + shift, 6)
        for j, key in enumerate(STUDY_KEYS):
            rec[key] = round(0.1 * (j + 1) + 0.01 * k + shift, 6)
        for j, group in enumerate(("head", "medium", "tail")):
            rec[f"ood_{group}_auroc"] = round(0.8 - 0.2 * j + 0.01 * k + shift, 6)
        rec.update(attack="pgd linf eps=0.3", ood_score="msp")
        out.append(rec)
    return out


@pytest.fixture
def study_runs(tmp_path: Path) -> list[Path]:
    """Two runs with robust, noise and OOD records (final per-class clean and robust accuracy,
    one class not in the test set), and one plain run without them."""
    finals = [
        {"per_class_accuracy": [0.9, 0.6, None, 0.2], "robust_per_class_accuracy": [0.5, 0.3, None, 0.0]},
        {"per_class_accuracy": [0.8, 0.7, 0.5, 0.4], "robust_per_class_accuracy": [0.6, 0.4, 0.2, 0.1]},
    ]
    runs = [
        write_run(tmp_path / name, study_records(shift), final=final)
        for name, shift, final in (("plain-at", 0.0, finals[0]), ("srat", 0.05, finals[1]))
    ]
    return [*runs, write_run(tmp_path / "clean-only", [record(5, 0.7, 0.6, 0.9, 0.6, 0.3)])]


def _by_title(fig: Any) -> dict[str, Any]:
    return {ax.get_title(): ax for ax in fig.axes}


def _bars(ax: Any) -> dict[str, list[float]]:
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def test_robust_noise_ood_figures_hold_the_records(study_runs: list[Path]) -> None:
    figures, notes = build_figures(study_runs)
    assert {"robust", "noise", "ood"} <= set(figures)
    assert not any(n.startswith(("robust", "noise", "ood")) for n in notes)
    recs = {p.name: _records(p) for p in study_runs[:2]}
    panels = _by_title(figures["robust"])
    titles = ["Accuracy", "Head accuracy", "Medium accuracy", "Tail accuracy", "Disparity (head - tail)"]
    for title, key in zip(titles, ROBUST_KEYS, strict=True):
        want = {}
        for name, rs in recs.items():
            want[f"{name} (clean)"] = ([r["round"] for r in rs], [r[key] for r in rs])
            want[f"{name} (robust)"] = ([r["round"] for r in rs], [r[f"robust_{key}"] for r in rs])
        assert _lines(panels[title]) == want  # the run without robust metrics is left out
        assert {ln.get_linestyle() for ln in panels[title].get_lines() if "robust" in ln.get_label()} == {
            "--"
        }
    summaries = {p.name: json.loads((p / "summary.json").read_text())["final"] for p in study_runs[:2]}
    bars = _bars(next(ax for t, ax in panels.items() if t.startswith("Per-class accuracy")))
    assert set(bars) == {f"{n} ({kind})" for n in recs for kind in ("clean", "robust")}
    for name, final in summaries.items():
        assert _nan_equal(bars[f"{name} (clean)"], final["per_class_accuracy"])
        assert _nan_equal(bars[f"{name} (robust)"], final["robust_per_class_accuracy"])
    assert "attack: pgd linf eps=0.3" in figures["robust"].get_suptitle()

    noise = _by_title(figures["noise"])
    ood = _by_title(figures["ood"])
    for ax, key in (
        (noise["Memorised: predicted as their noisy label"], "noise_memorised"),
        (noise["Corrected: predicted as their clean label"], "noise_corrected"),
        (ood["OOD AUROC"], "ood_auroc"),
        (ood["OOD AUPRC (in-distribution positive)"], "ood_auprc"),
        (ood["FPR at 95% TPR (lower is better)"], "ood_fpr_at_95_tpr"),
    ):
        assert _lines(ax) == {n: ([r["round"] for r in rs], [r[key] for r in rs]) for n, rs in recs.items()}
    groups = _lines(ood["AUROC of each shot group's samples vs OOD"])
    for name, rs in recs.items():
        for group in ("head", "medium", "tail"):
            assert groups[f"{name} ({group})"][1] == [r[f"ood_{group}_auroc"] for r in rs]
    assert "score: msp" in figures["ood"].get_suptitle()


def test_study_figures_are_skipped_with_a_note_without_their_metrics(study_runs: list[Path]) -> None:
    figures, notes = build_figures(study_runs[2:])
    assert not {"robust", "noise", "ood"} & set(figures)
    assert (
        "robust.png skipped: no run has robust_accuracy in metrics.jsonl (a scenario without [eval.attack])"
        in notes
    )
    assert (
        "noise.png skipped: no run has noise_memorised in metrics.jsonl (a scenario without [noise])" in notes
    )
    assert "ood.png skipped: no run has ood_auroc in metrics.jsonl (a scenario without [eval.ood])" in notes
    # Without the per-group OOD records, the OOD figure has its three panels only.
    per_group = ("ood_head", "ood_medium", "ood_tail")
    rs = [{k: v for k, v in r.items() if not k.startswith(per_group)} for r in _records(study_runs[0])]
    figures, _ = build_figures([write_run(study_runs[0].parent / "no-groups", rs)])
    assert len(figures["ood"].axes) == 3
    assert len(_by_title(figures["robust"])) == 5  # no final per-class values in summary: no bar panel


@pytest.fixture
def study_sweep(tmp_path: Path) -> Path:
    """A hand-written sweep: two groups (lr 0.1, 0.05) of two seeds with the study records."""
    root = tmp_path / "sweep"
    for g, lr in enumerate((0.1, 0.05)):
        for seed in (0, 1):
            shift = 0.1 * g + 0.01 * seed
            per_class = [0.9 - shift, None if seed else 0.5, 0.3 + shift]
            final = {"per_class_accuracy": per_class, "robust_per_class_accuracy": [0.4, 0.2 + shift, None]}
            scenario = {"name": "hand", "seed": seed, "train": {"lr": lr}}
            write_run(root / f"lr{lr}-s{seed}", study_records(shift), final=final, scenario=scenario)
    return root


def test_group_study_figures_draw_mean_band_and_seed_mean_per_class(study_sweep: Path) -> None:
    from fedlt.analysis.plotting import build_group_figures

    figures, notes, groups = build_group_figures([study_sweep])
    assert {"robust", "noise", "ood"} <= set(figures)
    labels = [g.label for g in groups]
    assert sorted(labels) == ["train.lr=0.05", "train.lr=0.1"]
    t1 = 12.706205  # t(0.975, 1): two seeds per group
    for label in labels:
        lr = label.removeprefix("train.lr=")
        seeds = [_records(study_sweep / f"lr{lr}-s{seed}") for seed in (0, 1)]
        rounds = [r["round"] for r in seeds[0]]
        for fig, title, key in (
            (figures["robust"], "Accuracy", "robust_accuracy"),
            (figures["noise"], "Memorised: predicted as their noisy label", "noise_memorised"),
            (figures["ood"], "FPR at 95% TPR (lower is better)", "ood_fpr_at_95_tpr"),
        ):
            ax = _by_title(fig)[title]
            suffix = " (robust)" if key.startswith("robust") else ""
            (line,) = [ln for ln in ax.get_lines() if ln.get_label() == label + suffix]
            pairs = [(a[key], b[key]) for a, b in zip(*seeds, strict=True)]
            assert list(line.get_xdata()) == rounds
            assert np.allclose(line.get_ydata(), [(a + b) / 2 for a, b in pairs])
            color = line.get_color()[:3]
            (band,) = [
                c
                for c in ax.collections
                if np.allclose(c.get_facecolor()[0][:3], color) and c.get_alpha() == (0.15 if suffix else 0.2)
            ]
            vertices = band.get_paths()[0].vertices
            for x, (a, b) in zip(rounds, pairs, strict=True):
                half = t1 * abs(a - b) / 2
                at_x = vertices[np.isclose(vertices[:, 0], x)][:, 1]
                assert np.isclose(at_x.min(), (a + b) / 2 - half) and np.isclose(
                    at_x.max(), (a + b) / 2 + half
                )
        finals = [
            json.loads((study_sweep / f"lr{lr}-s{s}" / "summary.json").read_text())["final"] for s in (0, 1)
        ]
        bars = _bars(next(ax for ax in figures["robust"].axes if ax.get_title().startswith("Per-class")))
        for key, kind in (("per_class_accuracy", "clean"), ("robust_per_class_accuracy", "robust")):
            want = []
            for a, b in zip(finals[0][key], finals[1][key], strict=True):
                values = [v for v in (a, b) if v is not None]
                want.append(sum(values) / len(values) if values else None)
            assert _nan_equal(bars[f"{label} ({kind})"], want)
    assert "Mean over 2 runs per group" in figures["noise"].get_suptitle()
    assert not any(n.startswith(("robust", "noise", "ood")) for n in notes)


def test_long_group_labels_get_fewer_legend_columns_and_stay_in_the_figure(tmp_path: Path) -> None:
    from fedlt.analysis.plotting import build_group_figures
    from fedlt.analysis.robust_plots import legend_columns

    # 10 inches hold floor(10 / (0.075 * chars + 0.7)) columns: 1 of 100 characters, 4 of 10.
    assert legend_columns(10.0, ["x" * 100] * 3, 3) == 1
    assert legend_columns(10.0, ["x" * 10] * 5, 4) == 4
    assert legend_columns(10.0, ["x" * 10] * 2, 4) == 2
    for g in range(4):
        name = f"{g}-" + "srat(eps=0.3,lam=1.0,norm=linf)," * 3  # as long as a plugin group's label
        scenario = {"name": "hand", "seed": 0, "model": {"name": name}}
        write_run(tmp_path / f"g{g}", study_records(0.02 * g), scenario=scenario)
    figures, _, groups = build_group_figures([tmp_path])
    assert len(groups) == 4 and all(len(gr.label) > 90 for gr in groups)
    for name in ("accuracy", "robust", "noise", "ood"):
        fig = figures[name]
        fig.canvas.draw()
        box = fig.legends[0].get_window_extent()
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, name  # not cut off at the figure's edges


def test_real_run_with_attack_noise_and_ood_draws_the_three_figures(tmp_path: Path) -> None:
    """The keys the evaluator writes are the keys the figures read."""
    from support.scenarios import TINY

    import fedlt

    s = copy.deepcopy(TINY)
    s["noise"] = {"kind": "symmetric", "rate": 0.4}
    s["eval"]["attack"] = {"kind": "fgsm", "norm": "linf", "eps": 0.3}
    s["eval"]["ood"] = {"kind": "held-out-classes", "classes": [8, 9]}
    fedlt.run(s, out=tmp_path / "run")
    files = plot_runs([tmp_path / "run"], tmp_path / "png", dpi=40)
    assert {"robust", "noise", "ood"} <= {p.stem for p in files}
    figures, _ = build_figures([tmp_path / "run"])
    rs = _records(tmp_path / "run")
    checks = [
        (figures["robust"], "Accuracy", "run (robust)", "robust_accuracy"),
        (figures["robust"], "Tail accuracy", "run (robust)", "robust_tail_accuracy"),
        (figures["noise"], "Corrected: predicted as their clean label", "run", "noise_corrected"),
        (figures["ood"], "OOD AUROC", "run", "ood_auroc"),
    ]
    for fig, title, label, key in checks:
        xs, ys = _lines(_by_title(fig)[title])[label]
        assert xs == [r["round"] for r in rs] and _nan_equal(ys, [r[key] for r in rs])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]
    bars = _bars(next(ax for ax in figures["robust"].axes if ax.get_title().startswith("Per-class")))
    assert _nan_equal(bars["run (robust)"], summary["robust_per_class_accuracy"])


def render_examples(out: Path, real_root: Path) -> list[Path]:
    """The example images of docs/images: synthetic long-tail runs, and tiny real runs on digits."""
    from support.scenarios import TINY

    import fedlt
    from fedlt.analysis.plotting import stream_labels
    from fedlt.data.federated import build_federated_data
    from fedlt.scenario.config import load_scenario

    written = []
    for p in plot_runs(synthetic_runs(real_root / "synthetic", continual=True), real_root / "png"):
        written.append(Path(shutil.move(p, out / f"synthetic-{p.name}")))
    runs = []
    for lr in (0.1, 0.03):
        s = copy.deepcopy(TINY)
        s["train"]["lr"] = lr
        s["federation"]["rounds"] = 10
        fedlt.run(s, out=real_root / f"tiny-lr{lr}")
        runs.append(real_root / f"tiny-lr{lr}")
    for p in plot_runs(runs, real_root / "png-tiny"):
        if p.stem in ("accuracy", "per_class_vs_count"):
            written.append(Path(shutil.move(p, out / f"tiny-{p.name}")))
    s = copy.deepcopy(TINY)
    s["stream"] = {"kind": "si-blurry", "n_tasks": 3, "samples_per_round": 20}
    s["partition"]["n_clients"] = 6
    s["federation"]["rounds"] = 12
    fedlt.run(s, out=real_root / "tiny-stream")
    for p in plot_runs([real_root / "tiny-stream"], real_root / "png-stream"):
        if p.stem == "anytime_accuracy":
            written.append(Path(shutil.move(p, out / f"tiny-{p.name}")))
    data = build_federated_data(load_scenario(s))
    written.append(plot_client_class_counts(data.client_counts, out / "tiny-client_class_counts.png"))
    labels, ends = stream_labels(data)
    written.append(plot_stream_timeline(labels, out / "tiny-stream_timeline.png", ends, data.num_classes))
    return written


if __name__ == "__main__":  # python tests/test_plotting.py [OUT]: regenerate docs/images
    import tempfile

    target = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parents[1] / "docs" / "images")
    target.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        for path in render_examples(target, Path(tmp)):
            print(path, path.stat().st_size)


# --------------------------------------------------------------------------- groups of runs (a sweep)


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sweep of the tiny digits scenario: learning rates 0.1 and 0.05, seeds 0 and 1, 2 rounds."""
    from support.scenarios import TINY

    import fedlt
    from fedlt.analysis.sweep import Sweep
    from fedlt.scenario.config import scenario_to_toml

    root = tmp_path_factory.mktemp("plot-sweep")
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=2, eval_every=1)
    s["engine"] = {"threads": 1}
    scenario = root / "tiny.toml"
    scenario.write_text(scenario_to_toml(fedlt.load_scenario(s)))
    sweep = Sweep(scenario, root / "sweep", {"train.lr": [0.1, 0.05]}, [0, 1])
    assert not any(line.startswith("failed") for line in sweep.run_local())
    return root / "sweep"


def _records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_groups_are_compares_and_draw_mean_and_band(sweep_folder: Path) -> None:
    from fedlt.analysis.compare import collect_runs, compare
    from fedlt.analysis.plotting import build_group_figures

    figures, notes, groups = build_group_figures([sweep_folder])
    labels = ["train.lr=0.05", "train.lr=0.1"]  # in folder order
    assert (
        [g.label for g in groups] == labels == [g.label for g in compare(collect_runs(sweep_folder)).groups]
    )
    assert set(figures) == {"accuracy", "shot_accuracy"}
    assert any(n.startswith("anytime_accuracy skipped") for n in notes)
    fig = figures["accuracy"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == labels
    t1 = 12.706205  # t(0.975, 1): two seeds per group
    for ax, key in zip(fig.axes, ("accuracy", "balanced_accuracy"), strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == sorted(labels)  # one line per group
        bands = ax.collections
        assert len(bands) == 2  # one band per group
        for label, band in zip(labels, bands, strict=True):
            lr = label.removeprefix("train.lr=")
            runs = [sweep_folder / f"lr={lr}-seed{seed}" for seed in (0, 1)]
            per_round = list(zip(*([r[key] for r in _records(run)] for run in runs), strict=True))
            rounds = [r["round"] for r in _records(runs[0])]
            xs, ys = lines[label].get_data()
            assert list(xs) == rounds == [1, 2]
            assert np.allclose(ys, [(a + b) / 2 for a, b in per_round])
            vertices = band.get_paths()[0].vertices
            for x, (a, b) in zip(rounds, per_round, strict=True):
                half = t1 * abs(a - b) / 2  # t * std / sqrt(2), std = |a - b| / sqrt(2)
                lo, hi = max((a + b) / 2 - half, 0.0), min((a + b) / 2 + half, 1.0)
                at_x = vertices[np.isclose(vertices[:, 0], x)][:, 1]
                assert np.isclose(at_x.min(), lo) and np.isclose(at_x.max(), hi)


@pytest.mark.parametrize(("fmt", "signature"), [("pdf", b"%PDF"), ("svg", b"<svg"), ("png", PNG_MAGIC)])
def test_group_plots_in_each_format(sweep_folder: Path, tmp_path: Path, fmt: str, signature: bytes) -> None:
    from fedlt.analysis.plotting import plot_groups

    files = plot_groups([sweep_folder], tmp_path, fmt=fmt, dpi=50)
    assert sorted(p.name for p in files) == [f"accuracy.{fmt}", f"shot_accuracy.{fmt}"]
    for path in files:
        head = path.read_bytes()[:400]
        assert (signature in head) if fmt == "svg" else head.startswith(signature)
    if fmt == "png":
        from PIL import Image

        with Image.open(tmp_path / "accuracy.png") as im:
            assert im.size == (500, 210)  # a 10 x 4.2 inch figure at 50 dpi
            assert tuple(round(d) for d in im.info["dpi"]) == (50, 50)


def test_plot_runs_writes_the_format_asked(two_runs: list[Path], tmp_path: Path) -> None:
    files = plot_runs(two_runs, tmp_path, fmt="svg")
    assert files and all(p.suffix == ".svg" and b"<svg" in p.read_bytes()[:400] for p in files)
    with pytest.raises(ValueError, match="format 'jpg' is not one of png, pdf, svg"):
        plot_runs(two_runs, tmp_path, fmt="jpg")
    with pytest.raises(ValueError, match="dpi must be an integer >= 1, got 0"):
        plot_runs(two_runs, tmp_path, dpi=0)


def test_cli_plot_of_a_sweep_folder_groups_it(sweep_folder: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from fedlt.cli import main

    out = tmp_path / "figs"
    assert main(["plot", str(sweep_folder), "--out", str(out), "--format", "png", "--dpi", "40"]) == 0
    with Image.open(out / "accuracy.png") as im:
        assert im.size == (400, 168)
    assert f"wrote {out / 'accuracy.png'}" in capsys.readouterr().out
    # Run folders named one by one are overlaid unless --group asks for groups.
    runs = sorted(str(p) for p in sweep_folder.iterdir())
    assert main(["plot", *runs, "--group", "--format", "pdf", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "accuracy.pdf").read_bytes().startswith(b"%PDF")
    assert main(["plot", str(sweep_folder), "--labels", "a,b", "--out", str(tmp_path / "x")]) == 2
    assert "groups are labelled by the settings" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(sweep_folder), "--dpi", "0"])
    assert exc.value.code == 2 and "'0' is not an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
