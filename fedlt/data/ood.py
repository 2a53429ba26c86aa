"""The out-of-distribution test set of ``[eval.ood]`` (docs/ood.md), built with the run's data.

Two sources of OOD samples:

* ``held-out-classes``: the listed classes of the scenario's own dataset are removed from the
  dataset as loaded, before the long tail, the partition and the local test views are built, so
  they reach no client's training data and no in-distribution test set. Their test samples are the
  OOD set. The remaining classes are renumbered ``0..C'-1`` in their original order (digits with 8
  and 9 held out: classes 0-7 keep their ids; with 3 held out, 4..9 become 3..8) and the model has
  ``C'`` outputs; the run's data records the map (``FederatedData.ood["class_ids"]``: the original
  id of each class).
* ``dataset``: the test split of another registry dataset, which must have the scenario's input
  shape, normalised with the scenario's dataset statistics (what the model would be fed).

Errors are plain :class:`~fedlt.base.registry.ParameterError` (``ood.classes``, ``ood.dataset``);
:func:`fedlt.data.federated.build_federated_data` turns them into scenario errors of ``eval.ood``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedlt.base.registry import ParameterError
from fedlt.data.datasets import load_dataset, to_tensor
from fedlt.data.raw import RawDataset, RawSplit

__all__ = ["OOD_KINDS", "hold_out_classes", "ood_dataset_tensor"]

#: The values of ``eval.ood.kind``.
OOD_KINDS = ("none", "held-out-classes", "dataset")


def _keep_split(split: RawSplit, keep: np.ndarray, new_id: np.ndarray) -> RawSplit:
    mask = keep[split.y]
    return RawSplit(split.x[mask], new_id[split.y[mask]])


def hold_out_classes(raw: RawDataset, classes: Sequence[int]) -> tuple[RawDataset, np.ndarray, np.ndarray]:
    """``raw`` without ``classes`` (the others renumbered in order), the held-out test samples'
    indices into ``raw.test``, and the original id of each remaining class.

    Raises :class:`ParameterError` (``ood.classes``) for ids outside the dataset's classes or a
    hold-out that leaves fewer than two classes.
    """
    c = raw.num_classes
    bad = [k for k in classes if not 0 <= k < c]
    if bad or len(classes) > c - 2:
        raise ParameterError(
            "ood.classes",
            list(classes),
            f"distinct class ids in [0, {c - 1}] leaving at least 2 of the {c} classes of {raw.name}",
        )
    held = np.zeros(c, dtype=bool)
    held[list(classes)] = True
    kept_ids = np.flatnonzero(~held)
    new_id = np.full(c, -1, dtype=np.int64)
    new_id[kept_ids] = np.arange(kept_ids.size)
    inside = replace(
        raw,
        train=_keep_split(raw.train, ~held, new_id),
        test=_keep_split(raw.test, ~held, new_id),
        num_classes=int(kept_ids.size),
        class_names=tuple(raw.class_names[k] for k in kept_ids),
    )
    return inside, np.flatnonzero(held[raw.test.y]), kept_ids


def ood_dataset_tensor(raw: RawDataset, name: str, params: dict[str, Any], seed: int) -> torch.Tensor:
    """The test split of dataset ``name`` as the model reads ``raw``'s samples (``raw``'s
    normalisation). Raises :class:`ParameterError` (``ood.dataset``) when its sample shape differs."""
    other = load_dataset(name, seed=seed, **params)
    if tuple(other.input_shape) != tuple(raw.input_shape):
        raise ParameterError(
            "ood.dataset",
            name,
            f"a dataset whose samples have the shape of {raw.name}'s, {list(raw.input_shape)}",
            hint=f"{name} samples have shape {list(other.input_shape)}.",
        )
    return to_tensor(raw, other.test)
