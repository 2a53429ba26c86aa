"""The server side of one round, shared by fedlt's runner and Flower's strategy.

Configuring a round (``server_configure_round``) and combining its results
(``server_make_aggregator`` or FedAvg, then ``server_after_aggregate``) must be the same code
whoever drives the rounds, or the engines would drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.aggregation import FedAvg
from fedlt.client import ClientResult
from fedlt.context import RoundContext, frozen_config
from fedlt.data.federated import FederatedData
from fedlt.errors import NonFiniteLossError
from fedlt.pluginmanager import HookSet

__all__ = ["aggregate_round", "configure_round", "round_context"]


def round_context(
    seed: int, data: FederatedData, round: int, selected: Sequence[int], config: Mapping[str, Any]
) -> RoundContext:
    """What the server hooks of one round see."""
    return RoundContext(
        round,
        seed,
        data.num_classes,
        tuple(selected),
        frozen_config(config),
        data.train_class_counts,
        data.client_counts,
    )


def configure_round(
    hooks: HookSet,
    seed: int,
    data: FederatedData,
    round: int,
    selected: Sequence[int],
    extra: Mapping[str, Any] | None = None,
) -> RoundContext:
    """The round's context; its ``config`` holds ``round``, ``extra`` and what plugins add."""
    config: dict[str, Any] = {**(extra or {}), "round": round}
    ctx = round_context(seed, data, round, selected, config)
    if not hooks.server_configure_round:
        return ctx
    for _, more in hooks.server_configure_round.all(ctx=ctx, states=None):
        config.update(more or {})
    return round_context(seed, data, round, selected, config)


def aggregate_round(
    hooks: HookSet,
    model: nn.Module,
    keys: Sequence[str],
    ctx: RoundContext,
    results: Iterable[ClientResult],
    client_states: dict[int, dict[str, dict[str, Any]]],
) -> tuple[float, int]:
    """Stream ``results`` (in task order) into the aggregator and write the new weights into
    ``model``; stores each client's new plugin state. Returns (mean loss, samples trained).

    A non-finite client loss stops the round naming round, client and plugins.
    """
    state = model.state_dict()
    make = hooks.server_make_aggregator
    aggregator = make.first(ctx=ctx, states=None) if make else None
    if aggregator is None:
        aggregator = FedAvg({k: state[k] for k in keys})
    payloads: dict[str, dict[int, Any]] = {name: {} for name in hooks.names}
    losses, total = [], 0
    for result in results:
        if not math.isfinite(result.loss):
            raise NonFiniteLossError(ctx.round, result.client_id, hooks.names, result.loss)
        aggregator.add(result.weights, result.n_samples, result.client_id)
        client_states[result.client_id] = result.states
        for name, payload in result.payloads.items():
            payloads[name][result.client_id] = payload
        if result.n_steps:
            losses.append(result.loss)
        total += result.n_samples
    new = aggregator.result()
    if new is not None:
        with torch.no_grad():
            for k, v in new.items():
                state[k].copy_(v)
    if hooks.server_after_aggregate:
        per_plugin = {name: {"payloads": p} for name, p in payloads.items()}
        hooks.server_after_aggregate.all(per_plugin=per_plugin, model=model, ctx=ctx, states=None)
    return (float(np.mean(losses)) if losses else float("nan")), total
