"""Anytime metrics (A_auc, A_last, A_avg, F_last) on hand-worked histories, and the task-end schedule."""

from __future__ import annotations

import numpy as np
import pytest

from fedlt.continual_metrics import a_auc, a_avg, a_last, f_last, task_end_rounds
from fedlt.errors import ScenarioError


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


def test_task_end_rounds() -> None:
    assert task_end_rounds(10, 3) == [4, 7, 10]  # ceil(10/3), ceil(20/3), ceil(30/3)
    assert task_end_rounds(5, 5) == [1, 2, 3, 4, 5]
    assert task_end_rounds(7, 1) == [7]
    assert task_end_rounds(100, 5) == [20, 40, 60, 80, 100]
    assert task_end_rounds(np.int64(10), 3) == [4, 7, 10]


def test_task_end_rounds_with_more_tasks_than_rounds_repeats_rounds() -> None:
    ends = task_end_rounds(2, 5)  # ceil(0.4), ceil(0.8), ceil(1.2), ceil(1.6), ceil(2.0)
    assert ends == [1, 1, 2, 2, 2]


@pytest.mark.parametrize(
    ("rounds", "tasks", "key"),
    [
        (0, 3, "federation.rounds"),
        (5, 0, "stream.n_tasks"),
        (5, 2.0, "stream.n_tasks"),
        (True, 1, "federation.rounds"),
    ],
)
def test_task_end_rounds_rejects_bad_counts(rounds, tasks, key: str) -> None:
    with pytest.raises(ScenarioError) as info:
        task_end_rounds(rounds, tasks)
    assert info.value.key == key
