"""The hook contract: every point where a plugin can act, in the order a run calls them.

This module is the whole contract between fedlt and its plugins. Each hook is declared once, by
``@hookspec(...)``: its signature, how results combine, where it runs, how often, since when.
The dispatcher combines results by that declaration and the docs are generated from it. Types
live under ``TYPE_CHECKING`` so the contract imports no part of the engine.

The protocol of one run
-----------------------
1. ``data_client_samples`` — offline, once per client wherever the data is built (synthetic samples
   join the client's data); ``configure_model`` — once wherever a model is built (the driver and
   every worker).
2. ``server_setup`` — once when a run starts (on resume, before checkpointed state is restored).
3. Per round ``r`` (a server update: in ``async`` and ``buffered`` modes clients start one at a
   time as slots free up, and steps a-b run per start; docs/async.md):

   a. ``server_select_clients`` (or a seeded uniform choice among the available clients);
      ``server_configure_round`` adds config for every selected client,
      ``server_configure_client`` config for one client;
   b. per selected client, wherever the engine trains it, on a **fresh plugin instance**:
      ``client_start`` → ``client_configure_training`` → ``client_trainable_parameters`` →
      ``client_select_indices`` (offline) → per step [``client_stream_batch`` (streams, when a
      new batch arrives) → ``client_replay_indices`` (streams) → ``client_forward`` →
      ``client_transform_logits`` → ``client_loss`` × ``client_sample_weights`` ×
      ``client_class_weights`` + ``client_extra_losses`` → backward →
      ``client_after_backward`` → ``client_step_gradients`` → optimizer step] →
      ``client_update_memory`` after each stream batch's steps (streams) → ``client_end``
      (payload for the server);
   c. updates arrive in virtual-time order; a stale one may be rewritten by
      ``server_refresh_update``; ``server_make_aggregator`` (or the mode's default: FedAvg,
      FedAsync, FedBuff) combines them; the new global weights are loaded;
      ``server_after_aggregate``;
   d. evaluation rounds: ``eval_logits`` and ``eval_metrics`` on the global test set (with
      ``[eval.ood]``: ``eval_logits`` on the OOD set, ``eval_ood_score`` on both); per client
      ``client_personalize`` (if implemented, on a fresh instance) then ``eval_logits`` and
      ``eval_metrics`` on its local view; in a stream ``eval_client_memory`` per client;
      ``server_log_metrics`` with the round's record;
   e. checkpoint (every plugin's ``state_dict`` and each client's per-plugin ``state``).
4. ``server_end`` with the run's summary.

Instances
---------
A plugin's server side (``server_*``, ``eval_*`` hooks, ``state_dict``) is one instance that
lives in the driver for the whole run. Its client side (``client_*`` hooks) runs on a **fresh
instance made for each client-round** from the same parameters, on every engine, the serial one
included. Attributes a client hook sets on ``self`` are the client-round's scratch space (compute
a per-round constant in ``client_start``, use it per batch); attributes set by server hooks are
never visible there. What a client needs from the server travels in ``ctx.config`` (see
``server_configure_round`` / ``server_configure_client``); what the server needs from a client
travels back as the ``client_end`` payload; what a client keeps between its rounds lives in
``state``.

Calling convention
------------------
Hooks take keyword arguments only and an implementation declares just the ones it needs, so a
hook can gain arguments without breaking plugins. Implementations run in the order plugins are
listed in the scenario. Results are checked where fedlt receives them (shapes, types, plain
data), and a mistake raises :class:`fedlt.PluginError` naming plugin, hook, client and round.

``state`` is special: it is the calling plugin's own per-client state, a ``dict`` for this
client that fedlt keeps between rounds, checkpoints and ships with the task to whichever worker
trains the client. It must hold only plain data (tensors, numbers, strings, bytes, None, and
lists / tuples / dicts of them): it is checked at the end of every client-round. A plugin may
declare its shape (``Plugin.client_state``, rules of :mod:`fedlt.hooks.state`); a resume then
checks the checkpointed state against it before training (docs/plugins.md, "Declaring the shape
of your state").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedlt.hooks.spec import HookSpec, hookspec

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence

    import torch
    from torch import nn

    from fedlt.hooks.context import (
        Arrival,
        ClientContext,
        EvalContext,
        Forward,
        LogContext,
        RoundContext,
        SetupContext,
    )
    from fedlt.hooks.recipe import LocalTraining
    from fedlt.server.aggregation import Aggregator

# =========================================================================== data


@hookspec(
    combine="per-plugin",
    side="data",
    when="once per client, where the run's data is built, before the model; offline scenarios only",
    since="0.3",
    check="samples",
)
def data_client_samples(
    x: torch.Tensor, y: torch.Tensor, client_id: int, generator: torch.Generator, ctx: SetupContext
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """New training samples for one client: input-space over-sampling such as SMOTE.

    Called once per client when the run's data is built, before the first round and before the
    model: in the driver, and again wherever the data is rebuilt (every Flower node), so it must
    be deterministic: draw only from ``generator``. Ray workers receive the driver's data,
    synthetic samples included. What it returns is appended to the training set and to this
    client's indices, so every engine, sampler and hook then sees it as the client's own data:
    ``ctx.indices``, ``ctx.labels`` and ``ctx.local_class_counts`` include it, and a checkpoint
    need not hold it (a resume rebuilds it). Left alone: the global class counts and shot groups
    (``ctx.global_class_counts``: the real long tail), the local test views (built from the real
    counts) and ``fedlt inspect``, which builds the data without plugins. Each plugin sees the
    client's real data only, not what an earlier plugin added; additions join in scenario order.
    A continual (stream) scenario with a plugin implementing this hook is refused before the data
    is built: what a client reads is fixed by its stream.

    :param x: ``(n, *input_shape)`` the client's training inputs (a copy on the CPU; with
        ``[noise]``, under the labels it sees).
    :param y: ``(n,)`` their labels (the noisy ones with ``[noise]``).
    :param client_id: the client.
    :param generator: a CPU generator seeded from ``(seed, "client-samples", client_id)``: the only
        randomness to use (shared by the plugins implementing this hook, in scenario order).
    :param ctx: run-level facts (seed, classes, input shape, rounds, real global class counts).
    :return: ``(x_new, y_new)``: ``(m, *input_shape)`` inputs of ``x``'s dtype and ``(m,)``
        integer labels in ``[0, C)``, or ``None`` to add nothing.

    .. versionadded:: 0.3
    """


# =========================================================================== model


@hookspec(combine="all", side="model", when="once per model build, right after construction")
def configure_model(model: nn.Module, ctx: SetupContext) -> None:
    """Change the freshly built model in place: swap or freeze the head, add modules.

    Called wherever a model is built (the driver and every worker), right after construction and
    before any weights are loaded, so it must be deterministic: draw only from ``ctx.generator``.
    Parameters set to ``requires_grad=False`` are neither trained nor aggregated (they stay
    bit-identical); submodules added here are trained and aggregated like the rest of the model.

    :param model: the model, with ``features(x)`` and a ``head`` linear layer.
    :param ctx: run-level facts (seed, classes, rounds, device, global class counts).
    :return: ignored.

    .. versionadded:: 0.1
    """


# =========================================================================== server round


@hookspec(
    combine="all",
    side="server",
    when="once per process start, before the first round (on resume: before state is loaded)",
)
def server_setup(model: nn.Module, ctx: SetupContext) -> None:
    """Prepare the plugin's global (server-side) state when a run starts.

    On resume it runs first, then ``load_state_dict`` restores the checkpointed state.

    :param model: the server's model, holding the initial global weights.
    :param ctx: run-level facts; ``ctx.run_dir`` is the run folder (loggers write there).
    :return: ignored.

    .. versionadded:: 0.1
    """


@hookspec(
    combine="first",
    side="server",
    when="once per round (sync, deadline) or per start of clients (async, buffered), before configuration",
    since="0.3",
    check="clients",
)
def server_select_clients(candidates: Sequence[int], k: int, ctx: RoundContext) -> Sequence[int] | None:
    """Choose the clients to start: class-aware, utility-based (Oort) or fairness-driven selection.

    :param candidates: the clients that can start now, ascending: online at ``ctx.virtual_time``
        and not already training. Built only when a plugin implements this hook (a list of every
        client), so leave it unimplemented where uniform choice will do.
    :param k: how many to start (``deadline``: the over-selected count; ``async``/``buffered``:
        the free slots, usually 1).
    :param ctx: the round about to start (``ctx.selected`` empty, ``ctx.config`` ``{"round": r}``);
        ``ctx.system`` answers durations (``ctx.system.duration(client, samples)``), speeds and
        availability. Randomness from ``ctx.generator(purpose)``.
    :return: at least one and at most ``k`` distinct clients from ``candidates``, or ``None`` for
        the default: a seeded uniform choice (in ``sync`` mode exactly the one without this hook).

    .. versionadded:: 0.3
    """


@hookspec(combine="merge", side="server", when="once per round, after client selection", check="config")
def server_configure_round(ctx: RoundContext) -> Mapping[str, Any] | None:
    """Configuration sent to every client selected this round (schedules such as Cooldown).

    :param ctx: the round: index, selected clients, the config built so far (read-only), a
        seeded ``ctx.generator(purpose)``.
    :return: entries merged into every selected client's ``ctx.config``, or ``None``. Plain data
        only (tensors, numbers, strings, lists, dicts). Name entries after the plugin
        (``"temperature.tau"``); later plugins override earlier ones on equal keys.

    .. versionadded:: 0.1
    """


@hookspec(
    combine="merge", side="server", when="once per selected client per round", since="0.2", check="config"
)
def server_configure_client(client_id: int, ctx: RoundContext) -> Mapping[str, Any] | None:
    """Configuration for one selected client only: the per-client channel from server to client.

    Per-client learning rates, staleness, a model version to start from: whatever differs by
    client. Merged over the round's config for that client.

    :param client_id: the selected client.
    :param ctx: the round (``ctx.config`` is the round config, shared by all clients).
    :return: entries merged into this client's ``ctx.config``, or ``None``. Plain data only.

    .. versionadded:: 0.2
    """


@hookspec(
    combine="first",
    side="server",
    when="once per stale update (async, buffered), before it is aggregated",
    since="0.3",
    check="update",
)
def server_refresh_update(
    weights: Mapping[str, torch.Tensor],
    arrival: Arrival,
    global_weights: Mapping[str, torch.Tensor],
    n_samples: int,
    n_steps: int,
    ctx: RoundContext,
) -> Mapping[str, torch.Tensor] | None:
    """Rewrite a stale update as if it had been trained from the current global weights.

    Called for each arriving update whose ``arrival.staleness > 0``. A rewritten update counts as
    fresh from then on (``staleness`` 0, ``base_weights`` the current weights, ``refreshed``), so
    staleness weighting no longer discounts it.

    :param weights: the client's trained weights (read-only).
    :param arrival: when it started and arrived, its staleness and ``base_weights`` (the stale
        global weights it trained from).
    :param global_weights: the current global weights (read-only).
    :param n_samples: samples it trained on; ``n_steps``: its optimizer steps.
    :param ctx: the server update being prepared (``ctx.arrivals`` empty).
    :return: new weights with the same keys and shapes as ``weights``, or ``None`` to keep it.

    .. versionadded:: 0.3
    """


@hookspec(combine="first", side="server", when="once per round, before updates arrive", check="aggregator")
def server_make_aggregator(
    global_weights: Mapping[str, torch.Tensor], ctx: RoundContext
) -> Aggregator | None:
    """Build the object that combines this round's client updates.

    :param global_weights: the current global weights of the entries clients train (read-only:
        copy what you keep).
    :param ctx: the round.
    :return: an :class:`~fedlt.server.aggregation.Aggregator` (``add(weights, n_samples, client_id)``
        per update in task order, then ``result()``: new values for some or all of the
        ``global_weights`` keys, same shapes, or ``None`` to keep the model), or ``None`` to
        leave the choice to later plugins and finally to the mode's default: streaming FedAvg
        (``sync``, ``deadline``), FedAsync mixing (``async``), FedBuff's buffered step
        (``buffered``). The ``i``-th ``add`` is ``ctx.arrivals[i]`` (staleness, base version and
        weights, arrival time). The result is the new global weights in every mode; an aggregator
        that holds updates across server updates keeps them on its plugin (checkpointed through
        ``state_dict``) and returns ``None`` until it applies them.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 receives ``global_weights``.
    .. versionchanged:: 0.3 ``ctx.arrivals``; the default depends on ``federation.mode``.
    """


@hookspec(
    combine="all",
    side="server",
    when="once per round, after the aggregated weights are loaded",
    by_plugin=("payloads",),
)
def server_after_aggregate(model: nn.Module, ctx: RoundContext, payloads: Mapping[int, Any]) -> None:
    """Act on the new global model: realign heads, re-train a classifier, update estimates.

    Changes made to ``model`` in place become the global model sent next round.

    :param model: the server's model, holding the new global weights.
    :param ctx: the round.
    :param payloads: what *this* plugin's ``client_end`` returned, by client id, for the clients
        trained this round (clients whose ``client_end`` returned ``None`` are absent).
    :return: ignored.

    .. versionadded:: 0.1
    """


# =========================================================================== client round


@hookspec(combine="all", side="client", when="once per client-round, the model holds the global weights")
def client_start(model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
    """A selected client begins local training.

    The place to compute per-round constants on ``self`` (a fresh instance for this client-round)
    for the per-batch hooks to use.

    :param model: the worker's resident model, loaded with the global weights.
    :param ctx: the client and round: id, config, class counts, data, seeded generator.
    :param state: this plugin's per-client state (empty on the client's first round).
    :return: ignored.

    .. versionadded:: 0.1
    """


@hookspec(
    combine="chain",
    side="client",
    when="once per client-round, before the optimizer is built",
    since="0.2",
    chain_arg="recipe",
    check="recipe",
)
def client_configure_training(
    recipe: LocalTraining, ctx: ClientContext, state: dict[str, Any]
) -> LocalTraining:
    """The local training recipe of this client-round (per-client learning rate, epochs, ...).

    :param recipe: the recipe so far (the scenario's ``[train]``, then earlier plugins').
    :return: the recipe to use: ``recipe`` itself or ``recipe.replace(lr=...)``.

    .. versionadded:: 0.2
    """


@hookspec(
    combine="extend",
    side="client",
    when="once per client-round, before the optimizer is built",
    check="parameters",
)
def client_trainable_parameters(
    model: nn.Module, ctx: ClientContext, state: dict[str, Any]
) -> Iterable[torch.Tensor] | None:
    """Extra tensors the local optimizer updates besides the model's trainable parameters.

    For parameters that live with the client (a local head kept in ``state``).

    :return: tensors with ``requires_grad=True``, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec(combine="first", side="client", when="once per client-round, offline scenarios", check="indices")
def client_select_indices(ctx: ClientContext, state: dict[str, Any]) -> torch.Tensor | None:
    """The sequence of training samples for this client-round (a sampler).

    :param ctx: the client; ``ctx.indices`` are its dataset indices, ``ctx.labels`` their labels,
        ``ctx.generator`` the seeded generator to draw from.
    :return: a 1-D integer tensor of indices drawn from ``ctx.indices`` (repeats allowed),
        consumed in consecutive batches of ``ctx.batch_size``; or ``None`` for the default (a
        fresh permutation per local epoch).

    .. versionadded:: 0.1
    """


@hookspec(
    combine="all",
    side="client",
    when="once per incoming stream batch, before its first step; continual scenarios only",
    since="0.2",
    stream_only=True,
)
def client_stream_batch(
    batch: torch.Tensor, model: nn.Module, ctx: ClientContext, state: dict[str, Any]
) -> None:
    """A new stream batch arrives; ``ctx.local_class_counts`` already count it.

    Per-batch bookkeeping of a stream: the classes seen so far change here (``seen-class-mask``
    updates its mask, prior-based losses their class counts), before the first step trains on
    the batch.

    :param batch: the dataset indices of the incoming stream batch.
    :return: ignored.

    .. versionadded:: 0.2
    """


@hookspec(
    combine="concat",
    side="client",
    when="per optimizer step, continual scenarios only",
    check="indices",
    stream_only=True,
)
def client_replay_indices(
    batch: torch.Tensor, ctx: ClientContext, state: dict[str, Any]
) -> torch.Tensor | None:
    """Extra samples to train on together with an incoming stream batch (replay memory).

    Called once per optimizer step, so each of ``online_iter`` steps on the same stream batch may
    replay different samples.

    :param batch: the dataset indices of the incoming stream batch.
    :return: a 1-D integer tensor of dataset indices to append (the replayed rows follow the
        stream rows in the batch the per-batch hooks see), or ``None``.

    .. versionadded:: 0.1
    """


@hookspec(combine="first", side="client", when="per batch", check="forward", vmap=True)
def client_forward(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: ClientContext, state: dict[str, Any]
) -> Forward | tuple[torch.Tensor, torch.Tensor] | None:
    """Compute features and logits of a training batch (e.g. adaptive feature scaling).

    :param y: the batch labels (training-time forwards may use them).
    :return: a :class:`~fedlt.hooks.context.Forward` ``(features, logits, head_input)`` where
        ``head_input`` is what the linear head actually received (when it differs from the
        features, e.g. rescaled), or a pair ``(features, logits)``; or ``None`` for the default
        ``h = model.features(x); z = model.head(h)``. Logits must be ``(B, C)``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 may return a ``Forward`` with ``head_input``.
    """


@hookspec(
    combine="chain",
    side="client",
    when="per batch, after the forward pass",
    chain_arg="logits",
    check="like-logits",
    vmap=True,
)
def client_transform_logits(
    logits: torch.Tensor,
    features: torch.Tensor,
    head_input: torch.Tensor,
    y: torch.Tensor,
    model: nn.Module,
    ctx: ClientContext,
    state: dict[str, Any],
) -> torch.Tensor:
    """Rewrite training logits (masking unseen classes, instance-wise masks).

    :param logits: the logits so far (the previous plugin's output).
    :param head_input: what the head received (``features`` unless ``client_forward`` says).
    :return: the new logits, same shape.

    .. versionadded:: 0.1
    """


@hookspec(combine="first", side="client", when="per batch", check="per-sample", vmap=True)
def client_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    features: torch.Tensor,
    head_input: torch.Tensor,
    model: nn.Module,
    ctx: ClientContext,
    state: dict[str, Any],
) -> torch.Tensor | None:
    """The per-sample training loss (focal, class-balanced, LDAM, balanced softmax, ...).

    :return: a ``(B,)`` tensor of per-sample losses (``reduction="none"``), or ``None`` for
        cross-entropy. The batch loss is ``sum(loss * c * s) / sum(c)`` where ``c`` is the
        product of the class weights (``client_class_weights``; weighted cross-entropy normalises
        by their sum) and ``s`` the product of the sample weights (``client_sample_weights``);
        without class weights ``c = 1`` and it is the mean. ``client_extra_losses`` are added.

    .. versionadded:: 0.1
    """


@hookspec(combine="product", side="client", when="per batch", check="per-sample", vmap=True)
def client_sample_weights(
    logits: torch.Tensor,
    y: torch.Tensor,
    features: torch.Tensor,
    head_input: torch.Tensor,
    model: nn.Module,
    ctx: ClientContext,
    state: dict[str, Any],
) -> torch.Tensor | None:
    """Per-sample weights on the loss (gradient-similarity focal, replay re-weighting).

    They multiply the per-sample loss; the batch loss is still normalised by the batch size (or
    by the class weights' sum, see ``client_class_weights``). Weights that are class weights
    ``w_{y_i}`` belong in ``client_class_weights``.

    :return: a ``(B,)`` tensor, or ``None``.

    .. versionadded:: 0.1
    .. versionchanged:: 0.3 class weights moved to ``client_class_weights``.
    """


@hookspec(combine="product", side="client", when="per batch", since="0.3", check="per-sample", vmap=True)
def client_class_weights(
    logits: torch.Tensor,
    y: torch.Tensor,
    features: torch.Tensor,
    head_input: torch.Tensor,
    model: nn.Module,
    ctx: ClientContext,
    state: dict[str, Any],
) -> torch.Tensor | None:
    """Class weights ``w_{y_i}`` per sample (class-balanced, DRW): weighted cross-entropy.

    The batch loss becomes ``sum_i w_i l_i s_i / sum_i w_i`` (see ``client_loss``): normalised by
    the weights' sum, as weighted cross-entropy is, so re-weighting does not shrink the effective
    learning rate. Several plugins' class weights multiply.

    :return: a ``(B,)`` tensor, or ``None``.

    .. versionadded:: 0.3 (before: ``client_sample_weights`` of a plugin with
       ``class_weighting = True``, still honoured with a deprecation warning).
    """


@hookspec(combine="sum", side="client", when="per batch", check="scalar", vmap=True)
def client_extra_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    features: torch.Tensor,
    head_input: torch.Tensor,
    logits: torch.Tensor,
    ctx: ClientContext,
    state: dict[str, Any],
) -> torch.Tensor | None:
    """Additional scalar losses (auxiliary heads on detached features, proximal terms).

    :return: a 0-dimensional tensor, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec(
    combine="all",
    side="client",
    when="per batch, after backward(), before clipping and the step",
    serial="it needs one model's gradients",
)
def client_after_backward(model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
    """Gradients are computed and not yet applied (gradient surgery, statistics).

    :return: ignored.

    .. versionadded:: 0.1
    """


@hookspec(
    combine="chain",
    side="client",
    when="per batch, after client_after_backward, before clipping and the optimizer step",
    since="0.3",
    chain_arg="grads",
    check="update",
    serial="it evaluates gradients again at weights it chooses, one model at a time",
)
def client_step_gradients(
    grads: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    regrad: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]],
    model: nn.Module,
    ctx: ClientContext,
    state: dict[str, Any],
) -> Mapping[str, torch.Tensor]:
    """The gradients the local optimizer steps with (sharpness-aware steps, correction terms).

    Around the optimizer step: a plugin may take an ascent step and re-evaluate the gradient
    there (SAM, FedSAM, FedSpeed's perturbed gradient) and add terms to it (FedSpeed's
    prox-correction). Clipping (``train.max_grad_norm``) and the optimizer (momentum, weight decay)
    then apply to what the chain returns. The step's loss stays the one at ``weights``.

    :param grads: the gradients so far (autograd's, then earlier plugins'), by parameter name:
        the model's trainable parameters that received a gradient at this step (tensors from
        ``client_trainable_parameters`` are not included and keep theirs).
    :param weights: those parameters' current values (read-only), same names.
    :param regrad: ``regrad(offsets)`` returns the gradients of this step's batch loss (same
        samples, same augmentation, every loss hook) at ``weights + offsets`` (``offsets`` by
        name, missing names unchanged), by the names of ``weights``; the model's weights and
        buffers (BatchNorm statistics) are restored afterwards, so only the returned tensors
        change. Each call is one more forward and backward pass.
    :return: the gradients to step with: the same names and shapes as ``weights``, finite.

    A plugin implementing this hook trains its clients one by one on every engine (the
    vectorized step is not used; the training log records why).

    .. versionadded:: 0.3
    """


@hookspec(
    combine="all",
    side="client",
    when="once per stream batch, after its online_iter steps; continual scenarios only",
    stream_only=True,
)
def client_update_memory(batch: torch.Tensor, ctx: ClientContext, state: dict[str, Any]) -> None:
    """An incoming stream batch has been trained on; update the client's memory from it.

    Memories store dataset *indices* (in ``state``), never copies of samples. Draw from
    ``ctx.generator`` (reservoir, class-balanced reservoir, GDumb).

    :param batch: the dataset indices of the stream batch just consumed.
    :return: ignored.

    .. versionadded:: 0.1
    """


@hookspec(
    combine="per-plugin", side="client", when="once per client-round, after the last step", check="payload"
)
def client_end(model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> Any:
    """Local training finished; return what the server half of this plugin needs.

    :return: a plain-data payload (tensors, numbers, strings, lists, dicts), or ``None``. It
        reaches this plugin's ``server_after_aggregate`` as ``payloads[client_id]``.

    .. versionadded:: 0.1
    """


# =========================================================================== evaluation


@hookspec(
    combine="all",
    side="client",
    when="per client per evaluation, in the driver, on a scratch copy of the global model",
)
def client_personalize(model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
    """Turn a copy of the global model into client ``ctx.client_id``'s personalised model in place
    (fine-tune the head, restore a local head) before its local test view is evaluated.

    Only called when personalised evaluation runs. ``ctx.indices`` are the samples the client
    has *read so far* (its whole data offline; in a stream, what it consumed up to this round).
    ``model`` is a scratch copy, so changes never reach the global model; ``state`` may be read
    but changes are discarded. Runs on a fresh plugin instance, like the other client hooks.

    :return: ignored.

    .. versionadded:: 0.1
    """


@hookspec(
    combine="chain",
    side="eval",
    when="per evaluation: the global test set, then each client's local view",
    chain_arg="logits",
    check="like-logits",
    by_plugin=("state",),
)
def eval_logits(
    logits: torch.Tensor, features: torch.Tensor, model: nn.Module, ctx: EvalContext, state: dict[str, Any]
) -> torch.Tensor:
    """Rewrite evaluation logits (post-hoc logit adjustment, realigned heads, class masks).

    Called for the global test set (``ctx.client_id is None``, ``state`` empty) and for each
    client's local view (``ctx.client_id`` set, ``state`` that client's state, read-only).

    :param logits: the logits so far (the previous plugin's output).
    :param features: the model's features for the same samples.
    :return: the new logits, same shape.

    .. versionadded:: 0.1
    """


@hookspec(
    combine="first",
    side="eval",
    when="once per run, when the evaluator is built, only with eval.personalized_mask = 'auto'",
    since="0.3",
)
def eval_personalized_mask() -> str | None:
    """The personalised-evaluation mask the method asks for (``eval.personalized_mask = "auto"``).

    The evaluator, not the plugin, applies the mask to every client's local-view logits after
    ``eval_logits`` (logit -1e9 for the hidden classes) and records the mask in every evaluation
    record (``personalized_mask``), so methods are compared under a stated mask.

    :return: ``"none"``, ``"test-classes"`` (hide the classes absent from the client's local
        test view, FedLoGe's ``localtest``) or ``"train-classes"`` (hide the classes the client
        has no training samples of), or ``None`` to leave it to the next plugin (none: no mask).

    .. versionadded:: 0.3
    """


@hookspec(
    combine="per-plugin",
    side="eval",
    when="per evaluation: the global test set, then each client's local view",
    since="0.2",
    check="metrics",
    by_plugin=("state",),
)
def eval_metrics(
    model: nn.Module,
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    ctx: EvalContext,
    state: dict[str, Any],
    head: tuple[torch.Tensor, torch.Tensor],
    inputs: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
) -> Mapping[str, Any] | None:
    """Named metrics of the evaluated model (neural collapse, calibration, robustness, ...).

    :param features: the evaluated model's features of the evaluated samples.
    :param logits: its logits after every ``eval_logits`` adjustment.
    :param labels: the true classes.
    :param ctx: which evaluation: the global test set (``ctx.client_id is None``) or a client's
        local view.
    :param head: ``(weight (C, d), bias (C,))``, the classifier the evaluation scores with: the
        affine map from features to the evaluated logits (``model.head`` then every
        ``eval_logits`` adjustment, before a personalised mask), read by evaluating that chain at
        ``h = 0`` and at each unit vector. Exact for affine heads and adjustments (a linear head,
        post-hoc adjustment, realigned heads); for a cosine head, its row-normalised weight times
        its scale. Metrics of "the head" read this one, so they describe the classifier the
        accuracy and calibration were measured with; the record names it (``evaluated_head``).
    :param inputs: the evaluated samples' inputs, as the model reads them (the dataset's
        normalised tensors), in the order of ``labels``: the whole test set, or the client's view.
        Read-only; a plugin that perturbs them works on a copy.
    :param score: ``score(x) -> logits``: the evaluated classifier as a function of inputs (the
        model's features, its head, then every ``eval_logits``, before a personalised mask), with
        gradients enabled and the model in eval mode, so a plugin can attack, perturb or re-score
        the inputs within the same evaluation pass. Take gradients with ``torch.autograd.grad``
        (not ``.backward()``), so the model's ``.grad`` stay untouched; batch large inputs.
    :return: ``{name: value}`` with JSON-ready values (numbers, strings, None, lists of them), or
        ``None``. Global-view metrics appear in metrics.jsonl and summary.json as
        ``"<plugin>.<name>"``; client-view metrics as ``"<plugin>.<name>"`` lists by client under
        ``"client_metrics"``, with the mean of numeric ones as ``"personalized.<plugin>.<name>"``.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 ``inputs`` and ``score`` (implementations that do not name them are
        unaffected).
    """


@hookspec(
    combine="first",
    side="eval",
    when="per full evaluation with eval.ood set: the in-distribution test set, then the OOD set",
    since="0.3",
)
def eval_ood_score(
    model: nn.Module,
    features: torch.Tensor,
    logits: torch.Tensor,
    inputs: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
    ctx: EvalContext,
) -> torch.Tensor | None:
    """An out-of-distribution detector's score of each evaluated sample (Mahalanobis, energy, ...).

    Called twice per full evaluation of the global model when ``[eval.ood]`` is set: on the
    in-distribution test set, then on the OOD set (``ctx.test_class_counts`` all zero there). The
    evaluator turns the two score sets into ``ood_auroc``, ``ood_auprc`` (in-distribution positive)
    and ``ood_fpr_at_95_tpr``, and records the winning plugin's name as ``ood_score``.

    :param model: the evaluated global model (eval mode).
    :param features: ``(N, d)`` its features of the samples.
    :param logits: ``(N, C)`` the evaluated logits (after every ``eval_logits``).
    :param inputs: the samples' inputs as the model reads them (read-only; perturb a copy).
    :param score: ``score(x) -> logits``, as in ``eval_metrics``; take input gradients under
        ``torch.enable_grad()`` with ``torch.autograd.grad``.
    :param ctx: the evaluation (``ctx.client_id is None``).
    :return: a ``(N,)`` tensor of finite scores, **higher for in-distribution**, or ``None`` to
        leave it to the next plugin (none: the maximum softmax probability, ``"msp"``).

    .. versionadded:: 0.3
    """


@hookspec(
    combine="per-plugin",
    side="eval",
    when="per evaluation of a stream scenario, once per client that has trained",
    since="0.3",
    check="metrics",
    by_plugin=("state",),
)
def eval_client_memory(state: dict[str, Any], num_classes: int) -> Mapping[str, Any] | None:
    """What a client's replay memory holds, recorded with every evaluation of a continual run.

    :param state: the plugin's per-client state of this client (read-only here).
    :param num_classes: ``C``, the number of classes.
    :return: ``{"class_counts": [n_0, ..., n_{C-1}]}``, the items of each class in the client's
        memory, or ``None`` (no memory). The driver writes them to metrics.jsonl as
        ``memory_class_counts``: ``{plugin: {client: counts}}``; ``fedlt plot`` draws them.

    .. versionadded:: 0.3
    """


@hookspec(combine="all", side="server", when="after every evaluation, in the driver", since="0.2")
def server_log_metrics(record: Mapping[str, Any], ctx: LogContext) -> None:
    """An evaluation's record is ready (the line just written to metrics.jsonl): log it.

    The hook loggers (CSV, TensorBoard, Weights & Biases, your own) implement.

    :param record: the round's metrics (read-only; JSON-ready values, ``None`` for undefined).
    :param ctx: the run folder, the round, the scenario's name.
    :return: ignored.

    .. versionadded:: 0.2
    """


@hookspec(combine="all", side="server", when="once, when the run has finished (summary written)", since="0.2")
def server_end(summary: Mapping[str, Any], ctx: LogContext) -> None:
    """The run finished and summary.json is written: close files, flush loggers.

    Not called when a run stops on an error or is interrupted.

    :param summary: what summary.json holds.
    :return: ignored.

    .. versionadded:: 0.2
    """


# =========================================================================== versions

#: The plugin contract this fedlt implements. A plugin may declare the one it was written for
#: (``contract = "0.3"``); registration refuses a contract this fedlt cannot honour.
CONTRACT = "0.3"

#: What changed for plugin authors in each contract version: (breaking, changes). A plugin that
#: declares a contract before a breaking version is refused with these sentences
#: (docs/migrating.md says the same at length).
CONTRACT_CHANGES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "0.2": (
        True,
        (
            "client hooks run on a fresh plugin instance per client-round on every engine: attributes "
            "a server hook sets on self are not visible to them (send values through ctx.config), and "
            "nothing a client hook sets on self survives to the client's next round (keep it in state)",
            "ctx.extra is gone: per-client-round scratch lives on self (set it in client_start); a "
            "forward pass that rescales features returns a Forward with head_input",
            "hook results are checked on arrival: client_loss and client_sample_weights return (B,) "
            "tensors, client_extra_losses a scalar, state, payloads and configs plain data",
            "weighted cross-entropy: class weights normalise the batch loss by their sum",
        ),
    ),
    "0.3": (
        False,
        (
            "class weights have their own hook, client_class_weights; client_sample_weights with "
            "class_weighting = True still works, with a deprecation warning",
            "per-client facts (ctx.client_id, ctx.config, ...: ClientContext.PER_CLIENT) are refused in "
            "the per-batch hooks of a plugin declaring vectorized = True, whatever the group size",
            "every context has generator_for(purpose): a seeded generator of the plugin's own",
            "client_personalize sees the config the server gave the client this round, and a generator "
            "of its own purpose",
            "server_select_clients chooses the clients to start and server_refresh_update may rewrite a "
            "stale update; RoundContext gains mode, virtual_time, arrivals (staleness and base weights "
            "of the updates being aggregated) and system (the simulated devices)",
            "eval_personalized_mask: the personalised-evaluation mask a method's protocol asks for, "
            "applied by the evaluator (eval.personalized_mask)",
            "eval_metrics may take inputs (the evaluated samples' inputs) and score (inputs to the "
            "evaluated logits, differentiable) to attack, perturb or re-score them in the same pass",
            "client_step_gradients rewrites the gradients of each local step before clipping and the "
            "optimizer step, with regrad for a second gradient at perturbed weights (SAM, FedSpeed)",
            "data_client_samples adds synthetic training samples to a client's data once, where the "
            "data is built (input-space SMOTE); offline scenarios only",
        ),
    ),
}

#: Every hook by name, in protocol order: what the dispatcher, the validator and the docs read.
SPECS: dict[str, HookSpec] = {name: obj for name, obj in dict(globals()).items() if isinstance(obj, HookSpec)}
