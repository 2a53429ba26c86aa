"""Where a Flower engine's Grid comes from: Flower's Simulation Runtime, or a ServerApp's Grid.

- inside a Flower ServerApp (``flwr run`` on a project written by ``fedlt export-flower``): the
  ServerApp's main runs fedlt's run under :func:`attach_grid`;
- inside ``with FlowerSimulation(...)``: one Simulation Runtime shared by several runs (Ray
  starts once);
- otherwise the Flower engine starts its own :class:`FlowerSimulation` (Flower's
  ``run_simulation`` in a background thread, one SuperNode per client) and stops it on close.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from fedlt.errors import FedltError
from fedlt.flower.client_app import make_client_app

__all__ = ["FlowerSimulation", "Link", "active_link", "attach_grid"]

#: Log lines that say nothing a fedlt user can act on.
_SILENCED = (
    "`run_simulation` function is deprecated",  # fedlt chose it knowingly; `flwr run` is supported too
    "SIGTERM handler is not set",  # Ray started from a non-main thread
    "Manually terminating ClientAppActor",
)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in _SILENCED)


class Link:
    """A Grid to send through, a liveness check, and how many SuperNodes it has (if known)."""

    def __init__(self, grid: Any, num_supernodes: int | None = None) -> None:
        self.grid = grid
        self.num_supernodes = num_supernodes

    def check(self) -> None:
        """Raise if the federation behind the Grid is gone (a plain Grid cannot tell)."""


_ACTIVE: list[Link] = []


def active_link() -> Link | None:
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def attach_grid(grid: Any) -> Iterator[None]:
    """Inside this block, Flower engines train through ``grid`` (a ServerApp's main uses it)."""
    link = Link(grid)
    _ACTIVE.append(link)
    try:
        yield
    finally:
        _ACTIVE.remove(link)


class FlowerSimulation(Link):
    """Flower's Simulation Runtime (``run_simulation``) in a background thread.

    Its ServerApp only hands its Grid over and waits; fedlt's runner, in the caller's thread,
    does the rounds. As a context manager it is shared: every Flower run started inside the
    block uses it, so Ray and the ClientApp workers start once.

    Parameters
    ----------
    num_supernodes : int
        SuperNodes (one per fedlt client; more are allowed and stay idle).
    num_workers : int, default=2
        ClientApp workers (Ray actors) for a local Ray: Ray gets ``num_workers * num_cpus`` CPUs.
    num_cpus, num_gpus : float
        Resources of each ClientApp worker (Flower's ``client_resources``).
    address : str, optional
        Join this Ray cluster (``"auto"`` or host:port) instead of starting a local Ray.
    start_timeout : float, default=600
        Seconds to wait for the Grid.
    """

    def __init__(
        self,
        num_supernodes: int,
        num_workers: int = 2,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        address: str | None = None,
        start_timeout: float = 600.0,
    ) -> None:
        super().__init__(None, num_supernodes)
        import ray

        if ray.is_initialized():
            raise FedltError(
                "Ray is already running in this process, and Flower's simulation shuts Ray down when it "
                "ends. Call ray.shutdown() first, or use engine.kind = 'ray'."
            )
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        init: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "configure_logging": False,
        }
        if address is not None:
            init["address"] = address
        else:
            init["address"] = "local"  # not whatever cluster /tmp/ray/ray_current_cluster names
            init["num_cpus"] = max(math.ceil(num_workers * num_cpus), 1)
            if num_gpus > 0:
                init["num_gpus"] = max(torch.cuda.device_count(), 1)
        self.backend_config: dict[str, Any] = {
            "client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus},
            "init_args": init,
        }
        self._grids: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        # Flower's Ray backend rewrites PYTHONPATH for its workers; give it back on close.
        self._pythonpath = os.environ.get("PYTHONPATH")
        self._quiet = _Quiet()
        for name in ("flwr", "ray._private.worker"):
            logging.getLogger(name).addFilter(self._quiet)
        self._thread = threading.Thread(target=self._simulate, name="fedlt-flower-simulation", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        try:
            while self.grid is None:
                try:
                    self.grid = self._grids.get(timeout=0.05)
                except queue.Empty:
                    if not self._thread.is_alive() or time.monotonic() > deadline:
                        raise FedltError(
                            f"Flower's simulation did not start: {self._error!r}"
                        ) from self._error
        except BaseException:  # Ctrl-C included: stop the thread and Ray rather than leak them
            self.close()
            raise

    @classmethod
    def for_scenario(cls, scenario: Any) -> FlowerSimulation:
        """A simulation sized by the scenario: one SuperNode per client, the engine's resources."""
        cfg = scenario.engine
        return cls(scenario.partition.n_clients, cfg.num_workers, cfg.num_cpus, cfg.num_gpus, cfg.address)

    def _simulate(self) -> None:
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation

        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Any) -> None:
            self._grids.put(grid)
            self._stop.wait()

        try:
            run_simulation(
                server_app=server_app,
                client_app=make_client_app(),
                num_supernodes=self.num_supernodes,
                backend_config=self.backend_config,
            )
        except BaseException as exc:  # reported by check(), in the runner's thread
            self._error = exc

    def check(self) -> None:
        if not self._thread.is_alive() or self._error is not None:
            raise FedltError(f"Flower's simulation stopped: {self._error!r}") from self._error

    def close(self) -> None:
        """Stop the ServerApp (which ends the simulation, its Ray actors and Ray)."""
        self._stop.set()
        self._thread.join(timeout=120)
        for name in ("flwr", "ray._private.worker"):
            logging.getLogger(name).removeFilter(self._quiet)
        if self._pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = self._pythonpath

    def __enter__(self) -> FlowerSimulation:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)
        self.close()
