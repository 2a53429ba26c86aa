"""The plugin base class, the ``@hookimpl`` marker, and the checks a plugin class must pass.

A plugin is a :class:`Plugin` subclass with typed ``Params`` and methods marked ``@hookimpl``,
each named after a hook declared in :mod:`fedlt.hooks.hookspecs`. :func:`implementations` validates a
class against the contract once (cached): unknown hook names, arguments the hook does not have,
and methods named like a hook but not marked are errors that name the plugin and the method.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from fedlt.base.warn import user_stacklevel
from fedlt.errors import PluginError
from fedlt.hooks.hookspecs import CONTRACT, CONTRACT_CHANGES, SPECS
from fedlt.hooks.state import Rule

__all__ = ["Impl", "NoParams", "Plugin", "contract_problem", "hookimpl", "implementations"]

_MARK = "fedlt_impl"


def hookimpl(function: Callable[..., Any] | None = None) -> Any:
    """Mark a plugin method as the implementation of the hook it is named after.

    Usable as ``@hookimpl`` or ``@hookimpl()``.
    """

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        setattr(fn, _MARK, True)
        return fn

    return mark(function) if function is not None else mark


class NoParams(BaseModel):
    """Parameters of a plugin that takes none."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """Base class of fedlt plugins.

    Subclasses set ``Params`` (a pydantic model: the plugin's typed parameters, validated when
    the scenario is loaded) and implement hooks as methods marked ``@hookimpl``. ``__init__``
    stores the validated parameters without logic.

    Server-side hooks run on the one instance the driver keeps for the run; client-side hooks
    run on a fresh instance made by :meth:`client_instance` for every client-round, so the
    instance's attributes are that client-round's scratch space (see :mod:`fedlt.hooks.hookspecs`).

    Attributes
    ----------
    name : str
        The name users type in a scenario; set from the entry-point name at discovery.
    requires : frozenset of str
        Capabilities the plugin needs, checked before a run starts: ``"head"`` (a model with a
        linear head), ``"stream"`` (a continual scenario), ``"prompts"`` (a ViT prompt slot).
    class_weighting : bool
        Deprecated (contract 0.3): implement ``client_class_weights`` instead. A plugin that sets
        it has its ``client_sample_weights`` treated as class weights, with a warning.
    vectorized : bool
        The plugin's per-batch hooks are pure tensor functions of their arguments and of tensor
        attributes set in ``client_start``, so they can run inside a vmapped step over a group of
        clients (``engine.vectorize``, see docs/vectorized.md); otherwise those clients train one
        by one.
    contract : str or None
        The plugin contract the plugin is written for (``"0.3"``, see
        :data:`fedlt.hooks.hookspecs.CONTRACT`): registration refuses it when this fedlt cannot
        honour it, saying what changed (docs/migrating.md). None: not declared, not checked.
    client_state : dict of str to Rule, or None
        The shape of the per-client ``state`` the client hooks keep: each key and the rule its
        value follows (:mod:`fedlt.hooks.state`: ``Int``, ``ListOf(OwnSample())``, ...). A resume
        checks the checkpoint against it before training, so a changed or foreign checkpoint is
        refused naming the plugin, client, key and value. None: loaded as it is.
    server_state : dict of str to Rule, or None
        The same for what :meth:`state_dict` returns.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    requires: ClassVar[frozenset[str]] = frozenset()
    class_weighting: ClassVar[bool] = False
    vectorized: ClassVar[bool] = False
    contract: ClassVar[str | None] = None
    client_state: ClassVar[Mapping[str, Rule] | None] = None
    server_state: ClassVar[Mapping[str, Rule] | None] = None

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def client_instance(self) -> Plugin:
        """A fresh instance for one client-round: same parameters, none of the server's state."""
        fresh = type(self)(self.params)
        fresh.name = self.name  # type: ignore[misc]
        return fresh

    def state_dict(self) -> dict[str, Any]:
        """Global (server-side) state to checkpoint, as plain data. Per-client state lives in
        the client hooks' ``state``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @classmethod
    def description(cls) -> str:
        """The first paragraph of the class docstring, as one line (``fedlt plugins`` shows it).

        A docstring's summary often wraps onto a second line; its first line alone would stop
        mid-sentence.
        """
        doc = inspect.getdoc(cls) if cls.__doc__ else None
        return " ".join(doc.strip().split("\n\n")[0].split()) if doc else ""


class Impl:
    """One validated hook implementation of a plugin class."""

    __slots__ = ("argnames", "function", "hook")

    def __init__(self, hook: str, function: Callable[..., Any], argnames: tuple[str, ...]) -> None:
        self.hook = hook
        self.function = function
        self.argnames = argnames


def _is_marked(value: Any) -> bool:
    return callable(value) and getattr(value, _MARK, False) is True


def _own_methods(cls: type) -> dict[str, Any]:
    """Attributes defined by ``cls`` and its bases up to (not including) :class:`Plugin`."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or klass is Plugin or issubclass(Plugin, klass):
            continue
        found.update(vars(klass))
    return found


def _version(text: str) -> tuple[int, ...] | None:
    parts = text.split(".") if isinstance(text, str) else []
    return tuple(int(p) for p in parts) if parts and all(p.isdigit() for p in parts) else None


def contract_problem(declared: str | None) -> str | None:
    """Why this fedlt cannot honour a plugin written for contract ``declared`` (None: it can)."""
    if declared is None:
        return None
    mine, theirs = _version(CONTRACT), _version(declared)
    if theirs is None:
        return f"declares contract = {declared!r}; expected a version such as {CONTRACT!r}"
    if theirs > mine:
        return (
            f"is written for plugin contract {declared}, newer than this fedlt's {CONTRACT}: upgrade "
            "fedlt (pip install -U fedlt)"
        )
    breaking = [
        change
        for version, (is_breaking, changes) in CONTRACT_CHANGES.items()
        if theirs < _version(version) <= mine and is_breaking
        for change in changes
    ]
    if breaking:
        return (
            f"is written for plugin contract {declared}; this fedlt implements {CONTRACT}, which changed: "
            + "; ".join(breaking)
            + f". See docs/migrating.md, then declare contract = {CONTRACT!r}."
        )
    return None


def _declaration_problem(attr: str, declared: Any) -> str | None:
    """What is wrong with a ``client_state`` / ``server_state`` declaration, or None."""
    if declared is None:
        return None
    if not isinstance(declared, Mapping):
        return f"{attr} must be a dict of state keys to rules (fedlt.hooks.state). Got {declared!r} instead."
    for key, rule in declared.items():
        if not isinstance(key, str) or not isinstance(rule, Rule):
            return (
                f"{attr}[{key!r}] must be a rule of fedlt.hooks.state (Int, ListOf(OwnSample()), ...), "
                f"keyed by a str. Got {rule!r} instead."
            )
    return None


@functools.cache
def implementations(cls: type[Plugin], name: str) -> dict[str, Impl]:
    """The hook implementations of a plugin class, validated against the contract.

    Raises
    ------
    PluginError
        Naming the plugin and the method: an unknown hook, an argument the hook does not pass,
        a generator or coroutine, or a method named like a hook but not marked ``@hookimpl``.
    """
    impls: dict[str, Impl] = {}
    for attr, value in _own_methods(cls).items():
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        marked = _is_marked(value)
        if attr in SPECS and not marked and callable(value):
            raise PluginError(
                name,
                attr,
                f"method {cls.__qualname__}.{attr} is named like a hook but is not marked @hookimpl, so "
                "fedlt would never call it. Put @fedlt.hookimpl above it (or rename it).",
            )
        if not marked:
            continue
        if attr not in SPECS:
            close = difflib.get_close_matches(attr, SPECS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PluginError(
                name, attr, f"unknown hook {attr!r} (marked @hookimpl on {cls.__qualname__}).{hint}"
            )
        if inspect.isgeneratorfunction(value) or inspect.iscoroutinefunction(value):
            raise PluginError(name, attr, "a hook implementation must be a plain function, not a generator")
        params = list(inspect.signature(value).parameters.values())
        if params and params[0].name == "self":
            params = params[1:]
        bad = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if bad:
            raise PluginError(name, attr, f"hook implementations take named arguments only, not *{bad[0]}")
        argnames = tuple(p.name for p in params)
        unknown = [a for a in argnames if a not in SPECS[attr].params]
        if unknown:
            raise PluginError(
                name,
                attr,
                f"argument(s) {unknown} are not passed by hook {attr!r}; it passes: "
                f"{', '.join(SPECS[attr].params)}",
            )
        impls[attr] = Impl(attr, value, argnames)
    problem = contract_problem(getattr(cls, "contract", None))
    if problem is not None:
        raise PluginError(name, None, problem)
    for attr in ("client_state", "server_state"):
        problem = _declaration_problem(attr, getattr(cls, attr, None))
        if problem is not None:
            raise PluginError(name, None, problem)
    if getattr(cls, "class_weighting", False):
        warnings.warn(
            f"plugin {name!r}: class_weighting = True is deprecated since fedlt's plugin contract 0.3; "
            "implement client_class_weights (same arguments, same return) instead of client_sample_weights",
            DeprecationWarning,
            stacklevel=user_stacklevel(),
        )
    return impls
