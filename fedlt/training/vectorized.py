"""A group of clients' steps in one vmapped call: the vectorized :class:`~fedlt.training.round.Update`.

Why: a simulator that trains clients one after another on a GPU is bound by kernel launches, not
arithmetic (a small CNN reached 15-19k samples/s on an H200 whatever the client count). Training a
group's clients as one batched computation (``vmap`` over parameters stacked along a leading
client dimension) lets each launch do every client's work. On a CPU there are no launches to
save, so ``engine.vectorize = "auto"`` uses it only on CUDA.

Only the update is here. Each client is a :class:`~fedlt.training.round.ClientRound` like any
other (its begin, its batches, arrivals, memory and end are the round's, driven by
:func:`~fedlt.training.round.drive` in lockstep); per step this module gathers the group's batches,
augments them with each client's own draws, runs the forward pass, the vectorized plugins'
per-batch hooks and the loss under ``vmap``, takes every client's gradient with one autograd call
(client k's parameters reach only client k's loss; a parameter that did not reach the loss gets no
gradient and, as with the serial optimizer, no update), clips per client and applies
:func:`fedlt.training.optim.sgd_update` / :func:`~fedlt.training.optim.adam_update` to the stacks.

Per-client tensors enter vmap as explicit arguments: model parameters and buffers (BatchNorm
statistics per client), the tensors the plugins asked the optimizer to train, and the tensors on
the vectorized plugins' instances and state (:class:`~fedlt.training.group.PluginViews`, rebuilt
as fresh views inside each call; a per-client hook that changed them between steps is re-read
before the next one). Clients whose batches at a step differ in length (an epoch's last batch)
train in a call of their own, so batch-level quantities (the mean, BatchNorm statistics) are
exactly the serial ones.

Results agree with the serial engine within float rounding (batched kernels sum in another order),
not bit for bit: see docs/vectorized.md for the tolerance the tests use.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.errors import FedltError, PluginError
from fedlt.hooks.dispatch import HookSet
from fedlt.hooks.hookspecs import SPECS
from fedlt.hooks.plugin import implementations
from fedlt.hooks.recipe import LocalTraining
from fedlt.training.augment import crop_flip_drawn, draw_crop_flip
from fedlt.training.group import VMAP_HOOKS, GroupContext, PluginViews
from fedlt.training.loss import batch_loss
from fedlt.training.optim import adam_update, sgd_update
from fedlt.training.round import ClientResult, ClientRound, TrainingSetup, Update

__all__ = ["GroupUpdate", "group_key", "vectorize_blockers"]

#: Modules that draw from torch's RNG in training: a vmapped step cannot reproduce their draws.
_RANDOM_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

#: Hooks whose implementation keeps a plugin's clients off the vectorized step, with the reason.
_SERIAL_HOOKS = {name: spec.serial for name, spec in SPECS.items() if spec.serial}

# clip_grad_norm_'s guard against a zero norm.
_CLIP_EPS = 1e-6


def vectorize_blockers(hooks: HookSet, model: nn.Module, streaming: bool, keys: Sequence[str]) -> list[str]:
    """Why this run's clients cannot train vectorized (empty: they can).

    A plugin implementing a per-batch hook without declaring ``vectorized = True``, or a hook
    whose declaration says it trains serially (``HookSpec.serial``: ``client_after_backward``
    needs one model's ``.grad``, ``client_step_gradients`` re-evaluates gradients), or in a stream
    ``client_replay_indices`` (per-step batches of another size); a model that draws random
    numbers in training (dropout); model entries that are neither parameters nor buffers.
    """
    reasons = []
    for p in hooks.plugins:
        impls = implementations(type(p), p.name)
        serial = [(h, why) for h, why in _SERIAL_HOOKS.items() if h in impls]
        reasons += [f"plugin {p.name!r} implements {h} ({why})" for h, why in serial]
        if streaming and "client_replay_indices" in impls:
            reasons.append(f"plugin {p.name!r} implements client_replay_indices (per-step replayed samples)")
        if not getattr(p, "vectorized", False):
            undeclared = [h for h in VMAP_HOOKS if h in impls]
            if undeclared:
                reasons.append(
                    f"plugin {p.name!r} implements {undeclared[0]} without declaring vectorized = True"
                )
    for name, module in model.named_modules():
        if isinstance(module, _RANDOM_MODULES) and module.p > 0:
            reasons.append(f"the model's {name or 'root'} draws random numbers in training (dropout)")
            break
    entries = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    missing = [k for k in keys if k not in entries]
    if missing:
        reasons.append(f"model entries {missing[:3]} are neither parameters nor buffers")
    return reasons


def group_key(client: ClientRound, plugin_key: Hashable) -> Hashable:
    """Clients with equal keys can share vmapped calls: the same recipe, extra tensors of the same
    shapes, and vectorized plugins whose attributes have the same structure."""
    r: LocalTraining = client.recipe
    return (
        (r.batch_size, r.optimizer, r.lr, r.momentum, r.weight_decay, r.max_grad_norm, r.augment),
        tuple((tuple(t.shape), t.dtype, t.device) for t in client.extras),
        plugin_key,
    )


class _Trained(torch.Tensor):
    """A trained tensor as the per-batch hooks see it inside the vmapped step.

    PyTorch's batched tensors always say ``requires_grad = False`` (the gradient is taken outside
    the vmap), so the common ``[p for p in model.parameters() if p.requires_grad]`` would find
    nothing in a vectorized hook. The swapped-in parameters (and the plugins' extra trained
    tensors) are this view of the same tensor instead: it says what is true, that they are
    trained, and every operation on it runs at full speed on the tensor underneath and returns a
    plain tensor (no ``__torch_function__`` override).
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return True


class _StepModule(nn.Module):
    """The resident model plus one batch's loss, the target of ``functional_call``: the model's
    parameters and buffers are one client's for the whole of :meth:`forward`, hooks included."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.views: PluginViews | None = None
        self.ctx: GroupContext | None = None

    def forward(
        self, extras: list[torch.Tensor], leaves: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        if self.views is None:
            return batch_loss(self.model, _NO_HOOKS, self.ctx, x, y)
        hooks = self.views.hooks(leaves, extras)
        loss = batch_loss(self.model, hooks, self.ctx, x, y)
        hooks.check_unchanged()
        return loss


class _NoHook:
    """Stands for a hook no plugin implements (falsy, like an empty Hook)."""

    def __bool__(self) -> bool:
        return False


class _EmptyHooks(dict):
    """``hooks[name]`` for groups without vectorized plugins: every per-batch hook is unimplemented."""

    def __missing__(self, key: str) -> _NoHook:
        return _NoHook()


_NO_HOOKS = _EmptyHooks()


class GroupUpdate(Update):
    """The steps of a group of clients (equal :func:`group_key`), trained together with vmap.

    Parameters
    ----------
    setup : TrainingSetup
        What the run's client-rounds share (the autocast dtype among them).
    model : nn.Module
        The resident model: the structure ``functional_call`` runs, and where a per-client hook
        that takes a model finds the client's current weights.
    members : list of ClientRound
        The begun clients, longest plan first (so the clients still training at any step are a
        prefix of every stack and nothing is copied).
    stacks : dict of str to Tensor
        Every parameter and buffer of the model stacked over ``members`` (row i: member i's
        weights after its begin).
    views : PluginViews or None
        The vectorized plugins' per-batch hooks (None: the run has none).
    plugin_key : Hashable
        The members' shared plugin structure (see :meth:`PluginViews.signature`).
    """

    def __init__(
        self,
        setup: TrainingSetup,
        model: nn.Module,
        members: list[ClientRound],
        stacks: dict[str, torch.Tensor],
        views: PluginViews | None,
        plugin_key: Hashable = (),
    ) -> None:
        self.setup, self.model, self.members = setup, model, members
        self.device = setup.device
        self.train_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.buffer_names = [n for n, _ in model.named_buffers()]
        self.live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.stacks = stacks
        self.row = {id(c): i for i, c in enumerate(members)}
        self.views, self.plugin_key = views, plugin_key
        n_extras = len(members[0].extras)
        self.extra_stacks = [torch.stack([c.extras[j].detach() for c in members]) for j in range(n_extras)]
        self.leaf_stacks: list[torch.Tensor] = []
        if views is not None:
            signatures = [views.signature(c.hooks, c.extras) for c in members]
            views.adopt(signatures[0][1])
            n_leaves = len(signatures[0][2])
            self.leaf_stacks = [
                torch.stack([sig[2][j].detach() for sig in signatures]) for j in range(n_leaves)
            ]
        for c in members:
            c.touched = False
        recipe = members[0].recipe
        self.recipe = recipe
        trained = [stacks[n] for n in self.train_names] + self.extra_stacks
        self.opt = _StackedOptimizer(recipe, trained, len(members))
        self.total = torch.zeros(len(members), device=self.device)
        self.module = _StepModule(model)
        self.module.views = views
        self.autocast = setup.autocast if setup.dtype is not None else None
        #: vmapped calls made, and those on rows gathered out of the stack (tests read them)
        self.calls = 0
        self.gathered = 0

    # ------------------------------------------------------------------ per-client hooks

    @contextmanager
    def model_of(self, client: ClientRound) -> Iterator[nn.Module]:
        row = self.row[id(client)]
        names = self.train_names + self.buffer_names
        live = [self.live[n] for n in names]
        with torch.no_grad():
            torch._foreach_copy_(live, [self.stacks[n][row] for n in names])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                torch._foreach_copy_([self.stacks[n][row] for n in names], live)

    def expose(self, client: ClientRound) -> None:
        """Before a per-client hook: the client's own extra tensors hold their trained values."""
        if self.extra_stacks:
            row = self.row[id(client)]
            with torch.no_grad():
                for dst, stack in zip(client.extras, self.extra_stacks, strict=True):
                    dst.copy_(stack[row])

    def _resync(self, client: ClientRound) -> None:
        """After per-client hooks ran: take the tensors they may have changed back into the stacks."""
        client.touched = False
        row = self.row[id(client)]
        with torch.no_grad():
            for dst, stack in zip(client.extras, self.extra_stacks, strict=True):
                stack[row].copy_(dst)
        if self.views is None:
            return
        key, _, leaves = self.views.signature(client.hooks, client.extras)
        if key != self.plugin_key:
            raise FedltError(
                f"Client {client.task.client_id} in round {client.task.round}: a per-client hook changed the "
                f"structure of a vectorized plugin's attributes or state ({', '.join(self.views.plugins)}); "
                "a plugin declaring vectorized = True may change its tensors' values between steps, not "
                'their shapes or its other attributes. Run with engine.vectorize = "off" to train one by one.'
            )
        with torch.no_grad():
            for stack, leaf in zip(self.leaf_stacks, leaves, strict=True):
                stack[row].copy_(leaf)

    # ------------------------------------------------------------------ a step

    def step(self, clients: Sequence[ClientRound], batches: Sequence[torch.Tensor], s: int) -> None:
        for c in clients:
            if c.touched:
                self._resync(c)
        lengths = [int(b.numel()) for b in batches]
        if all(n == lengths[0] for n in lengths):  # the usual case: one call for every client
            self._call(list(range(len(clients))), clients, batches, lengths[0])
            return
        by_length: dict[int, list[int]] = {}  # an epoch's partial batches: a call per length
        for row, n in enumerate(lengths):
            by_length.setdefault(n, []).append(row)
        for n, rows in by_length.items():
            self._call(rows, clients, batches, n)

    def _call(
        self, rows: list[int], clients: Sequence[ClientRound], batches: Sequence[torch.Tensor], length: int
    ) -> None:
        """One vmapped step of ``clients[rows]`` (rows of the stacks), whose batches have ``length``
        samples. On a prefix of the stacks every tensor is a view and the update lands in place;
        otherwise rows are gathered and written back."""
        k = len(rows)
        sel = None if rows[-1] == k - 1 else torch.tensor(rows, device=self.device)

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[:k] if sel is None else t.index_select(0, sel)

        data = self.setup.data
        idx = batches[rows[0]] if k == 1 else torch.cat([batches[r] for r in rows])
        x = data.x_train.index_select(0, idx)
        y = data.y_train.index_select(0, idx).view(k, length)
        if clients[rows[0]].augment and x.dim() == 4:  # each client's draws, from its own generator
            draws = [draw_crop_flip(clients[r].ctx.generator, length) for r in rows]
            x = crop_flip_drawn(x, torch.cat([d[0] for d in draws], 1), torch.cat([d[1] for d in draws]))
        x = x.view(k, length, *data.x_train.shape[1:])
        params = {n: take(self.stacks[n]).detach().requires_grad_(True) for n in self.train_names}
        buffers = {n: take(self.stacks[n]) for n in self.buffer_names}
        extras = [take(e).detach().requires_grad_(True) for e in self.extra_stacks]
        leaves = [take(t) for t in self.leaf_stacks]
        tensors = [*params.values(), *extras]
        self.module.ctx = GroupContext([clients[r].ctx for r in rows])
        try:
            losses, grads = self._losses_and_grads(params, buffers, extras, leaves, x, y, tensors)
        except PluginError as exc:
            ids = [clients[r].task.client_id for r in rows]
            raise PluginError(
                exc.plugin,
                exc.hook,
                f"{exc.message} (clients {ids}, trained together: vectorized)",
                exc.client,
                exc.round if exc.round is not None else clients[rows[0]].task.round,
            ) from exc.__cause__
        finally:
            self.module.ctx = None
        self.calls += 1
        used = [i for i, g in enumerate(grads) if g is not None]  # as the serial optimizer: .grad None
        used_grads = [grads[i] for i in used]
        if self.recipe.max_grad_norm is not None:
            _clip_stacked(used_grads, self.recipe.max_grad_norm)
        self.opt.step(used, rows, take, sel, [tensors[i] for i in used], used_grads)
        if sel is None:
            self.total[:k] += losses
            return
        self.gathered += 1
        with torch.no_grad():  # gathered copies: write the updated clients back
            for n in self.train_names:
                self.stacks[n].index_copy_(0, sel, params[n])
            for n in self.buffer_names:
                self.stacks[n].index_copy_(0, sel, buffers[n])
            for stack, value in zip(self.extra_stacks, extras, strict=True):
                stack.index_copy_(0, sel, value)
            self.total.index_add_(0, sel, losses)

    def _losses_and_grads(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        extras: list[torch.Tensor],
        leaves: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        tensors: list[torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """Every client's loss (vmapped) and gradient (one autograd call on the sum: client k's
        parameters only reach client k's loss, so row k of each gradient is client k's own; a
        tensor that did not reach the losses gets None, as ``.grad`` stays None serially)."""
        module = self.module

        def one(
            p: dict[str, torch.Tensor],
            e: list[torch.Tensor],
            b: dict[str, torch.Tensor],
            leaf: list[torch.Tensor],
            xb: torch.Tensor,
            yb: torch.Tensor,
        ) -> torch.Tensor:
            mapping = {f"model.{n}": t.as_subclass(_Trained) for n, t in p.items()}
            mapping.update({f"model.{n}": t for n, t in b.items()})
            return torch.func.functional_call(
                module, mapping, ([t.as_subclass(_Trained) for t in e], leaf, xb, yb)
            )

        # Buffers are a vmapped argument: BatchNorm updates each client's running statistics in place.
        with torch.enable_grad():
            if self.autocast is None:
                losses = torch.func.vmap(one)(params, extras, buffers, leaves, x, y)
            else:
                with self.autocast():  # per step, never across steps (autocast caches weight casts)
                    losses = torch.func.vmap(one)(params, extras, buffers, leaves, x, y)
            if not tensors or not losses.requires_grad:
                return losses.detach(), (None,) * len(tensors)
            grads = torch.autograd.grad(losses.sum(), tensors, allow_unused=True)
        return losses.detach(), grads

    # ------------------------------------------------------------------ the end

    def finish(self, keys: Sequence[str]) -> list[ClientResult]:
        """Every member's end (``client_end`` with its trained weights where it reads the model)
        and result, in member order. One host sync for the whole group."""
        k = len(self.members)
        weight_sum = torch.zeros(k, device=self.device)
        for key in keys:  # 0 * (sum of the new weights): non-finite when the weights diverged
            weight_sum += self.stacks[key].reshape(k, -1).sum(1).to(weight_sum.dtype)
        losses = (self.total + 0.0 * weight_sum).tolist()
        results = []
        for row, c in enumerate(self.members):
            self.expose(c)
            if c.end_needs_model:
                with self.model_of(c) as model:
                    payloads = c.end(model)
            else:
                payloads = c.end(self.model)
            weights = {key: self.stacks[key][row] for key in keys}
            results.append(c.result(weights, losses[row] / max(len(c.plan), 1), payloads))
        return results


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

    As the serial optimizer, state is per tensor and per client and starts at a tensor's first
    gradient: SGD's momentum buffers start at zero (``0 * momentum + d`` is exactly the first
    step's ``buf = d``), Adam's moments at zero with a step count per tensor and client, so a
    tensor that got no gradient at some steps (a plugin detaching features in round 1, at step 0)
    is updated exactly as one client alone would update it.
    """

    def __init__(self, recipe: LocalTraining, tensors: list[torch.Tensor], k: int) -> None:
        self.recipe = recipe
        self.states: list[list[torch.Tensor]] = []
        if recipe.optimizer == "sgd":
            if recipe.momentum != 0:
                self.states = [[torch.zeros_like(t) for t in tensors]]
        elif recipe.optimizer == "adam":
            self.states = [[torch.zeros_like(t) for t in tensors], [torch.zeros_like(t) for t in tensors]]
            self.steps = np.zeros((len(tensors), k), dtype=np.int64)
        else:
            raise ValueError(f"unknown local optimizer {recipe.optimizer!r}")

    @torch.no_grad()
    def step(
        self,
        used: list[int],
        rows: list[int],
        take: Any,
        sel: torch.Tensor | None,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
    ) -> None:
        """Update ``params`` (the tensors ``used`` of ``rows``) from ``grads``; gathered state
        (``sel`` set) is written back."""
        if not used:
            return
        r = self.recipe
        taken = [[take(state[i]) for i in used] for state in self.states]
        if r.optimizer == "sgd":
            bufs = taken[0] if taken else []
            sgd_update(params, grads, bufs, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
        else:
            counts = self.steps[np.ix_(used, rows)] + 1
            self.steps[np.ix_(used, rows)] = counts
            if (counts == counts[:, :1]).all():
                adam_update(
                    params,
                    grads,
                    taken[0],
                    taken[1],
                    counts[:, 0].tolist(),
                    lr=r.lr,
                    weight_decay=r.weight_decay,
                )
            else:  # clients that took different numbers of steps on a tensor: one update each
                for j in range(len(rows)):
                    adam_update(
                        [p[j : j + 1] for p in params],
                        [g[j : j + 1] for g in grads],
                        [m[j : j + 1] for m in taken[0]],
                        [v[j : j + 1] for v in taken[1]],
                        counts[:, j].tolist(),
                        lr=r.lr,
                        weight_decay=r.weight_decay,
                    )
        if sel is not None:
            for state, part in zip(self.states, taken, strict=True):
                for i, t in zip(used, part, strict=True):
                    state[i].index_copy_(0, sel, t)


def stack_state(
    model: nn.Module, global_state: Mapping[str, torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` stacked ``k`` times: the global weights where they
    are given, the model's own values elsewhere (frozen entries are not stacked: not trained)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad] + [
        n for n, _ in model.named_buffers()
    ]
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    out = {}
    for n in names:
        src = global_state[n] if n in global_state else live[n]
        out[n] = src.detach().unsqueeze(0).repeat_interleave(k, 0)
    return out
