"""The declared shape of a plugin's checkpointed state, checked when a run is resumed.

A checkpoint is input: the run folder may come from someone else, or from a plugin version that
stored something else. ``torch.load(weights_only=True)`` keeps it from running code, but a
replay memory holding index ``10**9`` (or ``-1``, or another client's sample) would crash
training with an ``IndexError`` or silently train on data the client does not have. So a plugin
declares, as data, what its state may hold (``client_state`` for the per-client ``state`` dict
its client hooks get, ``server_state`` for what :meth:`~fedlt.hooks.plugin.Plugin.state_dict`
returns), and a resume checks the checkpoint against it before anything is trained::

    class Replay(Plugin):
        client_state = {
            "indices": ListOf(OwnSample(), max_len="memory_size"),
            "labels": ListOf(LabelOf("indices"), same_length_as="indices"),
            "n_seen": Int(low=0),
        }

Each rule checks one value against the :class:`Owner` of the state (the client, its sample
indices, the dataset's labels and class count) and, on failure, the error names the plugin, the
client, the key (``indices[3]``) and the value, and says what is allowed. Keys the declaration
does not name are refused; declared keys may be absent (a client that never trained has none).
A plugin that declares nothing has its state loaded as it is (fedlt only checks it is plain data).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlt.errors import PluginError

__all__ = [
    "Bool",
    "Float",
    "Int",
    "Label",
    "LabelOf",
    "ListOf",
    "MapOf",
    "OwnSample",
    "Owner",
    "Rule",
    "Str",
    "check_checkpoint_states",
    "check_state",
]


@dataclass(frozen=True)
class Owner:
    """What a state is checked against: whose it is and the data it may refer to.

    Attributes
    ----------
    client : int or None
        The client the state belongs to; ``None`` for a plugin's server state.
    samples : numpy.ndarray
        Sorted training-sample indices the owner may refer to (a client's own; all for the server).
    labels : numpy.ndarray
        The training labels, by sample index (for :class:`LabelOf`).
    num_classes : int
        Number of classes (labels lie in ``[0, num_classes)``).
    params : Mapping
        The plugin's parameters (lengths may be given by a parameter's name).
    """

    client: int | None
    samples: np.ndarray
    labels: np.ndarray
    num_classes: int
    params: Mapping[str, Any]

    def owns(self, index: int) -> bool:
        """Whether ``index`` is one of the owner's samples (a binary search)."""
        at = int(np.searchsorted(self.samples, index))
        return at < len(self.samples) and int(self.samples[at]) == index


class Rule(ABC):
    """One constraint on a value; ``problem`` returns what the value must be, or ``None`` if it fits.

    ``state`` is the whole state dict and ``at`` the position in the list being checked (for rules
    that relate two keys, as :class:`LabelOf`).
    """

    @abstractmethod
    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        """What ``value`` must be, or ``None`` when it fits (each rule says)."""

    def where(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> tuple[str, Any, str] | None:
        """``(path below the key, offending value, what it must be)`` or ``None`` (lists recurse)."""
        problem = self.problem(value, owner, state, at)
        return None if problem is None else ("", value, problem)


class _Nested(Rule):
    """A rule over a container's items: :meth:`where` finds the offending item (with its path),
    and the problem is what that item must be."""

    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        found = self.where(value, owner, state)
        return None if found is None else found[2]

    @abstractmethod
    def where(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> tuple[str, Any, str] | None:
        """``(path below the key, offending value, what it must be)`` or ``None``."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class Int(Rule):
    """An int (not a bool) in ``[low, high]`` (either bound may be open: ``None``)."""

    low: int | None = None
    high: int | None = None

    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        if not _is_int(value) or (self.low is not None and value < self.low):
            return self._text()
        return self._text() if self.high is not None and value > self.high else None

    def _text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"an int in [{self.low}, {self.high}]"
        if self.low is not None:
            return f"an int >= {self.low}"
        return "an int" if self.high is None else f"an int <= {self.high}"


@dataclass(frozen=True)
class Float(Rule):
    """A real number (int or float, not bool) in ``[low, high]``; finite unless ``finite=False``."""

    low: float | None = None
    high: float | None = None
    finite: bool = True

    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        text = "a finite number" if self.finite else "a number"
        if self.low is not None or self.high is not None:
            text += f" in [{self.low if self.low is not None else '-inf'}, "
            text += f"{self.high if self.high is not None else 'inf'}]"
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            return text
        if self.finite and not math.isfinite(value):
            return text
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return text
        return None


@dataclass(frozen=True)
class Bool(Rule):
    """``True`` or ``False``."""

    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        return None if isinstance(value, bool) else "True or False"


@dataclass(frozen=True)
class Str(Rule):
    """A str, one of ``choices`` when given."""

    choices: tuple[str, ...] | None = None

    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        if isinstance(value, str) and (self.choices is None or value in self.choices):
            return None
        return "a str" if self.choices is None else f"one of {list(self.choices)}"


@dataclass(frozen=True)
class OwnSample(Rule):
    """An index of one of the owner's own training samples (a client's: never another's)."""

    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        if _is_int(value) and owner.owns(int(value)):
            return None
        whose = "the server's" if owner.client is None else f"client {owner.client}'s own"
        return f"one of {whose} {len(owner.samples)} training-sample indices"


@dataclass(frozen=True)
class Label(Rule):
    """A class label: an int in ``[0, num_classes)``."""

    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        ok = _is_int(value) and 0 <= value < owner.num_classes
        return None if ok else f"a class label, an int in [0, {owner.num_classes - 1}]"


@dataclass(frozen=True)
class ListOf(_Nested):
    """A list (or tuple) whose items all satisfy ``item``.

    ``max_len``: the most items, an int or the name of a plugin parameter (``"memory_size"``);
    ``same_length_as``: another key of the state whose list must be as long.
    """

    item: Rule
    max_len: int | str | None = None
    same_length_as: str | None = None

    def where(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> tuple[str, Any, str] | None:
        if not isinstance(value, list | tuple):
            return ("", value, "a list")
        limit = owner.params.get(self.max_len) if isinstance(self.max_len, str) else self.max_len
        if limit is not None and len(value) > limit:
            why = f" (the plugin's {self.max_len})" if isinstance(self.max_len, str) else ""
            return ("", f"a list of {len(value)} items", f"a list of at most {limit} items{why}")
        other = state.get(self.same_length_as) if self.same_length_as is not None else None
        if isinstance(other, list | tuple) and len(other) != len(value):
            return ("", f"a list of {len(value)} items", f"as long as {self.same_length_as!r} ({len(other)})")
        for i, item in enumerate(value):
            found = self.item.where(item, owner, state, i)
            if found is not None:
                return (f"[{i}]{found[0]}", found[1], found[2])
        return None


@dataclass(frozen=True)
class LabelOf(Rule):
    """The label of the sample that the same position of list ``key`` names (``labels[i]`` is the
    label of ``indices[i]``); checks it is a label when that sample is not the owner's."""

    key: str

    def problem(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> str | None:
        base = Label().problem(value, owner, state)
        if base is not None:
            return base
        other = state.get(self.key)
        if isinstance(other, list | tuple) and at is not None and at < len(other):
            index = other[at]
            if _is_int(index) and owner.owns(int(index)) and int(owner.labels[int(index)]) != value:
                return f"the label of sample {int(index)} ({self.key}[{at}]), {int(owner.labels[int(index)])}"
        return None


@dataclass(frozen=True)
class MapOf(_Nested):
    """A dict whose keys satisfy ``key`` and values satisfy ``value``."""

    key: Rule
    value: Rule

    def where(
        self, value: Any, owner: Owner, state: Mapping[str, Any], at: int | None = None
    ) -> tuple[str, Any, str] | None:
        if not isinstance(value, Mapping):
            return ("", value, "a dict")
        for k, v in value.items():
            problem = self.key.problem(k, owner, state)
            if problem is not None:
                return (f" key {k!r}", k, problem)
            found = self.value.where(v, owner, state)
            if found is not None:
                return (f"[{k!r}]{found[0]}", found[1], found[2])
        return None


def check_state(plugin: str, declared: Mapping[str, Rule], state: Any, owner: Owner, what: str) -> None:
    """Raise :class:`PluginError` naming ``plugin``, the key and the value where ``state`` breaks
    ``declared``; ``what`` says whose state it is ("client 3's state")."""

    def fail(key: str, value: Any, allowed: str) -> PluginError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return PluginError(
            plugin,
            None,
            f"the checkpoint's {what} is not what the plugin declares: {key!r} must be {allowed}. "
            f"Got {shown} instead. The run folder's checkpoint was changed or written by another "
            f"version of the plugin; start a new run.",
        )

    if not isinstance(state, Mapping):
        raise fail("(the state)", state, "a dict")
    for key, value in state.items():
        rule = declared.get(key) if isinstance(key, str) else None
        if rule is None:
            raise fail(str(key), value, f"one of the declared keys {sorted(declared)}")
        found = rule.where(value, owner, state)
        if found is not None:
            raise fail(f"{key}{found[0]}", found[1], found[2])


def check_checkpoint_states(plugins: Sequence[Any], ckpt: Mapping[str, Any], data: Any) -> None:
    """Check every declared plugin state in checkpoint ``ckpt`` against the run's ``data``
    (a :class:`~fedlt.data.federated.FederatedData`), before the resume trains anything.

    Raises
    ------
    PluginError
        A plugin's server or client state breaks its declaration, or a client id is not one of
        the run's clients; exit status 2 (nothing has run).
    """
    labels = data.y_train_np
    everyone = np.arange(len(labels))
    for plugin in plugins:
        params = plugin.params.model_dump() if hasattr(plugin.params, "model_dump") else {}
        declared = getattr(plugin, "server_state", None)
        if declared is not None and plugin.name in ckpt.get("plugins", {}):
            owner = Owner(None, everyone, labels, data.num_classes, params)
            check_state(plugin.name, declared, ckpt["plugins"][plugin.name], owner, "server state")
        declared = getattr(plugin, "client_state", None)
        if declared is None:
            continue
        for client, states in ckpt.get("client_states", {}).items():
            if not _is_int(client) or not 0 <= client < data.n_clients:
                raise PluginError(
                    plugin.name,
                    None,
                    f"the checkpoint holds state for client {client!r}, but the run's clients are "
                    f"0..{data.n_clients - 1}. The run folder's checkpoint was changed; start a new run.",
                )
            if isinstance(states, Mapping) and plugin.name in states:
                own = np.sort(np.asarray(data.client_indices[client]))
                owner = Owner(int(client), own, labels, data.num_classes, params)
                check_state(plugin.name, declared, states[plugin.name], owner, f"state of client {client}")
