"""fedlt.analysis.continual_plots: the anytime curve's points, per-client curves and the memory's
class make-up, read from hand-written records; and the figure ``fedlt plot`` draws from a run."""

from __future__ import annotations

import numpy as np
import pytest

import fedlt
from fedlt.analysis.continual_plots import (
    anytime_points,
    client_curves,
    continual_figure,
    memory_make_up,
    task_end_points,
)

pytest.importorskip("matplotlib")

HISTORY = [
    # Round 1 ends task 0, reaches no A_auc point; round 2 reaches 50 and 100; round 3 is a full
    # evaluation only (no anytime); round 4 reaches 150 and 200, ends task 1 and is the last.
    {
        "round": 1,
        "samples_seen": 30,
        "periodic": False,
        "eval_points": [],
        "task_end": [0],
        "anytime_accuracy": 0.1,
        "anytime_client_per_class": {"0": [0.5, None], "1": [None, None]},
        "memory_class_counts": {"replay": {"0": [2, 0], "1": [1, 1]}},
    },
    {
        "round": 2,
        "samples_seen": 120,
        "periodic": True,
        "eval_points": [50, 100],
        "task_end": None,
        "anytime_accuracy": 0.4,
        "anytime_client_per_class": {"0": [0.5, 0.25], "1": [1.0, None]},
        "memory_class_counts": {"replay": {"0": [2, 2], "1": [1, 3]}},
    },
    {"round": 3, "accuracy": 0.3},
    {
        "round": 4,
        "samples_seen": 200,
        "periodic": True,
        "eval_points": [150, 200],
        "task_end": [1],
        "final": True,
        "anytime_accuracy": 0.8,
    },
]


def test_points_task_ends_clients_and_memory_from_records() -> None:
    # Each A_auc point once, at k P, with the accuracy of the round that reached it.
    assert anytime_points(HISTORY) == [(50, 0.4), (100, 0.4), (150, 0.8), (200, 0.8)]
    # Task ends apart from the curve, at the samples read when they were evaluated.
    assert task_end_points(HISTORY) == [(30, 0.1, [0]), (200, 0.8, [1])]
    # Client 0: mean(0.5) = 0.5 at 30, mean(0.5, 0.25) = 0.375 at 120; client 1: nothing read at
    # 30 (no point), 1.0 at 120.
    assert client_curves(HISTORY) == {"0": [(30, 0.5), (120, 0.375)], "1": [(120, 1.0)]}
    # Memory summed over clients: [2+1, 0+1] at 30, [2+1, 2+3] at 120.
    xs, counts = memory_make_up(HISTORY)["replay"]
    assert xs == [30, 120]
    np.testing.assert_array_equal(counts, [[3, 1], [3, 5]])
    # Records from before eval_points: a periodic record counts once, at samples_seen.
    assert anytime_points([{"periodic": True, "samples_seen": 64, "anytime_accuracy": 0.5}]) == [(64, 0.5)]


class _FakeRun:
    def __init__(self, history, final) -> None:
        self.label, self.color, self.history, self._final = "run", "C0", history, final

    def final(self):
        return self._final


def test_figure_has_a_panel_per_recorded_kind_of_data() -> None:
    full = continual_figure([_FakeRun(HISTORY, {"client_f_last": {"0": 0.1, "1": None}})])
    # Curve, client curves, one memory panel, client forgetting.
    assert len(full.axes) == 4
    # No client_f_last in summary.json: curve, client curves and memory.
    assert len(continual_figure([_FakeRun(HISTORY, {})]).axes) == 3
    only_curve = [{k: v for k, v in HISTORY[1].items() if not k.startswith(("anytime_client", "memory"))}]
    assert len(continual_figure([_FakeRun(only_curve, {})]).axes) == 1
    assert continual_figure([_FakeRun([{"round": 1, "accuracy": 0.2}], {})]) is None


def test_fedlt_plot_draws_the_continual_panels_of_a_replay_run(tiny, tmp_path) -> None:
    tiny["stream"] = {"kind": "si-blurry", "n_tasks": 3, "samples_per_round": 48, "online_iter": 1}
    tiny["federation"].update(rounds=3, eval_every=3, fraction_clients=1.0)
    tiny["plugins"] = [{"name": "replay", "memory_size": 16, "policy": "evict-largest"}]
    fedlt.run(tiny, out=tmp_path / "run")
    from fedlt.analysis.plotting import build_figures

    figures, _ = build_figures([tmp_path / "run"])
    # The curve, each client's curve, the memory make-up and each client's forgetting.
    assert len(figures["anytime_accuracy"].axes) == 4
