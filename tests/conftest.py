"""Shared fixtures: a tiny, fast scenario on scikit-learn's bundled digits."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture
def tiny() -> dict[str, Any]:
    """A fresh copy of a 4-client, 3-round digits scenario (about a second to run)."""
    return copy.deepcopy(TINY)


class _Interrupted(Exception):
    """Raised from a run's round callback to cut it off, as a crash would."""


@pytest.fixture
def interrupted_run() -> Callable[[dict[str, Any], Path, int], Any]:
    """``interrupt(scenario, run_dir, after)``: start a run and cut it off after round ``after``.

    The run folder then holds what a killed run leaves (checkpoint of round ``after``); tests
    resume it with ``fedlt.resume(run_dir)`` and compare with an uninterrupted run.
    """
    import fedlt
    from fedlt.runner import Run

    def interrupt(scenario: dict[str, Any], run_dir: Path, after: int) -> Run:
        run = Run.create(fedlt.load_scenario(scenario), run_dir)

        def stop(r: int, record: Any) -> None:
            if r == after:
                raise _Interrupted

        run.on_round = stop
        with pytest.raises(_Interrupted):
            run.execute()
        return run

    return interrupt


@pytest.fixture
def lt_digits() -> Callable[..., dict[str, Any]]:
    """``lt_digits(n_clients, rounds)``: strongly long-tailed digits (IF 50), IID clients, no
    per-round evaluation; the setting where a remedy must lift tail accuracy over plain CE."""

    def make(n_clients: int, rounds: int) -> dict[str, Any]:
        return {
            "name": "lt",
            "seed": 1,
            "data": {"dataset": "digits"},
            "long_tail": {"profile": "exponential", "imbalance_factor": 50},
            "partition": {"kind": "iid", "n_clients": n_clients},
            "model": {"name": "mlp", "hidden": [64]},
            "train": {"local_epochs": 2, "batch_size": 32, "lr": 0.1},
            "federation": {"rounds": rounds, "eval_every": 0},
            "eval": {"shot_rule": "cumulative", "personalized": False},
        }

    return make


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Put torch's intra-op thread count back after a test that runs an engine with ``threads``."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread(restore_threads: None) -> None:
    """One intra-op thread for tests of tiny tensors: faster, and immune to a loaded machine's
    thread oversubscription (results do not depend on it)."""
    import torch

    torch.set_num_threads(1)
