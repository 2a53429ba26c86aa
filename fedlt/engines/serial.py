"""The default engine: every client trained in this process on one resident model.

One by one (each client a :class:`~fedlt.training.round.ClientRound` driven by a
:class:`~fedlt.training.serial.SerialUpdate`), or, with ``engine.vectorize``, in groups trained
together (the same client-rounds driven in lockstep by a
:class:`~fedlt.training.vectorized.GroupUpdate`). Groups are as large as memory allows
(:mod:`fedlt.training.sizing`, or ``engine.group_size``); a group that runs out of memory is
retried in halves, from the same states. Each round's report says whether it trained vectorized
and why, in how many groups, and its peak memory.
"""

from __future__ import annotations

import copy
import functools
import gc
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch

from fedlt.base.allocator import keep_freed_memory
from fedlt.base.memory import device_free_memory
from fedlt.engines.base import Engine
from fedlt.errors import FedltError
from fedlt.hooks.plugin import implementations
from fedlt.prepare import Prepared
from fedlt.training.group import VMAP_HOOKS, PluginViews
from fedlt.training.round import ClientResult, ClientRound, ClientTask, drive
from fedlt.training.sizing import activation_bytes, client_bytes, group_size_for
from fedlt.training.vectorized import GroupUpdate, group_key, stack_state, vectorize_blockers
from fedlt.training.worker import ClientTrainer

__all__ = ["SerialEngine", "is_out_of_memory", "resolve_vectorize"]

#: Hooks that receive the model before training starts (and so could change it per client).
_PREP_HOOKS = ("client_start", "client_trainable_parameters")


def resolve_vectorize(mode: str, device: torch.device) -> tuple[bool, str]:
    """Whether clients train in vectorized groups, and why: ``engine.vectorize`` is "on", "off", or
    "auto" (on CUDA only: on a CPU vmap is no faster than one by one)."""
    if mode == "auto":
        if device.type == "cuda":
            return True, 'engine.vectorize = "auto" on CUDA'
        return False, 'engine.vectorize = "auto" trains one by one on a CPU'
    return mode == "on", f'engine.vectorize = "{mode}"'


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA's, or the CPU allocator's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class SerialEngine(Engine):
    """One process, one model reused for all clients, data resident on the device."""

    name = "serial"

    def __init__(self, prepared: Prepared) -> None:
        super().__init__(prepared)
        scenario, hooks, device = self.scenario, self.hooks, self.device
        self._noticed: set[str] = set()
        keep_freed_memory()
        if isinstance(scenario.engine.threads, int):
            torch.set_num_threads(scenario.engine.threads)
        # The resident training model: a copy of the driver's (which holds the global weights).
        model = copy.deepcopy(prepared.model)
        self.trainer = ClientTrainer(scenario, self.data, hooks, device, model)
        model = self.trainer.model
        streaming = scenario.stream.kind != "none"
        wanted, self._why = resolve_vectorize(scenario.engine.vectorize, device)
        self.blockers = vectorize_blockers(hooks, model, streaming, self.trainer.keys) if wanted else []
        self.vectorize = wanted and not self.blockers
        if self.blockers:
            self._why = f"training clients one by one, not vectorized: {self.blockers[0]}"
            self._notice(self._why)
        self.group_limit: int | None = scenario.engine.group_size
        self._group_size: int | None = None  # found on the first vectorized round, halved on OOM
        self._vector_plugins = [
            p.name for p in hooks.plugins if any(h in implementations(type(p), p.name) for h in VMAP_HOOKS)
        ]
        self._prep_touches_model = any(
            "model" in impl.argnames
            for p in hooks.plugins
            for name, impl in implementations(type(p), p.name).items()
            if name in _PREP_HOOKS
        )
        #: Totals over the run (tests and benchmarks read them): groups and vmapped calls (and those
        #: on rows gathered out of the stack), clients trained one by one, out-of-memory retries.
        self.stats = {"groups": 0, "calls": 0, "gathered": 0, "one_by_one": 0, "oom_retries": 0}
        self._round: dict[str, Any] = {}

    def _notice(self, message: str) -> None:
        """Print ``message`` once per run on stderr."""
        if message not in self._noticed:
            self._noticed.add(message)
            print(f"fedlt: {message}", file=sys.stderr)

    def round_report(self) -> dict[str, Any]:
        return dict(self._round)

    # ------------------------------------------------------------------ the round

    def train_round(
        self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        self._round = {"vectorized": self.vectorize, "why": self._why}
        if not tasks:
            return
        if not self.vectorize:
            for i, task in enumerate(tasks):
                yield self.trainer.run(task, global_state, self._progress(i))
                self.stats["one_by_one"] += 1
            return
        size = self._size_groups(tasks, global_state)
        self._round.update(group_size=size, groups=0, oom_retries=0)
        for start in range(0, len(tasks), size):
            yield from self._train_chunk(list(tasks[start : start + size]), global_state, start)

    def _progress(self, index: int) -> Callable[[int, int], None] | None:
        return None if self.on_step is None else functools.partial(self.on_step, index)

    # ------------------------------------------------------------------ vectorized groups

    def _size_groups(self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]) -> int:
        """Clients per group: ``engine.group_size`` if set, else what memory holds (measured on the
        first vectorized round, then kept; halved for good after an out-of-memory retry)."""
        if self._group_size is None:
            if self.group_limit is not None:
                self._group_size = self.group_limit
            else:
                trainer = self.trainer
                n = min(trainer.recipe.batch_size, len(self.data.y_train))
                x = self.data.x_train[: max(n, 1)]
                trainer.load_global(global_state)
                per_client = client_bytes(trainer.model, trainer.recipe, activation_bytes(trainer.model, x))
                self._group_size = group_size_for(per_client, device_free_memory(self.device), 1 << 30)
        return max(1, min(self._group_size, len(tasks)))

    def _train_chunk(
        self, tasks: list[ClientTask], global_state: Mapping[str, torch.Tensor], first: int
    ) -> Iterator[ClientResult]:
        """Train ``tasks`` together; out of memory, again in halves from the same states."""
        saved = [copy.deepcopy(t.states) for t in tasks]
        try:
            results = self._vectorized(tasks, global_state, first)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            del exc
            for task, states in zip(tasks, saved, strict=True):
                task.states.clear()
                task.states.update(states)
            self._free()
            self.stats["oom_retries"] += 1
            self._round["oom_retries"] += 1
            if len(tasks) == 1:
                raise FedltError(
                    f"Client {tasks[0].client_id} in round {tasks[0].round}: out of memory training it alone "
                    f"on {self.device}; use a smaller model or batch, or another device."
                ) from None
            half = (len(tasks) + 1) // 2
            self._group_size = min(self._group_size or half, half)
            self._notice(
                f"round {tasks[0].round}: a group of {len(tasks)} clients ran out of memory; groups of "
                f"{half} from now on"
            )
            yield from self._train_chunk(tasks[:half], global_state, first)
            yield from self._train_chunk(tasks[half:], global_state, first + half)
            return
        yield from results

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _vectorized(
        self, tasks: list[ClientTask], global_state: Mapping[str, torch.Tensor], first: int
    ) -> list[ClientResult]:
        """Begin every client of ``tasks``, train them in groups of equal structure, end them;
        results in task order."""
        trainer, hooks = self.trainer, self.hooks
        model, setup = trainer.model, trainer.setup
        trainer.load_global(global_state)
        # Without client-side hooks a client-round needs no plugin instances and no RNG of its own.
        shared = None if hooks.has_client_hooks else hooks.for_client(tasks[0].client_id, tasks[0].round, {})
        clients = [ClientRound(setup, t, shared, isolated_rng=True) for t in tasks]
        # A start hook may change the model (per client): a client whose start did trains from its
        # own snapshot, the others from the global weights. Tensors' version counters tell which
        # (a hook that only reads the model, such as a prior estimated from the head, costs nothing).
        live = [t for _, t in _entries(model)]
        snapshots: dict[int, list[torch.Tensor]] = {}
        for i, c in enumerate(clients):
            versions = [t._version for t in live]
            c.begin(model)
            if self._prep_touches_model and any(t._version != v for t, v in zip(live, versions, strict=True)):
                snapshots[i] = [t.detach().clone() for t in live]
                trainer.load_global(global_state)
        views = PluginViews(clients[0].hooks) if self._vector_plugins else None
        groups: dict[Hashable, list[int]] = {}
        for i, c in enumerate(clients):
            plugin_key = views.signature(c.hooks, c.extras)[0] if views is not None else ()
            groups.setdefault(group_key(c, plugin_key), []).append(i)
        if len(groups) > 1:
            self._notice(
                f"round {tasks[0].round}: clients trained in {len(groups)} vectorized groups, not one "
                "(their recipes or plugin attributes differ)"
            )
        results: list[ClientResult | None] = [None] * len(clients)
        for key, rows in groups.items():
            order = sorted(rows, key=lambda i: -len(clients[i].plan))  # longest plan first
            members = [clients[i] for i in order]
            group_stacks = stack_state(model, global_state, len(members))
            with torch.no_grad():
                for row, i in enumerate(order):
                    for (name, _), value in zip(_entries(model), snapshots.get(i, ()), strict=False):
                        group_stacks[name][row].copy_(value)
            update = GroupUpdate(setup, model, members, group_stacks, views, key[2])
            on_step = self._progress(first + order[0])
            drive(members, update, on_step)
            for i, result in zip(order, update.finish(trainer.keys), strict=True):
                results[i] = result
            self.stats["groups"] += 1
            self.stats["calls"] += update.calls
            self.stats["gathered"] += update.gathered
            self._round["groups"] += 1
        return results  # type: ignore[return-value]


def _entries(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's trainable parameters and buffers, in :func:`stack_state`'s order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad] + list(model.named_buffers())
