"""Plugin discovery (entry points), parameter validation, and ordered, attributed hook dispatch.

pluggy checks each plugin against the hookspecs when it is registered (misspelt hooks, unknown
arguments). Dispatch is ours: implementations run in the order plugins are listed in the
scenario, ``state`` is injected per plugin, and an exception is re-raised as a
:class:`~fedlt.errors.PluginError` naming the plugin and the hook.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import pluggy
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fedlt import hookspecs
from fedlt.errors import FedltError, PluginError, ScenarioError

__all__ = [
    "ENTRY_POINT_GROUP",
    "HookSet",
    "Plugin",
    "PluginInfo",
    "build_hooks",
    "discover_plugins",
    "hookimpl",
    "instantiate_plugins",
]

ENTRY_POINT_GROUP = "fedlt.plugins"

hookimpl = pluggy.HookimplMarker("fedlt")


class NoParams(BaseModel):
    """Parameters of a plugin that takes none."""

    model_config = ConfigDict(extra="forbid")


class Plugin:
    """Base class of fedlt plugins.

    Subclasses set ``Params`` (a pydantic model: the plugin's typed parameters, validated when
    the scenario is loaded) and implement hooks as methods marked ``@hookimpl``. ``__init__``
    stores the validated parameters without logic; setup belongs in ``server_setup`` or
    ``configure_model``.

    Attributes
    ----------
    name : str
        The name users type in a scenario; set from the entry-point name at discovery.
    requires : frozenset of str
        Capabilities the plugin needs from the scenario (checked before a run starts):
        ``"head"`` (a model with a separable linear head, all built-in models have one).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, params: BaseModel | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def state_dict(self) -> dict[str, Any]:
        """Global (server-side) state to checkpoint. Per-client state lives in hooks' ``state``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class PluginInfo:
    """A discovered plugin: its name, where it comes from, and (loaded on first use) its class.

    Loading is deferred so a run imports only the plugins its scenario lists; ``error`` says why
    an entry point cannot be used (then ``cls`` is the bare base class). It is raised only when a
    scenario asks for this plugin, so one broken package breaks nothing else.
    """

    def __init__(
        self,
        name: str,
        value: str,
        distribution: str,
        cls: type[Plugin] | None = None,
        error: str | None = None,
        entry_point: md.EntryPoint | None = None,
    ) -> None:
        self.name, self.value, self.distribution = name, value, distribution
        self._cls, self._error, self._ep = cls, error, entry_point

    def _load(self) -> None:
        if self._cls is not None or self._error is not None:
            return
        try:
            cls = self._ep.load() if self._ep is not None else None
        except Exception as exc:
            self._error = f"entry point {self.value} failed to load: {exc!r}"
            return
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            self._error = f"entry point {self.value} is not a fedlt.Plugin subclass"
            return
        self._cls = cls

    @property
    def cls(self) -> type[Plugin]:
        self._load()
        return self._cls if self._cls is not None else Plugin

    @property
    def error(self) -> str | None:
        self._load()
        return self._error

    @property
    def hooks(self) -> list[str]:
        return sorted(n for n in hookspecs.COMBINE if _is_hookimpl(getattr(self.cls, n, None)))

    def parameters(self) -> list[dict[str, Any]]:
        out = []
        for pname, field in self.cls.Params.model_fields.items():
            out.append(
                {
                    "name": pname,
                    "type": type_name(field.annotation),
                    "default": None if field.is_required() else field.get_default(call_default_factory=True),
                    "required": field.is_required(),
                    "description": field.description or "",
                }
            )
        return out


def type_name(ann: Any) -> str:
    """A readable type for docs and listings: ``float``, ``'local' | 'global'``, ``list[int] | None``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", str(ann))


def _is_hookimpl(fn: Any) -> bool:
    return fn is not None and hasattr(fn, "fedlt_impl")


#: Environment variable naming plugins that are not installed: ``name=module:Class,...``.
EXTRA_PLUGINS_ENV = "FEDLT_EXTRA_PLUGINS"


def _extra_entry_points() -> list[md.EntryPoint]:
    """Plugins named in $FEDLT_EXTRA_PLUGINS, for developing a plugin before packaging it.

    Worker processes (Ray) inherit the variable, so such plugins work on every engine as long as
    their module is importable there (e.g. via PYTHONPATH).
    """
    spec = os.environ.get(EXTRA_PLUGINS_ENV, "").strip()
    eps = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or ":" not in value:
            raise ScenarioError(EXTRA_PLUGINS_ENV, item, "a comma-separated list of name=module:Class")
        eps.append(md.EntryPoint(name=name.strip(), value=value.strip(), group=ENTRY_POINT_GROUP))
    return eps


def discover_plugins() -> dict[str, PluginInfo]:
    """Every plugin registered in the ``fedlt.plugins`` entry-point group, by name.

    A plugin that fails to load, or a name registered by two distributions, is recorded with its
    error and reported when a scenario uses it (and by ``fedlt plugins``), not here.
    """
    found: dict[str, PluginInfo] = {}
    for ep in [*md.entry_points(group=ENTRY_POINT_GROUP), *_extra_entry_points()]:
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in found:
            other = found[ep.name]
            if other.value != ep.value:
                found[ep.name] = PluginInfo(
                    ep.name,
                    ep.value,
                    dist,
                    Plugin,
                    f"registered twice: by {other.distribution} ({other.value}) and by {dist} ({ep.value}). "
                    "Uninstall one of them.",
                )
            continue
        found[ep.name] = PluginInfo(ep.name, ep.value, dist, entry_point=ep)
    return found


def _plugin_param_error(index: int, name: str, exc: ValidationError, params: list[str]) -> ScenarioError:
    messages = []
    first: ScenarioError | None = None
    for err in exc.errors():
        pname = ".".join(str(p) for p in err["loc"])
        key = f"plugins[{index}].{pname}"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(params) or "none"
            one = ScenarioError(
                key, err.get("input"), f"a parameter of plugin {name!r} (it takes: {allowed})"
            )
        else:
            allowed = err["msg"].removeprefix("Input should be ").removeprefix("Value error, ")
            one = ScenarioError(key, err.get("input"), f"{allowed} (parameter {pname!r} of plugin {name!r})")
        first = first or one
        messages.append(str(one))
    assert first is not None
    first.args = (" ".join(messages),)
    return first


def instantiate_plugins(
    specs: Sequence[Any], available: Mapping[str, PluginInfo] | None = None
) -> list[Plugin]:
    """Plugin instances for the scenario's ``[[plugins]]`` tables, parameters validated.

    Parameters
    ----------
    specs : sequence of PluginSpec
        Each has ``name`` and ``params``.
    available : mapping, optional
        Discovered plugins (default: :func:`discover_plugins`).
    """
    available = discover_plugins() if available is None else available
    plugins: list[Plugin] = []
    for i, spec in enumerate(specs):
        info = available.get(spec.name)
        if info is None:
            known = ", ".join(sorted(available)) or "(none installed)"
            raise ScenarioError(
                f"plugins[{i}].name", spec.name, f"an installed plugin: {known}", hint="See `fedlt plugins`."
            )
        if info.error is not None:
            raise PluginError(spec.name, None, info.error)
        try:
            params = info.cls.Params.model_validate(spec.params)
        except ValidationError as exc:
            raise _plugin_param_error(i, spec.name, exc, list(info.cls.Params.model_fields)) from None
        except ScenarioError:
            raise
        plugin = info.cls(params)
        # The scenario name is the plugin's name (also for classes registered under several names).
        plugin.name = info.name  # type: ignore[misc]
        plugins.append(plugin)
    return plugins


# --------------------------------------------------------------------------- dispatch


class _Hook:
    """One hook's implementations in scenario order, with pre-resolved argument names."""

    __slots__ = ("combine", "impls", "name")

    def __init__(self, name: str, impls: list[tuple[str, Callable[..., Any], tuple[str, ...]]]) -> None:
        self.name = name
        self.impls = impls
        self.combine = hookspecs.COMBINE[name]

    def __bool__(self) -> bool:
        return bool(self.impls)

    @property
    def plugin_names(self) -> list[str]:
        return [n for n, _, _ in self.impls]

    def _call(
        self, plugin: str, fn: Callable[..., Any], argnames: tuple[str, ...], kwargs: dict[str, Any]
    ) -> Any:
        __tracebackhide__ = True
        try:
            args = {}
            for a in argnames:
                if a == "state":
                    args[a] = (
                        kwargs["states"].setdefault(plugin, {}) if kwargs.get("states") is not None else {}
                    )
                else:
                    args[a] = kwargs[a]
            return fn(**args)
        except FedltError:
            raise
        except Exception as exc:
            raise PluginError(plugin, self.name, f"{type(exc).__name__}: {exc}") from exc

    def all(
        self, per_plugin: Mapping[str, Mapping[str, Any]] | None = None, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """(plugin, result) for every implementation, in order; ``None`` results included.

        ``per_plugin`` gives arguments that differ by plugin (e.g. each plugin's own payloads).
        """
        if per_plugin is None:
            return [(p, self._call(p, fn, a, kwargs)) for p, fn, a in self.impls]
        return [(p, self._call(p, fn, a, {**kwargs, **per_plugin.get(p, {})})) for p, fn, a in self.impls]

    def first(self, **kwargs: Any) -> Any:
        for p, fn, a in self.impls:
            out = self._call(p, fn, a, kwargs)
            if out is not None:
                return out
        return None

    def chain(self, value_name: str, **kwargs: Any) -> Any:
        for p, fn, a in self.impls:
            out = self._call(p, fn, a, kwargs)
            if out is None:
                raise PluginError(
                    p, self.name, f"returned None; a chain hook must return the new {value_name}"
                )
            kwargs[value_name] = out
        return kwargs[value_name]

    def product(self, **kwargs: Any) -> torch.Tensor | None:
        acc = None
        for p, fn, a in self.impls:
            out = self._call(p, fn, a, kwargs)
            if out is not None:
                acc = out if acc is None else acc * out
        return acc

    def concat(self, **kwargs: Any) -> torch.Tensor | None:
        """Non-None tensor results joined along the first dimension, in order."""
        parts = [out for p, fn, a in self.impls if (out := self._call(p, fn, a, kwargs)) is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def sum(self, **kwargs: Any) -> torch.Tensor | None:
        acc = None
        for p, fn, a in self.impls:
            out = self._call(p, fn, a, kwargs)
            if out is not None:
                acc = out if acc is None else acc + out
        return acc


class HookSet:
    """All hooks for one ordered list of plugin instances; attribute access by hook name."""

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self.plugins = list(plugins)
        self.by_name = {p.name: p for p in self.plugins}
        pm = pluggy.PluginManager("fedlt")
        pm.add_hookspecs(hookspecs)
        for plugin in self.plugins:
            for attr in dir(type(plugin)):
                if _is_hookimpl(getattr(type(plugin), attr, None)) and attr not in hookspecs.COMBINE:
                    raise PluginError(
                        plugin.name, attr, f"unknown hook {attr!r}; hooks are: {', '.join(hookspecs.COMBINE)}"
                    )
            try:
                pm.register(plugin, name=plugin.name)
            except pluggy.PluginValidationError as exc:
                # pluggy's text starts with its own "Plugin '<name>' for hook ..." line: keep the rest.
                detail = str(exc).split("\n", 1)[-1].replace("\n", "; ")
                raise PluginError(plugin.name, None, detail) from None
        order = {p.name: i for i, p in enumerate(self.plugins)}
        self._hooks: dict[str, _Hook] = {}
        for name in hookspecs.COMBINE:
            caller = getattr(pm.hook, name)
            impls = sorted(caller.get_hookimpls(), key=lambda h: order[h.plugin_name])
            self._hooks[name] = _Hook(name, [(h.plugin_name, h.function, tuple(h.argnames)) for h in impls])

    def __getattr__(self, name: str) -> _Hook:
        try:
            return self.__dict__["_hooks"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    def state_dict(self) -> dict[str, Any]:
        """Every plugin's global state, by plugin name."""
        return {p.name: p.state_dict() for p in self.plugins}

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        for p in self.plugins:
            if p.name in states:
                try:
                    p.load_state_dict(states[p.name])
                except Exception as exc:
                    raise PluginError(p.name, "load_state_dict", f"{type(exc).__name__}: {exc}") from exc


def build_hooks(specs: Iterable[Any], available: Mapping[str, PluginInfo] | None = None) -> HookSet:
    """Discover, validate and register the scenario's plugins; the entry point for engines."""
    return HookSet(instantiate_plugins(list(specs), available))
