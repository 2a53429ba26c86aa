"""Anytime metrics (A_auc, A_last, A_avg, F_last) on hand-worked histories, and the task-end schedule."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt.metrics.continual import (
    a_auc,
    a_avg,
    a_last,
    crossed,
    f_last,
    federation_task_ends,
    periodic_due,
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
    assert periodic_due(100, 350, 100) is True  # once, however many periods passed
    assert periodic_due(350, 350, 100) is False
    assert periodic_due(10, 11, None) is True and periodic_due(11, 11, None) is False


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
