"""Pieces of vectorized training: plugin scratch stacked over a group, a group context, batched crop-flip.

Why a module of its own: the vectorized engine (:mod:`fedlt.engines.vectorized`) runs each
client's once-per-round hooks on that client's own fresh plugin instance, exactly as the serial
engine does, and then runs the per-batch hooks of the whole group in one ``torch.func.vmap``
call. Inside that call there is one Python object per plugin, not one per client, so every
per-client tensor a plugin keeps on ``self`` (or in ``state``) has to travel as a vmapped input
and be put back on a stand-in instance while the hooks run. The pieces here do that:

- :func:`flatten` / :func:`rebuild`: a plugin's attributes as a structure (equal across the
  group, or the clients cannot share one call) plus tensor leaves (stacked over the group).
- :class:`GroupContext`: the ``ctx`` the per-batch hooks see; a fact that differs between the
  clients of the group (``client_id``, ``generator``, ...) cannot be answered for all of them,
  so reading it fails with a message saying where per-client facts belong (``client_start``).
- :class:`HookViews`: the per-batch hooks of a group, bound to stand-in plugin instances whose
  tensor attributes are swapped for the vmapped ones at each call.
- :func:`crop_flip_drawn`: :func:`fedlt.training.augment.crop_flip` for many clients' batches at once,
  with each client's random draws made from its own generator beforehand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedlt.hooks.context import ClientContext
from fedlt.hooks.dispatch import ClientHooks, Hook
from fedlt.hooks.plugin import Plugin

__all__ = [
    "PER_STEP_HOOKS",
    "GroupContext",
    "GroupFactError",
    "HookViews",
    "Slot",
    "crop_flip_drawn",
    "draw_crop_flip",
    "flatten",
    "rebuild",
]

#: The per-batch tensor hooks the vectorized step runs under vmap (for plugins that declare
#: ``vectorized = True``). ``client_after_backward`` is not among them: it needs the ``.grad``
#: of one model's parameters, which a vmapped gradient does not have.
PER_STEP_HOOKS = (
    "client_forward",
    "client_transform_logits",
    "client_loss",
    "client_sample_weights",
    "client_extra_losses",
)

# --------------------------------------------------------------------------- attribute trees


@dataclass(frozen=True, slots=True)
class Slot:
    """Where a tensor sat in a flattened tree: leaf ``index`` of the tree's tensors, or, when
    ``extra`` is set, that entry of the client's extra trainable tensors."""

    index: int
    extra: int | None = None


def _constant_key(value: Any) -> Hashable:
    """A hashable stand-in for a non-tensor leaf: equal keys mean equal values.

    Plain values compare by value; NumPy arrays by dtype, shape and bytes; anything unhashable
    or of unknown equality by identity (the plugin's ``params`` object is shared by every client
    instance, so it compares equal; an object made per client does not, and splits the group).
    """
    if value is None or isinstance(value, bool | int | float | str | bytes | torch.dtype | torch.device):
        return (type(value).__name__, value)
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return ("npscalar", value.dtype.str, value.item())
    return ("id", id(value))


def flatten(tree: Any, extras: Sequence[torch.Tensor] = ()) -> tuple[Any, list[torch.Tensor], Hashable]:
    """Split ``tree`` (attributes, a state dict) into a structure, its tensors and a key.

    Tuples, lists and dicts are walked; a tensor becomes a :class:`Slot` in the structure (an
    ``extra`` slot when it is one of ``extras``, by identity: a trainable tensor the plugin
    handed to the optimizer); anything else stays in the structure as it is. Two clients whose
    keys are equal have the same structure, equal non-tensor values and tensors of the same
    shape, dtype and device, so their tensors can be stacked and one stand-in serves both.

    Returns
    -------
    structure, leaves, key
        ``rebuild(structure, leaves, extras)`` gives the tree back.
    """
    extra_pos = {id(t): i for i, t in enumerate(extras)}
    leaves: list[torch.Tensor] = []

    def walk(node: Any) -> tuple[Any, Hashable]:
        if isinstance(node, torch.Tensor):
            meta = (tuple(node.shape), node.dtype, node.device, node.requires_grad)
            if id(node) in extra_pos:
                return Slot(-1, extra_pos[id(node)]), ("extra", extra_pos[id(node)], *meta)
            leaves.append(node)
            return Slot(len(leaves) - 1), ("tensor", *meta)
        if type(node) is tuple or type(node) is list:
            parts = [walk(item) for item in node]
            return type(node)(p[0] for p in parts), (type(node).__name__, tuple(p[1] for p in parts))
        if type(node) is dict:
            parts = {k: walk(v) for k, v in node.items()}
            return (
                {k: p[0] for k, p in parts.items()},
                ("dict", tuple((_constant_key(k), p[1]) for k, p in parts.items())),
            )
        return node, _constant_key(node)

    structure, key = walk(tree)
    return structure, leaves, key


def rebuild(structure: Any, leaves: Sequence[torch.Tensor], extras: Sequence[torch.Tensor]) -> Any:
    """The tree :func:`flatten` split, with its tensors taken from ``leaves`` and ``extras``."""
    if isinstance(structure, Slot):
        return extras[structure.extra] if structure.extra is not None else leaves[structure.index]
    if type(structure) is tuple or type(structure) is list:
        return type(structure)(rebuild(s, leaves, extras) for s in structure)
    if type(structure) is dict:
        return {k: rebuild(s, leaves, extras) for k, s in structure.items()}
    return structure


# --------------------------------------------------------------------------- group context


class GroupFactError(AttributeError):
    """A per-batch hook read a context fact that differs between the clients trained together.

    An ``AttributeError``, so ``getattr(ctx, name, default)`` still answers the default.
    """


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False  # distinct tensors: comparing values would sync the device every step
    try:
        return bool(a == b)
    except Exception:
        return False


class GroupContext:
    """The ``ctx`` of the per-batch hooks of a group of clients trained in one vmapped call.

    Reading a fact returns it when every client of the call has the same value (``round``,
    ``num_classes``, ``step``, ``global_class_counts``, ``x_train``, ...). A fact that differs
    (``client_id``, ``indices``, ``generator``, usually ``local_class_counts``) raises
    :class:`GroupFactError`: a plugin that declares ``vectorized = True`` computes per-client
    values in ``client_start`` and keeps them on ``self`` as tensors, which are vmapped.
    """

    __slots__ = ("members",)

    def __init__(self, members: Sequence[ClientContext]) -> None:
        self.members = list(members)

    def __getattr__(self, name: str) -> Any:
        members = object.__getattribute__(self, "members")
        first = getattr(members[0], name)
        if callable(first) and not isinstance(first, torch.Tensor):
            return self._method(name)
        for other in members[1:]:
            if not _same(first, getattr(other, name)):
                raise GroupFactError(self._differs(name))
        return first

    def _method(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            values = [getattr(m, name)(*args, **kwargs) for m in self.members]
            if not all(_same(values[0], v) for v in values[1:]):
                raise GroupFactError(self._differs(f"{name}(...)"))
            return values[0]

        return call

    def _differs(self, name: str) -> str:
        ids = [m.client_id for m in self.members]
        return (
            f"ctx.{name} differs between clients {ids}, which are trained together (vectorized). "
            "A plugin declaring vectorized = True reads per-client facts in client_start and keeps "
            "what the per-batch hooks need on self as tensors."
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "members":
            raise GroupFactError(f"ctx.{name} cannot be set in a per-batch hook of a vectorized group")
        object.__setattr__(self, name, value)


# --------------------------------------------------------------------------- plugin stand-ins


class _Tracked:
    """One vectorized plugin of a group: its stand-in instance and the structures it is built from."""

    __slots__ = ("attrs", "n_attrs", "n_state", "state", "state_bounds", "view")

    def __init__(self, view: Plugin) -> None:
        self.view = view
        self.attrs: Any = {}  # structure of the instance's __dict__
        self.n_attrs = 0
        self.state: Any = None  # structure of the per-client state its per-batch hooks read
        self.n_state = 0
        self.state_bounds: list[Any] = []  # the bound hooks that receive that state


def _count(structure: Any) -> int:
    """Tensor leaves (extra slots excluded) in a structure made by :func:`flatten`."""
    if isinstance(structure, Slot):
        return int(structure.extra is None)
    if type(structure) is tuple or type(structure) is list:
        return sum(_count(s) for s in structure)
    if type(structure) is dict:
        return sum(_count(s) for s in structure.values())
    return 0


class HookViews:
    """The per-batch hooks of a group, bound to stand-ins of the plugin instances.

    :meth:`signature` gives, per client, the key of everything a stand-in is built from (clients
    with equal keys can share a vmapped call) and the tensors to stack over them. :meth:`bind`
    puts one call's vmapped tensors on the stand-ins; the hooks in :attr:`hooks`
    (``client_loss``, ``sample_weights``, ...) then run on them, combined and checked by the
    same :class:`~fedlt.hooks.dispatch.Hook` as on the serial path.

    Parameters
    ----------
    template : ClientHooks
        Any client's hooks of the round (only which plugins implement what is read from it).
    names : sequence of str
        The per-batch hooks to bind (:data:`PER_STEP_HOOKS`).
    """

    def __init__(self, template: ClientHooks, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._tracked: dict[str, _Tracked] = {}  # plugin name -> stand-in, in scenario order
        self.hooks: dict[str, Hook] = {}
        for name in (*self.names, "sample_weights", "class_weights"):
            hook = getattr(template, name)
            bounds = []
            for b in hook.impls:
                tracked = self._tracked.get(b.plugin)
                if tracked is None:
                    tracked = self._tracked[b.plugin] = _Tracked(copy.copy(b.call.__self__))
                bound = type(b)(b.plugin, getattr(tracked.view, b.call.__name__), b.argnames, b.state)
                if b.state is not None:
                    tracked.state_bounds.append(bound)
                bounds.append(bound)
            self.hooks[name] = Hook(hook.spec, bounds, None, template.round)

    @property
    def plugins(self) -> list[str]:
        """The plugins whose per-batch hooks run in the vectorized step, in scenario order."""
        return list(self._tracked)

    def signature(
        self, hooks: ClientHooks, extras: Sequence[torch.Tensor]
    ) -> tuple[Hashable, list[Any], list[torch.Tensor]]:
        """One client's key, structures and tensor leaves, read from its own plugin instances and
        state (``hooks`` is that client's :class:`ClientHooks`; ``extras`` its extra trainable
        tensors, which become extra slots)."""
        keys: list[Hashable] = []
        structures: list[Any] = []
        leaves: list[torch.Tensor] = []
        for plugin, tracked in self._tracked.items():
            attrs, attr_leaves, attr_key = flatten(
                dict(vars(_instance_of(hooks, plugin, self.names))), extras
            )
            state_struct, state_leaves, state_key = None, [], None
            if tracked.state_bounds:
                state_struct, state_leaves, state_key = flatten(hooks.states.get(plugin, {}), extras)
            keys.append((plugin, attr_key, state_key))
            structures.append((attrs, state_struct))
            leaves += attr_leaves + state_leaves
        return tuple(keys), structures, leaves

    def adopt(self, structures: list[Any]) -> None:
        """Build the stand-ins from one client's structures (equal for every client of the group)."""
        for tracked, (attrs, state) in zip(self._tracked.values(), structures, strict=True):
            tracked.attrs, tracked.n_attrs = attrs, _count(attrs)
            tracked.state, tracked.n_state = state, _count(state)

    def bind(self, leaves: Sequence[torch.Tensor], extras: Sequence[torch.Tensor]) -> None:
        """Put one call's tensors (vmapped: one client's slice) on the stand-ins and in the state
        their hooks receive. Every attribute is rewritten, so nothing of another call remains."""
        at = 0
        for tracked in self._tracked.values():
            vars(tracked.view).update(rebuild(tracked.attrs, leaves[at : at + tracked.n_attrs], extras))
            at += tracked.n_attrs
            if tracked.state_bounds:
                state = rebuild(tracked.state, leaves[at : at + tracked.n_state], extras)
                at += tracked.n_state
                for bound in tracked.state_bounds:
                    bound.state = state

    def release(self) -> None:
        """Drop the last call's tensors from the stand-ins (they belong to a finished transform)."""
        for tracked in self._tracked.values():
            vars(tracked.view).clear()
            for bound in tracked.state_bounds:
                bound.state = {}


def _instance_of(hooks: ClientHooks, plugin: str, names: Sequence[str]) -> Plugin:
    """A client's own instance of ``plugin`` (the object its bound per-batch hooks live on)."""
    for name in names:
        for b in getattr(hooks, name).impls:
            if b.plugin == plugin:
                return b.call.__self__
    raise KeyError(plugin)


# --------------------------------------------------------------------------- augmentation


def draw_crop_flip(generator: torch.Generator, b: int, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws :func:`fedlt.training.augment.crop_flip` makes for a batch of ``b`` images, in its
    order: ``(2, b)`` crop offsets in ``[0, 2 pad]``, then ``b`` flip decisions."""
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    return offsets, flips


def crop_flip_drawn(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """:func:`fedlt.training.augment.crop_flip` with its draws given, for any number of images at once.

    Sample ``i`` of ``x`` (N, C, H, W) is zero-padded by ``pad``, cropped to H x W at rows
    ``offsets[0, i] + [0, H)`` and columns ``offsets[1, i] + [0, W)``, and mirrored when
    ``flips[i]``: the same gather as ``crop_flip``, so concatenating several clients' draws gives
    each client's images exactly as ``crop_flip`` with its own generator would.
    """
    if x.dim() != 4:
        return x
    n, _, h, w = x.shape
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
