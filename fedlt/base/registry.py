"""Registries: each kind of interchangeable part, declared once next to its implementation.

Datasets (:data:`fedlt.data.datasets.DATASETS`), models (:data:`fedlt.models.MODELS`), partitions
(:data:`fedlt.data.partition.PARTITIONS`) and long-tail profiles (:data:`fedlt.data.longtail.PROFILES`)
each list their entries in one :class:`Registry`: a name, a pydantic model of the parameters a
scenario may set (types, defaults, constraints, descriptions), a one-line summary and the function
that builds it. :mod:`fedlt.scenario.config` derives its scenario sections from them and the scenario
reference is generated from them, so a name or a parameter is written in exactly one place.

Library code raises plain errors: an unknown name is a ``ValueError``, and a parameter value that
does not fit what only the data can tell (an image model on flat data, a cap an archive exceeds) is
a :class:`ParameterError`, a ``ValueError`` that names the parameter so that the scenario boundary
(:func:`fedlt.data.federated.build_federated_data`) can name the scenario key.

Outside code: a registry with an entry-point ``group`` (``fedlt.models``, ``fedlt.datasets``) also
serves the :class:`Entry` objects other installed packages declare there (docs/extending.md).
Discovery reads entry-point metadata only, and only when a name is not built in, so built-in
scenarios never scan or import anything else; an outside entry's module is imported when a
scenario names it, and one that cannot be used (its import fails, it is not an ``Entry``, two
packages claim its name) raises :class:`OutsideEntryError`, naming the package and the entry
point, only then. Built-in names always win: an entry point named like a built-in entry is never
used (a scenario file means the same thing wherever it runs) and is listed with that error.
Iterating a registry, :attr:`Registry.names`, :meth:`Registry.entries` and
:meth:`Registry.parameters` give the built-in entries (what the committed reference documents);
:meth:`Registry.outside` lists the others.
"""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["Entry", "NoParams", "OutsideEntry", "OutsideEntryError", "ParameterError", "Params", "Registry"]


def _plain(value: Any) -> Any:
    """Tuples as lists, paths as strings, numpy integers as ints: what TOML would have given."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
        return int(value)
    return value


class Params(BaseModel):
    """Base of every entry's parameter model.

    Unknown keys are errors, instances are immutable, and types are strict (``true`` is not the
    integer 1, ``"3"`` not 3, ``2.0`` not a layer width), with no infinities or NaN; tuples, paths and
    numpy integers that code passes are taken as the lists, strings and ints a scenario would hold.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_values(cls, data: Any) -> Any:
        return {k: _plain(v) for k, v in data.items()} if isinstance(data, Mapping) else data


class NoParams(Params):
    """The parameters of an entry that takes none."""


class ParameterError(ValueError):
    """A parameter value that does not fit, said so that a caller can name the setting at fault.

    Parameters
    ----------
    param : str
        The parameter's name as the entry's parameter model spells it (``"widths"``), not the
        scenario key: the boundary that knows which section it came from adds the prefix.
    value : Any
        The value that was given.
    allowed : str
        What is allowed, phrased to follow "must be".
    hint : str, optional
        One sentence on why, or how to fix it.
    """

    def __init__(self, param: str, value: Any, allowed: str, hint: str | None = None) -> None:
        self.param = param
        self.value = value
        self.allowed = allowed
        self.hint = hint
        message = f"{param} must be {allowed}, got {value!r}."
        if hint:
            message += f" {hint}"
        super().__init__(message)

    def __reduce__(self):  # picklable (Ray workers) with its attributes, not just the message
        return (ParameterError, (self.param, self.value, self.allowed, self.hint))


@dataclass(frozen=True)
class Entry:
    """One registered part.

    Attributes
    ----------
    name : str
        The name a scenario selects it by.
    params : type[BaseModel]
        Its parameters: every field a scenario may set, with default, constraints and description.
    summary : str
        One sentence for the scenario reference.
    build : Callable
        What builds it; each registry documents the call.
    provides : frozenset of str
        Capabilities it has that plugins may require (a model's ``"head"``, ``"prompts"``), so a
        requirement is checked from the scenario alone, before anything is built.
    """

    name: str
    params: type[BaseModel]
    summary: str
    build: Callable[..., Any]
    provides: frozenset[str] = frozenset()

    @property
    def takes(self) -> tuple[str, ...]:
        """The names of its parameters, in declaration order."""
        return tuple(self.params.model_fields)

    def defaults(self) -> dict[str, Any]:
        """Its parameters' defaults (required ones left out), as fresh copies."""
        return {
            k: f.get_default(call_default_factory=True)
            for k, f in self.params.model_fields.items()
            if not f.is_required()
        }


class OutsideEntryError(ValueError):
    """An outside package's entry that cannot be used; the message names the package and entry point.

    Attributes
    ----------
    name : str
        The name a scenario selects it by.
    origin : str
        Where it comes from: ``"package mypkg (entry point fedlt.models: mynet = mypkg.models:ENTRY)"``.
    reason : str
        Why it cannot be used.
    """

    def __init__(self, kind: str, name: str, origin: str, reason: str) -> None:
        self.kind, self.name, self.origin, self.reason = kind, name, origin, reason
        super().__init__(f"The {kind} {name!r} from {origin} cannot be used: {reason}")

    def __reduce__(self):  # picklable (Ray workers) with its attributes
        return (OutsideEntryError, (self.kind, self.name, self.origin, self.reason))


class OutsideEntry:
    """An entry another installed package registers in an entry-point group; loaded on first use.

    Parameters
    ----------
    kind : str
        The registry's kind, for messages.
    name, value, group : str
        The entry point: ``name = value`` in ``group``.
    distribution : str
        The package that declares it.
    entry_point : importlib.metadata.EntryPoint, optional
        What is loaded; None when ``error`` is known from the metadata alone (a clash).
    error : str, optional
        Why it cannot be used, when known without loading it.
    """

    def __init__(
        self,
        kind: str,
        name: str,
        value: str,
        group: str,
        distribution: str,
        entry_point: Any = None,
        error: str | None = None,
    ) -> None:
        self.kind, self.name, self.value, self.group = kind, name, value, group
        self.distribution = distribution
        self._ep, self._error = entry_point, error
        self._entry: Entry | None = None

    @property
    def origin(self) -> str:
        """The package and entry point, as messages name them."""
        return f"package {self.distribution} (entry point {self.group}: {self.name} = {self.value})"

    def _load(self) -> None:
        if self._entry is not None or self._error is not None:
            return
        try:
            obj = self._ep.load()
        except Exception as exc:  # any failure of outside code is reported, not raised here
            self._error = f"importing it failed: {type(exc).__name__}: {exc}"
            return
        self._error = _entry_problem(obj, self.name)
        if self._error is None:
            self._entry = obj

    @property
    def error(self) -> str | None:
        """Why it cannot be used (loading it if needed), or None."""
        self._load()
        return self._error

    def load(self) -> Entry:
        """The :class:`Entry`; :class:`OutsideEntryError` when it cannot be used."""
        self._load()
        if self._entry is None:
            raise OutsideEntryError(self.kind, self.name, self.origin, str(self._error))
        return self._entry


def _entry_problem(obj: Any, name: str) -> str | None:
    """What keeps ``obj`` (an entry point's target) from being used as entry ``name``, or None."""
    where = "fedlt.base.registry"
    if not isinstance(obj, Entry):
        return f"it points at an object of type {type(obj).__name__}, not a {where}.Entry"
    if obj.name != name:
        return f"it points at an Entry named {obj.name!r}; the entry point's name must be the Entry's name"
    if not (isinstance(obj.params, type) and issubclass(obj.params, Params)):
        return f"its params must be a subclass of {where}.Params (unknown keys refused, strict types)"
    if not callable(obj.build):
        return "its build is not callable"
    return None


#: Discovered outside entries per (group, sys.path): the scan (about 15 ms) runs once per process
#: unless sys.path changes (a test's package, a worker's PYTHONPATH).
_DISCOVERED: dict[tuple[str, tuple[str, ...]], dict[str, OutsideEntry]] = {}


def _discover(kind: str, group: str, builtin: Mapping[str, Entry]) -> dict[str, OutsideEntry]:
    """Every entry point of ``group``, by name, clashes and duplicates recorded as errors."""
    import importlib.metadata as md

    key = (group, tuple(sys.path))
    if key in _DISCOVERED:
        return _DISCOVERED[key]
    found: dict[str, OutsideEntry] = {}
    for ep in md.entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in builtin:
            found[ep.name] = OutsideEntry(
                kind, ep.name, ep.value, group, dist,
                error=f"{ep.name!r} is a built-in {kind}, and built-in names always mean the built-in one; "
                "rename the entry point",
            )  # fmt: skip
        elif ep.name in found and found[ep.name].value != ep.value:
            other = found[ep.name]
            found[ep.name] = OutsideEntry(
                kind, ep.name, ep.value, group, dist,
                error=f"package {other.distribution} ({other.value}) registers the same name; uninstall "
                "one of them or rename one entry point",
            )  # fmt: skip
        elif ep.name not in found:
            found[ep.name] = OutsideEntry(kind, ep.name, ep.value, group, dist, entry_point=ep)
    _DISCOVERED[key] = found
    return found


class Registry:
    """The entries of one kind, in declaration order; iterating gives their (built-in) names.

    Parameters
    ----------
    kind : str
        What an entry is, for messages: ``"model"``, ``"dataset"``, ``"long-tail profile"``.
    entries : iterable of Entry
        Names must be unique.
    group : str, optional
        The entry-point group outside packages register further entries in (``"fedlt.models"``);
        looking a name up (``registry[name]``, ``name in registry``) also finds those (see the
        module docstring).
    """

    def __init__(self, kind: str, entries: Iterable[Entry], group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise ValueError(f"{kind} {entry.name!r} is registered twice")
            self._entries[entry.name] = entry

    def outside(self) -> dict[str, OutsideEntry]:
        """The entries installed packages register in :attr:`group` (none without a group), by name.

        Reads metadata only; an entry's module is imported when it is used (:meth:`OutsideEntry.load`).
        """
        if self.group is None:
            return {}
        return _discover(self.kind, self.group, self._entries)

    def check_built(self, name: str, built: Any, expected: type, key: str, what: str) -> Any:
        """``built`` (what entry ``name``'s builder returned) if it is an ``expected``; only an outside
        builder can return anything else, and that is refused naming ``key`` and the package.

        Raises
        ------
        ParameterError
            ``built`` is not an ``expected``; ``what`` says what the builder must return.
        """
        if isinstance(built, expected):
            return built
        raise ParameterError(
            key,
            name,
            what,
            hint=f"The builder of {self.outside()[name].origin} returned a {type(built).__name__}.",
        )

    def is_builtin(self, name: str) -> bool:
        """Whether ``name`` is one of the entries declared with the registry (not an outside one)."""
        return isinstance(name, str) and name in self._entries

    def known(self) -> tuple[str, ...]:
        """Every name a scenario may select: the built-in ones, then the outside ones."""
        return self.names + tuple(n for n in self.outside() if n not in self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        """Every built-in entry's name, in declaration order (:meth:`known` adds the outside ones)."""
        return tuple(self._entries)

    def __getitem__(self, name: str) -> Entry:
        """The entry called ``name``, built in or outside.

        Raises
        ------
        OutsideEntryError
            ``name`` is an outside entry that cannot be used (a ``ValueError``).
        ValueError
            An unknown name; the message lists the known ones.
        """
        if not isinstance(name, str):
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names)}")
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        outside = self.outside().get(name)
        if outside is None:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.known())}")
        return outside.load()

    def __contains__(self, name: object) -> bool:
        """Whether a scenario may name it: a built-in entry or an outside one (usable or not)."""
        return isinstance(name, str) and (name in self._entries or name in self.outside())

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> tuple[Entry, ...]:
        """Every built-in entry, in declaration order."""
        return tuple(self._entries.values())

    def parameters(self) -> dict[str, list[Entry]]:
        """Every parameter name any built-in entry takes, with the entries taking it (first-seen order)."""
        found: dict[str, list[Entry]] = {}
        for entry in self._entries.values():
            for key in entry.takes:
                found.setdefault(key, []).append(entry)
        return found

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.names)})"
