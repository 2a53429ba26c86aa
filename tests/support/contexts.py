"""Hand-built contexts and hooks for calling plugins directly, without a run.

Client-side hooks run on a fresh plugin instance per client-round: ``client_start`` keeps the
round's constants on ``self`` and the per-batch hooks read them. :func:`client_hooks` gives the
client-side hooks of one client-round through the dispatcher (as the engine calls them: keyword
arguments, each implementation receiving only what it declares, results combined and checked),
and :func:`per_batch` the arguments the engine passes to the per-batch hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import fedlt
from fedlt.hooks.context import ClientContext, EvalContext, RoundContext, SetupContext
from fedlt.hooks.dispatch import ClientHooks, HookSet, build_hooks

Counts = Sequence[int] | np.ndarray


def client_ctx(
    labels: Sequence[int] | torch.Tensor = (),
    *,
    local_counts: Counts | None = None,
    global_counts: Counts | None = None,
    x: torch.Tensor | None = None,
    num_classes: int | None = None,
    **fields: Any,
) -> ClientContext:
    """Client 0 in round 1 of 10 holding ``labels`` (its whole local data, indices 0..n-1).

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
        "n_rounds": 10,
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


def eval_ctx(
    client_id: int | None = None,
    *,
    local_counts: Counts | None = None,
    global_counts: Counts,
    test_counts: Counts | None = None,
    round: int = 1,
    n_rounds: int = 10,
) -> EvalContext:
    """An evaluation of round ``round``: the global test set (``client_id=None``) or a client's view.

    ``test_counts`` (the evaluated samples' classes) defaults to ones for every class.
    """
    global_ = np.asarray(global_counts)
    return EvalContext(
        round=round,
        n_rounds=n_rounds,
        num_classes=len(global_),
        client_id=client_id,
        local_class_counts=None if local_counts is None else np.asarray(local_counts),
        global_class_counts=global_,
        test_class_counts=np.ones(len(global_), dtype=np.int64)
        if test_counts is None
        else np.asarray(test_counts),
    )


def setup_ctx(
    num_classes: int,
    *,
    seed: int = 0,
    input_shape: tuple[int, ...] = (8,),
    n_clients: int = 1,
    n_rounds: int = 10,
    global_counts: Counts | None = None,
    generator: torch.Generator | None = None,
) -> SetupContext:
    """Run-level facts for ``configure_model`` / ``server_setup``."""
    return SetupContext(
        seed=seed,
        num_classes=num_classes,
        input_shape=input_shape,
        n_clients=n_clients,
        n_rounds=n_rounds,
        device=torch.device("cpu"),
        global_class_counts=np.ones(num_classes, dtype=np.int64)
        if global_counts is None
        else np.asarray(global_counts),
        generator=torch.Generator() if generator is None else generator,
    )


def round_ctx(
    round: int = 1,
    *,
    global_counts: Counts,
    n_rounds: int = 10,
    seed: int = 0,
    selected: tuple[int, ...] = (0,),
    config: dict[str, Any] | None = None,
) -> RoundContext:
    """Server round ``round`` of ``n_rounds`` with one client holding ``global_counts``."""
    global_ = np.asarray(global_counts)
    return RoundContext(
        round=round,
        n_rounds=n_rounds,
        seed=seed,
        num_classes=len(global_),
        selected=selected,
        config={"round": round} if config is None else config,
        global_class_counts=global_,
        client_class_counts=global_[None, :],
    )


def _spec(plugin: str | dict[str, Any]) -> dict[str, Any]:
    return {"name": plugin} if isinstance(plugin, str) else plugin


def hook_set(*plugins: str | dict[str, Any]) -> HookSet:
    """The scenario's plugins (names or ``{"name": ..., **params}``), validated and registered."""
    return build_hooks(fedlt.load_scenario({"plugins": [_spec(p) for p in plugins]}).plugins)


def plugin(name: str, **params: Any) -> fedlt.Plugin:
    """One validated plugin instance (its server side; client hooks want :func:`client_hooks`)."""
    return hook_set({"name": name, **params}).plugins[0]


def client_hooks(
    *plugins: str | dict[str, Any] | HookSet,
    client_id: int = 0,
    round: int = 1,
    states: dict[str, dict[str, Any]] | None = None,
) -> ClientHooks:
    """The client-side hooks of one client-round (fresh plugin instances, as the engine makes).

    Pass plugin specs, or one :class:`HookSet` to reuse. ``states`` are the per-plugin per-client
    states (filled in place).
    """
    hooks = plugins[0] if len(plugins) == 1 and isinstance(plugins[0], HookSet) else hook_set(*plugins)
    return hooks.for_client(client_id, round, {} if states is None else states)


def per_batch(
    ctx: ClientContext,
    logits: torch.Tensor,
    y: torch.Tensor,
    features: torch.Tensor | None = None,
    head_input: torch.Tensor | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """The keyword arguments the engine passes to ``client_loss`` / ``client_sample_weights`` /
    ``client_transform_logits`` (``head_input`` defaults to ``features``, as without a
    ``client_forward`` that rescales)."""
    return {
        "logits": logits,
        "y": y,
        "features": features,
        "head_input": features if head_input is None else head_input,
        "model": model,
        "ctx": ctx,
    }
