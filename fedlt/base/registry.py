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
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["Entry", "NoParams", "ParameterError", "Params", "Registry"]


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


class Registry:
    """The entries of one kind, in declaration order; iterating gives their names.

    Parameters
    ----------
    kind : str
        What an entry is, for messages: ``"model"``, ``"dataset"``, ``"long-tail profile"``.
    entries : iterable of Entry
        Names must be unique.
    """

    def __init__(self, kind: str, entries: Iterable[Entry]) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise ValueError(f"{kind} {entry.name!r} is registered twice")
            self._entries[entry.name] = entry

    @property
    def names(self) -> tuple[str, ...]:
        """Every entry's name, in declaration order."""
        return tuple(self._entries)

    def __getitem__(self, name: str) -> Entry:
        """The entry called ``name``; a ``ValueError`` listing the known names otherwise."""
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names)}")
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> tuple[Entry, ...]:
        """Every entry, in declaration order."""
        return tuple(self._entries.values())

    def parameters(self) -> dict[str, list[Entry]]:
        """Every parameter name any entry takes, with the entries taking it (first-seen order)."""
        found: dict[str, list[Entry]] = {}
        for entry in self._entries.values():
            for key in entry.takes:
                found.setdefault(key, []).append(entry)
        return found

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.names)})"
