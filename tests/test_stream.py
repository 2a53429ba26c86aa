"""Si-Blurry / i-Blurry client streams: exact coverage, the N/M fractions, splits, degenerate clients."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlt.data.stream import STREAM_KINDS, ClientStream, Task, build_stream
from fedlt.errors import ScenarioError
from fedlt.seeding import numpy_rng

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


def build(idx, labels, kind="si-blurry", t=5, n=50.0, m=10.0, seed=0) -> ClientStream:
    return build_stream(idx, labels, kind, t, n, m, np.random.default_rng(seed))


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

    num_blurred = math.floor(blurry_sample_count(stream, labels) * m / 100)
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


def test_leaked_samples_are_the_first_in_dataset_order() -> None:
    # 10 balanced classes x 50; N=50 -> 5 blurry classes, one per i-blurry task (50 samples each);
    # M=10 -> num_blurred = 25, dealt 5 per task, and no task runs short, so task j gives up exactly
    # its 5 lowest-index blurry samples; those that left it are among them.
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(10), 50))
    idx = np.arange(len(labels), dtype=np.int64)
    stream = build(idx, labels, "i-blurry", 5, 50, 10, seed=3)
    assert [t.n_blurry for t in stream.tasks] == [5] * 5
    for task in stream.tasks:
        (bc,) = task.blurry_classes
        own = np.flatnonzero(labels == bc)
        left = np.setdiff1d(own, task.indices)
        assert set(left) <= set(own[:5])


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
    assert stream.describe() == [{"classes": [], "size": 0, "blurry": 0}] * 3


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
    ("kwargs", "key"),
    [
        ({"kind": "blurry"}, "stream.kind"),
        ({"kind": "none"}, "stream.kind"),
        ({"n_tasks": 0}, "stream.n_tasks"),
        ({"n_tasks": 2.0}, "stream.n_tasks"),
        ({"disjoint_percent": -1}, "stream.disjoint_percent"),
        ({"disjoint_percent": 100.5}, "stream.disjoint_percent"),
        ({"disjoint_percent": float("nan")}, "stream.disjoint_percent"),
        ({"blurry_percent": 101}, "stream.blurry_percent"),
        ({"blurry_percent": -0.1}, "stream.blurry_percent"),
    ],
)
def test_bad_arguments_name_their_key(kwargs: dict, key: str) -> None:
    labels = dataset_labels(0)
    args = {"kind": "si-blurry", "n_tasks": 5, "disjoint_percent": 50, "blurry_percent": 10} | kwargs
    with pytest.raises(ScenarioError) as info:
        build_stream(np.arange(10), labels, rng=np.random.default_rng(0), **args)
    assert info.value.key == key


def test_percent_floor_uses_the_written_decimal() -> None:
    # 1500 * 8.2 / 100 is 123 by hand, but in floats it is 122.99999999999999.
    assert math.floor(1500 * 8.2 / 100) == 122
    labels = np.repeat(np.arange(3), 500)
    stream = build_stream(np.arange(1500), labels, "i-blurry", 1, 0, 8.2, np.random.default_rng(0))
    assert stream.tasks[0].n_blurry == 123
