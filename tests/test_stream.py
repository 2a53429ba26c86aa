"""Si-Blurry / i-Blurry client streams: exact coverage, the N/M fractions, splits, degenerate clients."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedlt.base.seeding import numpy_rng
from fedlt.data.stream import (
    STREAM_KINDS,
    ClientStream,
    Task,
    TaskSchedule,
    build_stream,
    check_task_count,
    shared_schedule,
)

NUM_CLASSES = 10


def dataset_labels(seed: int = 0) -> np.ndarray:
    """A long-tailed label array (300 ... 30 per class), shuffled like a real training set."""
    counts = np.linspace(300, 30, NUM_CLASSES).astype(int)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(NUM_CLASSES), counts))


def client_indices(
    labels: np.ndarray, classes: list[int], fraction: float = 0.5, seed: int = 0
) -> np.ndarray:
    """A client holding a random `fraction` of the samples of `classes`, sorted like a partition."""
    pool = np.flatnonzero(np.isin(labels, classes))
    keep = np.random.default_rng(seed).random(len(pool)) < fraction
    return np.sort(pool[keep]).astype(np.int64)


def build(
    idx: np.ndarray,
    labels: np.ndarray,
    kind: str = "si-blurry",
    t: int = 5,
    n: float = 50.0,
    m: float = 10.0,
    seed: int = 0,
    schedule: TaskSchedule | None = None,
) -> ClientStream:
    return build_stream(idx, labels, kind, t, n, m, np.random.default_rng(seed), schedule=schedule)


def assert_exact_cover(stream: ClientStream, idx: np.ndarray) -> None:
    everything = stream.indices
    assert everything.dtype == np.int64
    assert len(everything) == len(idx)
    np.testing.assert_array_equal(np.sort(everything), np.sort(idx))
    assert stream.boundaries == list(np.cumsum([len(t.indices) for t in stream.tasks]))
    assert (stream.boundaries[-1] if stream.boundaries else 0) == len(idx)


def blurry_sample_count(stream: ClientStream, labels: np.ndarray) -> int:
    blurry = [c for t in stream.tasks for c in t.blurry_classes]
    return int(np.isin(labels[stream.indices], blurry).sum())


def leavers(stream: ClientStream, labels: np.ndarray, j: int) -> np.ndarray:
    """Samples of task j's own blurry classes that ended up in another task."""
    own = stream.tasks[j].blurry_classes
    elsewhere = np.concatenate([t.indices for i, t in enumerate(stream.tasks) if i != j])
    return elsewhere[np.isin(labels[elsewhere], own)]


@pytest.mark.parametrize("kind", STREAM_KINDS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_tasks", [1, 3, 5])
@pytest.mark.parametrize(("n", "m"), [(50, 10), (0, 30), (100, 10), (30, 0), (70, 100)])
def test_every_index_appears_exactly_once(kind: str, seed: int, n_tasks: int, n: float, m: float) -> None:
    labels = dataset_labels(seed)
    idx = client_indices(labels, list(range(8)), seed=seed)
    stream = build(idx, labels, kind, n_tasks, n, m, seed)
    assert len(stream.tasks) == n_tasks
    assert_exact_cover(stream, idx)
    owned = [c for t in stream.tasks for c in t.classes]
    assert sorted(owned) == list(range(8)), "each present class is owned by exactly one task"


@pytest.mark.parametrize("kind", STREAM_KINDS)
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("n", "m"), [(50, 10), (30, 25), (75, 50), (0, 10), (10, 100)])
def test_disjoint_and_blurry_fractions_follow_the_formulas(kind: str, seed: int, n: float, m: float) -> None:
    labels = dataset_labels(seed)
    classes = list(range(NUM_CLASSES))[seed:]  # 10, 9, ... 6 classes
    idx = client_indices(labels, classes, seed=seed)
    stream = build(idx, labels, kind, 4, n, m, seed)

    blurry_classes = [c for t in stream.tasks for c in t.blurry_classes]
    n_disjoint = len(classes) - len(blurry_classes)
    assert n_disjoint == math.floor(len(classes) * n / 100)
    assert all(set(t.blurry_classes) <= set(t.classes) for t in stream.tasks)

    if kind == "si-blurry":  # M % of all blurry-class samples, cut into random shares
        num_blurred = math.floor(blurry_sample_count(stream, labels) * m / 100)
    else:  # M % of each task's own blurry-class samples, pooled
        owned = [int(np.isin(labels[idx], t.blurry_classes).sum()) for t in stream.tasks]
        num_blurred = sum(math.floor(o * m / 100) for o in owned)
    assert sum(t.n_blurry for t in stream.tasks) == num_blurred

    for task in stream.tasks:
        task_labels = labels[task.indices]
        disjoint = sorted(set(task.classes) - set(task.blurry_classes))
        # Disjoint classes never leak: all their client samples are in the owning task.
        for c in disjoint:
            assert (task_labels == c).sum() == (labels[idx] == c).sum()
        # Foreign samples in a task can only be blurry samples it received.
        foreign = ~np.isin(task_labels, task.classes)
        assert foreign.sum() <= task.n_blurry
        assert np.isin(task_labels[foreign], blurry_classes).all()


def test_short_tasks_are_made_up_by_others_so_totals_hold() -> None:
    # M=100 deals every blurry-class sample; with si-blurry's random cuts some task owning few or no
    # blurry classes is dealt more than it holds, so the shortfall comes from other tasks.
    labels = dataset_labels(0)
    idx = client_indices(labels, [0, 1, 2, 3, 4, 5], seed=0)
    saw_shortfall = False
    for seed in range(30):
        stream = build(idx, labels, "si-blurry", 5, 50, 100, seed)
        assert_exact_cover(stream, idx)
        total_blurry = blurry_sample_count(stream, labels)
        assert sum(t.n_blurry for t in stream.tasks) == total_blurry
        own_blurry = [int(np.isin(labels[idx], t.blurry_classes).sum()) for t in stream.tasks]
        saw_shortfall |= any(t.n_blurry > o for t, o in zip(stream.tasks, own_blurry, strict=True))
    assert saw_shortfall, "the scenario is meant to exercise the shortfall path"


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_splits_differ_between_clients(kind: str) -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    streams = [build_stream(idx, labels, kind, 5, 50, 10, numpy_rng(7, "stream", k)) for k in range(6)]
    class_sets = {tuple(t.classes for t in s.tasks) for s in streams}
    assert len(class_sets) == 6, "each client draws its own class order"
    if kind == "si-blurry":
        sizes = {tuple(len(t.classes) for t in s.tasks) for s in streams}
        assert len(sizes) > 1, "si-blurry tasks hold different numbers of classes per client"


def test_si_blurry_splits_are_random_and_may_leave_a_task_without_classes() -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    counts = [
        tuple(len(t.classes) for t in build(idx, labels, "si-blurry", 5, 50, 10, s).tasks) for s in range(40)
    ]
    assert any(0 in c for c in counts)
    assert any(max(c) - min(c) > 1 for c in counts)
    assert all(sum(c) == NUM_CLASSES for c in counts)


@pytest.mark.parametrize("n_classes", [1, 2, 3, 6, 7, 10])
@pytest.mark.parametrize("n_tasks", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(("n", "m"), [(50, 10), (30, 40), (100, 0), (0, 33)])
def test_i_blurry_splits_are_even(n_classes: int, n_tasks: int, n: float, m: float) -> None:
    labels = dataset_labels(1)
    idx = client_indices(labels, list(range(n_classes)), seed=1)
    stream = build(idx, labels, "i-blurry", n_tasks, n, m, seed=n_classes)
    assert_exact_cover(stream, idx)

    def spread(xs: list[int]) -> int:
        return max(xs) - min(xs)

    assert spread([len(t.classes) for t in stream.tasks]) <= 1
    assert spread([len(t.blurry_classes) for t in stream.tasks]) <= 1
    assert spread([len(t.classes) - len(t.blurry_classes) for t in stream.tasks]) <= 1
    assert spread([t.n_blurry for t in stream.tasks]) <= 1


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_same_rng_same_stream(kind: str) -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    a, b = build(idx, labels, kind, seed=5), build(idx, labels, kind, seed=5)
    c = build(idx, labels, kind, seed=6)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.describe() == b.describe()
    assert not np.array_equal(a.indices, c.indices)


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_fully_disjoint_has_no_blurry_classes_or_samples(kind: str) -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    stream = build(idx, labels, kind, 5, 100, 50)
    for task in stream.tasks:
        assert task.blurry_classes == ()
        assert task.n_blurry == 0
        assert set(labels[task.indices]) == set(task.classes)


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_no_blurry_samples_when_m_is_zero(kind: str) -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    stream = build(idx, labels, kind, 5, 20, 0)
    assert sum(len(t.blurry_classes) for t in stream.tasks) == 8
    for task in stream.tasks:
        assert task.n_blurry == 0
        assert set(labels[task.indices]) == set(task.classes)
        assert len(task.indices) == np.isin(labels[idx], task.classes).sum()


def test_tasks_are_shuffled_and_visited_in_order() -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    stream = build(idx, labels, "i-blurry", 2, 50, 10)
    ends = stream.boundaries
    starts = [0, *ends[:-1]]
    for task, lo, hi in zip(stream.tasks, starts, ends, strict=True):
        np.testing.assert_array_equal(stream.indices[lo:hi], task.indices)
        assert len(task.indices) > 50
        assert not np.all(np.diff(task.indices) > 0), "a task's samples arrive shuffled"


@pytest.mark.parametrize("kind", STREAM_KINDS)
@pytest.mark.parametrize("n_tasks", [1, 5])
def test_single_class_client(kind: str, n_tasks: int) -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, [4], seed=0)
    stream = build(idx, labels, kind, n_tasks, 50, 10)  # floor(1 * 0.5) = 0 disjoint -> blurry
    assert_exact_cover(stream, idx)
    assert [c for t in stream.tasks for c in t.blurry_classes] == [4]
    assert sum(t.n_blurry for t in stream.tasks) == math.floor(len(idx) * 10 / 100)


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_fewer_classes_than_tasks(kind: str) -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, [2, 7], seed=0)
    stream = build(idx, labels, kind, 5, 50, 20)
    assert_exact_cover(stream, idx)
    assert sum(1 for t in stream.tasks if t.classes) <= 2
    if kind == "i-blurry":  # one disjoint class first, one blurry class last
        assert [len(t.classes) for t in stream.tasks] == [1, 0, 0, 0, 1]


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_empty_client(kind: str) -> None:
    stream = build(np.empty(0, dtype=np.int64), dataset_labels(0), kind, 3, 50, 10)
    assert len(stream.tasks) == 3
    assert stream.indices.dtype == np.int64
    assert len(stream.indices) == 0
    assert stream.boundaries == [0, 0, 0]
    empty = {
        "size": 0,
        "classes": [],
        "disjoint_classes": [],
        "blurry_classes": [],
        "n_blurry": 0,
        "blurry": 0,
    }
    assert stream.describe() == [empty] * 3


def test_describe_reports_each_task() -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    stream = build(idx, labels)
    rows = stream.describe()
    assert [r["size"] for r in rows] == [len(t.indices) for t in stream.tasks]
    assert [r["blurry"] for r in rows] == [t.n_blurry for t in stream.tasks]
    assert [r["classes"] for r in rows] == [list(t.classes) for t in stream.tasks]
    assert all(isinstance(c, int) for r in rows for c in r["classes"])
    assert isinstance(stream.tasks[0], Task)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "blurry"}, "kind"),
        ({"kind": "none"}, "kind"),
        ({"n_tasks": 0}, "n_tasks"),
        ({"n_tasks": 2.0}, "n_tasks"),
        ({"n_tasks": True}, "n_tasks"),
        ({"disjoint_percent": -1}, "disjoint_percent"),
        ({"disjoint_percent": 100.5}, "disjoint_percent"),
        ({"disjoint_percent": float("nan")}, "disjoint_percent"),
        ({"blurry_percent": 101}, "blurry_percent"),
        ({"blurry_percent": -0.1}, "blurry_percent"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, name: str) -> None:
    labels = dataset_labels(0)
    args = {"kind": "si-blurry", "n_tasks": 5, "disjoint_percent": 50, "blurry_percent": 10} | kwargs
    with pytest.raises(ValueError, match=f"^{name} must be"):
        build_stream(np.arange(10), labels, rng=np.random.default_rng(0), **args)


def test_percent_floor_uses_the_written_decimal() -> None:
    # 1500 * 8.2 / 100 is 123 by hand, but in floats it is 122.99999999999999.
    assert math.floor(1500 * 8.2 / 100) == 122
    labels = np.repeat(np.arange(3), 500)
    stream = build_stream(np.arange(1500), labels, "i-blurry", 1, 0, 8.2, np.random.default_rng(0))
    assert stream.tasks[0].n_blurry == 123


# --------------------------------------------------------------------------- i-blurry: M % per task


def grouped_labels(sizes: list[int]) -> np.ndarray:
    """Labels sorted by class, as an image folder lists them: class 0's samples first, and so on."""
    return np.repeat(np.arange(len(sizes)), sizes)


def test_i_blurry_takes_m_percent_of_each_tasks_blurry_samples() -> None:
    # Blurry samples per task, by hand: 10 (class 0), 200 + 150 (classes 1, 2), 500 (class 3).
    # M = 30 -> each task gives floor(0.3 * own): 3, 105, 150 -> pool 258, dealt 86 to each task.
    # The old rule (258 dealt evenly, taken 86 per task) emptied task 0 of all 10 of its samples.
    labels = grouped_labels([10, 200, 150, 500])
    idx = np.arange(len(labels), dtype=np.int64)
    schedule = TaskSchedule("i-blurry", disjoint=((), (), ()), blurry=((0,), (1, 2), (3,)))
    takes = [3, 105, 150]
    for seed in range(20):
        stream = build(idx, labels, "i-blurry", 3, 0, 30, seed, schedule=schedule)
        assert_exact_cover(stream, idx)
        assert [t.n_blurry for t in stream.tasks] == [86, 86, 86]
        for j, take in enumerate(takes):
            # What left task j was taken from it; at most what it received came back home.
            gone = len(leavers(stream, labels, j))
            assert take - 86 <= gone <= take
        kept_small = int((labels[stream.tasks[0].indices] == 0).sum())
        assert kept_small >= 10 - 3


def test_i_blurry_pool_remainder_is_dealt_not_dropped() -> None:
    # Per-task takes floor(0.5 * 7) = 3 and floor(0.5 * 9) = 4: a pool of 7 over 2 tasks. The reference
    # deals floor(7 / 2) = 3 to each and drops one sample; here the first task receives the extra one.
    labels = grouped_labels([7, 9])
    idx = np.arange(16, dtype=np.int64)
    schedule = TaskSchedule("i-blurry", disjoint=((), ()), blurry=((0,), (1,)))
    stream = build(idx, labels, "i-blurry", 2, 0, 50, seed=0, schedule=schedule)
    assert_exact_cover(stream, idx)
    assert [t.n_blurry for t in stream.tasks] == [4, 3]


# --------------------------------------------------------------------------- which samples leak


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_leaked_samples_come_from_every_blurry_class_in_proportion(kind: str) -> None:
    # Class-grouped indices (an image folder): taking the lowest indices would draw every leaked
    # sample from the one or two first classes of each task. A uniform draw within the task makes
    # class c's share of the leavers size_c / (task's blurry samples), up to binomial noise.
    sizes = [60, 70, 80, 90, 100, 110, 120, 130, 140, 150]
    labels = grouped_labels(sizes)
    idx = np.arange(len(labels), dtype=np.int64)
    observed = np.zeros(len(sizes))
    expected = np.zeros(len(sizes))
    variance = np.zeros(len(sizes))
    for seed in range(20):
        stream = build(idx, labels, kind, 2, 0, 40, seed)  # N = 0: all ten classes blurry
        for j, task in enumerate(stream.tasks):
            gone = labels[leavers(stream, labels, j)]
            own = np.array(task.blurry_classes, dtype=np.int64)
            if not len(own):  # si-blurry may give a task no class
                continue
            share = np.array([sizes[c] for c in own], dtype=float)
            share /= share.sum()
            observed[own] += [(gone == c).sum() for c in own]
            expected[own] += len(gone) * share
            variance[own] += len(gone) * share * (1 - share)
    assert (observed > 0).all(), "every blurry class contributes leaked samples"
    assert (np.abs(observed - expected) <= 5 * np.sqrt(variance)).all(), (observed, expected)


def test_si_blurry_shortfall_is_not_taken_from_the_first_tasks() -> None:
    # Task 1 owns class 1, which this client lacks, so its share b_1 is always a shortfall. Tasks 0
    # and 2 hold 200 blurry samples each and their shares b_0, b_2 are exchangeable, so when the
    # shortfall is spread at random both lose the same on average; taken "in task order" it came
    # from task 0 alone (about 40 samples more of it picked, ~27 more leaving, per stream).
    labels = grouped_labels([200, 50, 200])
    idx = np.concatenate([np.arange(0, 200), np.arange(250, 450)]).astype(np.int64)
    schedule = TaskSchedule("si-blurry", disjoint=((), (), ()), blurry=((0,), (1,), (2,)))
    lost = []
    for seed in range(300):
        stream = build(idx, labels, "si-blurry", 3, 0, 30, seed, schedule=schedule)
        assert sum(t.n_blurry for t in stream.tasks) == 120  # floor(0.3 * 400)
        assert stream.tasks[1].classes == ()
        lost.append((len(leavers(stream, labels, 0)), len(leavers(stream, labels, 2))))
    diff = np.array([a - b for a, b in lost], dtype=float)
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)) + 0.5


# --------------------------------------------------------------------------- shared schedule


@pytest.mark.parametrize("kind", STREAM_KINDS)
@pytest.mark.parametrize(("n", "t"), [(50, 5), (30, 3), (100, 4), (0, 2)])
def test_shared_schedule_splits_all_classes_by_the_formulas(kind: str, n: float, t: int) -> None:
    schedule = shared_schedule(NUM_CLASSES, kind, t, n, np.random.default_rng(4))
    assert schedule.n_tasks == t
    owned = [c for j in range(t) for c in schedule.classes(j)]
    assert sorted(owned) == list(range(NUM_CLASSES))
    assert sum(len(d) for d in schedule.disjoint) == math.floor(NUM_CLASSES * n / 100)
    if kind == "i-blurry":
        assert max(map(len, schedule.disjoint)) - min(map(len, schedule.disjoint)) <= 1
        assert max(map(len, schedule.blurry)) - min(map(len, schedule.blurry)) <= 1
    json.dumps(schedule.describe())


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_shared_schedule_gives_every_client_the_same_class_order(kind: str) -> None:
    labels = dataset_labels(0)
    schedule = shared_schedule(NUM_CLASSES, kind, 5, 50, numpy_rng(7, "schedule"))
    subsets = [list(range(NUM_CLASSES))] * 3 + [[0, 3, 5, 8], [1, 2], [9]]
    clients = [client_indices(labels, cls, fraction=0.3, seed=k) for k, cls in enumerate(subsets)]
    streams = [
        build_stream(idx, labels, kind, 5, 50, 20, numpy_rng(7, "stream", k), schedule=schedule)
        for k, idx in enumerate(clients)
    ]
    for idx, cls, stream in zip(clients, subsets, streams, strict=True):
        assert_exact_cover(stream, idx)
        for j, task in enumerate(stream.tasks):
            # Task j holds exactly the client's classes among the schedule's task-j classes.
            assert set(task.classes) == set(schedule.classes(j)) & set(cls)
            assert set(task.blurry_classes) == set(schedule.blurry[j]) & set(cls)
            task_labels = labels[task.indices]
            for c in task.disjoint_classes:  # all of the client's samples of a disjoint class
                assert (task_labels == c).sum() == (labels[idx] == c).sum()
            foreign = ~np.isin(task_labels, schedule.classes(j))
            assert foreign.sum() <= task.n_blurry
            assert np.isin(task_labels[foreign], [c for b in schedule.blurry for c in b]).all()
    # Clients holding every class: the classes their tasks 0..j own are exactly the schedule's.
    for j in range(5):
        union = {c for s in streams[:3] for t in s.tasks[: j + 1] for c in t.classes}
        assert union == {c for i in range(j + 1) for c in schedule.classes(i)}
    # ... yet each client's samples, leakage and shuffles are its own.
    assert len({tuple(s.indices[:20]) for s in streams[:3]}) == 3


def test_per_client_streams_expose_classes_out_of_the_shared_order() -> None:
    # The reason for the option: without it, task 0 of six clients already covers most classes.
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    own = [build_stream(idx, labels, "i-blurry", 5, 50, 10, numpy_rng(7, "stream", k)) for k in range(6)]
    assert len({c for s in own for c in s.tasks[0].classes}) > 2
    schedule = shared_schedule(NUM_CLASSES, "i-blurry", 5, 50, numpy_rng(7, "schedule"))
    shared = [
        build_stream(idx, labels, "i-blurry", 5, 50, 10, numpy_rng(7, "stream", k), schedule=schedule)
        for k in range(6)
    ]
    assert {c for s in shared for c in s.tasks[0].classes} == set(schedule.classes(0))
    assert len(schedule.classes(0)) == 2


def test_schedule_mismatches_are_rejected() -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    schedule = shared_schedule(NUM_CLASSES, "si-blurry", 5, 50, np.random.default_rng(0))
    with pytest.raises(ValueError, match="schedule is 'si-blurry' with 5 tasks"):
        build(idx, labels, "i-blurry", 5, schedule=schedule)
    with pytest.raises(ValueError, match="with 5 tasks"):
        build(idx, labels, "si-blurry", 4, schedule=schedule)
    partial = TaskSchedule("si-blurry", disjoint=((0,), (1,)), blurry=((2,), ()))
    with pytest.raises(ValueError, match=r"classes \[3, 4"):
        build(idx, labels, "si-blurry", 2, schedule=partial)
    with pytest.raises(ValueError, match="only one task"):
        TaskSchedule("i-blurry", disjoint=((0,), (1,)), blurry=((1,), ()))
    with pytest.raises(ValueError, match="same number"):
        TaskSchedule("i-blurry", disjoint=((0,),), blurry=((1,), ()))
    with pytest.raises(ValueError, match="ints >= 0"):
        TaskSchedule("i-blurry", disjoint=((-1,),), blurry=((1,),))
    with pytest.raises(ValueError, match="kind must be"):
        TaskSchedule("blurry", disjoint=((0,),), blurry=((1,),))
    with pytest.raises(ValueError, match="num_classes must be"):
        shared_schedule(0, "si-blurry", 5, 50, np.random.default_rng(0))


# --------------------------------------------------------------------------- describe


def test_describe_with_labels_counts_each_tasks_classes() -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    stream = build(idx, labels, "si-blurry", 4, 40, 30, seed=2)
    rows = stream.describe(labels, NUM_CLASSES)
    for row, task in zip(rows, stream.tasks, strict=True):
        by_hand = [int((labels[task.indices] == c).sum()) for c in range(NUM_CLASSES)]
        assert row["class_counts"] == by_hand
        assert sum(row["class_counts"]) == row["size"] == len(task.indices)
        assert row["n_blurry"] == row["blurry"] == task.n_blurry
        assert sorted(row["disjoint_classes"] + row["blurry_classes"]) == row["classes"]
        assert row["blurry_classes"] == list(task.blurry_classes)
        assert "indices" not in row
    assert sum(len(r["disjoint_classes"]) for r in rows) == math.floor(NUM_CLASSES * 40 / 100)
    json.dumps(rows)
    with_idx = stream.describe(labels, NUM_CLASSES, with_indices=True)
    assert np.concatenate([r["indices"] for r in with_idx]).tolist() == stream.indices.tolist()
    assert stream.boundaries == list(np.cumsum([r["size"] for r in rows]))
    with pytest.raises(ValueError, match="both labels and num_classes"):
        stream.describe(labels)


def test_stream_indices_are_a_fresh_copy() -> None:
    labels = dataset_labels(0)
    idx = client_indices(labels, list(range(NUM_CLASSES)), seed=0)
    stream = build(idx, labels)
    first = stream.indices
    first[:] = -1
    assert (stream.indices >= 0).all()


# --------------------------------------------------------------------------- n_tasks guard


def test_more_tasks_than_samples_is_rejected() -> None:
    labels = dataset_labels(0)
    idx = np.flatnonzero(labels == 0)[:37]
    with pytest.raises(ValueError, match="a client with 37 samples cannot be split into 100000 tasks"):
        build(idx, labels, "si-blurry", 100_000)
    # T = n is allowed: with M = 100 the one (blurry) class's 37 samples are pooled, one per task.
    stream = build(idx, labels, "i-blurry", 37, 0, 100)
    assert [len(t.indices) for t in stream.tasks] == [1] * 37


def test_check_task_count_names_the_smallest_client_and_skips_empty_ones() -> None:
    check_task_count(5, [0, 5, 100])  # an empty client has an empty stream whatever T is
    check_task_count(1, [])
    with pytest.raises(
        ValueError, match=r"a client with 3 samples cannot be split into 5 tasks \(client 2\)"
    ):
        check_task_count(5, [40, 4, 3, 0, 9])


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_as_many_tasks_as_samples_builds_every_task(kind: str) -> None:
    # T = n = 20,000: a loop over tasks that scanned every sample would be 4e8 steps; this builds
    # in well under a second. Each of the 20 classes is one task's (N = 100); with 20,000 tasks and
    # 1,000 samples per class only 20 tasks are non-empty, each holding one whole class.
    labels = grouped_labels([1000] * 20)
    idx = np.arange(len(labels), dtype=np.int64)
    stream = build(idx, labels, kind, len(idx), 100, 10, seed=1)
    assert len(stream.tasks) == len(idx)
    assert_exact_cover(stream, idx)
    sizes = np.array([len(t.indices) for t in stream.tasks])
    assert sorted(sizes[sizes > 0].tolist()) == [1000] * 20
