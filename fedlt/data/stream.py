"""Per-client Si-Blurry / i-Blurry task streams (Moon et al. 2023, ``OnlineSampler``).

A client's data arrives as ``T`` tasks visited in order. A share ``N`` % of the client's classes
are *disjoint* (they appear in exactly one task); the rest are *blurry* classes, and ``M`` % of
the blurry-class samples are pulled out of their own task, shuffled and dealt across all tasks,
so task boundaries are blurred. The rule is applied to each client's own indices and classes, so
every client gets its own class order, task sizes and blurry leakage (the federated setting).

- ``si-blurry`` (stochastic): classes and blurry counts are cut into ``T`` chunks at random cut
  points, so tasks differ in how many classes and samples they hold; a task may get none.
- ``i-blurry``: the same with as-even-as-possible chunks (sizes differ by at most 1).

Deviations from the reference, made because a client holds few classes:

- The reference floors ``disjoint_num`` and ``blurry_num`` to multiples of ``T``, which with a
  handful of classes per client would silently drop classes from the stream. Here no class is
  dropped: ``disjoint_num = floor(|C_k| N / 100)`` and every other class is blurry; si-blurry cuts
  at random points anyway and i-blurry spreads the remainder (the extra disjoint classes go to the
  first tasks and the extra blurry classes to the last ones, so per-task class counts still
  differ by at most 1).
- Random cut points are drawn from ``[0, n]`` inclusive (the reference's ``randint(0, n)`` never
  cuts at ``n``).
- When a task holds fewer blurry-class samples than its share ``b_j``, it gives up all it has and
  the shortfall is taken from the other tasks, in task order 0..T-1, that still have blurry-class
  samples to spare. The pool therefore always holds exactly ``num_blurred`` samples and task ``j`` still
  *receives* exactly ``b_j`` of them, so every index appears once and the blurry fraction is exact
  (the reference deals a shorter pool and the last tasks receive less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fedlt.errors import ScenarioError

__all__ = ["STREAM_KINDS", "ClientStream", "Task", "build_stream"]

STREAM_KINDS: tuple[str, ...] = ("si-blurry", "i-blurry")


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a client's stream.

    Attributes
    ----------
    indices : np.ndarray
        int64 dataset indices, in the order the stream visits them.
    classes : tuple[int, ...]
        The classes this task owns (its disjoint and blurry classes), sorted. Blurry samples it
        received may belong to other tasks' classes.
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


@dataclass(frozen=True, eq=False)
class ClientStream:
    """A client's tasks, visited in order 0..T-1."""

    tasks: tuple[Task, ...]

    @property
    def indices(self) -> np.ndarray:
        """The whole stream in visit order (task indices concatenated)."""
        if not self.tasks:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([t.indices for t in self.tasks]).astype(np.int64, copy=False)

    @property
    def boundaries(self) -> list[int]:
        """Cumulative end offset of each task in :attr:`indices` (the last equals its length)."""
        return [int(x) for x in np.cumsum([len(t.indices) for t in self.tasks])]

    def describe(self) -> list[dict]:
        """One JSON-friendly dict per task (classes, size, blurry samples), for ``fedlt inspect``."""
        return [
            {"classes": list(t.classes), "size": len(t.indices), "blurry": t.n_blurry} for t in self.tasks
        ]


def _percent_of(count: int, percent: float) -> int:
    """``floor(count * percent / 100)`` computed exactly on the decimal the user wrote.

    Float arithmetic can land just below an integer (e.g. ``1000 * 10.1 / 100``); going through the
    shortest decimal repr keeps the floor at the value a reader would compute by hand.
    """
    return math.floor(count * Fraction(repr(float(percent))) / 100)


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
    if kind not in STREAM_KINDS:
        raise ScenarioError("stream.kind", kind, f"one of {', '.join(map(repr, STREAM_KINDS))}")
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int | np.integer) or n_tasks < 1:
        raise ScenarioError("stream.n_tasks", n_tasks, "an int >= 1")
    for key, value in (
        ("stream.disjoint_percent", disjoint_percent),
        ("stream.blurry_percent", blurry_percent),
    ):
        ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        if not (ok and 0 <= value <= 100):
            raise ScenarioError(key, value, "a number in [0, 100]")


def build_stream(
    indices: np.ndarray,
    labels: np.ndarray,
    kind: str,
    n_tasks: int,
    disjoint_percent: float,
    blurry_percent: float,
    rng: np.random.Generator,
) -> ClientStream:
    """Split one client's indices into a Si-Blurry (or i-Blurry) stream of ``n_tasks`` tasks.

    Parameters
    ----------
    indices : np.ndarray
        The client's dataset indices (1-D ints; dataset order is ascending index).
    labels : np.ndarray
        The full label array; ``labels[indices]`` are the client's labels.
    kind : str
        ``"si-blurry"`` (random splits) or ``"i-blurry"`` (even splits).
    n_tasks : int
        Number of tasks ``T`` >= 1.
    disjoint_percent : float
        ``N`` in [0, 100]: share of the client's classes that are disjoint.
    blurry_percent : float
        ``M`` in [0, 100]: share of blurry-class samples dealt across tasks.
    rng : np.random.Generator
        Source of every draw (class order, cut points, pool shuffle, per-task shuffles).

    Returns
    -------
    ClientStream
        Every client index appears exactly once.

    Raises
    ------
    ScenarioError
        ``stream.kind``, ``stream.n_tasks``, ``stream.disjoint_percent`` or
        ``stream.blurry_percent`` when out of range.
    """
    _check(kind, n_tasks, disjoint_percent, blurry_percent)
    n_tasks = int(n_tasks)
    indices = np.asarray(indices, dtype=np.int64).ravel()
    own_labels = np.asarray(labels)[indices].astype(np.int64)
    stochastic = kind == "si-blurry"

    # 1-3. Class order, disjoint/blurry split, and the classes each task owns.
    present = np.unique(own_labels)
    class_order = rng.permutation(present)
    disjoint_num = _percent_of(len(present), disjoint_percent)
    disjoint, blurry = class_order[:disjoint_num], class_order[disjoint_num:]
    if stochastic:
        d_sizes = _random_chunks(len(disjoint), n_tasks, rng)
        b_sizes = _random_chunks(len(blurry), n_tasks, rng)
    else:
        d_sizes = _even_chunks(len(disjoint), n_tasks)
        b_sizes = _even_chunks(len(blurry), n_tasks, extras_last=True)
    d_chunks = np.split(disjoint, np.cumsum(d_sizes)[:-1])
    b_chunks = np.split(blurry, np.cumsum(b_sizes)[:-1])

    # 4. Every index goes to the task that owns its class (kept in dataset order for step 5).
    order = np.argsort(indices, kind="stable")
    indices, own_labels = indices[order], own_labels[order]
    own_disjoint = [indices[np.isin(own_labels, c)] for c in d_chunks]
    own_blurry = [indices[np.isin(own_labels, c)] for c in b_chunks]

    # 5. Pull num_blurred blurry-class samples out of their tasks, shuffle, deal back b_j each.
    num_blurred = _percent_of(sum(len(b) for b in own_blurry), blurry_percent)
    deal = _random_chunks(num_blurred, n_tasks, rng) if stochastic else _even_chunks(num_blurred, n_tasks)
    available = np.array([len(b) for b in own_blurry], dtype=np.int64)
    take = np.minimum(deal, available)
    shortfall = num_blurred - int(take.sum())
    for j in range(n_tasks):  # a task short of blurry samples: others with spare make up for it
        if shortfall == 0:
            break
        extra = min(shortfall, int(available[j] - take[j]))
        take[j] += extra
        shortfall -= extra
    pool = rng.permutation(np.concatenate([b[:k] for b, k in zip(own_blurry, take, strict=True)]))
    received = np.split(pool, np.cumsum(deal)[:-1])

    # 6. Each task: its remaining own samples plus what it received, shuffled.
    tasks = []
    for j in range(n_tasks):
        kept = np.concatenate([own_disjoint[j], own_blurry[j][take[j] :], received[j]]).astype(np.int64)
        classes = tuple(sorted(int(c) for c in np.concatenate([d_chunks[j], b_chunks[j]])))
        tasks.append(
            Task(
                indices=rng.permutation(kept),
                classes=classes,
                n_blurry=len(received[j]),
                blurry_classes=tuple(sorted(int(c) for c in b_chunks[j])),
            )
        )
    return ClientStream(tasks=tuple(tasks))
