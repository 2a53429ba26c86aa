"""Per-client Si-Blurry / i-Blurry task streams (Moon et al. 2023, ``OnlineSampler``).

A client's data arrives as ``T`` tasks visited in order. A share ``N`` % of the classes are
*disjoint* (they appear in exactly one task); the rest are *blurry* classes, and ``M`` % of the
blurry-class samples are pulled out of their own task, shuffled and dealt across all tasks, so task
boundaries are blurred.

Which task owns which class is a :class:`TaskSchedule`. By default every client draws its own from
its own classes (each client gets its own class order and task boundaries). With a schedule from
:func:`shared_schedule`, every client follows one class-to-task assignment for the whole federation
(federated class-incremental learning): a client's task ``j`` holds its samples of the classes the
schedule gives task ``j``, and classes the client lacks are simply absent. Either way the blurry
leakage, the samples and the shuffles are the client's own.

- ``si-blurry`` (stochastic): classes are cut into ``T`` chunks at random cut points, so tasks
  differ in how many classes and samples they hold (a task may get none); ``num_blurred = floor(M %
  of all blurry-class samples)`` is cut into ``T`` random chunks ``b_j``, task ``j`` gives ``b_j`` of
  its blurry-class samples to the pool and receives ``b_j`` from it.
- ``i-blurry``: as-even-as-possible class chunks (sizes differ by at most 1); task ``j`` gives
  ``floor(M % of its own blurry-class samples)``, as the reference's non-stochastic branch does,
  and the pool is dealt back in as-even-as-possible shares.

Deviations from the reference, made because a client holds few classes and few samples, and so
that every index appears exactly once:

- The reference floors ``disjoint_num`` and ``blurry_num`` to multiples of ``T``, which with a
  handful of classes per client would silently drop classes from the stream. Here no class is
  dropped: ``disjoint_num = floor(|C| N / 100)`` and every other class is blurry; si-blurry cuts
  at random points anyway and i-blurry spreads the remainder (the extra disjoint classes go to the
  first tasks and the extra blurry classes to the last ones, so per-task class counts still
  differ by at most 1).
- Random cut points are drawn from ``[0, n]`` inclusive (the reference's ``randint(0, n)`` never
  cuts at ``n``).
- The samples a task gives up are a uniformly random subset of its blurry-class samples. The
  reference takes the *first* ones in dataset order, which on a class-sorted dataset (an image
  folder) means one or two of the task's blurry classes supply every leaked sample.
- i-blurry: the reference deals ``floor(P / T)`` pooled samples to each task and drops the other
  ``P mod T`` from the stream; here the first ``P mod T`` tasks receive one more, so none is lost.
- si-blurry: when a task holds fewer blurry-class samples than its share ``b_j``, it gives up all
  it has and the shortfall is drawn uniformly at random from the blurry-class samples the other
  tasks still hold (so each gives in proportion to what it can spare, and no task is favoured by
  its position). The pool therefore always holds exactly ``num_blurred`` samples and task ``j``
  still *receives* exactly ``b_j`` of them, so the blurry fraction is exact (the reference deals a
  shorter pool and the last tasks receive less).
- ``T`` may not exceed a non-empty client's number of samples (:func:`check_task_count`): such a
  stream would be mostly empty tasks, and a mistyped ``T`` would only show as a slow build.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = [
    "PACINGS",
    "SCHEDULES",
    "STREAM_KINDS",
    "ClientStream",
    "ProportionalPacing",
    "Task",
    "TaskSchedule",
    "build_stream",
    "check_task_count",
    "shared_schedule",
]

STREAM_KINDS: tuple[str, ...] = ("si-blurry", "i-blurry")
#: Who draws the class-to-task assignment: each client its own, or one for the whole federation.
SCHEDULES: tuple[str, ...] = ("per-client", "shared")
#: How fast each client reads its stream: ``samples_per_round`` for everyone, or in proportion to
#: its tasks so that every client ends each task in the same round (:class:`ProportionalPacing`).
PACINGS: tuple[str, ...] = ("constant", "proportional")


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a client's stream.

    Attributes
    ----------
    indices : np.ndarray
        int64 dataset indices, in the order the stream visits them.
    classes : tuple[int, ...]
        The classes this task owns (its disjoint and blurry classes) that the client holds, sorted.
        Blurry samples it received may belong to other tasks' classes.
    n_blurry : int
        How many of its samples were dealt in from the blurry pool.
    blurry_classes : tuple[int, ...]
        The subset of ``classes`` that are blurry (the rest are disjoint: all their samples are
        in this task), sorted; kept so the split can be inspected and checked.
    """

    indices: np.ndarray
    classes: tuple[int, ...]
    n_blurry: int
    blurry_classes: tuple[int, ...] = ()

    @property
    def disjoint_classes(self) -> tuple[int, ...]:
        """The classes this task owns that are disjoint (every one of their samples is here)."""
        blurry = set(self.blurry_classes)
        return tuple(c for c in self.classes if c not in blurry)


@dataclass(frozen=True, eq=False)
class ClientStream:
    """A client's tasks, visited in order 0..T-1."""

    tasks: tuple[Task, ...]
    # The concatenation, built once: the runner slices the stream every round, and concatenating
    # thousands of task arrays each time would cost more than the slice.
    _all: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parts = [np.asarray(t.indices, dtype=np.int64) for t in self.tasks]
        whole = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        object.__setattr__(self, "_all", whole.astype(np.int64, copy=False))

    @property
    def indices(self) -> np.ndarray:
        """The whole stream in visit order (task indices concatenated); a fresh, writable copy."""
        return self._all.copy()

    @property
    def boundaries(self) -> list[int]:
        """Cumulative end offset of each task in :attr:`indices` (the last equals its length)."""
        return [int(x) for x in np.cumsum([len(t.indices) for t in self.tasks])]

    def describe(
        self, labels: np.ndarray | None = None, num_classes: int | None = None, with_indices: bool = False
    ) -> list[dict[str, Any]]:
        """One JSON-friendly dict per task, for ``fedlt inspect --json``.

        Every row has ``size``, ``classes`` (owned), ``disjoint_classes``, ``blurry_classes``,
        ``n_blurry`` (samples dealt in from the pool) and ``blurry`` (the same count, the key the
        text output and older JSON readers use). With ``labels`` (the full label array) and
        ``num_classes`` it adds ``class_counts``, the task's samples per class (length
        ``num_classes``), which shows what a task really contains once blurry samples moved;
        ``with_indices`` adds the sample indices in visit order (large, so only when asked).
        """
        if (labels is None) != (num_classes is None):
            raise ValueError("describe needs both labels and num_classes, or neither")
        rows = []
        for t in self.tasks:
            row: dict[str, Any] = {
                "size": len(t.indices),
                "classes": list(t.classes),
                "disjoint_classes": list(t.disjoint_classes),
                "blurry_classes": list(t.blurry_classes),
                "n_blurry": int(t.n_blurry),
                "blurry": int(t.n_blurry),
            }
            if labels is not None and num_classes is not None:
                task_labels = np.asarray(labels)[t.indices].astype(np.int64)
                row["class_counts"] = np.bincount(task_labels, minlength=num_classes).tolist()
            if with_indices:
                row["indices"] = [int(i) for i in t.indices]
            rows.append(row)
        return rows


@dataclass(frozen=True, eq=False)
class TaskSchedule:
    """Which task owns each class, and whether the class is disjoint or blurry.

    A client following a schedule puts its samples of ``disjoint[j]`` and ``blurry[j]`` into task
    ``j``; classes the client lacks are simply absent from its stream.

    Attributes
    ----------
    kind : str
        ``"si-blurry"`` or ``"i-blurry"``: how the classes were split, and how a client following
        the schedule deals its blurry samples.
    disjoint : tuple[tuple[int, ...], ...]
        Per task, the disjoint classes it owns, sorted.
    blurry : tuple[tuple[int, ...], ...]
        Per task, the blurry classes it owns, sorted.
    """

    kind: str
    disjoint: tuple[tuple[int, ...], ...]
    blurry: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if self.kind not in STREAM_KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, STREAM_KINDS))}, got {self.kind!r}")
        if len(self.disjoint) != len(self.blurry) or not self.disjoint:
            raise ValueError(
                "a schedule needs the same number (>= 1) of disjoint and blurry class lists, got "
                f"{len(self.disjoint)} and {len(self.blurry)}"
            )
        owned = [c for chunk in (*self.disjoint, *self.blurry) for c in chunk]
        if any(isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 0 for c in owned):
            raise ValueError("schedule classes must be ints >= 0")
        if len(set(owned)) != len(owned):
            raise ValueError("a class may be owned by only one task, as disjoint or as blurry")

    @property
    def n_tasks(self) -> int:
        """Number of tasks ``T``."""
        return len(self.disjoint)

    def classes(self, task: int) -> tuple[int, ...]:
        """All classes task ``task`` owns (disjoint and blurry), sorted."""
        return tuple(sorted((*self.disjoint[task], *self.blurry[task])))

    def describe(self) -> dict[str, Any]:
        """JSON-friendly form for ``fedlt inspect --json``: the kind and, per task, its classes."""
        return {
            "kind": self.kind,
            "n_tasks": self.n_tasks,
            "tasks": [
                {"disjoint_classes": list(d), "blurry_classes": list(b)}
                for d, b in zip(self.disjoint, self.blurry, strict=True)
            ],
        }

    def _lookup(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Arrays of length ``size``: owning task of each class (-1 if none), and its blurry flag."""
        owned = [c for chunk in (*self.disjoint, *self.blurry) for c in chunk]
        size = max(size, max(owned, default=-1) + 1)
        task_of = np.full(size, -1, dtype=np.int64)
        is_blurry = np.zeros(size, dtype=bool)
        for lists, blurry in ((self.disjoint, False), (self.blurry, True)):
            lengths = np.fromiter((len(c) for c in lists), dtype=np.int64, count=len(lists))
            members = np.fromiter(
                (c for chunk in lists for c in chunk), dtype=np.int64, count=int(lengths.sum())
            )
            task_of[members] = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
            is_blurry[members] = blurry
        return task_of, is_blurry


def _percent_of(count: int, percent: float) -> int:
    """``floor(count * percent / 100)`` computed exactly on the decimal the user wrote.

    Float arithmetic can land just below an integer (e.g. ``1000 * 10.1 / 100``); going through the
    shortest decimal repr keeps the floor at the value a reader would compute by hand.
    """
    return math.floor(count * Fraction(repr(float(percent))) / 100)


def _percent_of_each(counts: np.ndarray, percent: float) -> np.ndarray:
    """:func:`_percent_of` for every entry, exactly (Python ints: the fraction may not fit int64)."""
    frac = Fraction(repr(float(percent))) / 100
    num, den = frac.numerator, frac.denominator
    return np.array([int(c) * num // den for c in counts], dtype=np.int64)


def _random_chunks(n: int, n_tasks: int, rng: np.random.Generator) -> np.ndarray:
    """Sizes of ``n_tasks`` contiguous chunks of ``n`` items, cut at ``n_tasks - 1`` random points."""
    cuts = np.sort(rng.integers(0, n + 1, size=n_tasks - 1))
    return np.diff(np.concatenate([[0], cuts, [n]])).astype(np.int64)


def _even_chunks(n: int, n_tasks: int, extras_last: bool = False) -> np.ndarray:
    """Sizes of ``n_tasks`` chunks of ``n`` items differing by at most 1 (extras first or last)."""
    q, r = divmod(n, n_tasks)
    sizes = np.full(n_tasks, q, dtype=np.int64)
    if extras_last:
        sizes[n_tasks - r :] += 1
    else:
        sizes[:r] += 1
    return sizes


def _check(kind: str, n_tasks: int, disjoint_percent: float, blurry_percent: float) -> None:
    """Range checks, so a direct caller gets a clear message (the scenario boundary checks first)."""
    if kind not in STREAM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, STREAM_KINDS))}, got {kind!r}")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int | np.integer) or n_tasks < 1:
        raise ValueError(f"n_tasks must be an int >= 1, got {n_tasks!r}")
    for name, value in (("disjoint_percent", disjoint_percent), ("blurry_percent", blurry_percent)):
        ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        if not (ok and 0 <= value <= 100):
            raise ValueError(f"{name} must be a number in [0, 100], got {value!r}")


def check_task_count(n_tasks: int, client_sizes: Iterable[int]) -> None:
    """Raise ``ValueError`` if some non-empty client holds fewer samples than ``n_tasks``.

    Cheap (one pass over the sizes), so the scenario boundary can call it with the partition's
    client sizes before any stream or tensor is built. Empty clients pass: a partition may leave a
    client without data (``partition.min_client_size = 0``), and its stream is ``T`` empty tasks
    whatever ``T`` is.

    Parameters
    ----------
    n_tasks : int
        Tasks ``T`` per stream.
    client_sizes : Iterable[int]
        Number of samples of each client, in client order.
    """
    sizes = np.fromiter((int(s) for s in client_sizes), dtype=np.int64)
    small = np.flatnonzero((sizes > 0) & (sizes < n_tasks))
    if len(small):
        k = int(small[np.argmin(sizes[small])])
        which = f" (client {k})" if len(sizes) > 1 else ""
        raise ValueError(
            f"a client with {sizes[k]} samples cannot be split into {n_tasks} tasks{which}; "
            f"n_tasks must be at most {sizes[k]}, the smallest non-empty client's sample count"
        )


def _draw_schedule(
    classes: np.ndarray, kind: str, n_tasks: int, disjoint_percent: float, rng: np.random.Generator
) -> TaskSchedule:
    """Steps 1-3 of the reference: class order, disjoint/blurry split, the classes of each task."""
    class_order = rng.permutation(np.asarray(classes, dtype=np.int64))
    disjoint_num = _percent_of(len(class_order), disjoint_percent)
    disjoint, blurry = class_order[:disjoint_num], class_order[disjoint_num:]
    if kind == "si-blurry":
        d_sizes = _random_chunks(len(disjoint), n_tasks, rng)
        b_sizes = _random_chunks(len(blurry), n_tasks, rng)
    else:
        d_sizes = _even_chunks(len(disjoint), n_tasks)
        b_sizes = _even_chunks(len(blurry), n_tasks, extras_last=True)

    def chunks(values: np.ndarray, sizes: np.ndarray) -> tuple[tuple[int, ...], ...]:
        parts = np.split(values, np.cumsum(sizes)[:-1])
        return tuple(tuple(sorted(int(c) for c in p)) for p in parts)

    return TaskSchedule(kind=kind, disjoint=chunks(disjoint, d_sizes), blurry=chunks(blurry, b_sizes))


def shared_schedule(
    num_classes: int, kind: str, n_tasks: int, disjoint_percent: float, rng: np.random.Generator
) -> TaskSchedule:
    """One class-to-task assignment for the whole federation (federated class-incremental learning).

    Classes ``0 .. num_classes-1`` are split by the same rule a client uses on its own classes
    (steps 1-3 of the module docstring). Pass the result to :func:`build_stream` for every client,
    so task ``j`` owns the same classes everywhere: a *disjoint* class appears nowhere before its
    task, while a *blurry* class's leaked samples may be dealt to earlier tasks (that is what
    blurry means), and with ``si-blurry`` a task may own no class at all (it then holds only
    leaked samples, or none). Each client still leaks and shuffles its own samples.
    """
    _check(kind, n_tasks, disjoint_percent, 0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return _draw_schedule(np.arange(int(num_classes)), kind, int(n_tasks), disjoint_percent, rng)


def build_stream(
    indices: np.ndarray,
    labels: np.ndarray,
    kind: str,
    n_tasks: int,
    disjoint_percent: float,
    blurry_percent: float,
    rng: np.random.Generator,
    schedule: TaskSchedule | None = None,
) -> ClientStream:
    """Split one client's indices into a Si-Blurry (or i-Blurry) stream of ``n_tasks`` tasks.

    Runs in O(n log n + T + C) array operations (n samples, T tasks, C classes): no loop visits
    every sample once per task, so a large ``T`` stays fast.

    Parameters
    ----------
    indices : np.ndarray
        The client's dataset indices (1-D ints). Their order does not matter: the stream depends
        only on the set of indices and ``rng``.
    labels : np.ndarray
        The full label array; ``labels[indices]`` are the client's labels.
    kind : str
        ``"si-blurry"`` (random splits) or ``"i-blurry"`` (even splits).
    n_tasks : int
        Number of tasks ``T``, from 1 to the client's number of samples (any ``T`` for an empty
        client).
    disjoint_percent : float
        ``N`` in [0, 100]: share of the client's classes that are disjoint. Not used with a
        ``schedule``, which already says which classes are disjoint.
    blurry_percent : float
        ``M`` in [0, 100]: share of blurry-class samples dealt across tasks.
    rng : np.random.Generator
        Source of every draw (class order and cut points without a schedule, the leaked samples,
        the pool shuffle, per-task shuffles).
    schedule : TaskSchedule, optional
        A class-to-task assignment to follow (e.g. one :func:`shared_schedule` for every client).
        Without one, the client draws its own from the classes it holds.

    Returns
    -------
    ClientStream
        Every client index appears exactly once.

    Raises
    ------
    ValueError
        An argument out of range, ``n_tasks`` above the client's number of samples, a schedule
        whose kind or task count differs from ``kind``/``n_tasks``, or a client class the schedule
        gives to no task.
    """
    _check(kind, n_tasks, disjoint_percent, blurry_percent)
    n_tasks = int(n_tasks)
    indices = np.sort(np.asarray(indices, dtype=np.int64).ravel())
    check_task_count(n_tasks, [len(indices)])
    own_labels = np.asarray(labels)[indices].astype(np.int64)
    present = np.unique(own_labels)

    # 1-3. The classes each task owns: the client's own draw, or the shared schedule.
    if schedule is None:
        schedule = _draw_schedule(present, kind, n_tasks, disjoint_percent, rng)
    elif schedule.kind != kind or schedule.n_tasks != n_tasks:
        raise ValueError(
            f"the schedule is {schedule.kind!r} with {schedule.n_tasks} tasks, "
            f"but the stream asks for {kind!r} with {n_tasks}"
        )
    task_of, is_blurry = schedule._lookup(int(present[-1]) + 1 if len(present) else 0)
    unowned = present[task_of[present] < 0]
    if len(unowned):
        raise ValueError(f"the schedule gives classes {unowned.tolist()} to no task")

    # 4. Every sample goes to the task that owns its class.
    sample_task = task_of[own_labels]

    # 5. Pull blurry-class samples out of their tasks, pool, shuffle, deal back.
    blurry_pos = np.flatnonzero(is_blurry[own_labels])
    available = np.bincount(sample_task[blurry_pos], minlength=n_tasks)
    if kind == "si-blurry":
        num_blurred = _percent_of(int(available.sum()), blurry_percent)
        deal = _random_chunks(num_blurred, n_tasks, rng)
        take = np.minimum(deal, available)
    else:
        take = _percent_of_each(available, blurry_percent)
        num_blurred = int(take.sum())
        deal = _even_chunks(num_blurred, n_tasks)
    # A uniformly random take_j of task j's blurry samples: random keys, grouped by task.
    grouped = blurry_pos[np.lexsort((rng.random(len(blurry_pos)), sample_task[blurry_pos]))]
    starts = np.cumsum(available) - available
    rank = np.arange(len(grouped)) - np.repeat(starts, available)
    chosen = rank < np.repeat(take, available)
    picked = grouped[chosen]
    shortfall = num_blurred - len(picked)
    if shortfall:  # si-blurry only: at random among the blurry samples the tasks still hold
        rest = grouped[~chosen]
        picked = np.concatenate([picked, rest[rng.choice(len(rest), size=shortfall, replace=False)]])
    pool = rng.permutation(np.sort(picked))
    final_task = sample_task.copy()
    final_task[pool] = np.repeat(np.arange(n_tasks, dtype=np.int64), deal)

    # 6. Each task: its remaining own samples plus what it received, shuffled; tasks in order.
    order = np.lexsort((rng.random(len(indices)), final_task))
    parts = np.split(indices[order], np.cumsum(np.bincount(final_task, minlength=n_tasks))[:-1])
    holds = set(present.tolist())
    held = [tuple(c for c in schedule.classes(j) if c in holds) for j in range(n_tasks)]
    held_blurry = [tuple(c for c in schedule.blurry[j] if c in holds) for j in range(n_tasks)]
    tasks = tuple(
        Task(indices=parts[j], classes=held[j], n_blurry=int(deal[j]), blurry_classes=held_blurry[j])
        for j in range(n_tasks)
    )
    return ClientStream(tasks=tasks)


@dataclass(frozen=True, eq=False)
class ProportionalPacing:
    """Reading speeds that make every client end task ``t`` in the same round.

    Task ``t`` lasts ``R_t = ceil(max_k |task_{k,t}| / samples_per_round)`` rounds for everyone
    (the client with the largest task ``t`` reads ``samples_per_round`` a round, the others
    proportionally slower; a task empty on every client lasts 0 rounds). After ``j`` of task
    ``t``'s rounds, client ``k`` has read ``b_{k,t-1} + floor(|task_{k,t}| j / R_t)`` samples
    (``b_{k,t}``: its cumulative task sizes), so after the task's last round it stands exactly at
    its task boundary ``b_{k,t}``, as federated class-incremental work runs its tasks.

    Attributes
    ----------
    sizes : np.ndarray
        ``(K, T)`` task sizes of every client.
    task_rounds : tuple[int, ...]
        ``R_t`` per task.
    """

    sizes: np.ndarray
    task_rounds: tuple[int, ...]

    @classmethod
    def of(cls, streams: Iterable[ClientStream], samples_per_round: int) -> ProportionalPacing:
        """The pacing of ``streams`` (all with the same number of tasks) at ``samples_per_round``."""
        spr = samples_per_round
        if isinstance(spr, bool) or not isinstance(spr, int | np.integer) or spr < 1:
            raise ValueError(f"samples_per_round must be an int >= 1, got {spr!r}")
        rows = [[len(t.indices) for t in s.tasks] for s in streams]
        if not rows or any(len(r) != len(rows[0]) for r in rows):
            raise ValueError("proportional pacing needs streams, all with the same number of tasks")
        sizes = np.asarray(rows, dtype=np.int64)
        rounds = tuple(-(-int(m) // int(spr)) for m in sizes.max(axis=0))
        return cls(sizes=sizes, task_rounds=rounds)

    @property
    def task_end_rounds(self) -> list[int]:
        """The round (1-based) after which every client has ended task ``t`` (0: before any)."""
        return [int(x) for x in np.cumsum(self.task_rounds)]

    def position(self, client: int, rounds_done: int) -> int:
        """Samples of its stream client ``client`` should have read after ``rounds_done`` rounds."""
        ends = np.cumsum(self.task_rounds)
        row = self.sizes[client]
        t = int(np.searchsorted(ends, rounds_done, side="right"))
        if t >= len(ends):
            return int(row.sum())
        start = int(ends[t]) - self.task_rounds[t]
        return int(row[:t].sum()) + int(row[t]) * (rounds_done - start) // self.task_rounds[t]
