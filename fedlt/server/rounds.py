"""The server side of one round: select, configure, aggregate. fedlt's one round loop uses it.

Selecting clients, configuring them (``server_configure_round`` / ``server_configure_client``)
and combining their results (``server_make_aggregator`` or FedAvg, then
``server_after_aggregate``) happen here and only here, whatever engine trains the clients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.base.safe import describe_type
from fedlt.base.seeding import numpy_rng
from fedlt.data.federated import FederatedData
from fedlt.errors import NonFiniteLossError, PluginError
from fedlt.hooks.context import RoundContext, frozen_config
from fedlt.hooks.dispatch import HookSet
from fedlt.server.aggregation import FedAvg
from fedlt.training.round import ClientResult

__all__ = ["aggregate_round", "choose_clients", "configure_round", "round_context", "select_clients"]


def select_clients(seed: int, round: int, n_clients: int, fraction: float) -> list[int]:
    """The round's participants: ``max(1, floor(n * fraction))`` clients drawn from (seed, round)."""
    k = max(1, int(n_clients * fraction + 1e-9))
    if k >= n_clients:
        return list(range(n_clients))
    chosen = numpy_rng(seed, "select", round).choice(n_clients, size=k, replace=False)
    return sorted(int(c) for c in chosen)


def round_context(
    seed: int,
    data: FederatedData,
    round: int,
    n_rounds: int,
    selected: Sequence[int],
    config: Mapping[str, Any],
    **when: Any,
) -> RoundContext:
    """What the server hooks of one round see; ``when``: ``mode``, ``virtual_time``, ``arrivals``,
    ``system`` (see :class:`RoundContext`)."""
    return RoundContext(
        round,
        n_rounds,
        seed,
        data.num_classes,
        tuple(selected),
        frozen_config(config),
        data.train_class_counts,
        data.client_counts,
        **when,
    )


def choose_clients(
    hooks: HookSet,
    candidates: Callable[[], Sequence[int]],
    k: int,
    ctx: RoundContext,
    default: Callable[[], Sequence[int]],
) -> list[int]:
    """``server_select_clients``'s choice among ``candidates()`` (built only when a plugin selects),
    or ``default()``; ascending."""
    if hooks.server_select_clients:
        chosen = hooks.server_select_clients(candidates=list(candidates()), k=k, ctx=ctx)
        if chosen is not None:
            return sorted(int(c) for c in chosen)
    return sorted(int(c) for c in default())


def configure_round(
    hooks: HookSet,
    seed: int,
    data: FederatedData,
    round: int,
    n_rounds: int,
    selected: Sequence[int],
    **when: Any,
) -> tuple[RoundContext, dict[int, Mapping[str, Any]]]:
    """The round's context and each selected client's config (round config + per-client config)."""
    config: dict[str, Any] = {"round": round}
    ctx = round_context(seed, data, round, n_rounds, selected, config, **when)
    if hooks.server_configure_round:
        config.update(hooks.server_configure_round(ctx=ctx))
        ctx = round_context(seed, data, round, n_rounds, selected, config, **when)
    per_client: dict[int, Mapping[str, Any]] = {}
    for client in selected:
        own = (
            hooks.server_configure_client(client_id=client, ctx=ctx)
            if hooks.server_configure_client
            else None
        )
        per_client[client] = frozen_config({**config, **own}) if own else ctx.config
    return ctx, per_client


def _check_update(
    new: Any, state: Mapping[str, torch.Tensor], keys: Sequence[str], plugin: str, round: int
) -> Mapping[str, torch.Tensor]:
    """The aggregator's result holds known keys with the model's shapes, or a PluginError."""

    def fail(message: str) -> PluginError:
        return PluginError(
            plugin, "server_make_aggregator", f"the aggregator's result() {message}", round=round
        )

    if not isinstance(new, Mapping):
        raise fail(f"returned {describe_type(new)}; expected a mapping of weight names to tensors (or None)")
    allowed = set(keys)
    for key, value in new.items():
        if key not in allowed:
            raise fail(
                f"returned an unknown key {key!r}; it may only return the trained entries it was given "
                f"(global_weights keys, e.g. {sorted(allowed)[:3]})"
            )
        if not isinstance(value, torch.Tensor):
            raise fail(f"returned {describe_type(value)} for {key!r}; expected a tensor")
        if value.shape != state[key].shape:
            raise fail(
                f"returned shape {tuple(value.shape)} for {key!r}; the model's is {tuple(state[key].shape)}"
            )
        if not bool(torch.isfinite(value).all()) and state[key].is_floating_point():
            raise fail(f"returned non-finite values for {key!r}")
    return new


def aggregate_round(
    hooks: HookSet,
    model: nn.Module,
    keys: Sequence[str],
    ctx: RoundContext,
    results: Iterable[ClientResult],
    client_states: dict[int, dict[str, dict[str, Any]]],
    default: Callable[[Mapping[str, torch.Tensor]], Any] = FedAvg,
    state: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Stream ``results`` (in task order) into the aggregator and write the new weights into
    ``model``; stores each client's new plugin state. Returns (mean loss, samples trained).

    ``default`` makes the aggregator when no plugin does (the mode's rule: FedAvg, FedAsync,
    FedBuff); ``state``: ``model.state_dict()`` when the caller has it. A non-finite client loss
    stops the round naming round, client and plugins.
    """
    state = model.state_dict() if state is None else state
    global_weights = {k: state[k] for k in keys}
    maker = "fedlt"
    aggregator = None
    if hooks.server_make_aggregator:
        aggregator = hooks.server_make_aggregator(global_weights=global_weights, ctx=ctx)
        maker = hooks.server_make_aggregator.winner or maker
    if aggregator is None:
        aggregator = default(global_weights)
    payloads: dict[str, dict[int, Any]] = {name: {} for name in hooks.names}
    losses, total = [], 0
    for result in results:
        if not math.isfinite(result.loss):
            raise NonFiniteLossError(ctx.round, result.client_id, hooks.names, result.loss)
        try:
            aggregator.add(result.weights, result.n_samples, result.client_id)
        except Exception as exc:
            if maker == "fedlt":
                raise
            raise PluginError(
                maker,
                "server_make_aggregator",
                f"the aggregator's add() raised {type(exc).__name__}: {exc}",
                round=ctx.round,
            ) from exc
        # Sparse: only clients whose plugins keep something hold an entry (100,000 clients
        # without per-client state cost nothing).
        if any(result.states.values()):
            client_states[result.client_id] = result.states
        else:
            client_states.pop(result.client_id, None)
        for name, payload in result.payloads.items():
            payloads[name][result.client_id] = payload
        if result.n_steps:
            losses.append(result.loss)
        total += result.n_samples
    new = aggregator.result()
    if new is not None:
        new = _check_update(new, state, keys, maker, ctx.round) if maker != "fedlt" else new
        with torch.no_grad():
            for k, v in new.items():
                if v is not state[k]:  # an aggregator may have written the model's own tensors
                    state[k].copy_(v)
    if hooks.server_after_aggregate:
        hooks.server_after_aggregate(payloads=payloads, model=model, ctx=ctx)  # each plugin its own
    mean = float(losses[0]) if len(losses) == 1 else float(np.mean(losses)) if losses else float("nan")
    return mean, total
