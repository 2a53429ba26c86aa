"""The Ray engine: a pool of actors, each with a resident model, the data in Ray's object store.

Each actor builds the run's model and plugins once (from the scenario) and then trains whatever
client it is handed. A task carries the client's per-plugin state and the round config; the
result carries the new weights and the new state back, so nothing lives only on a worker. The
driver yields results in task order, so aggregation order, and the numbers, match the serial
engine.

Faults: a task that raises is re-run up to ``max_retries`` times, then the run fails naming the
client, round and plugin; an actor that dies is replaced and its clients re-run, but a client
whose worker died more than ``max_retries`` times fails the run. A worker that cannot build its
model, data or plugins (an error the driver did not hit) reports that error on its first task,
which then fails like any other task: the run stops with the worker's own error, naming the
plugin, instead of replacing workers forever. Because every draw derives from (seed, round,
client), a re-run gives the same result.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedlt.data.federated import FederatedData
from fedlt.engines.base import Engine
from fedlt.errors import FedltError, PluginError, ScenarioError
from fedlt.prepare import Prepared
from fedlt.training.round import ClientResult, ClientTask

__all__ = ["RayEngine"]


def on_worker(exc: BaseException) -> BaseException:
    """A worker's setup error, saying it happened on a Ray worker: a plugin or data that loads in
    the driver may not on a worker (another machine, another environment)."""
    where = f"on a Ray worker (pid {os.getpid()})"
    if isinstance(exc, PluginError):
        return PluginError(exc.plugin, exc.hook, f"{exc.message} ({where})", exc.client, exc.round)
    if isinstance(exc, ScenarioError):
        hint = " ".join(filter(None, [exc.hint, f"This happened {where}."]))
        return ScenarioError(exc.key, exc.value, exc.allowed, hint=hint)
    return FedltError(f"Preparing the run {where} failed: {type(exc).__name__}: {exc}")


class _Worker:
    """Actor body: one resident model and the shared data; trains one client per call."""

    def __init__(self, scenario: Any, shared: dict[str, Any], device: str, threads: int) -> None:
        from fedlt.base.allocator import keep_freed_memory
        from fedlt.prepare import prepare
        from fedlt.training.worker import ClientTrainer

        keep_freed_memory()
        torch.set_num_threads(threads)
        self.error: BaseException | None = None
        try:
            data = FederatedData.from_shared(shared, device)
            p = prepare(scenario, device, data=data, checked=True)  # the driver checked the scenario
            self.trainer = ClientTrainer(p.scenario, p.data, p.hooks, p.device, p.model)
        except Exception as exc:  # reported on the first task: the actor must not die of it
            self.error = on_worker(exc)

    def run(self, task: ClientTask, global_state: Mapping[str, np.ndarray]) -> ClientResult:
        if self.error is not None:
            raise self.error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only object-store arrays, only read
            state = {k: torch.from_numpy(v) for k, v in global_state.items()}
        result = self.trainer.run(task, state)
        # The trainer returns live tensors of the resident model: copy them out.
        result.weights = {k: v.detach().cpu().numpy().copy() for k, v in result.weights.items()}
        return result

    def pid(self) -> int:
        return os.getpid()


class RayEngine(Engine):
    """Clients trained by a pool of Ray actors (local Ray, or a cluster via ``address``)."""

    name = "ray"

    def __init__(self, prepared: Prepared) -> None:
        super().__init__(prepared)
        scenario, data, device = self.scenario, self.data, self.device
        import ray

        cfg = scenario.engine
        self._ray = ray
        self._started_ray = False
        # Keep Ray from rewriting CUDA_VISIBLE_DEVICES for CPU-only actors (and from warning about it).
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        if not ray.is_initialized():
            init: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if cfg.address is not None:
                init["address"] = cfg.address
            else:
                init["address"] = "local"  # not whatever cluster /tmp/ray/ray_current_cluster names
                init["num_cpus"] = max(int(np.ceil(cfg.num_workers * cfg.num_cpus)), 1)
                if cfg.num_gpus > 0:
                    init["num_gpus"] = max(torch.cuda.device_count(), 1)
            ray.init(**init)
            self._started_ray = True
        self._device = "cuda" if cfg.num_gpus > 0 else str(device)
        self._threads = cfg.threads if isinstance(cfg.threads, int) else max(int(cfg.num_cpus), 1)
        self._actor_cls = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=0)(_Worker)
        self._shared = ray.put(data.to_shared())
        self.workers = [self._spawn() for _ in range(cfg.num_workers)]
        self.max_retries = cfg.max_retries
        self.replaced = 0

    def _spawn(self) -> Any:
        return self._actor_cls.remote(self.scenario, self._shared, self._device, self._threads)

    def worker_pids(self) -> list[int]:
        """Process ids of the current actors (tests kill one to check recovery)."""
        return self._ray.get([w.pid.remote() for w in self.workers])

    def train_round(
        self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        ray = self._ray
        state_ref = ray.put({k: v.detach().cpu().numpy() for k, v in global_state.items()})
        queue = list(range(len(tasks)))
        queue.reverse()
        attempts = [0] * len(tasks)
        inflight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (task index, worker slot, actor)
        idle = list(range(len(self.workers)))
        done: dict[int, ClientResult] = {}
        nxt = 0

        def submit(slot: int) -> None:
            i = queue.pop()
            actor = self.workers[slot]
            inflight[actor.run.remote(tasks[i], state_ref)] = (i, slot, actor)

        # Results are yielded in task order; cap how far ahead of the next one work may run so the
        # buffer of early finishers stays bounded (streaming aggregation, bounded memory).
        window = 2 * len(self.workers)
        while nxt < len(tasks):
            while queue and idle and queue[-1] < nxt + window:
                submit(idle.pop())
            if nxt in done:
                yield self._to_tensors(done.pop(nxt))
                nxt += 1
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1)
            i, slot, actor = inflight.pop(ready[0])
            try:
                done[i] = ray.get(ready[0])
                idle.append(slot)
            except ray.exceptions.RayActorError as exc:
                # The worker process died: replace it (once per death) and re-run its client, at
                # most max_retries times per client (a client that kills every worker fails).
                if self.workers[slot] is actor:
                    self.workers[slot] = self._spawn()
                    self.replaced += 1
                    idle.append(slot)
                attempts[i] += 1
                if attempts[i] > self.max_retries:
                    task = tasks[i]
                    raise FedltError(
                        f"Client {task.client_id} in round {task.round}: its Ray worker died "
                        f"{attempts[i]} times (engine.max_retries = {self.max_retries}): {exc}"
                    ) from None
                queue.append(i)
            except ray.exceptions.RayTaskError as exc:
                attempts[i] += 1
                idle.append(slot)
                if attempts[i] > self.max_retries:
                    cause = exc.as_instanceof_cause()
                    if isinstance(exc.cause, FedltError):
                        raise exc.cause from None
                    raise cause from None
                queue.append(i)

    @staticmethod
    def _to_tensors(result: ClientResult) -> ClientResult:
        with warnings.catch_warnings():
            # Arrays from the object store are read-only; aggregation only reads them.
            warnings.simplefilter("ignore", UserWarning)
            result.weights = {k: torch.from_numpy(v) for k, v in result.weights.items()}
        return result

    def close(self) -> None:
        for w in self.workers:
            self._ray.kill(w)
        self.workers = []
        if self._started_ray:
            self._ray.shutdown()
