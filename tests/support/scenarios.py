"""Scenario dicts shared by the tests (imported by conftest.py and by test modules)."""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "data": {"dataset": "digits"},
    "long_tail": {"profile": "exponential", "imbalance_factor": 10},
    "partition": {"kind": "dirichlet", "n_clients": 4, "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [32]},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.1},
    "federation": {"rounds": 3, "fraction_clients": 0.5, "eval_every": 1},
    "eval": {"shot_rule": "count", "shot_thresholds": [60, 20]},
}
