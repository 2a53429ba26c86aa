"""The hook contract: every point where a plugin can act, in the order a run calls them.

This module is the whole contract between fedlt and its plugins. It declares hooks and nothing
that runs; types live under ``TYPE_CHECKING`` so it creates no import cycles.

The protocol of one run
-----------------------
1. ``configure_model`` — once wherever a model is built (server and every worker).
2. ``server_setup`` — once when a run starts (then checkpointed state is restored on resume).
3. Per round ``r``:

   a. clients are selected (seeded by (seed, r)); ``server_configure_round`` adds per-round config;
   b. ``server_make_aggregator`` picks how updates combine (FedAvg by default);
   c. per selected client, wherever the engine runs it:
      ``client_start`` → ``client_trainable_parameters`` → ``client_select_indices`` (offline) →
      per step [``client_replay_indices`` (streams) → ``client_forward`` →
      ``client_transform_logits`` → ``client_loss`` × ``client_sample_weights`` +
      ``client_extra_losses`` → backward → ``client_after_backward`` → optimizer step] →
      ``client_update_memory`` after each stream batch's steps (streams) → ``client_end``
      (payload for the server);
   d. updates are aggregated; the new global weights are loaded; ``server_after_aggregate``;
   e. every ``eval_every`` rounds: ``eval_logits`` on the global test set; per client
      ``client_personalize`` (if any plugin implements it) then ``eval_logits`` on its local view;
   f. checkpoint (plugin ``state_dict`` and every client's per-plugin state).

Calling convention
------------------
Hooks take keyword arguments only and an implementation declares just the ones it needs, so a
hook can gain arguments without breaking plugins. Implementations run in the order plugins are
listed in the scenario (never registration order). How results combine is part of each hook:
*first result* (the first non-``None`` wins), *all* (a list), *chain* (each receives the previous
one's output), *product*, *sum* or *concat* (tensors joined).

``state`` is special: it is the calling plugin's own per-client state, a ``dict`` for this
client that fedlt keeps between rounds, checkpoints, and ships with the task to whichever worker
trains the client. Keep it to tensors, numbers and plain containers. A plugin's global state is
its ``state_dict()`` / ``load_state_dict()``.

Where hooks run: ``server_*`` and ``eval_*`` hooks run in the driver process; ``client_*`` hooks
run wherever the engine trains the client (the same process for the serial engine, a worker for
Ray or Flower), so they must not rely on anything but their arguments, ``state`` and the plugin's
parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import torch
    from torch import nn

    from fedlt.aggregation import Aggregator
    from fedlt.context import ClientContext, EvalContext, RoundContext, SetupContext

hookspec = pluggy.HookspecMarker("fedlt")

#: Hooks whose first non-None result wins; the rest are called in full.
FIRSTRESULT = frozenset({"server_make_aggregator", "client_select_indices", "client_forward", "client_loss"})

#: How each hook's results combine (documentation and dispatch both read this table).
COMBINE: dict[str, str] = {
    "configure_model": "all",
    "server_setup": "all",
    "server_configure_round": "all",
    "server_make_aggregator": "first",
    "server_after_aggregate": "all",
    "client_start": "all",
    "client_trainable_parameters": "all",
    "client_select_indices": "first",
    "client_replay_indices": "concat",
    "client_update_memory": "all",
    "client_forward": "first",
    "client_transform_logits": "chain",
    "client_loss": "first",
    "client_sample_weights": "product",
    "client_extra_losses": "sum",
    "client_after_backward": "all",
    "client_end": "all",
    "client_personalize": "all",
    "eval_logits": "chain",
}

# =========================================================================== model


@hookspec
def configure_model(model: nn.Module, ctx: SetupContext) -> None:
    """Change the freshly built model in place: swap or freeze the head, add modules.

    Called once wherever a model is built (the server and every worker), right after
    construction and before any weights are loaded, so it must be deterministic: draw only from
    ``ctx.generator``. Parameters set to ``requires_grad=False`` are neither trained nor
    aggregated (they stay bit-identical); submodules added here are trained and aggregated like
    the rest of the model.

    :param model: the model, with ``features(x)`` and a ``head`` linear layer.
    :param ctx: run-level facts (seed, number of classes, device, global class counts).

    Combine: all, in scenario order. Return value ignored.

    .. versionadded:: 0.1
    """


# =========================================================================== server round


@hookspec
def server_setup(model: nn.Module, ctx: SetupContext) -> None:
    """Prepare global plugin state when a run starts (before round 0, and on resume before the
    checkpointed ``state_dict`` is loaded back).

    :param model: the server's model, holding the initial global weights.
    :param ctx: run-level facts.

    Combine: all. Return value ignored. Runs in the driver, once per process start.

    .. versionadded:: 0.1
    """


@hookspec
def server_configure_round(ctx: RoundContext) -> Mapping[str, Any] | None:
    """Per-round configuration sent to every selected client (schedules such as Cooldown).

    :param ctx: the round: index, selected clients, the config built so far (read-only).
    :return: entries to merge into the round config (``ctx.config`` of each client), or ``None``.
        Name entries after the plugin (``"temperature.tau"``) to avoid clashes; later plugins
        override earlier ones on equal keys.

    Combine: all, merged in scenario order. Runs in the driver, once per round.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def server_make_aggregator(ctx: RoundContext) -> Aggregator | None:
    """Build the object that combines this round's client updates.

    :param ctx: the round.
    :return: an :class:`~fedlt.aggregation.Aggregator` (``add(weights, n_samples, client_id)``
        as updates arrive, then ``result()``), or ``None`` to leave the choice to later plugins
        and finally to streaming FedAvg weighted by client sample counts.

    Combine: first result. Runs in the driver, once per round.

    .. versionadded:: 0.1
    """


@hookspec
def server_after_aggregate(model: nn.Module, ctx: RoundContext, payloads: Mapping[int, Any]) -> None:
    """Act on the new global model: realign heads, re-train a classifier, update estimates.

    Called after aggregation, with the aggregated weights already loaded into ``model``; changes
    made to ``model`` in place become the global model sent next round.

    :param model: the server's model, holding the new global weights.
    :param ctx: the round.
    :param payloads: what *this* plugin's ``client_end`` returned, by client id, for the clients
        trained this round (clients whose ``client_end`` returned ``None`` are absent).

    Combine: all. Runs in the driver, once per round.

    .. versionadded:: 0.1
    """


# =========================================================================== client round


@hookspec
def client_start(model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
    """A selected client begins local training; ``model`` holds the global weights.

    :param model: the worker's resident model, loaded with the global weights.
    :param ctx: the client and round: id, round config, local/global class counts, data.
    :param state: this plugin's per-client state (empty on the client's first round).

    Combine: all. Runs where the client is trained, once per client-round.

    .. versionadded:: 0.1
    """


@hookspec
def client_trainable_parameters(
    model: nn.Module, ctx: ClientContext, state: dict[str, Any]
) -> Iterable[torch.Tensor] | None:
    """Extra tensors the local optimizer should update besides the model's trainable ones.

    For parameters that live in ``state`` (a per-client head that never leaves the client).

    :return: tensors with ``requires_grad=True``, or ``None``.

    Combine: all, concatenated in scenario order. Once per client-round.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def client_select_indices(ctx: ClientContext, state: dict[str, Any]) -> torch.Tensor | None:
    """The sequence of training samples for this client-round (a sampler).

    :param ctx: the client; ``ctx.indices`` are its dataset indices, ``ctx.labels`` their labels,
        ``ctx.generator`` the seeded generator to draw from.
    :return: a 1-D long tensor of dataset indices (repeats allowed), consumed in consecutive
        batches of ``ctx.batch_size``; or ``None`` for the default (a fresh permutation of the
        client's indices per local epoch).

    Combine: first result. Once per client-round.

    .. versionadded:: 0.1
    """


@hookspec
def client_replay_indices(
    batch: torch.Tensor, ctx: ClientContext, state: dict[str, Any]
) -> torch.Tensor | None:
    """Extra samples to train on together with an incoming stream batch (replay memory).

    Only called in continual scenarios (a ``[stream]``), once per optimizer step, so each of
    ``online_iter`` steps on the same stream batch may replay different samples.

    :param batch: the dataset indices of the incoming stream batch.
    :return: dataset indices to append (the replayed rows follow the stream rows in the batch
        that the per-batch hooks see; ``ctx.extra`` is the place to note how many you added), or
        ``None``.

    Combine: concatenated in scenario order. Per step.

    .. versionadded:: 0.1
    """


@hookspec
def client_update_memory(batch: torch.Tensor, ctx: ClientContext, state: dict[str, Any]) -> None:
    """An incoming stream batch has been trained on; update the client's memory from it.

    Memories store dataset *indices* (in ``state``), never copies of samples. Draw from
    ``ctx.generator`` (reservoir, class-balanced reservoir, GDumb).

    :param batch: the dataset indices of the stream batch just consumed.

    Combine: all. Once per stream batch (after its ``online_iter`` steps).

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def client_forward(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext, state: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Compute ``(features, logits)`` for a training batch (e.g. adaptive feature scaling).

    :param y: the batch labels (training-time forwards may use them).

    :return: the pair, or ``None`` for the default ``h = model.features(x); z = model.head(h)``.

    Combine: first result. Per batch.

    .. versionadded:: 0.1
    """


@hookspec
def client_transform_logits(
    logits: torch.Tensor,
    features: torch.Tensor,
    y: torch.Tensor,
    model: nn.Module,
    ctx: ClientContext,
    state: dict[str, Any],
) -> torch.Tensor:
    """Rewrite training logits (masking unseen classes, instance-wise masks).

    :param logits: the logits so far (the previous plugin's output).
    :return: the new logits, same shape.

    Combine: chain, in scenario order. Per batch.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def client_loss(
    logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor, ctx: ClientContext, state: dict[str, Any]
) -> torch.Tensor | None:
    """The per-sample training loss (focal, class-balanced, LDAM, balanced softmax, ...).

    :return: a ``(B,)`` tensor of per-sample losses (``reduction="none"``), or ``None`` for
        cross-entropy. The batch loss is ``mean(loss * weights)`` with the product of
        ``client_sample_weights``, plus the sum of ``client_extra_losses``.

    Combine: first result. Per batch.

    .. versionadded:: 0.1
    """


@hookspec
def client_sample_weights(
    logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor, ctx: ClientContext, state: dict[str, Any]
) -> torch.Tensor | None:
    """Per-sample weights on the loss (gradient-similarity focal, replay re-weighting).

    :return: a ``(B,)`` tensor, or ``None``.

    Combine: product of all returned tensors. Per batch.

    .. versionadded:: 0.1
    """


@hookspec
def client_extra_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    features: torch.Tensor,
    logits: torch.Tensor,
    ctx: ClientContext,
    state: dict[str, Any],
) -> torch.Tensor | None:
    """Additional scalar losses (auxiliary heads on detached features, prompt losses).

    :return: a scalar tensor, or ``None``.

    Combine: sum. Per batch.

    .. versionadded:: 0.1
    """


@hookspec
def client_after_backward(model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
    """Gradients are computed and not yet applied (gradient surgery, accumulation of statistics).

    Combine: all. Per batch.

    .. versionadded:: 0.1
    """


@hookspec
def client_end(model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> Any:
    """Local training finished; return what the server half of this plugin needs.

    :return: a picklable payload (class counts, per-class gradients), or ``None``. It reaches
        this plugin's ``server_after_aggregate`` as ``payloads[client_id]``.

    Combine: all, each plugin's result kept apart. Once per client-round.

    .. versionadded:: 0.1
    """


# =========================================================================== evaluation


@hookspec
def client_personalize(model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
    """Turn a copy of the global model into client ``ctx.client_id``'s personalised model in place
    (fine-tune the head, restore a local head) before its local test view is evaluated.

    Only called when personalised evaluation runs; ``model`` is a scratch copy, so changes never
    reach the global model. ``state`` may be read but changes are discarded.

    Combine: all. Runs in the driver, once per client per evaluation.

    .. versionadded:: 0.1
    """


@hookspec
def eval_logits(
    logits: torch.Tensor, features: torch.Tensor, model: nn.Module, ctx: EvalContext, state: dict[str, Any]
) -> torch.Tensor:
    """Rewrite evaluation logits (post-hoc logit adjustment, realigned heads, class masks).

    Called for the global test set (``ctx.client_id is None``, ``state`` empty) and for each
    client's local view (``ctx.client_id`` set, ``state`` that client's state for this plugin).

    :param logits: the logits so far (the previous plugin's output).
    :param features: the model's features for the same samples.
    :return: the new logits.

    Combine: chain, in scenario order. Runs in the driver, per evaluation.

    .. versionadded:: 0.1
    """
