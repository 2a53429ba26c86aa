"""Vectorized client training: a round's clients trained together with torch.func, one step at a time.

Why: a simulator that trains clients one after another on a GPU is bound by kernel launches, not
arithmetic (a small CNN reached 15-19k samples/s on an H200 whatever the client count). Training
the round's clients as one batched computation (``vmap`` over parameters stacked along a leading
client dimension) lets each launch do every client's work: the same step for 100 clients costs
about what one costs. On a CPU there are no launches to save and ``vmap`` is slower (0.52-0.77x
of one by one on 2 cores), so ``engine.vectorize = "auto"`` uses it only on CUDA.

What stays exactly as on the serial engine (:mod:`fedlt.training.client`): each client-round gets its own
:class:`~fedlt.hooks.context.ClientContext` (generator seeded from (seed, round, client)) and fresh plugin
instances; ``client_start``, ``client_configure_training``, ``client_trainable_parameters`` and
the step plan (``client_select_indices`` or a permutation per epoch) run per client, un-vectorized;
so do ``client_stream_batch`` and ``client_update_memory`` in a stream, and ``client_end`` after
training, with the resident model holding that client's trained weights. The local recipe (SGD with
momentum and weight decay or Adam, epochs or steps, batch size, clipping, crop-flip augmentation)
and the loss (per-sample loss x sample weights, class weights normalised by their sum, extra losses)
are those of ``train_client``, and the updates are :func:`fedlt.training.optim.sgd_update` /
:func:`~fedlt.training.optim.adam_update`, torch.optim's arithmetic, applied to the stacked tensors.

What is vectorized: per optimizer step, the forward pass, the per-batch hooks
(``client_forward``, ``client_transform_logits``, ``client_loss``, ``client_sample_weights``,
``client_extra_losses``) of plugins that declare ``vectorized = True``, the backward pass (one
``torch.func.grad`` of the sum of the clients' losses: client k's parameters only reach client k's
loss, so this is every client's own gradient), clipping and the optimizer update. BatchNorm
buffers are stacked per client like the parameters (batch statistics per client, running
statistics updated per client). Clients whose plans have fewer steps drop out of the step once
their plan ends (they are ordered by plan length, so the active clients are a prefix of the stack
and nothing is copied); clients whose batch at a step has a different length (an epoch's last,
partial batch) are trained in a call of their own at that step, so batch-level quantities (the
batch mean, BatchNorm statistics, a plugin's per-batch weights) are exactly the serial ones.

When it falls back to one by one (a one-line notice, once per run): a plugin implements a
per-batch hook without declaring ``vectorized = True``; a plugin implements
``client_after_backward`` (it needs one model's ``.grad``) or, in a stream,
``client_replay_indices`` (a per-step batch of another size drawn from the client's generator);
the model draws randomness in training (dropout). Clients whose recipes (batch size, optimizer,
learning rate, ...) or plugin attributes differ in structure are trained in separate groups
(still vectorized).

Results agree with the serial engine within float rounding (batched kernels sum in another order),
not bit for bit: see docs/vectorized.md for the tolerance the tests use.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.base.seeding import seed_torch
from fedlt.data.federated import FederatedData
from fedlt.engines.serial import SerialEngine
from fedlt.engines.vgroup import PER_STEP_HOOKS, GroupContext, HookViews, crop_flip_drawn, draw_crop_flip
from fedlt.errors import FedltError, PluginError, ScenarioError
from fedlt.hooks.context import ClientContext
from fedlt.hooks.dispatch import CLIENT_HOOKS, ClientHooks, Hook, HookSet
from fedlt.hooks.plugin import implementations
from fedlt.hooks.recipe import LocalTraining
from fedlt.training.client import ClientResult, ClientTask, Step, batch_loss, plan_steps
from fedlt.training.optim import adam_update, sgd_update
from fedlt.training.worker import client_context

__all__ = [
    "DTYPES",
    "VECTORIZE_MODES",
    "VectorizedEngine",
    "engine_dtype",
    "engine_group_size",
    "resolve_vectorize",
    "wants_vectorized_engine",
]

#: ``engine.vectorize``: "auto" groups clients on CUDA and trains them one by one on a CPU.
VECTORIZE_MODES = ("auto", "off", "on")

#: ``engine.dtype``: the autocast dtype of client training ("float32": no autocast).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

#: Modules that draw from torch's RNG in training: a vmapped step cannot reproduce their draws.
_RANDOM_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

#: Hooks that receive the model before training starts (and so could change it).
_PREP_HOOKS = ("client_start", "client_trainable_parameters")

# clip_grad_norm_'s guard against a zero norm.
_CLIP_EPS = 1e-6

_UNSET: Any = object()

# --------------------------------------------------------------------------- settings


def _setting(scenario: Any, name: str, default: Any) -> Any:
    """``scenario.engine.<name>``, or ``default`` while the scenario schema lacks the key."""
    return getattr(scenario.engine, name, default)


def resolve_vectorize(scenario: Any, device: torch.device, mode: str | None = None) -> bool:
    """Whether clients are trained in vectorized groups: ``engine.vectorize`` ("on", "off", or
    "auto" = on CUDA only, because on a CPU vmap is slower than one by one)."""
    mode = _setting(scenario, "vectorize", "auto") if mode is None else mode
    if mode not in VECTORIZE_MODES:
        raise ScenarioError("engine.vectorize", mode, "'auto', 'off' or 'on'")
    if mode == "auto":
        return device.type == "cuda"
    return mode == "on"


def engine_group_size(scenario: Any) -> int | None:
    """``engine.group_size``: clients trained together per group (None: every client of a round)."""
    size = _setting(scenario, "group_size", None)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ScenarioError("engine.group_size", size, "a positive integer, or unset for a whole round")
    return size


def engine_dtype(scenario: Any, name: str | None = None) -> torch.dtype:
    """``engine.dtype``: "float32" (default) or "bfloat16" (autocast of forward and loss)."""
    name = _setting(scenario, "dtype", "float32") if name is None else name
    if name not in DTYPES:
        raise ScenarioError("engine.dtype", name, "'float32' or 'bfloat16'")
    return DTYPES[name]


def wants_vectorized_engine(scenario: Any, device: torch.device) -> bool:
    """Whether a ``serial`` scenario needs this engine: vectorized groups, or an autocast dtype."""
    return resolve_vectorize(scenario, device) or engine_dtype(scenario) != torch.float32


# --------------------------------------------------------------------------- one batch's loss


class _StepModule(nn.Module):
    """The resident model plus one batch's loss: ``functional_call`` swaps the model's parameters
    and buffers for one client's for the whole of :meth:`forward`, hooks included."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.views: HookViews | None = None
        self.hooks: Mapping[str, Hook] = {}
        self.ctx: GroupContext | None = None
        self.autocast: Callable[[], Any] = contextlib.nullcontext

    def forward(
        self, extras: list[torch.Tensor], leaves: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        if self.views is not None:
            self.views.bind(leaves, extras)
        with self.autocast():
            return batch_loss(self.model, self.hooks, self.ctx, x, y)


# --------------------------------------------------------------------------- per-client bookkeeping


@dataclass
class _Client:
    """One client-round after its un-vectorized start: everything the group's steps need."""

    task: ClientTask
    ctx: ClientContext
    hooks: ClientHooks
    recipe: LocalTraining
    extras: list[torch.Tensor]
    plan: list[Step]
    key: Hashable = None
    structures: list[Any] = field(default_factory=list)
    leaves: list[torch.Tensor] = field(default_factory=list)
    # where its trained tensors are: the group's stacks and its row in them
    stacks: dict[str, torch.Tensor] = field(default_factory=dict)
    extra_stacks: list[torch.Tensor] = field(default_factory=list)
    row: int = 0
    loss: float = 0.0


class VectorizedEngine(SerialEngine):
    """The serial engine, training a round's clients in vectorized groups (``engine.vectorize``).

    A ``serial`` scenario gets this engine from :func:`~fedlt.engines.make_engine` when
    ``engine.vectorize`` resolves to on (or ``engine.dtype`` asks for autocast); its name stays
    ``"serial"``. Clients that cannot be vectorized go through the serial engine's own
    :class:`~fedlt.training.worker.ClientTrainer`, on the same resident model.

    Parameters
    ----------
    scenario, data, hooks, device
        As for every engine.
    vectorize : {"auto", "off", "on"}, optional
        Overrides ``engine.vectorize``.
    group_size : int or None, optional
        Overrides ``engine.group_size`` (None: all of a round's clients together).
    dtype : {"float32", "bfloat16"}, optional
        Overrides ``engine.dtype``: autocast of the forward pass and loss.
    """

    name = "serial"

    def __init__(
        self,
        scenario: Any,
        data: FederatedData,
        hooks: HookSet,
        device: torch.device,
        *,
        vectorize: str | None = None,
        group_size: int | None = _UNSET,
        dtype: str | None = None,
    ) -> None:
        super().__init__(scenario, data, hooks, device)
        self.enabled = resolve_vectorize(scenario, device, vectorize)
        self.group_size = engine_group_size(scenario) if group_size is _UNSET else group_size
        if self.group_size is not None and self.group_size < 1:
            raise ScenarioError("engine.group_size", self.group_size, "a positive integer, or unset")
        self.dtype = engine_dtype(scenario, dtype)
        model = self.trainer.model
        self.model = model
        self.recipe = self.trainer.recipe
        self.keys = list(self.trainer.keys)
        self._train_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._buffer_names = [n for n, _ in model.named_buffers()]
        self._live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        missing = [k for k in self.keys if k not in self._train_names and k not in self._buffer_names]
        self.blockers = self._blockers(missing)
        self._vector_plugins = [
            p.name
            for p in hooks.plugins
            if any(h in implementations(type(p), p.name) for h in PER_STEP_HOOKS)
        ]
        self._prep_touches_model = any(
            "model" in impl.argnames
            for p in hooks.plugins
            for name, impl in implementations(type(p), p.name).items()
            if name in _PREP_HOOKS
        )
        #: No plugin has client-side hooks: nothing can read the global RNG, the model's mode or a
        #: client's hooks during a client's start, so the per-client start skips them (it is the
        #: part of a vectorized round that runs client by client on the host).
        self._bare = not any(hooks.implements(h) for h in CLIENT_HOOKS)
        self._step_module = _StepModule(model)
        self._used: dict[Hashable, tuple[list[bool], list[bool]]] = {}
        self._noticed: set[str] = set()
        #: Groups, vectorized calls (and those on gathered, non-prefix rows) and clients trained one
        #: by one so far: tests and benchmarks read them.
        self.stats = {"groups": 0, "calls": 0, "gathered": 0, "one_by_one": 0}

    # ------------------------------------------------------------------ what can run vectorized

    def _blockers(self, missing_keys: list[str]) -> list[str]:
        """Why this run's clients cannot train vectorized (empty: they can)."""
        reasons = []
        streaming = self.scenario.stream.kind != "none"
        for p in self.hooks.plugins:
            impls = implementations(type(p), p.name)
            if "client_after_backward" in impls:
                reasons.append(
                    f"plugin {p.name!r} implements client_after_backward (it needs one model's gradients)"
                )
            if streaming and "client_replay_indices" in impls:
                reasons.append(
                    f"plugin {p.name!r} implements client_replay_indices (per-step replayed samples)"
                )
            if not getattr(p, "vectorized", False):
                undeclared = [h for h in PER_STEP_HOOKS if h in impls]
                if undeclared:
                    reasons.append(
                        f"plugin {p.name!r} implements {undeclared[0]} without declaring vectorized = True"
                    )
        for name, module in self.model.named_modules():
            if isinstance(module, _RANDOM_MODULES) and module.p > 0:
                reasons.append(f"the model's {name or 'root'} draws random numbers in training (dropout)")
                break
        if missing_keys:
            reasons.append(f"model entries {missing_keys[:3]} are neither parameters nor buffers")
        return reasons

    def _notice(self, message: str) -> None:
        """Print ``message`` once per run (per engine) on stderr."""
        if message not in self._noticed:
            self._noticed.add(message)
            print(f"fedlt: {message}", file=sys.stderr)

    def _autocast(self) -> Any:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ------------------------------------------------------------------ the round

    def train_round(
        self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        if not tasks:
            return
        if not self.enabled:
            yield from self._one_by_one(tasks, global_state)
            return
        if self.blockers:
            self._notice(f"training clients one by one, not vectorized: {self.blockers[0]}")
            yield from self._one_by_one(tasks, global_state)
            return
        size = self.group_size or len(tasks)
        for start in range(0, len(tasks), size):
            yield from self._train_group(list(tasks[start : start + size]), global_state)

    def _one_by_one(
        self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        """The serial engine's path (under autocast when ``engine.dtype`` asks for it)."""
        for task in tasks:
            with self._autocast():
                result = self.trainer.run(task, global_state)
            self.stats["one_by_one"] += 1
            yield result

    @torch.no_grad()
    def _load(self, tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
        """Copy ``tensors`` into the resident model's entries ``names`` (one foreach copy)."""
        if names:
            torch._foreach_copy_([self._live[n] for n in names], [tensors[n] for n in names])

    def _prepare(
        self,
        task: ClientTask,
        global_state: Mapping[str, torch.Tensor],
        reload: bool,
        shared_hooks: ClientHooks | None,
    ) -> _Client:
        """A client's un-vectorized start, as ``train_client`` does it before its batch loop.

        ``shared_hooks``: when no plugin has client hooks, one (empty) ClientHooks serves the group.
        """
        if reload:
            self._load(global_state, self.keys)
        if shared_hooks is None:
            seed_torch(self.scenario.seed, "torch", task.round, task.client_id)
        ctx = client_context(self.scenario, self.data, task, self.device, self.recipe)
        hooks = shared_hooks or self.hooks.for_client(task.client_id, task.round, task.states)
        if shared_hooks is None:
            self.model.train()
        if hooks.client_start:
            hooks.client_start(model=self.model, ctx=ctx)
        recipe = self.recipe
        if hooks.client_configure_training:
            recipe = hooks.client_configure_training(recipe=recipe, ctx=ctx)
            ctx.batch_size, ctx.local_epochs, ctx.local_steps = (
                recipe.batch_size,
                recipe.local_epochs,
                recipe.local_steps,
            )
        extras = []
        if hooks.client_trainable_parameters:
            extras = list(hooks.client_trainable_parameters(model=self.model, ctx=ctx))
        stream_labels = self.data.y_train_np[task.indices] if ctx.online_iter is not None else None
        plan = plan_steps(ctx, hooks, stream_labels)
        return _Client(task, ctx, hooks, recipe, extras, plan)

    def _train_group(
        self, tasks: list[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        """Train ``tasks`` together (in sub-groups of equal structure); yield results in task order."""
        names = self._train_names + self._buffer_names
        self._load(global_state, self.keys)
        clients: list[_Client] = []
        # Where a plugin's start may change the model, each client starts from its own snapshot.
        snapshot: dict[str, torch.Tensor] | None = None
        if self._prep_touches_model:
            snapshot = {
                n: self._live[n].detach().unsqueeze(0).repeat_interleave(len(tasks), 0) for n in names
            }
        self.model.train()
        shared = (
            self.hooks.for_client(tasks[0].client_id, tasks[0].round, tasks[0].states) if self._bare else None
        )
        for i, task in enumerate(tasks):
            client = self._prepare(task, global_state, snapshot is not None and i > 0, shared)
            if snapshot is not None:
                with torch.no_grad():
                    torch._foreach_copy_([snapshot[n][i] for n in names], [self._live[n] for n in names])
            clients.append(client)

        views = HookViews(clients[0].hooks, PER_STEP_HOOKS) if self._vector_plugins else None
        groups: dict[Hashable, list[int]] = {}
        for i, c in enumerate(clients):
            plugin_key: Hashable = ()
            if views is not None:
                plugin_key, c.structures, c.leaves = views.signature(c.hooks, c.extras)
            r = c.recipe
            c.key = (
                (r.batch_size, r.optimizer, r.lr, r.momentum, r.weight_decay, r.max_grad_norm, r.augment),
                tuple((tuple(t.shape), t.dtype, t.device) for t in c.extras),
                plugin_key,
            )
            groups.setdefault(c.key, []).append(i)
        if len(groups) > 1:
            self._notice(
                f"round {tasks[0].round}: clients trained in {len(groups)} vectorized groups, not one "
                "(their recipes or plugin attributes differ)"
            )
        for rows in groups.values():
            start = None
            if snapshot is not None:
                index = torch.tensor(rows, device=self.device)
                start = {n: snapshot[n].index_select(0, index) for n in names}
            self._train_subgroup([clients[i] for i in rows], views, global_state, start)

        end_loads_model = any("model" in b.argnames for b in clients[0].hooks.client_end.impls)
        for c in clients:
            weights = {k: c.stacks[k][c.row] for k in self.keys}
            with torch.no_grad():
                for dst, stack in zip(c.extras, c.extra_stacks, strict=True):
                    dst.copy_(stack[c.row])
            payloads = {}
            if c.hooks.client_end:
                if end_loads_model:
                    self._load({n: c.stacks[n][c.row] for n in names}, names)
                payloads = c.hooks.client_end(model=self.model, ctx=c.ctx)
            c.hooks.check_states()
            yield ClientResult(
                c.task.client_id, weights, c.ctx.n_samples, c.loss, len(c.plan), payloads, c.task.states
            )

    # ------------------------------------------------------------------ one vectorized sub-group

    def _train_subgroup(
        self,
        members: list[_Client],
        views: HookViews | None,
        global_state: Mapping[str, torch.Tensor],
        start: dict[str, torch.Tensor] | None,
    ) -> None:
        """Train clients of equal structure together; leave each one's stacks, row and loss on it."""
        g = self._stack(members, views, global_state, start)
        members = g.members
        n_steps = [len(c.plan) for c in members]
        streaming = members[0].ctx.online_iter is not None
        step_module = self._step_module
        step_module.views = views
        step_module.hooks = views.hooks if views is not None else _NO_HOOKS
        step_module.autocast = self._autocast
        self.model.train()
        self.stats["groups"] += 1
        try:
            for s in range(n_steps[0]):
                active = sum(1 for n in n_steps if n > s)  # members are sorted by plan length
                for c in members[:active]:
                    c.ctx.step, c.ctx.epoch = s, s * c.ctx.batch_size // max(c.ctx.n_samples, 1)
                if streaming:  # a stream batch arrives: counted as seen, then its hooks
                    self._arrivals(g, views, active, s)
                col = g.lengths[:active, s]
                if (col == col[0]).all():  # the usual case: one call for every active client
                    self._step(g, list(range(active)), s, int(col[0]))
                else:  # partial batches: one call per batch length, so batch statistics stay exact
                    by_length: dict[int, list[int]] = {}
                    for row in range(active):
                        by_length.setdefault(int(col[row]), []).append(row)
                    for length, rows in by_length.items():
                        self._step(g, rows, s, length)
                if streaming:  # a stream batch is consumed once its online_iter steps are done
                    for c in members[:active]:
                        step = c.plan[s]
                        if step.ends_batch and c.hooks.client_update_memory:
                            c.hooks.client_update_memory(batch=step.batch, ctx=c.ctx)
        finally:
            if views is not None:
                views.release()
            step_module.ctx = None
        # One host sync per group. Adding 0 * (sum of the new weights) makes the loss non-finite
        # when the weights diverged after the last step, as the serial engine does.
        k = len(members)
        weight_sum = torch.zeros(k, device=self.device)
        for key in self.keys:
            weight_sum += g.stacks[key].reshape(k, -1).sum(1).to(weight_sum.dtype)
        for c, value, n in zip(members, (g.total + 0.0 * weight_sum).tolist(), n_steps, strict=True):
            c.loss = value / max(n, 1)

    def _stack(
        self,
        members: list[_Client],
        views: HookViews | None,
        global_state: Mapping[str, torch.Tensor],
        start: dict[str, torch.Tensor] | None,
    ) -> _Group:
        """The group's stacked state, its clients ordered by plan length (longest first), so the
        clients still training at any step are a prefix of every stack."""
        order = sorted(range(len(members)), key=lambda i: -len(members[i].plan))
        members = [members[i] for i in order]
        k = len(members)
        stacks: dict[str, torch.Tensor] = {}
        rows = torch.tensor(order, device=self.device)
        for n in self._train_names + self._buffer_names:
            if start is not None:
                stacks[n] = start[n].index_select(0, rows)
            else:
                src = global_state[n] if n in global_state else self._live[n]
                stacks[n] = src.detach().unsqueeze(0).repeat_interleave(k, 0)
        n_extras, n_leaves = len(members[0].extras), len(members[0].leaves)
        extra_stacks = [torch.stack([c.extras[j].detach() for c in members]) for j in range(n_extras)]
        leaf_stacks = [torch.stack([c.leaves[j].detach() for c in members]) for j in range(n_leaves)]
        for row, c in enumerate(members):
            c.stacks, c.extra_stacks, c.row = stacks, extra_stacks, row
        if views is not None:
            views.adopt(members[0].structures)
        index, lengths = self._index_matrix(members)
        labels = self.data.y_train.index_select(0, index.reshape(-1)).view(index.shape)
        g = _Group(members, stacks, extra_stacks, leaf_stacks, index, lengths, labels)
        g.used_params, g.used_extras = self._used_entries(g, views)
        trained = [stacks[n] for n, u in zip(self._train_names, g.used_params, strict=True) if u]
        trained += [e for e, u in zip(extra_stacks, g.used_extras, strict=True) if u]
        g.opt = _StackedOptimizer(members[0].recipe, trained)
        g.total = torch.zeros(k, device=self.device)
        return g

    def _index_matrix(self, members: list[_Client]) -> tuple[torch.Tensor, np.ndarray]:
        """Every client's batches as one padded ``(K, S, B)`` index tensor, and their lengths.

        One device-to-host copy of all batches (not one per step), then one copy back.
        """
        k, s_max = len(members), max(len(c.plan) for c in members)
        lengths = np.zeros((k, s_max), dtype=np.int64)
        batches = []
        for row, c in enumerate(members):
            for s, step in enumerate(c.plan):
                lengths[row, s] = step.batch.numel()
                batches.append(step.batch.reshape(-1))
        b_max = max(int(lengths.max()) if lengths.size else 0, 1)
        matrix = np.zeros((k, s_max, b_max), dtype=np.int64)
        if batches:
            flat = torch.cat(batches).to(torch.long).cpu().numpy()
            # batches were concatenated client by client, step by step: C order of the mask
            matrix[np.arange(b_max) < lengths[..., None]] = flat
        return torch.from_numpy(matrix).to(self.data.x_train.device), lengths

    def _arrivals(self, g: _Group, views: HookViews | None, active: int, s: int) -> None:
        """Stream batches arriving at step ``s``: as ``train_client``, the client's counts first,
        then ``client_stream_batch``; then the plugin tensors it may have changed are restacked."""
        for row, c in enumerate(g.members[:active]):
            step = c.plan[s]
            if step.arrives is None:
                continue
            c.ctx.local_class_counts += step.arrives
            if not c.hooks.client_stream_batch:
                continue
            c.hooks.client_stream_batch(batch=step.batch, ctx=c.ctx)
            if views is None:
                continue
            key, _, leaves = views.signature(c.hooks, c.extras)
            if key != c.key[2]:
                raise FedltError(
                    f"Client {c.task.client_id} in round {c.task.round}: client_stream_batch changed the "
                    f"structure of a vectorized plugin's attributes ({', '.join(views.plugins)}); a plugin "
                    "declaring vectorized = True may change its tensors' values there, not their shapes "
                    "or its other attributes"
                )
            with torch.no_grad():
                for stack, leaf in zip(g.leaf_stacks, leaves, strict=True):
                    stack[row].copy_(leaf)

    def _used_entries(self, g: _Group, views: HookViews | None) -> tuple[list[bool], list[bool]]:
        """Which trainable entries reach the loss (cached per group structure).

        The serial optimizer skips a parameter whose ``.grad`` is None (no weight decay, no
        state); ``torch.func.grad`` gives zeros there instead. One un-vectorized forward and
        backward of the first client's first batch tells them apart.
        """
        c = g.members[0]
        cached = self._used.get(c.key)
        if cached is not None:
            return cached
        if not c.plan:
            return [True] * len(self._train_names), [True] * len(g.extra_stacks)
        params = {n: g.stacks[n][0].detach().clone().requires_grad_(True) for n in self._train_names}
        extras = [e[0].detach().clone().requires_grad_(True) for e in g.extra_stacks]
        buffers = {n: g.stacks[n][0].detach().clone() for n in self._buffer_names}
        idx = g.index[0, 0, : int(g.lengths[0, 0])]
        x, y = self.data.x_train.index_select(0, idx), self.data.y_train.index_select(0, idx)
        module = self._step_module
        module.views = views
        module.hooks = views.hooks if views is not None else _NO_HOOKS
        module.ctx = GroupContext([c.ctx])
        module.autocast = self._autocast
        mapping = {f"model.{n}": t for n, t in {**params, **buffers}.items()}
        leaves = [t[0] for t in g.leaf_stacks]
        with torch.enable_grad():
            loss = torch.func.functional_call(module, mapping, (extras, leaves, x, y))
            grads = torch.autograd.grad(loss, [*params.values(), *extras], allow_unused=True)
        flags = [grad is not None for grad in grads]
        used = (flags[: len(params)], flags[len(params) :])
        self._used[c.key] = used
        return used

    def _step(self, g: _Group, rows: list[int], s: int, length: int) -> None:
        """One optimizer step of the group's clients ``rows``, whose batches at step ``s`` all have
        ``length`` samples.

        When the rows are a prefix of the stack (the usual case) every tensor is a view and the
        update lands in place; otherwise they are gathered and scattered back.
        """
        k = len(rows)
        sel = None if rows[-1] == k - 1 else torch.tensor(rows, device=self.device)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[:k] if sel is None else t.index_select(0, sel)

        params = {n: take(g.stacks[n]) for n in self._train_names}
        buffers = {n: take(g.stacks[n]) for n in self._buffer_names}
        extras = [take(e) for e in g.extra_stacks]
        leaves = [take(t) for t in g.leaf_stacks]
        x_all = self.data.x_train
        x = x_all.index_select(0, take(g.index)[:, s, :length].reshape(-1))
        y = take(g.labels)[:, s, :length]
        first = g.members[rows[0]]
        if first.recipe.augment == "crop-flip" and x.dim() == 4:  # as crop_flip: images only
            draws = [draw_crop_flip(g.members[r].ctx.generator, length) for r in rows]
            x = crop_flip_drawn(x, torch.cat([d[0] for d in draws], 1), torch.cat([d[1] for d in draws]))
        x = x.view(k, length, *x_all.shape[1:])
        self._step_module.ctx = GroupContext([g.members[r].ctx for r in rows])
        try:
            (param_grads, extra_grads), losses = _grad_step(
                self._step_module, params, extras, buffers, leaves, x, y
            )
        except PluginError as exc:
            ids = [g.members[r].task.client_id for r in rows]
            raise PluginError(
                exc.plugin,
                exc.hook,
                f"{exc.message} (clients {ids}, trained together: vectorized)",
                exc.client,
                exc.round if exc.round is not None else first.task.round,
            ) from exc.__cause__
        self.stats["calls"] += 1
        if first.recipe.max_grad_norm is not None:
            _clip_stacked([*param_grads.values(), *extra_grads], first.recipe.max_grad_norm)
        trained = [params[n] for n, u in zip(self._train_names, g.used_params, strict=True) if u]
        grads = [param_grads[n] for n, u in zip(self._train_names, g.used_params, strict=True) if u]
        trained += [e for e, u in zip(extras, g.used_extras, strict=True) if u]
        grads += [e for e, u in zip(extra_grads, g.used_extras, strict=True) if u]
        g.opt.step(trained, grads, s, take)
        if sel is None:
            g.total[:k] += losses
            return
        self.stats["gathered"] += 1
        with torch.no_grad():  # gathered copies: write the updated clients back
            for n in self._train_names:
                g.stacks[n].index_copy_(0, sel, params[n])
            for n in self._buffer_names:
                g.stacks[n].index_copy_(0, sel, buffers[n])
            for stack, value in zip(g.extra_stacks, extras, strict=True):
                stack.index_copy_(0, sel, value)
            g.opt.put_back(sel)
            g.total.index_add_(0, sel, losses)


@dataclass
class _Group:
    """A vectorized group's state: its clients (longest plan first) and their stacked tensors."""

    members: list[_Client]
    stacks: dict[str, torch.Tensor]  # model parameters and buffers, (K, ...)
    extra_stacks: list[torch.Tensor]  # extra trainable tensors (client_trainable_parameters)
    leaf_stacks: list[torch.Tensor]  # the vectorized plugins' tensor attributes
    index: torch.Tensor  # (K, S, B) dataset indices of every step's batch, padded
    lengths: np.ndarray  # (K, S) batch lengths (0 past a client's plan)
    labels: torch.Tensor  # (K, S, B) their labels
    used_params: list[bool] = field(default_factory=list)
    used_extras: list[bool] = field(default_factory=list)
    opt: _StackedOptimizer | None = None
    total: torch.Tensor | None = None  # (K,) summed step losses


class _NoHook:
    """Stands for a hook no plugin implements (falsy, like an empty :class:`Hook`)."""

    def __bool__(self) -> bool:
        return False


class _EmptyHooks(dict):
    """``hooks[name]`` for runs without vectorized plugins: every per-batch hook is unimplemented."""

    def __missing__(self, key: str) -> _NoHook:
        return _NoHook()


_NO_HOOKS = _EmptyHooks()


def _grad_step(
    module: _StepModule,
    params: dict[str, torch.Tensor],
    extras: list[torch.Tensor],
    buffers: dict[str, torch.Tensor],
    leaves: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[tuple[dict[str, torch.Tensor], list[torch.Tensor]], torch.Tensor]:
    """Every client's gradient and loss in one call: ``grad`` of the sum of the vmapped losses.

    Client k's parameters only reach client k's loss, so the gradient of the sum with respect to
    the stacked parameters is, row by row, each client's own gradient. (``grad`` outside ``vmap``,
    not inside: under ``vmap(grad(...))`` ops such as ``F.one_hot`` that check their input's
    values cannot run, while a plain ``vmap`` has batching rules for them.)
    """

    def one(
        p: dict[str, torch.Tensor],
        e: list[torch.Tensor],
        b: dict[str, torch.Tensor],
        leaf: list[torch.Tensor],
        xb: torch.Tensor,
        yb: torch.Tensor,
    ) -> torch.Tensor:
        mapping = {f"model.{n}": t for n, t in p.items()}
        mapping.update({f"model.{n}": t for n, t in b.items()})
        return torch.func.functional_call(module, mapping, (e, leaf, xb, yb))

    def summed(
        p: dict[str, torch.Tensor], e: list[torch.Tensor], b: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        losses = torch.func.vmap(one)(p, e, b, leaves, x, y)
        return losses.sum(), losses.detach()

    # The buffers are an argument, not captured: BatchNorm updates its running statistics in
    # place, and a grad transform only allows that on tensors passed in.
    return torch.func.grad(summed, argnums=(0, 1), has_aux=True)(params, extras, buffers)


@torch.no_grad()
def _clip_stacked(grads: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` per client on stacked gradients: each client's total 2-norm over its
    tensors, ``coef = min(max_norm / (norm + 1e-6), 1)``, gradients scaled in place."""
    if not grads:
        return
    k = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(k, -1), 2, dim=1) for g in grads], dim=1)
    coef = torch.clamp(max_norm / (torch.linalg.vector_norm(norms, 2, dim=1) + _CLIP_EPS), max=1.0)
    for g in grads:
        g.mul_(coef.view(k, *[1] * (g.dim() - 1)).to(g.dtype))


class _StackedOptimizer:
    """The local optimizer of a group, on stacked tensors: state stacked like the parameters.

    Every client of a step takes its n-th step together (clients only drop out when their plan
    ends), so one step count serves the whole call: SGD's first step starts the momentum buffers,
    Adam's bias corrections use ``s + 1``.
    """

    def __init__(self, recipe: LocalTraining, params: list[torch.Tensor]) -> None:
        self.recipe = recipe
        self.states: list[list[torch.Tensor]] = []
        if recipe.optimizer == "sgd":
            if recipe.momentum != 0:
                self.states = [[torch.zeros_like(p) for p in params]]
        elif recipe.optimizer == "adam":
            self.states = [[torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]]
        else:
            raise ValueError(f"unknown local optimizer {recipe.optimizer!r}")
        self._taken: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        s: int,
        take: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        r = self.recipe
        self._taken = [[take(t) for t in state] for state in self.states]
        if r.optimizer == "sgd":
            bufs = self._taken[0] if self._taken else []
            sgd_update(
                params,
                grads,
                bufs,
                lr=r.lr,
                momentum=r.momentum,
                weight_decay=r.weight_decay,
                first_step=s == 0,
            )
        else:
            adam_update(
                params, grads, self._taken[0], self._taken[1], s + 1, lr=r.lr, weight_decay=r.weight_decay
            )

    def put_back(self, sel: torch.Tensor) -> None:
        """Scatter the state of gathered rows back after a non-prefix step."""
        for state, taken in zip(self.states, self._taken, strict=True):
            for full, part in zip(state, taken, strict=True):
                full.index_copy_(0, sel, part)
