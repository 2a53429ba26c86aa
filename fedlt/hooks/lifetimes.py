"""What a plugin keeps on ``self``, and whether it lives where it is read.

A plugin's server side is one instance for the whole run; its client side is a fresh instance per
client-round (:mod:`fedlt.hooks.hookspecs`). So an attribute a server hook sets is never seen by
client hooks (they see the class default, or nothing), an attribute a client hook sets is never
seen by server hooks, and nothing a client hook sets survives to the client's next round. Each
mistake runs without an error and silently changes nothing (a proximal term that stays 0, a
counter that stays 1).

Two ways to find them:

- :func:`static_problems` reads the hook methods' source (``self.x = ...`` and ``self.x``) once
  per plugin class: cheap enough for every run (a warning when the run starts);
- :class:`Tracer` records, in a real run, every attribute each instance sets and every attribute
  it reads but does not hold (:func:`fedlt.testing.check_plugin` uses it): it also sees what the
  source cannot, such as a client counter read back before it is set.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedlt.hooks.hookspecs import SPECS
from fedlt.hooks.plugin import Plugin, implementations

__all__ = ["PluginWarning", "Tracer", "static_problems", "warn_static_problems"]

_HOW = {
    "server->client": "client hooks run on a fresh instance per client-round and never see it; send it "
    "through ctx.config (return it from server_configure_round or server_configure_client)",
    "client->server": "the server's instance never sees client instances; return it from client_end "
    "(it reaches server_after_aggregate as payloads[client_id])",
    "client->client": "each client-round runs on a fresh instance, so it starts over every round; keep "
    "what a client carries between its rounds in state",
}


class PluginWarning(UserWarning):
    """A plugin does something that runs but cannot do what it means (see :mod:`fedlt.hooks.lifetimes`)."""


def _side(hook: str) -> str:
    return "client" if SPECS[hook].side == "client" else "server"


def _self_attributes(fn: Any) -> tuple[set[str], set[str]]:
    """(names set as ``self.x = ...``, names read as ``self.x``) in a method's source."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return set(), set()
    sets, reads = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            (sets if isinstance(node.ctx, ast.Store | ast.Del) else reads).add(node.attr)
    return sets, reads


@functools.cache
def static_problems(cls: type[Plugin], name: str) -> tuple[str, ...]:
    """Sentences naming each attribute set on one side and read on the other, from the source."""
    impls = implementations(cls, name)
    by_side: dict[str, dict[str, tuple[set[str], set[str]]]] = {"client": {}, "server": {}}
    for hook, impl in impls.items():
        by_side[_side(hook)][hook] = _self_attributes(impl.function)
    init_sets = _self_attributes(cls.__init__)[0] if cls.__init__ is not Plugin.__init__ else set()

    def sets(side: str) -> dict[str, str]:
        return {a: h for h, (s, _) in sorted(by_side[side].items()) for a in s}

    def reads(side: str) -> dict[str, str]:
        return {a: h for h, (_, r) in sorted(by_side[side].items()) for a in r}

    problems = []
    for writer, reader in (("server", "client"), ("client", "server")):
        own = sets(reader)
        for attr, hook in sorted(sets(writer).items()):
            if attr in reads(reader) and attr not in own and attr not in init_sets:
                problems.append(
                    f"plugin {name!r}: {writer} hook {hook} sets self.{attr}, which {reader} hook "
                    f"{reads(reader)[attr]} reads; {_HOW[f'{writer}->{reader}']}"
                )
    return tuple(problems)


def warn_static_problems(plugins: Iterable[Plugin]) -> None:
    """One :class:`PluginWarning` per problem :func:`static_problems` finds (a run calls this once)."""
    for plugin in plugins:
        for problem in static_problems(type(plugin), plugin.name):
            warnings.warn(problem, PluginWarning, stacklevel=2)


# --------------------------------------------------------------------------- tracing a real run


@dataclass(frozen=True)
class Access:
    """One recorded access: an instance (server or client) set or read a missing attribute in a hook."""

    kind: str  # "set", or "missing" (read but not held by the instance)
    side: str  # "server" or "client"
    hook: str
    attr: str


class Tracer:
    """Records what a plugin class's instances set on ``self`` and read without holding, per hook.

    ``Tracer(cls).traced`` is a subclass of ``cls`` that behaves the same and records into
    :attr:`accesses`; :meth:`problems` turns them into sentences.
    """

    _local = threading.local()

    def __init__(self, cls: type[Plugin], name: str) -> None:
        self.name = name
        self.accesses: set[Access] = set()
        tracer = self
        hooks = implementations(cls, name)

        def wrap(hook: str, fn: Any) -> Any:
            @functools.wraps(fn)
            def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
                before = getattr(Tracer._local, "hook", None)
                Tracer._local.hook = hook
                try:
                    return fn(self, *args, **kwargs)
                finally:
                    Tracer._local.hook = before

            return traced

        namespace: dict[str, Any] = {attr: wrap(attr, impl.function) for attr, impl in hooks.items()}

        def record(self: Any, kind: str, attr: str) -> None:
            hook = getattr(Tracer._local, "hook", None)
            if hook is not None and not attr.startswith("__"):
                side = object.__getattribute__(self, "__dict__").get("_fedlt_side", "server")
                tracer.accesses.add(Access(kind, side, hook, attr))

        def __setattr__(self: Any, attr: str, value: Any) -> None:
            record(self, "set", attr)
            cls.__setattr__(self, attr, value)

        def __getattribute__(self: Any, attr: str) -> Any:
            if attr.startswith("_") or attr in namespace:
                return object.__getattribute__(self, attr)
            held = object.__getattribute__(self, "__dict__")
            if attr not in held:
                found = inspect.getattr_static(type(self), attr, None)
                if not callable(found) and not isinstance(found, property | staticmethod | classmethod):
                    record(self, "missing", attr)
            return cls.__getattribute__(self, attr)

        def client_instance(self: Any) -> Plugin:
            fresh = cls.client_instance(self)
            fresh.__dict__["_fedlt_side"] = "client"
            return fresh

        namespace.update(
            __setattr__=__setattr__,
            __getattribute__=__getattribute__,
            client_instance=client_instance,
            __module__=cls.__module__,
            __qualname__=cls.__qualname__,
        )
        self.traced = type(cls.__name__, (cls,), namespace)

    def problems(self) -> list[str]:
        """Sentences for each attribute that does not live where it is read."""
        sets = {(a.side, a.attr): a.hook for a in sorted(self.accesses, key=str) if a.kind == "set"}
        out = []
        for a in sorted(self.accesses, key=str):
            if a.kind != "missing":
                continue
            other = "server" if a.side == "client" else "client"
            if (other, a.attr) in sets:
                writer = sets[(other, a.attr)]
                out.append(
                    f"plugin {self.name!r}: {other} hook {writer} sets self.{a.attr}, which {a.side} hook "
                    f"{a.hook} reads; {_HOW[f'{other}->{a.side}']}"
                )
            elif a.side == "client" and ("client", a.attr) in sets:
                writer = sets[("client", a.attr)]
                out.append(
                    f"plugin {self.name!r}: client hook {a.hook} reads self.{a.attr} before this "
                    f"client-round set it (client hook {writer} sets it); {_HOW['client->client']}"
                )
        return sorted(set(out))
