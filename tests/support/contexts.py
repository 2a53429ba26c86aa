"""A hand-built ClientContext for calling one plugin's hooks directly, without a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedlt.context import ClientContext


def client_ctx(
    labels: Sequence[int] | torch.Tensor = (),
    *,
    local_counts: Sequence[int] | np.ndarray | None = None,
    global_counts: Sequence[int] | np.ndarray | None = None,
    x: torch.Tensor | None = None,
    num_classes: int | None = None,
    **fields: Any,
) -> ClientContext:
    """Client 0 in round 1 holding ``labels`` (its whole local data, indices 0..n-1).

    ``local_counts`` defaults to the label histogram, ``global_counts`` to ``local_counts``, ``x``
    to a dummy tensor; any other ClientContext field can be given as a keyword.
    """
    y = torch.as_tensor(labels, dtype=torch.long)
    if local_counts is None:
        local_counts = np.bincount(y.numpy(), minlength=num_classes or 0)
    local = np.asarray(local_counts)
    values: dict[str, Any] = {
        "client_id": 0,
        "round": 1,
        "seed": 0,
        "num_classes": num_classes or len(local),
        "config": {},
        "local_class_counts": local,
        "global_class_counts": local if global_counts is None else np.asarray(global_counts),
        "indices": torch.arange(len(y)),
        "labels": y,
        "x_train": torch.zeros(1) if x is None else x,
        "y_train": y,
        "batch_size": 4,
        "local_epochs": 1,
        "local_steps": None,
        "device": torch.device("cpu"),
        "generator": torch.Generator(),
    }
    values.update(fields)
    return ClientContext(**values)
