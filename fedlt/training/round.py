"""One client's local training in one round: what every engine drives.

A client-round **begins** (torch's global RNG seeded from (seed, round, client); its context with
the client's own generator; fresh plugin instances; ``client_start``,
``client_configure_training``, ``client_trainable_parameters``; the step plan), takes its
**steps**, and **ends** (``client_end``, the state checks). At each step the stream batch
arrives (its class counts, ``client_stream_batch``), replayed samples join it
(``client_replay_indices``), the batch is gathered and augmented, the parameters change, and a
consumed stream batch updates the memory (``client_update_memory``).

Only "the parameters change" differs between engines: an :class:`Update`, either one model's
autograd step (:class:`~fedlt.training.serial.SerialUpdate`: the serial engine, Ray actors,
Flower nodes) or a vmapped step over a group's stacked parameters
(:class:`~fedlt.training.vectorized.GroupUpdate`). :func:`drive` takes the steps of one client or
of a group in lockstep with the same code, so hook order, stream handling, memory, RNG and
the loss total are written once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.base.seeding import seed_torch
from fedlt.hooks.context import ClientContext
from fedlt.hooks.dispatch import ClientHooks, HookSet
from fedlt.hooks.recipe import LocalTraining
from fedlt.training.augment import crop_flip
from fedlt.training.context import client_context
from fedlt.training.plan import Step, plan_steps

__all__ = ["ClientResult", "ClientRound", "ClientTask", "TrainingSetup", "Update", "drive"]


@dataclass
class ClientTask:
    """What an engine needs to train one client in one round (plain data, sent to workers).

    Attributes
    ----------
    client_id, round : int
        Who and when.
    config : Mapping
        The client's config: the round config merged with its per-client config.
    states : dict
        Each plugin's per-client state, by plugin name (updated in place by training).
    indices : np.ndarray or None
        Continual scenarios: this round's slice of the client's stream; ``None`` offline.
    seen_counts : np.ndarray or None
        Continual scenarios: class counts of what the client read *before* this slice.
    dispatch : int
        Asynchronous modes: the number of this start of the client, joined to its seeds (0 in
        sync and deadline rounds, whose seeds are (seed, round, client) as always).
    """

    client_id: int
    round: int
    config: Mapping[str, Any]
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    indices: np.ndarray | None = None
    seen_counts: np.ndarray | None = None
    dispatch: int = 0


@dataclass
class ClientResult:
    """What comes back: weights to aggregate, sample count, payloads, the client's new state."""

    client_id: int
    weights: Mapping[str, torch.Tensor]
    n_samples: int
    loss: float
    n_steps: int
    payloads: dict[str, Any]
    states: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class TrainingSetup:
    """What every client-round of a run shares: the scenario, the data, the plugins, the recipe.

    Attributes
    ----------
    scenario : Scenario
        The run's scenario (seed, stream settings).
    data : FederatedData
        The run's data (device-resident tensors, client indices).
    hooks : HookSet
        The run's plugins.
    device : torch.device
        Where the model and data live.
    recipe : LocalTraining
        The scenario's ``[train]`` recipe (a plugin may change it per client-round).
    dtype : torch.dtype or None
        The autocast dtype of each step's forward pass and loss (``engine.dtype``); None: float32.
    """

    scenario: Any
    data: Any
    hooks: HookSet
    device: torch.device
    recipe: LocalTraining
    dtype: torch.dtype | None = None

    def autocast(self) -> Any:
        """A fresh autocast context for one step's forward pass and loss (never a whole round:
        autocast caches the low-precision copies of the weights until it exits)."""
        return torch.autocast(self.device.type, dtype=self.dtype)


class Update(ABC):
    """How the parameters change at a step: the one part of a client-round engines do differently."""

    @abstractmethod
    def step(self, clients: Sequence[ClientRound], batches: Sequence[torch.Tensor], s: int) -> None:
        """Train step ``s`` of ``clients`` on ``batches`` (their dataset indices), adding each
        client's loss to its total."""

    @abstractmethod
    def model_of(self, client: ClientRound) -> AbstractContextManager[nn.Module]:
        """The model holding ``client``'s current weights, for a per-client hook that takes one
        (a context: changes the hook makes to it are kept)."""

    def expose(self, client: ClientRound) -> None:  # noqa: B027 - optional: one model needs nothing
        """Before a per-client hook: make the client's own tensors current (a group keeps them
        stacked while training)."""


class ClientRound:
    """One client's local training in one round, from its begin to its end.

    Parameters
    ----------
    setup : TrainingSetup
        What the run's client-rounds share.
    task : ClientTask or None
        The client, round, config, state and (in a stream) slice; None when the context and
        hooks are built by the caller (:meth:`start`).
    shared_hooks : ClientHooks, optional
        Hooks to use instead of fresh ones: a group whose plugins have no client-side hooks at
        all shares one (empty) set.
    isolated_rng : bool, default=False
        The client shares the process with others trained in lockstep (a vectorized group):
        torch's global RNG is switched to this client's own state around each of its hooks, so
        every hook draws what it would if the client were trained alone.

    Attributes
    ----------
    ctx : ClientContext
        The client's context (its generator seeded from (seed, round, client)).
    hooks : ClientHooks
        Its plugins' client-side hooks, on fresh instances.
    recipe : LocalTraining
        Its local recipe, after ``client_configure_training``.
    extras : list of Tensor
        Tensors the plugins asked the optimizer to train (``client_trainable_parameters``).
    plan : list of Step
        Its steps.
    total : Tensor
        The sum of its step losses (on the device: read once, at the end).
    touched : bool
        A per-client hook ran since the last step (its plugins' attributes may have changed).
    """

    __slots__ = (
        "_arrive",
        "_arrive_model",
        "_memory",
        "_n_local",
        "_replay",
        "_rng",
        "augment",
        "ctx",
        "extras",
        "hooks",
        "isolated_rng",
        "plan",
        "recipe",
        "setup",
        "shared_hooks",
        "task",
        "total",
        "touched",
    )

    def __init__(
        self,
        setup: TrainingSetup,
        task: ClientTask | None = None,
        shared_hooks: ClientHooks | None = None,
        isolated_rng: bool = False,
    ) -> None:
        self.setup = setup
        self.task = task
        self.shared_hooks = shared_hooks
        self.isolated_rng = isolated_rng
        self._rng: list[torch.Tensor] | None = None
        self.touched = False

    # ------------------------------------------------------------------ begin

    def begin(self, model: nn.Module) -> None:
        """Seed, build the context and fresh plugin instances, then :meth:`start`.

        ``model`` holds the global weights; ``client_start`` may change it.
        """
        s, task = self.setup, self.task
        if self.shared_hooks is None:  # a group without client hooks: nothing draws from it
            seed_torch(s.scenario.seed, "torch", task.round, task.client_id, *_dispatch(task))
        ctx = client_context(s.scenario, s.data, task, s.device, s.recipe)
        streaming = s.scenario.stream.kind != "none"
        hooks = self.shared_hooks or s.hooks.for_client(task.client_id, task.round, task.states, streaming)
        labels = s.data.y_train_np[task.indices] if ctx.online_iter is not None else None
        self.start(model, ctx, hooks, labels)

    def start(
        self,
        model: nn.Module,
        ctx: ClientContext,
        hooks: ClientHooks,
        stream_labels: np.ndarray | None = None,
    ) -> None:
        """Run the start hooks on ``model`` and plan the steps, for a context and hooks already built
        (``stream_labels``: the labels of a stream slice, on the host)."""
        self.ctx, self.hooks = ctx, hooks
        model.train()
        if hooks.client_start:
            hooks.client_start(model=model, ctx=ctx)
        recipe = self.setup.recipe
        if hooks.client_configure_training:
            recipe = hooks.client_configure_training(recipe=recipe, ctx=ctx)
            ctx.batch_size, ctx.local_epochs, ctx.local_steps = (
                recipe.batch_size,
                recipe.local_epochs,
                recipe.local_steps,
            )
        self.recipe = recipe
        self.extras: list[torch.Tensor] = []
        if hooks.client_trainable_parameters:
            self.extras = list(hooks.client_trainable_parameters(model=model, ctx=ctx))
        self.plan: list[Step] = plan_steps(ctx, hooks, stream_labels)
        # Settle per-step dispatch once: None means "no plugin implements it" (offline, the
        # stream-only hooks are never bound: their declarations say so).
        self._arrive = hooks.client_stream_batch or None
        self._arrive_model = self._arrive is not None and any(
            "model" in b.argnames for b in self._arrive.impls
        )
        self._replay = hooks.client_replay_indices or None
        self._memory = hooks.client_update_memory or None
        self.augment = recipe.augment == "crop-flip"
        self._n_local = max(ctx.n_samples, 1)
        self.total = torch.zeros((), device=ctx.device)
        if self.isolated_rng and self.shared_hooks is None:
            self._rng = _rng_state(self.setup.device)

    # ------------------------------------------------------------------ a step

    def batch(self, s: int, update: Update) -> torch.Tensor:
        """Step ``s``'s dataset indices: a stream batch arrives first (its counts, then
        ``client_stream_batch``), replayed samples are appended after it."""
        ctx, step = self.ctx, self.plan[s]
        ctx.step, ctx.epoch = s, s * ctx.batch_size // self._n_local
        batch = step.batch
        if step.arrives is not None:  # counted as seen before the first step trains on it
            ctx.local_class_counts += step.arrives
            if self._arrive is not None:
                self._own_rng(update)
                if self._arrive_model:
                    with update.model_of(self) as model:
                        self._arrive(batch=batch, model=model, ctx=ctx)
                else:
                    self._arrive(batch=batch, model=None, ctx=ctx)
                self._shared_rng()
        if self._replay is None:
            return batch
        self._own_rng(update)
        extra = self._replay(batch=batch, ctx=ctx)
        self._shared_rng()
        if extra is not None and extra.numel():
            return torch.cat([batch, extra.to(batch.device)])
        return batch

    def inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples and labels of ``idx``, augmented with the client's own draws."""
        ctx = self.ctx
        # index_select is several times faster than advanced indexing (x[idx]) for a row gather
        x, y = ctx.x_train.index_select(0, idx), ctx.y_train.index_select(0, idx)
        if self.augment:
            x = crop_flip(x, self.ctx.generator)
        return x, y

    def done(self, s: int, update: Update) -> None:
        """After step ``s``: a stream batch whose ``online_iter`` steps are over updates the memory."""
        step = self.plan[s]
        if step.ends_batch and self._memory is not None:
            self._own_rng(update)
            self._memory(batch=step.batch, ctx=self.ctx)
            self._shared_rng()

    # ------------------------------------------------------------------ end

    def end(self, model: nn.Module) -> dict[str, Any]:
        """``client_end`` (``model`` holds the client's trained weights) and the state checks;
        returns the payloads by plugin name."""
        self._own_rng(None)
        payloads = self.hooks.client_end(model=model, ctx=self.ctx) if self.hooks.client_end else {}
        self._shared_rng()
        if self.shared_hooks is None:
            self.hooks.check_states()
        return payloads

    def result(
        self, weights: Mapping[str, torch.Tensor], loss: float, payloads: dict[str, Any]
    ) -> ClientResult:
        return ClientResult(
            self.task.client_id, weights, self.ctx.n_samples, loss, len(self.plan), payloads, self.task.states
        )

    @property
    def end_needs_model(self) -> bool:
        """Whether some ``client_end`` reads the model (a group then loads this client's weights)."""
        return any("model" in b.argnames for b in self.hooks.client_end.impls)

    # ------------------------------------------------------------------ the global RNG

    def _own_rng(self, update: Update | None) -> None:
        """Before a per-client hook: the client's tensors are current (``update.expose``) and torch's
        global RNG holds this client's state (only when trained in a group)."""
        self.touched = True
        if update is not None:
            update.expose(self)
        if self._rng is not None:
            _set_rng_state(self._rng, self.setup.device)

    def _shared_rng(self) -> None:
        """Keep what this client's hook left in torch's global RNG for its next hook."""
        if self._rng is not None:
            self._rng = _rng_state(self.setup.device)


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_state(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1], device)


def drive(
    clients: Sequence[ClientRound],
    update: Update,
    on_step: Callable[[int, int], None] | None = None,
) -> None:
    """Take the steps of ``clients`` (begun, ordered by plan length, longest first) in lockstep.

    One client (the serial engine, a worker) or a group (vectorized): at step ``s`` the clients
    whose plans reach ``s`` get their batch (arrivals, replay), ``update`` trains them, and their
    finished stream batches update the memory. ``on_step(done, total)`` reports progress, at
    most twice a second.
    """
    if not clients:
        return
    lengths = [len(c.plan) for c in clients]
    n = lengths[0]
    next_report = time.monotonic() + 0.5 if on_step is not None else None
    active = list(clients)
    for s in range(n):
        while lengths[len(active) - 1] <= s:  # plans end longest-first: drop from the back
            active.pop()
        if next_report is not None and time.monotonic() >= next_report:
            on_step(s, n)
            next_report = time.monotonic() + 0.5
        batches = [c.batch(s, update) for c in active]
        update.step(active, batches, s)
        for c in active:
            c.done(s, update)


def _dispatch(task: ClientTask) -> tuple[Any, ...]:
    """What an asynchronous start adds to a client-round's seeds (nothing in sync rounds)."""
    return ("dispatch", task.dispatch) if task.dispatch else ()
