"""Shared fixtures: a tiny, fast scenario on scikit-learn's bundled digits."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.scenarios import TINY

# Runs compared for equality must use the same torch thread count (BLAS sums in a thread-count-
# dependent order): pin engine.threads = "auto" to one thread, whatever the machine's load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# What runs remember about this machine (the thread choice) goes to a folder of the test session's.
if "FEDLT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FEDLT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedlt-test-cache-")


@pytest.fixture
def tiny() -> dict[str, Any]:
    """A fresh copy of a 4-client, 3-round digits scenario (about a second to run)."""
    return copy.deepcopy(TINY)


@pytest.fixture
def interrupted_run() -> Callable[[dict[str, Any], Path, int], Any]:
    """``interrupt(scenario, run_dir, after)``: start a run and cut it off after round ``after``.

    The run folder then holds what a killed run leaves (checkpoint of round ``after``); tests
    resume it with ``fedlt.resume(run_dir)`` and compare with an uninterrupted run.
    """
    from support.runs import interrupt_run

    return interrupt_run


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


@pytest.fixture
def install_plugins(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``install_plugins(name=Class, ...)``: make inline plugin classes discoverable, as if a
    distribution registered them (next to the installed ones)."""
    from fedlt.hooks import discovery

    real = discovery.discover_plugins

    def install(**classes: Any) -> None:
        fake = {
            name: discovery.PluginInfo(name, f"tests:{cls.__name__}", "tests", cls)
            for name, cls in classes.items()
        }
        found = real()
        monkeypatch.setattr(discovery, "discover_plugins", lambda: {**found, **fake})

    return install
