"""Typed context objects handed to hooks: the facts a plugin may use, not engine internals.

Every field is documented here and in the generated reference (docs/plugins.md, "Context
reference"); a plugin author should not need to read any other module.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from fedlt.base.seeding import numpy_rng, torch_generator

__all__ = ["Arrival", "ClientContext", "EvalContext", "Forward", "LogContext", "RoundContext", "SetupContext"]


class Forward(NamedTuple):
    """What a training forward pass produced (``client_forward`` may return one).

    Attributes
    ----------
    features : Tensor
        ``(B, d)`` backbone features, ``model.features(x)``.
    logits : Tensor
        ``(B, C)`` logits.
    head_input : Tensor
        ``(B, d)`` what the linear head actually received: ``features`` unless the forward
        rescaled them (adaptive feature scaling feeds ``features / r``). Hooks that need the
        head's true input (closed-form head gradients) read it from here.
    """

    features: torch.Tensor
    logits: torch.Tensor
    head_input: torch.Tensor


@dataclass(frozen=True)
class Arrival:
    """One client update reaching the server (docs/async.md).

    Attributes
    ----------
    client_id : int
        The client.
    base_version : int
        The server version (server updates applied) its training started from.
    staleness : int
        Server updates applied between its start and the one it enters: ``version - base_version``.
        Always 0 in sync and deadline rounds.
    dispatched_at, arrived_at : float
        Virtual seconds of its start and of its arrival.
    base_weights : Mapping
        The global weights it started from (read-only; the current ones when it is fresh).
    refreshed : bool
        A plugin's ``server_refresh_update`` rewrote it onto the current weights (staleness 0).
    """

    client_id: int
    base_version: int
    staleness: int
    dispatched_at: float
    arrived_at: float
    base_weights: Mapping[str, torch.Tensor] = field(repr=False, default_factory=dict)
    refreshed: bool = False


@dataclass(frozen=True, slots=True)
class SetupContext:
    """Run-level facts, available when models and plugins are set up.

    Attributes
    ----------
    seed : int
        The scenario's seed.
    num_classes : int
        Number of classes C.
    input_shape : tuple of int
        Shape of one sample.
    n_clients : int
        Number of clients in the federation.
    n_rounds : int
        Rounds the run will train (``federation.rounds``).
    device : torch.device
        Where the model and data live.
    global_class_counts : np.ndarray
        ``(C,)`` true training counts over all clients: privileged information a real federation
        does not have, so plugins must say when they use it.
    generator : torch.Generator
        Seeded from ``(seed, "configure-model")``: the only randomness ``configure_model`` may use,
        so every process builds the identical model.
    run_dir : Path or None
        The run folder in the driver (loggers write there); ``None`` on workers.
    recipe : LocalTraining or None
        The scenario's local training recipe (``[train]``, before any plugin changes it for a
        client): what a server plugin that simulates a client's training needs.
    """

    seed: int
    num_classes: int
    input_shape: tuple[int, ...]
    n_clients: int
    n_rounds: int
    device: torch.device
    global_class_counts: np.ndarray
    generator: torch.Generator
    run_dir: Path | None = None
    recipe: Any = None

    def generator_for(self, purpose: str) -> torch.Generator:
        """A CPU generator of the stream ``(seed, purpose)``: randomness of the plugin's own, the same
        in every process, that leaves :attr:`generator`'s draws untouched. Name the purpose after
        the plugin (``"creff-features"``)."""
        return torch_generator(self.seed, purpose)


@dataclass(frozen=True, slots=True)
class RoundContext:
    """One server round.

    Attributes
    ----------
    round : int
        The round, from 1.
    n_rounds : int
        Rounds in the run.
    seed : int
        The scenario's seed.
    num_classes : int
        Number of classes C.
    selected : tuple of int
        The clients selected this round, in training (and aggregation) order.
    config : Mapping
        The round config built so far (read-only): ``{"round": r}`` plus what plugins added.
    global_class_counts : np.ndarray
        ``(C,)`` training counts over all clients (privileged).
    client_class_counts : np.ndarray
        ``(K, C)`` training counts of every client (privileged).
    mode : str
        ``federation.mode``: ``"sync"``, ``"deadline"``, ``"async"`` or ``"buffered"``.
    virtual_time : float
        Virtual seconds on the run's clock: when the round starts (sync, deadline), when the
        clients start (async, buffered configuration) or when the update is applied (aggregation).
    arrivals : tuple of Arrival
        At aggregation: the updates being applied, in the order ``add()`` receives them, with
        their staleness and base weights. Empty when selecting and configuring.
    system : Devices or None
        The simulated devices (speeds, ``duration(client, samples)``, ``available(client, t,
        round)``, ``tail_share``): what a selection strategy such as Oort needs to know.
    """

    round: int
    n_rounds: int
    seed: int
    num_classes: int
    selected: tuple[int, ...]
    config: Mapping[str, Any]
    global_class_counts: np.ndarray
    client_class_counts: np.ndarray
    mode: str = "sync"
    virtual_time: float = 0.0
    arrivals: tuple[Arrival, ...] = ()
    system: Any = field(default=None, repr=False, compare=False)

    @property
    def version(self) -> int:
        """Server updates applied before this one (``round - 1`` in every mode)."""
        return self.round - 1

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU torch generator seeded from ``(seed, round, purpose)``: server-side randomness
        that is the same on every engine and after a resume. Name the purpose after the plugin."""
        return torch_generator(self.seed, "server", self.round, purpose)

    def rng(self, purpose: str) -> np.random.Generator:
        """A numpy generator seeded from ``(seed, round, purpose)`` (see :meth:`generator`)."""
        return numpy_rng(self.seed, "server", self.round, purpose)

    def generator_for(self, purpose: str) -> torch.Generator:
        """A CPU generator of the stream ``(seed, purpose, round)``: every context has this method,
        with the round (and the client, where there is one) in the stream."""
        return torch_generator(self.seed, purpose, self.round)


@dataclass(slots=True)
class ClientContext:
    """One client in one round, wherever it is trained.

    Per-client facts (``client_id``, ``config``, ``local_class_counts``, ``indices``, ``labels``,
    ``generator``, ``epoch``, ``n_samples``, ``seen_classes``: :attr:`PER_CLIENT`; and
    ``class_counts("local")``) differ between the clients of a vectorized group, so a per-batch
    hook of a plugin declaring ``vectorized = True`` may not read them: it reads them in
    ``client_start`` and keeps what it needs on ``self`` as tensors.

    Attributes
    ----------
    client_id : int
        The client.
    round : int
        The round, from 1.
    n_rounds : int
        Rounds in the run.
    seed : int
        The scenario's seed.
    num_classes : int
        Number of classes C.
    config : Mapping
        This client's config (read-only): the round config merged with its per-client config.
    local_class_counts : np.ndarray
        ``(C,)`` the client's training counts. In a stream: the counts of what it has read so
        far, updated when each stream batch arrives (before training on it).
    global_class_counts : np.ndarray
        ``(C,)`` training counts over all clients (privileged).
    indices : Tensor
        The client's dataset indices for this round (all of its data offline; this round's
        stream slice in a continual scenario), rows of ``x_train``/``y_train``.
    labels : Tensor
        ``y_train[indices]``.
    x_train, y_train : Tensor
        The whole (device-resident) training set; index it, never copy it.
    batch_size, local_epochs, local_steps : int, int, int or None
        The local recipe of this client-round (after ``client_configure_training``).
    device : torch.device
        Where the model and data live.
    generator : torch.Generator
        Seeded from ``(seed, round, client)``: the only randomness client hooks should use.
    online_iter : int or None
        Steps per stream batch in a continual scenario, ``None`` offline.
    step, epoch : int
        The current optimizer step (from 0) and local epoch.
    dispatch : int
        Asynchronous modes: which start of a client this is (0 in sync and deadline rounds). It
        joins the generators' seeds, so a client started twice from one server version draws
        afresh.
    """

    #: Facts that differ by client: not readable in a vectorized per-batch hook.
    PER_CLIENT: ClassVar[frozenset[str]] = frozenset(
        {
            "client_id",
            "config",
            "local_class_counts",
            "indices",
            "labels",
            "generator",
            "epoch",
            "n_samples",
            "seen_classes",
        }
    )

    client_id: int
    round: int
    n_rounds: int
    seed: int
    num_classes: int
    config: Mapping[str, Any]
    local_class_counts: np.ndarray
    global_class_counts: np.ndarray
    indices: torch.Tensor
    labels: torch.Tensor
    x_train: torch.Tensor
    y_train: torch.Tensor
    batch_size: int
    local_epochs: int
    local_steps: int | None
    device: torch.device
    generator: torch.Generator
    online_iter: int | None = None
    step: int = 0
    epoch: int = 0
    dispatch: int = 0

    @property
    def n_samples(self) -> int:
        """Samples this client-round trains on (its data, or its stream slice)."""
        return int(self.indices.numel())

    @property
    def seen_classes(self) -> np.ndarray:
        """Boolean ``(C,)`` mask of the classes in the client's data (seen so far, in a stream)."""
        return self.local_class_counts > 0

    def class_counts(self, prior: str) -> np.ndarray:
        """Class counts by source: ``"local"`` (this client's) or ``"global"`` (privileged)."""
        if prior == "local":
            return self.local_class_counts
        if prior == "global":
            return self.global_class_counts
        raise ValueError(f"prior must be 'local' or 'global', got {prior!r}")

    def generator_for(self, purpose: str, per_round: bool = True) -> torch.Generator:
        """A CPU generator of the stream ``(seed, purpose, round, client)`` (``(seed, purpose,
        client)`` with ``per_round=False``): randomness of the plugin's own, the same on every
        engine and after a resume, that leaves :attr:`generator`'s draws (the sample order)
        untouched. Name the purpose after the plugin (``"gla-fr-local-head"``)."""
        parts: tuple[Any, ...] = (
            (purpose, self.round, self.client_id) if per_round else (purpose, self.client_id)
        )
        if per_round and self.dispatch:
            parts += ("dispatch", self.dispatch)
        return torch_generator(self.seed, *parts)

    def __getattr__(self, name: str) -> Any:
        """Names removed from the contract say what replaced them; others suggest a close field."""
        if name in _REMOVED:
            raise AttributeError(_REMOVED[name])
        close = difflib.get_close_matches(name, [f.name for f in fields(self)], n=1)
        hint = f" Did you mean ctx.{close[0]}?" if close else ""
        raise AttributeError(f"'ClientContext' object has no attribute {name!r}.{hint}")


@dataclass(frozen=True, slots=True)
class EvalContext:
    """One evaluation: the global test set (``client_id is None``) or a client's local view.

    Attributes
    ----------
    round : int
        The round just finished.
    n_rounds : int
        Rounds in the run.
    num_classes : int
        Number of classes C.
    client_id : int or None
        ``None`` for the global (balanced) test set, else the client whose local view this is.
    local_class_counts : np.ndarray or None
        The client's training counts (read so far, in a stream); ``None`` on the global set.
    global_class_counts : np.ndarray
        ``(C,)`` training counts over all clients (privileged).
    test_class_counts : np.ndarray
        ``(C,)`` counts of the classes among the evaluated test samples (FedLoGe masks the
        classes absent from a client's local test view).
    shot_groups : Mapping
        The run's head / medium / tail split (``eval.shot_rule``): ``{"head": [class ids],
        "medium": [...], "tail": [...]}``, for metrics reported per group.
    seed : int
        The scenario's seed.
    """

    round: int
    n_rounds: int
    num_classes: int
    client_id: int | None
    local_class_counts: np.ndarray | None
    global_class_counts: np.ndarray
    test_class_counts: np.ndarray
    shot_groups: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def generator_for(self, purpose: str, per_round: bool = True) -> torch.Generator:
        """A CPU generator of the stream ``(seed, purpose, round)``, or ``(seed, purpose, round,
        client)`` on a client's view: evaluation randomness (an attack's random start) that is the
        same on every engine and after a resume. On a client's view ``per_round=False`` gives
        ``(seed, purpose, client)``, the stream of ``ClientContext.generator_for(purpose,
        per_round=False)``: what the client's own training draws from it (an initial local head)."""
        if self.client_id is not None and not per_round:
            return torch_generator(self.seed, purpose, self.client_id)
        parts = (purpose, self.round) if self.client_id is None else (purpose, self.round, self.client_id)
        return torch_generator(self.seed, *parts)


@dataclass(frozen=True, slots=True)
class LogContext:
    """Where a run's records go (``server_log_metrics``, ``server_end``).

    Attributes
    ----------
    run_dir : Path
        The run folder.
    scenario : str
        The scenario's name.
    round : int or None
        The round of the record; ``None`` at the end of the run.
    n_rounds : int
        Rounds in the run.
    """

    run_dir: Path
    scenario: str
    round: int | None
    n_rounds: int


#: Context names removed from the plugin contract, with what replaced them.
_REMOVED = {
    "extra": "ctx.extra was removed in plugin contract 0.2: a client hook's scratch space is now self "
    "(client hooks run on a fresh plugin instance per client-round: set self.x in client_start and "
    "read it in the per-batch hooks); what the server needs goes back as client_end's payload, what a "
    "client keeps between its rounds in state; a forward pass that rescales features returns a "
    "fedlt.Forward with head_input. See docs/migrating.md.",
}


def frozen_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view, so hooks cannot change the config other clients receive."""
    return MappingProxyType(dict(config))
