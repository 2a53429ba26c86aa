"""What a vectorized group needs besides stacked weights: plugin tensors as vmapped arguments and a
context of the facts its clients share.

Inside one ``torch.func.vmap`` call there is one Python function call for the whole group, so a
per-client tensor a plugin keeps on ``self`` (or in ``state``) must enter as a vmapped argument,
in torch.func's own ensembling style, and no plugin object may be changed under the transform:

- :func:`flatten` / :func:`rebuild`: a plugin's attributes as a structure (equal across the group,
  or the clients cannot share a call) plus tensor leaves (stacked over the group);
- :class:`PluginViews`: each vmapped call builds *fresh* views of the plugins from that call's
  slices of the leaves and calls the per-batch hooks on them; the clients' own instances are
  never touched under the transform, and a hook that changes its view's attributes is an error;
- :class:`GroupContext`: the ``ctx`` those hooks see; a per-client fact
  (:attr:`~fedlt.hooks.context.ClientContext.PER_CLIENT`) raises, whatever the group's size.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlt.errors import PluginError
from fedlt.hooks.context import ClientContext
from fedlt.hooks.dispatch import ClientHooks, Hook, bound_hook
from fedlt.hooks.hookspecs import SPECS
from fedlt.hooks.plugin import implementations

__all__ = ["VMAP_HOOKS", "GroupContext", "GroupFactError", "PluginViews", "Slot", "flatten", "rebuild"]

#: The per-batch hooks that run inside a vmapped step (for plugins that declare ``vectorized``),
#: read from the hook declarations (``HookSpec.vmap``).
VMAP_HOOKS = tuple(name for name, spec in SPECS.items() if spec.vmap)

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
    shape, dtype and device, so their tensors can be stacked and one structure serves both.

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


def _count(structure: Any) -> int:
    """Tensor leaves (extra slots excluded) in a structure made by :func:`flatten`."""
    if isinstance(structure, Slot):
        return int(structure.extra is None)
    if type(structure) is tuple or type(structure) is list:
        return sum(_count(s) for s in structure)
    if type(structure) is dict:
        return sum(_count(s) for s in structure.values())
    return 0


# --------------------------------------------------------------------------- group context

#: Advice every refusal of a per-client fact ends with.
_HOW = (
    "A plugin declaring vectorized = True reads per-client facts in client_start and keeps what its "
    'per-batch hooks need on self as tensors; or run with engine.vectorize = "off".'
)


class GroupFactError(AttributeError):
    """A per-batch hook of a vectorized plugin read a per-client fact (``ctx.client_id``, ...).

    An ``AttributeError``, so ``getattr(ctx, name, default)`` still answers the default.
    """


class GroupContext:
    """The ``ctx`` of the per-batch hooks of a group of clients trained in one vmapped call.

    Facts every client of a call shares by construction (``round``, ``step``, ``num_classes``,
    ``batch_size``, ``global_class_counts``, ``x_train``, ...) are answered; per-client facts
    (:attr:`ClientContext.PER_CLIENT`, and ``class_counts("local")``) raise
    :class:`GroupFactError` whether the group holds one client or many, so a plugin behaves the
    same whatever ``engine.group_size`` is.
    """

    __slots__ = ("members",)

    def __init__(self, members: Sequence[ClientContext]) -> None:
        object.__setattr__(self, "members", list(members))

    def __getattr__(self, name: str) -> Any:
        if name in ClientContext.PER_CLIENT:
            raise GroupFactError(self._refuse(f"ctx.{name}"))
        value = getattr(self.members[0], name)
        if name == "class_counts":
            return self._class_counts
        return value

    def _class_counts(self, prior: str) -> np.ndarray:
        if prior == "local":
            raise GroupFactError(self._refuse('ctx.class_counts("local")'))
        return self.members[0].class_counts(prior)

    def _refuse(self, what: str) -> str:
        ids = [m.client_id for m in self.members]
        return (
            f"{what} is a per-client fact, and this per-batch hook runs once for clients {ids} trained "
            f"together (vectorized). {_HOW}"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise GroupFactError(f"ctx.{name} cannot be set in a per-batch hook of a vectorized group")


# --------------------------------------------------------------------------- plugin views


class _Plugin:
    """One vectorized plugin of a group: its class, the per-batch hooks it implements, and the
    structures its views are built from (equal for every client of the group)."""

    __slots__ = ("attrs", "cls", "n_attrs", "n_state", "name", "state", "takes_state")

    def __init__(self, name: str, cls: type) -> None:
        self.name, self.cls = name, cls
        self.takes_state = False
        self.attrs: Any = {}
        self.n_attrs = 0
        self.state: Any = None
        self.n_state = 0


class PluginViews:
    """The per-batch hooks of a group's vectorized plugins, called on fresh views per vmapped call.

    :meth:`signature` reads, from one client's own plugin instances and state, the key of
    everything a view is built from (clients with equal keys share a call) and the tensors to
    stack. :meth:`hooks` (inside the transform) builds one fresh view per plugin from a call's
    slice of those tensors and returns the per-batch hooks bound to the views, combined and
    checked by the same :class:`~fedlt.hooks.dispatch.Hook` as on the serial path.

    Parameters
    ----------
    template : ClientHooks
        Any client's hooks of the group (only which plugins implement what is read from it).
    """

    def __init__(self, template: ClientHooks) -> None:
        self._plugins: dict[str, _Plugin] = {}
        #: hook -> (spec, [(plugin, method name, argnames, takes_state)]) in scenario order
        self._impls: dict[str, tuple[Any, list[tuple[str, str, tuple[str, ...], bool]]]] = {}
        for name in VMAP_HOOKS:
            hook = template[name]
            entries = []
            for b in hook.impls:
                plugin = self._plugins.get(b.plugin)
                if plugin is None:
                    plugin = self._plugins[b.plugin] = _Plugin(b.plugin, type(template.instance(b.plugin)))
                # a plugin still declaring class_weighting implements class weights as client_sample_weights
                method = name if name in implementations(plugin.cls, b.plugin) else "client_sample_weights"
                takes_state = b.state is not None
                plugin.takes_state |= takes_state
                entries.append((b.plugin, method, b.argnames, takes_state))
            self._impls[name] = (hook.spec, entries)
        self.round = template.round

    @property
    def plugins(self) -> list[str]:
        """The plugins whose per-batch hooks run in the vectorized step, in scenario order."""
        return list(self._plugins)

    def signature(
        self, hooks: ClientHooks, extras: Sequence[torch.Tensor]
    ) -> tuple[Hashable, list[Any], list[torch.Tensor]]:
        """One client's key, structures and tensor leaves, from its own instances and state."""
        keys: list[Hashable] = []
        structures: list[Any] = []
        leaves: list[torch.Tensor] = []
        for name, plugin in self._plugins.items():
            attrs, attr_leaves, attr_key = flatten(dict(vars(hooks.instance(name))), extras)
            state_struct, state_leaves, state_key = None, [], None
            if plugin.takes_state:
                state_struct, state_leaves, state_key = flatten(hooks.states.get(name, {}), extras)
            keys.append((name, attr_key, state_key))
            structures.append((attrs, state_struct))
            leaves += attr_leaves + state_leaves
        return tuple(keys), structures, leaves

    def adopt(self, structures: list[Any]) -> None:
        """Take the structures views are built from (one client's: equal for the whole group)."""
        for plugin, (attrs, state) in zip(self._plugins.values(), structures, strict=True):
            plugin.attrs, plugin.n_attrs = attrs, _count(attrs)
            plugin.state, plugin.n_state = state, _count(state)

    def hooks(self, leaves: Sequence[torch.Tensor], extras: Sequence[torch.Tensor]) -> _CallHooks:
        """The per-batch hooks of one vmapped call, on fresh views built from ``leaves`` (that
        call's slices) and ``extras``; nothing outlives the call."""
        views: dict[str, tuple[Any, dict[str, Any], Any]] = {}
        at = 0
        for name, plugin in self._plugins.items():
            attrs = rebuild(plugin.attrs, leaves[at : at + plugin.n_attrs], extras)
            at += plugin.n_attrs
            state = None
            if plugin.takes_state:
                state = rebuild(plugin.state, leaves[at : at + plugin.n_state], extras)
                at += plugin.n_state
            view = object.__new__(plugin.cls)
            vars(view).update(attrs)
            views[name] = (view, attrs, state, None if state is None else dict(state))
        hooks = {}
        for hook_name, (spec, entries) in self._impls.items():
            bounds = []
            for plugin, method, argnames, takes in entries:
                view, _, state, _ = views[plugin]
                bounds.append(
                    bound_hook(plugin, getattr(view, method), argnames, state if takes else None, spec)
                )
            hooks[hook_name] = Hook(spec, bounds, None, self.round)
        return _CallHooks(hooks, views)


class _CallHooks(dict):
    """One call's hooks by name (``hooks["client_loss"]``), and the views they are bound to."""

    def __init__(self, hooks: dict[str, Hook], views: dict[str, tuple[Any, ...]]) -> None:
        super().__init__(hooks)
        self.views = views

    def check_unchanged(self) -> None:
        """A vectorized per-batch hook may not change its plugin's attributes or state: under vmap
        the change would be lost (or leak a batched tensor), so it is an error, not a surprise."""
        for name, (view, attrs, state, state_before) in self.views.items():
            for where, before, now in (("self", attrs, vars(view)), ("state", state_before, state)):
                if before is None:
                    continue
                changed = [
                    k for k in now.keys() | before.keys() if now.get(k, _GONE) is not before.get(k, _GONE)
                ]
                if changed:
                    what = (
                        f"self.{sorted(changed)[0]}" if where == "self" else f"state[{sorted(changed)[0]!r}]"
                    )
                    raise PluginError(
                        name,
                        "vectorized",
                        f"a per-batch hook changed {what}: the per-batch hooks of a plugin declaring "
                        "vectorized = True run once for a group of clients under vmap and must not change "
                        'self or state (compute it in client_start), or run with engine.vectorize = "off"',
                    )


_GONE = object()
