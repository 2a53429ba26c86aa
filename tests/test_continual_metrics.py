"""Anytime metrics (A_auc, A_last, A_avg, F_last) on hand-worked histories, and the task-end schedule."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedlt.driver.schedule import EvalSchedule
from fedlt.driver.summary import continual_summary
from fedlt.metrics.continual import (
    AUTO_EVAL_POINTS,
    a_auc,
    a_avg,
    a_last,
    auto_eval_period,
    crossed,
    f_last,
    federation_task_ends,
    periodic_due,
    periodic_points,
)


def test_anytime_accuracies() -> None:
    history = [0.2, 0.5, 0.4, 0.6]
    assert a_auc(history) == pytest.approx(0.425)  # (0.2 + 0.5 + 0.4 + 0.6) / 4 = 1.7 / 4
    assert a_last(history) == pytest.approx(0.6)
    assert a_auc(np.array(history)) == pytest.approx(0.425)
    assert isinstance(a_auc(np.array(history)), float)


def test_end_of_task_average() -> None:
    assert a_avg([0.9, 0.6, 0.3]) == pytest.approx(0.6)
    assert a_avg([42.0]) == pytest.approx(42.0)


def test_empty_histories_give_none() -> None:
    assert a_auc([]) is None
    assert a_last([]) is None
    assert a_avg([]) is None


def test_forgetting_worked_by_hand() -> None:
    # Three task ends; columns are classes 0..3. None = not exposed yet.
    matrix = [
        [0.8, 0.6, None, None],  # end of task 0
        [0.5, 0.7, 0.0, None],  # end of task 1
        [0.4, 0.7, 0.3, 0.9],  # final
    ]
    # class 0: max(0.8, 0.5) - 0.4 = 0.4
    # class 1: max(0.6, 0.7) - 0.7 = 0.0
    # class 2: max(0.0) = 0, never learned before the end -> not in C'
    # class 3: no earlier value -> not in C'
    # F_last = (0.4 + 0.0) / 2 = 0.2
    assert f_last(matrix) == pytest.approx(0.2)


def test_forgetting_can_be_negative_when_classes_improve() -> None:
    # class 0: 0.5 - 0.9 = -0.4; class 1: 0.6 - 0.4 = 0.2 -> mean -0.1
    assert f_last([[0.5, 0.6], [0.9, 0.4]]) == pytest.approx(-0.1)


def test_forgetting_handles_nones_ragged_rows_and_nan() -> None:
    # Rows grow as classes are exposed; a missing column counts as None, NaN too.
    matrix = [
        [0.9],  # end of task 0: only class 0 exposed
        [0.6, float("nan"), 0.5],  # end of task 1
        [0.3, 0.2, None, 0.8],  # final: class 2 has no final value -> excluded
    ]
    # class 0: max(0.9, 0.6) - 0.3 = 0.6; class 1: no earlier value; class 2: no final; class 3: new
    assert f_last(matrix) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "matrix",
    [
        [],
        [[0.5, 0.4]],  # a single evaluation: nothing to forget from
        [[0.0, None], [0.0, 0.7]],  # nothing was learned before the final evaluation
        [[None, None], [0.5, 0.5]],
    ],
)
def test_forgetting_is_none_without_learned_classes(matrix: list) -> None:
    assert f_last(matrix) is None


def test_federation_task_ends_sum_the_clients_boundaries() -> None:
    # Client 0's tasks end at 10, 25, 40 samples of its stream; client 1's at 5, 5, 30.
    assert federation_task_ends([[10, 25, 40], [5, 5, 30]]) == [15, 30, 70]
    assert federation_task_ends([]) == []
    with pytest.raises(ValueError, match="same number of tasks"):
        federation_task_ends([[1, 2], [3]])


def test_crossed_task_ends_and_periodic_evaluations() -> None:
    ends = [15, 30, 70]
    assert crossed(0, 14, ends) == []
    assert crossed(0, 15, ends) == [0]  # reaching the boundary ends the task
    assert crossed(15, 70, ends) == [1, 2]  # one round can end several tasks
    assert crossed(70, 70, ends) == []  # a round that read nothing ends nothing
    assert periodic_due(0, 99, 100) is False
    assert periodic_due(99, 100, 100) is True
    assert periodic_due(350, 350, 100) is False
    assert periodic_points(0, 99, 100) == []
    assert periodic_points(99, 100, 100) == [100]  # reaching the multiple counts
    assert periodic_points(100, 350, 100) == [200, 300]  # every multiple passed, none skipped
    assert periodic_points(350, 350, 100) == []
    with pytest.raises(ValueError, match="period must be an int >= 1, got None"):
        periodic_points(0, 10, None)  # type: ignore[arg-type]


def test_auto_eval_period_gives_at_most_fifty_points_over_the_stream() -> None:
    assert AUTO_EVAL_POINTS == 50
    assert auto_eval_period(50_000) == 1000  # MVP / Si-Blurry's CIFAR-100 period
    assert auto_eval_period(515) == 11  # ceil(515 / 50): 46 points (11 ... 506)
    assert auto_eval_period(7) == 1 and auto_eval_period(0) == 1


def _schedule(period, task_ends, rounds=10, every=0) -> EvalSchedule:
    fed = SimpleNamespace(eval_every=every, rounds=rounds)
    s = SimpleNamespace(federation=fed, stream=SimpleNamespace(eval_period=period))
    return EvalSchedule(s, task_ends, streaming=True)


def test_a_round_that_passes_several_multiples_gives_a_point_for_each() -> None:
    # The siblurry_quick reads per round (new samples): 80, 80, 80, 55, 48, 48, 48, 37, 32, 7,
    # i.e. the federation's count after each round is 80, 160, 240, 295, 343, 391, 439, 476, 508, 515.
    after = np.cumsum([80, 80, 80, 55, 48, 48, 48, 37, 32, 7]).tolist()
    before = [0, *after[:-1]]
    sched = _schedule(50, [515])
    pairs = enumerate(zip(before, after, strict=True))
    points = [sched.due(r + 1, b, a, a == 515).points for r, (b, a) in pairs]
    # With P = 50 the 10 multiples 50..500 are each reached once, two of them in round 2.
    assert points == [[50], [100, 150], [200], [250], [300], [350], [400], [450], [500], []]
    # "auto" resolves from the federation's stream length (the last task end): ceil(515 / 50) = 11.
    assert _schedule("auto", [100, 515]).period == 11


def test_a_auc_on_a_hand_worked_stream() -> None:
    # P = 50; the federation reads 30, 90, 10, 70 samples in rounds 1-4 (counts 30, 120, 130, 200)
    # and its two tasks end at 30 and 200 samples. The model after each round scores 0.1, 0.4,
    # 0.5, 0.8 on the exposed classes.
    sched = _schedule(50, [30, 200], rounds=4)
    counts, accuracy = [0, 30, 120, 130, 200], [None, 0.1, 0.4, 0.5, 0.8]
    history = []
    for r in range(1, 5):
        due = sched.due(r, counts[r - 1], counts[r], exhausted=r == 4)
        if due is None:
            continue
        history.append(
            {
                "round": r,
                "anytime_accuracy": accuracy[r],
                "anytime_per_class_accuracy": [accuracy[r]],
                "samples_seen": due.samples_seen,
                "periodic": due.periodic,
                "eval_points": due.points,
                "task_end": due.task_end or None,
                "final": due.last,
            }
        )
    # Round 1 ends task 0 (no multiple of 50); round 2 reaches 50 and 100; round 3 nothing (not
    # evaluated); round 4 reaches 150 and 200, ends task 1 and is the last.
    assert [(h["round"], h["eval_points"], h["task_end"]) for h in history] == [
        (1, [], [0]),
        (2, [50, 100], None),
        (4, [150, 200], [1]),
    ]
    out = continual_summary(history)
    # A_auc = (0.4 + 0.4 + 0.8 + 0.8) / 4 = 0.6: each point weighs 50 samples (per round: 0.6333).
    assert out["a_auc"] == pytest.approx(0.6)
    assert out["anytime_history"] == [[50, 0.4], [100, 0.4], [150, 0.8], [200, 0.8]]
    assert out["a_avg"] == pytest.approx((0.1 + 0.8) / 2)  # the task ends, apart from the curve
    assert out["a_last"] == pytest.approx(0.8)


def test_idle_rounds_change_no_continual_metric(tmp_path) -> None:
    """Once every stream is exhausted the run stops: 10, 14 and 20 rounds give the same A_auc,
    A_avg and F_last (they were 0.3575 / 0.3474 / 0.3398 when idle rounds were evaluated)."""
    import fedlt

    got = []
    for rounds in (10, 14, 20):
        summary = fedlt.run(
            "scenarios/siblurry_quick.toml", out=tmp_path / str(rounds), federation__rounds=rounds
        )
        got.append({k: summary["final"][k] for k in ("a_auc", "a_avg", "f_last", "a_last")})
        records = fedlt.history(tmp_path / str(rounds))
        assert all(r["samples_seen"] > 0 for r in records if r.get("periodic"))
    assert got[0] == got[1] == got[2]
    assert summary["stopped_early"] is not None and summary["rounds_run"] <= 10


class _MemoryHook:
    """A stand-in for the dispatched ``eval_client_memory`` hook: fixed results per client."""

    def __init__(self, results: dict) -> None:
        self.results = results

    def __bool__(self) -> bool:
        return True

    def __call__(self, state: dict, num_classes: int) -> dict:
        return self.results[state["id"]]

    def error(self, plugin: str, message: str) -> ValueError:
        return ValueError(f"{plugin}: {message}")


def test_memory_class_counts_collects_every_clients_memory_by_plugin() -> None:
    from fedlt.driver.schedule import memory_class_counts

    hook = _MemoryHook({0: {"replay": {"class_counts": [2, 1, 0]}}, 3: {}})
    hooks = SimpleNamespace(eval_client_memory=hook)
    states = {3: {"id": 3}, 0: {"id": 0}}  # client 3 has no memory yet
    assert memory_class_counts(hooks, states, 3) == {"memory_class_counts": {"replay": {"0": [2, 1, 0]}}}
    assert memory_class_counts(SimpleNamespace(eval_client_memory=[]), states, 3) == {}
    hook.results[0] = {"replay": {"class_counts": [1, 1]}}
    with pytest.raises(ValueError, match="replay: returned class_counts of length 2; expected 3 counts >= 0"):
        memory_class_counts(hooks, states, 3)
