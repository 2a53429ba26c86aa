"""Split a (long-tailed) training set across clients.

Every partitioner returns one sorted int64 index array per client; together they cover every
index of ``labels`` exactly once. Clients hold these index arrays, never copies of the data.

- ``dirichlet`` (FedLoGe / Fed-GraB ``util/sampling.py``): per class, ``q ~ Dir(alpha 1_K)`` and
  each sample goes to a client drawn from ``Categorical(q)``. Client sizes are unequal.
- ``dirichlet-equal`` (CReFF ``Dataset/sample_dirichlet.py``, from FedDF): balanced Dirichlet
  over groups of up to 10 auxiliary workers, then cut into ``K`` equal contiguous parts.
- ``shards`` (McMahan et al. 2017): label-sorted shards, a few per client.
- ``iid``: a uniform random split into equal parts.

:data:`PARTITIONS` declares them once, with the parameters a scenario may set under
``[partition]``. Errors are plain: bad arguments are ``ValueError``; a parameter that the labels at
hand cannot satisfy (a minimum client size no draw reaches, more shards than samples) is a
:class:`~fedlt.base.registry.ParameterError` naming it, which the scenario boundary turns into a
scenario error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt

from fedlt.base.registry import Entry, NoParams, ParameterError, Params, Registry

__all__ = [
    "PARTITIONS",
    "partition",
    "partition_dirichlet",
    "partition_dirichlet_equal",
    "partition_iid",
    "partition_shards",
]

# CReFF / FedDF split the data into chunks handled by this many "auxiliary workers".
_AUX_WORKERS = 10


def _prepare(labels: np.ndarray, n_clients: int, num_classes: int | None) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if n_clients < 1:
        raise ValueError(f"n_clients must be an int >= 1, got {n_clients!r}")
    if len(labels) and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    seen = int(labels.max()) + 1 if len(labels) else 0
    if num_classes is None:
        num_classes = seen
    elif num_classes < seen:
        raise ValueError(f"num_classes={num_classes} but labels go up to {seen - 1}")
    return labels, num_classes


def _check_alpha(alpha: float) -> None:
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite float > 0, got {alpha!r}")


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """``Dir(alpha 1_k)``, renormalised; a draw that underflows everywhere becomes one-hot.

    For very small alpha every component can underflow to 0; the limit of Dir(alpha) as
    alpha -> 0 puts all mass on one uniformly chosen component, so that is what we return.
    """
    q = rng.dirichlet(np.full(k, alpha))
    total = q.sum()
    if not (np.isfinite(total) and total > 0):
        q = np.zeros(k)
        q[rng.integers(k)] = 1.0
        return q
    return q / total


def partition_iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniform random split into ``n_clients`` parts whose sizes differ by at most 1."""
    labels, _ = _prepare(labels, n_clients, None)
    return _finish(np.array_split(rng.permutation(len(labels)), n_clients))


def partition_dirichlet(
    labels: np.ndarray,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    num_classes: int | None = None,
    min_client_size: int = 0,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """FedLoGe-style per-class Dirichlet split with unequal client sizes.

    For each class ``c`` a share vector ``q ~ Dir(alpha 1_K)`` is drawn and every sample of ``c``
    goes to a client drawn from ``Categorical(q)``; small ``alpha`` gives each class to few
    clients. With ``min_client_size > 0`` the whole partition is redrawn until every client has at
    least that many samples (the reference code has no such guard, so 0 reproduces it).

    Parameters
    ----------
    labels : np.ndarray
        Class of every sample (the indices returned index this array).
    n_clients : int
        Number of clients ``K``.
    alpha : float
        Dirichlet concentration, > 0.
    rng : np.random.Generator
        Source of every draw.
    num_classes : int, optional
        Number of classes (default ``labels.max() + 1``); absent classes still consume a draw so
        the stream does not depend on which classes happen to be present.
    min_client_size : int, default=0
        Smallest acceptable client.
    max_tries : int, default=1000
        Redraws allowed before giving up.

    Raises
    ------
    ParameterError
        ``min_client_size`` when no draw within ``max_tries`` satisfies it, or when it exceeds
        ``len(labels) // n_clients``.
    """
    labels, num_classes = _prepare(labels, n_clients, num_classes)
    _check_alpha(alpha)
    n = len(labels)
    if min_client_size < 0 or min_client_size * n_clients > n:
        raise ParameterError(
            "min_client_size",
            min_client_size,
            f"an int in [0, {n // n_clients}] ({n} samples over {n_clients} clients)",
        )
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for _ in range(max(1, max_tries)):
        owner = np.empty(n, dtype=np.int64)
        for idx in by_class:
            q = _dirichlet(rng, alpha, n_clients)
            owner[idx] = rng.choice(n_clients, size=len(idx), p=q)
        sizes = np.bincount(owner, minlength=n_clients)
        if sizes.min() >= min_client_size:
            order = np.argsort(owner, kind="stable")  # indices grouped by client, ascending within
            return _finish(np.split(order, np.cumsum(sizes)[:-1]))
    raise ParameterError(
        "min_client_size",
        min_client_size,
        f"reachable by a Dirichlet(alpha={alpha}) split of {n} samples over {n_clients} clients "
        f"within {max_tries} draws",
        hint="Lower partition.min_client_size, raise partition.alpha, or use fewer clients.",
    )


def _balanced_dirichlet_chunk(
    idx: np.ndarray,
    chunk_labels: np.ndarray,
    n_workers: int,
    alpha: float,
    num_classes: int,
    rng: np.random.Generator,
    max_tries: int,
) -> list[np.ndarray] | None:
    """One CReFF chunk: Dirichlet shares masked to workers still below the average size.

    Resampled until the smallest worker holds at least half the average; ``None`` if
    ``max_tries`` draws all fail.
    """
    size = len(idx)
    average = size / n_workers
    min_required = int(0.5 * size / n_workers)
    by_class = [idx[chunk_labels == c] for c in range(num_classes)]
    for _ in range(max(1, max_tries)):
        batches: list[list[np.ndarray]] = [[] for _ in range(n_workers)]
        sizes = np.zeros(n_workers, dtype=np.int64)
        for class_idx in by_class:
            if len(class_idx) == 0:
                continue
            q = _dirichlet(rng, alpha, n_workers)
            open_workers = sizes < average
            q = q * open_workers
            total = q.sum()
            # All mass on full workers: spread over the open ones (there is always one, because
            # the samples placed so far number fewer than the chunk).
            q = q / total if total > 0 else open_workers / open_workers.sum()
            cuts = (np.cumsum(q) * len(class_idx)).astype(np.int64)[:-1]
            for worker, piece in enumerate(np.split(class_idx, cuts)):
                batches[worker].append(piece)
                sizes[worker] += len(piece)
        if sizes.min() >= min_required:
            return [np.concatenate(b) if b else np.empty(0, dtype=np.int64) for b in batches]
    return None


def partition_dirichlet_equal(
    labels: np.ndarray,
    n_clients: int,
    alpha: float,
    rng: np.random.Generator,
    num_classes: int | None = None,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """CReFF-style Dirichlet split into equal-size clients (sizes differ by at most 1).

    Following CReFF's ``sample_dirichlet.py`` (from FedDF): shuffle; cut the data into chunks,
    one per group of up to 10 auxiliary workers, sized in proportion to the group; inside each
    chunk draw ``q ~ Dir(alpha)`` per class, zero the workers already at or above the average
    size, renormalise and split the class by cumulative sum; redraw the chunk until its smallest
    worker has at least half the average. The worker lists are concatenated and cut into
    ``n_clients`` equal contiguous parts, so label skew comes from Dirichlet while sizes are equal.

    Raises
    ------
    ParameterError
        ``alpha`` when a chunk cannot meet the half-average rule within ``max_tries``
        redraws (very small alpha on strongly long-tailed labels can make it unreachable).
    """
    labels, num_classes = _prepare(labels, n_clients, num_classes)
    _check_alpha(alpha)
    n = len(labels)
    order = rng.permutation(n)
    shuffled = labels[order]
    group_workers = [min(_AUX_WORKERS, n_clients - start) for start in range(0, n_clients, _AUX_WORKERS)]
    bounds = np.concatenate([[0], np.cumsum(group_workers)]) * n // n_clients
    workers: list[np.ndarray] = []
    for g, n_workers in enumerate(group_workers):
        lo, hi = bounds[g], bounds[g + 1]
        batches = _balanced_dirichlet_chunk(
            order[lo:hi], shuffled[lo:hi], n_workers, alpha, num_classes, rng, max_tries
        )
        if batches is None:
            raise ParameterError(
                "alpha",
                alpha,
                f"large enough for a balanced Dirichlet split of {hi - lo} samples over {n_workers} "
                f"workers (each needs >= half the average) within {max_tries} draws",
                hint="Raise partition.alpha or use partition.kind = 'dirichlet'.",
            )
        workers.extend(batches)
    flat = np.concatenate(workers) if workers else np.empty(0, dtype=np.int64)
    return _finish(np.array_split(flat, n_clients))


def partition_shards(
    labels: np.ndarray, n_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan's pathological split: each client gets ``shards_per_client`` label-sorted shards.

    The indices are shuffled (so a class's samples land in random shards), stably sorted by
    label and cut into ``n_clients * shards_per_client`` contiguous shards of near-equal size;
    each client receives a random set of them, so it sees about ``shards_per_client`` classes
    (exactly at most that many when shards do not straddle a class boundary).

    Raises
    ------
    ParameterError
        ``shards_per_client`` when there are more shards than samples.
    """
    labels, _ = _prepare(labels, n_clients, None)
    n_shards = n_clients * shards_per_client
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be an int >= 1, got {shards_per_client!r}")
    if n_shards > len(labels):
        raise ParameterError(
            "shards_per_client",
            shards_per_client,
            f"an int in [1, {len(labels) // n_clients}] ({len(labels)} samples over {n_clients} clients)",
        )
    perm = rng.permutation(len(labels))
    by_label = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(by_label, n_shards)
    assignment = rng.permutation(n_shards).reshape(n_clients, shards_per_client)
    return _finish([np.concatenate([shards[s] for s in row]) for row in assignment])


class DirichletParams(Params):
    """``dirichlet``: per-class Dirichlet shares, unequal client sizes."""

    alpha: float = Field(
        0.5, gt=0, allow_inf_nan=False, description="Dirichlet concentration (smaller = more skewed clients)."
    )
    min_client_size: NonNegativeInt = Field(0, description="Redraw until every client has this many samples.")


class DirichletEqualParams(Params):
    """``dirichlet-equal``: Dirichlet label skew, equal client sizes."""

    alpha: float = Field(
        0.5, gt=0, allow_inf_nan=False, description="Dirichlet concentration (smaller = more skewed clients)."
    )


class ShardsParams(Params):
    """``shards``: label-sorted shards."""

    shards_per_client: PositiveInt = Field(2, description="Shards (about classes) per client.")


def _dirichlet_entry(
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    num_classes: int | None,
    alpha: float,
    min_client_size: int,
) -> list[np.ndarray]:
    return partition_dirichlet(
        labels, n_clients, alpha, rng, num_classes=num_classes, min_client_size=min_client_size
    )


def _dirichlet_equal_entry(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, num_classes: int | None, alpha: float
) -> list[np.ndarray]:
    return partition_dirichlet_equal(labels, n_clients, alpha, rng, num_classes=num_classes)


def _shards_entry(
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    num_classes: int | None,
    shards_per_client: int,
) -> list[np.ndarray]:
    return partition_shards(labels, n_clients, shards_per_client, rng)


def _iid_entry(
    labels: np.ndarray, n_clients: int, rng: np.random.Generator, num_classes: int | None
) -> list[np.ndarray]:
    return partition_iid(labels, n_clients, rng)


#: Every partitioner a scenario can name;
#: ``build(labels, n_clients, rng, num_classes, **params) -> list of index arrays``.
PARTITIONS = Registry(
    "partition",
    [
        Entry(
            "dirichlet",
            DirichletParams,
            "Per-class Dir(alpha) shares, unequal sizes (FedLoGe).",
            _dirichlet_entry,
        ),
        Entry(
            "dirichlet-equal",
            DirichletEqualParams,
            "Dirichlet label skew cut into equal-size clients (CReFF, FedDF).",
            _dirichlet_equal_entry,
        ),
        Entry(
            "shards",
            ShardsParams,
            "A few label-sorted shards per client (McMahan et al. 2017).",
            _shards_entry,
        ),
        Entry("iid", NoParams, "A uniform random split into equal parts.", _iid_entry),
    ],
)


def partition(
    kind: str,
    labels: np.ndarray,
    n_clients: int,
    rng: np.random.Generator,
    *,
    num_classes: int | None = None,
    **params: Any,
) -> list[np.ndarray]:
    """Split ``labels`` across ``n_clients`` with the partitioner named ``kind``.

    Parameters
    ----------
    kind : str
        One of :data:`PARTITIONS`.
    labels, n_clients, rng, num_classes
        As for the partitioners above.
    **params
        ``kind``'s parameters (its entry's parameter model); the rest keep their defaults.

    Raises
    ------
    ValueError
        An unknown kind, or parameters ``kind`` does not take or out of range.
    ParameterError
        A parameter the labels cannot satisfy.
    """
    entry = PARTITIONS[kind]
    return entry.build(labels, n_clients, rng, num_classes, **dict(entry.params.model_validate(params)))
