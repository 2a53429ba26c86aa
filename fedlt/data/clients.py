"""Class counts and per-client local test views.

Remedies and metrics need each client's class counts (priors for logit adjustment, the class
mask for personalised heads); personalised accuracy needs a local test set per client that
mirrors its training mix, built from the balanced global test set as FedLoGe does
(``util/dataset.py:152-179``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["class_counts", "client_class_counts", "local_test_views"]


def class_counts(labels: np.ndarray, num_classes: int, indices: np.ndarray | None = None) -> np.ndarray:
    """Samples per class among ``labels[indices]`` (all of ``labels`` when ``indices`` is None).

    Returns
    -------
    np.ndarray
        int64 ``(num_classes,)``.
    """
    labels = np.asarray(labels)
    picked = labels if indices is None else labels[np.asarray(indices, dtype=np.int64)]
    if len(picked) and (picked.min() < 0 or picked.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{picked.min()}, {picked.max()}]")
    return np.bincount(picked, minlength=num_classes).astype(np.int64)


def client_class_counts(
    labels: np.ndarray, client_indices: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """Class counts of every client, one row per client.

    Returns
    -------
    np.ndarray
        int64 ``(K, num_classes)``.
    """
    rows = [class_counts(labels, num_classes, idx) for idx in client_indices]
    if not rows:
        return np.zeros((0, num_classes), dtype=np.int64)
    return np.stack(rows)


def local_test_views(
    client_counts: np.ndarray, test_labels: np.ndarray, rngs: Sequence[np.random.Generator]
) -> list[np.ndarray]:
    """Each client's local test set, drawn from the global test set to mirror its training mix.

    Client ``k`` gets ``floor(n_kc / N_train * N_test)`` test samples of class ``c``, where
    ``N_train`` is the total training size over all clients and ``N_test = len(test_labels)``,
    capped at the test samples class ``c`` has; they are drawn without replacement with
    ``rngs[k]`` (one stream per client, so a client's view does not depend on the others).
    A class the client does not train on never appears in its view.

    Parameters
    ----------
    client_counts : np.ndarray
        ``(K, C)`` training class counts (see :func:`client_class_counts`).
    test_labels : np.ndarray
        Labels of the global test set.
    rngs : sequence of np.random.Generator
        One generator per client.

    Returns
    -------
    list of np.ndarray
        Sorted int64 indices into the test set, one array per client.
    """
    client_counts = np.asarray(client_counts, dtype=np.int64)
    test_labels = np.asarray(test_labels)
    if client_counts.ndim != 2:
        raise ValueError(f"client_counts must be (K, C), got shape {client_counts.shape}")
    n_clients, num_classes = client_counts.shape
    if len(rngs) != n_clients:
        raise ValueError(f"need one rng per client: {n_clients} clients, {len(rngs)} rngs")
    n_train = int(client_counts.sum())
    n_test = len(test_labels)
    test_by_class = [np.flatnonzero(test_labels == c) for c in range(num_classes)]
    available = np.array([len(t) for t in test_by_class], dtype=np.int64)
    # Integer arithmetic gives the exact floor, which float division can miss by one.
    wanted = client_counts * n_test // n_train if n_train else np.zeros_like(client_counts)
    wanted = np.minimum(wanted, available[None, :])
    views: list[np.ndarray] = []
    for k in range(n_clients):
        picks = [
            rngs[k].choice(test_by_class[c], size=int(m), replace=False) for c, m in enumerate(wanted[k]) if m
        ]
        view = np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)
        views.append(np.sort(view).astype(np.int64, copy=False))
    return views
