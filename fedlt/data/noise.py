"""Label noise as part of the scenario (``[noise]``): each client's training labels are flipped.

A real federation trains on the labels its clients hold, and those are often wrong; the long tail
makes it worse (a tail class has few clean samples to outvote its noisy ones). The noise is drawn
once per run from a class transition matrix ``T`` (``T[c, j]``: probability that a sample of clean
class ``c`` carries label ``j``), one generator per client, ``numpy_rng(seed, "noise", client)``,
over the client's samples in index order, so a client's noisy labels depend on no other client.
Only training labels change; the test set and the local test views stay clean.

Kinds (``noise.kind``), with ``r_c`` the flip rate of class ``c`` and ``C`` classes:

- ``symmetric``: ``r_c = rate``; a flipped label is uniform over the ``C - 1`` other classes.
- ``pair``: ``r_c = rate``; a flipped label goes to ``(c + 1) mod C``.
- ``class-dependent``: ``r_c = rates[c]``; flips uniform over the other classes.
- ``asymmetric``: ``r_c = rate`` for the classes of ``map`` (``{source: target}``), 0 for the
  others; a flipped label goes to the class's target. ``map = "cifar10"`` is the standard CIFAR-10
  map of Patrini et al. (2017): truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog.
- ``tail``: ``r_c = rate * N / (C * n_c)`` with ``n_c`` the class's (clean, long-tailed) training
  count and ``N`` their sum: every class gets the same expected number of noisy labels
  ``rate * N / C``, so the overall share of noisy labels is ``rate`` and a class's rate grows as
  its count shrinks (the tail is the noisiest). Flips uniform over the other classes. A rate that
  would put some ``r_c`` above 1 is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedlt.base.registry import ParameterError
from fedlt.base.seeding import numpy_rng

__all__ = [
    "CLASS_MAPS",
    "NOISE_KINDS",
    "apply_noise",
    "class_rates",
    "noise_summary",
    "noisy_class_counts",
    "resolve_map",
    "transition_matrix",
]

#: ``noise.kind`` values.
NOISE_KINDS = ("none", "symmetric", "pair", "class-dependent", "tail", "asymmetric")

#: Named ``noise.map`` values: ``{source class: target class}``.
CLASS_MAPS: dict[str, dict[int, int]] = {
    # Patrini et al. 2017 (CIFAR-10 class ids): truck -> automobile, bird -> airplane,
    # deer -> horse, cat <-> dog.
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
}


def resolve_map(mapping: str | dict[int, int] | None, n_classes: int) -> dict[int, int] | None:
    """``noise.map`` as ``{source: target}`` (a named map looked up), checked against the classes.

    Raises
    ------
    ParameterError
        A class outside ``0 .. n_classes - 1``.
    """
    if mapping is None:
        return None
    if isinstance(mapping, str):
        resolved = CLASS_MAPS[mapping]
    else:
        resolved = {int(k): int(v) for k, v in mapping.items()}
    outside = sorted({c for pair in resolved.items() for c in pair if not 0 <= c < n_classes})
    if outside:
        allowed = f"class ids in 0..{n_classes - 1} ({n_classes} classes in the data), not {outside[0]}"
        raise ParameterError("map", mapping, allowed)
    return resolved


def class_rates(
    kind: str,
    rate: float,
    rates: Sequence[float] | None,
    class_counts: np.ndarray,
    mapping: Mapping[int, int] | None = None,
) -> np.ndarray:
    """Flip rate ``r_c`` of every class (see the module docstring for each kind).

    Raises
    ------
    ParameterError
        ``rates`` not one per class (``class-dependent``), or a ``tail`` rate that would give some
        class a flip rate above 1.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    n_classes = counts.size
    if kind == "none":
        return np.zeros(n_classes)
    if kind in ("symmetric", "pair"):
        return np.full(n_classes, float(rate))
    if kind == "asymmetric":
        out = np.zeros(n_classes)
        out[list(mapping or {})] = rate
        return out
    if kind == "class-dependent":
        if rates is None or len(rates) != n_classes:
            raise ParameterError("rates", rates, f"a list of {n_classes} rates in [0, 1], one per class")
        return np.asarray(rates, dtype=np.float64)
    if kind == "tail":
        present = np.maximum(counts, 1.0)  # an empty class gets no sample to flip anyway
        out = rate * counts.sum() / (n_classes * present)
        if out.max() > 1 + 1e-12:
            limit = n_classes * present.min() / counts.sum()
            raise ParameterError(
                "rate",
                rate,
                f"at most {limit:.4g} for kind 'tail' on this data",
                hint=f"The rarest class ({int(present.min())} samples of {int(counts.sum())}, {n_classes} "
                "classes) would need a flip rate above 1 to carry its share rate * N / C of the noise.",
            )
        return np.minimum(out, 1.0)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


def transition_matrix(
    kind: str, rates: np.ndarray, mapping: Mapping[int, int] | None = None
) -> np.ndarray:
    """``T[c, j]`` = P(label ``j`` | clean class ``c``) for per-class flip rates ``rates``.

    ``pair`` puts the whole rate on ``(c + 1) mod C``, ``asymmetric`` on ``mapping[c]``; every
    other kind spreads it evenly over the ``C - 1`` other classes. Rows sum to 1.
    """
    rates = np.asarray(rates, dtype=np.float64)
    n = rates.size
    if n < 2:
        return np.ones((n, n))
    if kind in ("pair", "asymmetric"):
        t = np.diag(1.0 - rates)
        if kind == "pair":
            t[np.arange(n), (np.arange(n) + 1) % n] += rates
        else:
            for source, target in (mapping or {}).items():
                t[source, target] += rates[source]
        return t
    t = np.repeat((rates / (n - 1))[:, None], n, axis=1)
    t[np.arange(n), np.arange(n)] = 1.0 - rates
    return t


def _draw(labels: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per sample from row ``t[labels[i]]``: one uniform each, inverse CDF."""
    if labels.size == 0:
        return labels.copy()
    cdf = np.cumsum(t, axis=1)[labels]
    u = rng.random(labels.size)
    return np.minimum((u[:, None] >= cdf).sum(axis=1), t.shape[0] - 1).astype(labels.dtype)


def apply_noise(
    labels: np.ndarray, client_indices: Sequence[np.ndarray], t: np.ndarray, seed: int
) -> np.ndarray:
    """Noisy copy of ``labels``: client ``k``'s samples redrawn from ``t`` with
    ``numpy_rng(seed, "noise", k)``; samples no client holds keep their label.

    Raises
    ------
    ValueError
        A sample held by two clients (its label would depend on the order clients are noised in).
    """
    labels = np.asarray(labels)
    noisy = labels.copy()
    owner = np.full(labels.size, -1, dtype=np.int64)
    for k, idx in enumerate(client_indices):
        idx = np.asarray(idx, dtype=np.int64)
        shared = idx[owner[idx] >= 0]
        if shared.size:
            raise ValueError(f"sample {int(shared[0])} is held by clients {int(owner[shared[0]])} and {k}")
        owner[idx] = k
        noisy[idx] = _draw(labels[idx], t, numpy_rng(seed, "noise", k))
    return noisy


def noisy_class_counts(
    clean: np.ndarray, noisy: np.ndarray, client_indices: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """``(K, C)``: client ``k``'s samples of clean class ``c`` whose label was changed."""
    rows = []
    for idx in client_indices:
        idx = np.asarray(idx, dtype=np.int64)
        flipped = idx[clean[idx] != noisy[idx]]
        rows.append(np.bincount(clean[flipped], minlength=num_classes))
    return np.stack(rows).astype(np.int64) if rows else np.zeros((0, num_classes), dtype=np.int64)


def noise_summary(
    settings: dict[str, Any], rates: np.ndarray, t: np.ndarray, per_client: np.ndarray, n_samples: int
) -> dict[str, Any]:
    """What ``fedlt inspect --json`` shows of the noise (``noise`` key), JSON-ready."""
    total = int(per_client.sum())
    return {
        **settings,
        "class_rates": [float(r) for r in rates],
        "transition_matrix": t.tolist(),
        "n_noisy": total,
        "realised_rate": total / n_samples if n_samples else 0.0,
        "noisy_class_counts": per_client.sum(axis=0).tolist(),
    }
