"""Finding plugins: the ``fedlt.plugins`` entry-point group, and validated plugin instances.

Discovery reads entry-point metadata only; a plugin's module is imported when a scenario (or
``fedlt plugins --details``) asks for it, so one broken package breaks nothing else and listing
names needs no torch.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from fedlt.errors import PluginError, ScenarioError, readable_constraint

__all__ = [
    "ENTRY_POINT_GROUP",
    "EXTRA_PLUGINS_ENV",
    "PluginInfo",
    "discover_plugins",
    "instantiate_plugins",
    "qualified_plugin",
    "type_name",
]

ENTRY_POINT_GROUP = "fedlt.plugins"

#: Environment variable naming plugins that are not installed: ``name=module:Class,...``.
EXTRA_PLUGINS_ENV = "FEDLT_EXTRA_PLUGINS"


class PluginInfo:
    """A discovered plugin: its name, where it comes from, and (loaded on first use) its class.

    ``error`` says why an entry point cannot be used; it is raised only when a scenario asks for
    this plugin.
    """

    def __init__(
        self,
        name: str,
        value: str,
        distribution: str,
        cls: type | None = None,
        error: str | None = None,
        entry_point: md.EntryPoint | None = None,
    ) -> None:
        self.name, self.value, self.distribution = name, value, distribution
        self._cls, self._error, self._ep = cls, error, entry_point

    def _load(self) -> None:
        if self._cls is not None or self._error is not None:
            return
        from fedlt.hooks.plugin import Plugin, implementations

        try:
            cls = self._ep.load() if self._ep is not None else None
        except Exception as exc:
            self._error = f"entry point {self.value} failed to load: {exc!r}"
            return
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            self._error = f"entry point {self.value} is not a fedlt.Plugin subclass"
            return
        try:
            implementations(cls, self.name)
        except PluginError as exc:
            self._error = exc.message
            return
        self._cls = cls

    @property
    def cls(self) -> type:
        """The plugin class (the bare :class:`~fedlt.hooks.plugin.Plugin` when it cannot be used)."""
        self._load()
        if self._cls is None:
            from fedlt.hooks.plugin import Plugin

            return Plugin
        return self._cls

    @property
    def error(self) -> str | None:
        self._load()
        return self._error

    @property
    def hooks(self) -> list[str]:
        from fedlt.hooks.plugin import implementations

        return [] if self.error else list(implementations(self.cls, self.name))

    @property
    def description(self) -> str:
        return "" if self.error else self.cls.description()

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

    A name two installed distributions register is recorded with an error (the bare name is then
    unusable; the message names both distribution-qualified names, which still work, see
    :func:`qualified_plugin`). Plugins named in ``$FEDLT_EXTRA_PLUGINS`` (development) come last
    and replace an installed plugin of the same name. A plugin that fails to load is recorded with
    its error and reported when a scenario uses it (and by ``fedlt plugins``), not here.
    """
    found: dict[str, PluginInfo] = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in found:
            other = found[ep.name]
            if other.value != ep.value:
                found[ep.name] = PluginInfo(
                    ep.name,
                    ep.value,
                    dist,
                    error=f"registered twice: by {other.distribution} ({other.value}) and by {dist} "
                    f"({ep.value}). Uninstall one of them, or choose one by its qualified name: "
                    f"name = '{other.distribution}:{ep.name}' or name = '{dist}:{ep.name}'.",
                )
            continue
        found[ep.name] = PluginInfo(ep.name, ep.value, dist, entry_point=ep)
    for ep in _extra_entry_points():
        found[ep.name] = PluginInfo(ep.name, ep.value, EXTRA_PLUGINS_ENV, entry_point=ep)
    return found


def qualified_plugin(name: str) -> PluginInfo | None:
    """The plugin a distribution-qualified name (``"<distribution>:<name>"``, e.g. ``"fedlt:focal"``)
    names, or None: the way to choose one of two distributions registering the same name."""
    dist, sep, bare = name.partition(":")
    if not sep:
        return None
    for ep in md.entry_points(group=ENTRY_POINT_GROUP, name=bare):
        if ep.dist is not None and ep.dist.name == dist:
            return PluginInfo(name, ep.value, dist, entry_point=ep)
    return None


def _plugin_param_error(index: int, name: str, exc: ValidationError, params: list[str]) -> ScenarioError:
    messages = []
    first: ScenarioError | None = None
    for err in exc.errors():
        pname = ".".join(str(p) for p in err["loc"]) or "(parameters)"
        key = f"plugins[{index}].{pname}"
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(params) or "none"
            one = ScenarioError(
                key, err.get("input"), f"a parameter of plugin {name!r} (it takes: {allowed})"
            )
        else:
            one = ScenarioError(
                key, err.get("input"), f"{readable_constraint(err)} (parameter {pname!r} of plugin {name!r})"
            )
        first = first or one
        messages.append(str(one))
    assert first is not None
    first.args = (" ".join(messages),)
    return first


def instantiate_plugins(specs: Sequence[Any], available: Mapping[str, PluginInfo] | None = None) -> list[Any]:
    """Plugin instances for the scenario's ``[[plugins]]`` tables, parameters validated.

    Parameters
    ----------
    specs : sequence of PluginSpec
        Each has ``name`` and ``params``.
    available : mapping, optional
        Discovered plugins (default: :func:`discover_plugins`).
    """
    if not specs:
        return []  # nothing to find: no entry-point scan (about 30 ms)
    available = discover_plugins() if available is None else available
    plugins = []
    for i, spec in enumerate(specs):
        info = available.get(spec.name) or qualified_plugin(spec.name)
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
        plugin = info.cls(params)
        # The scenario name is the plugin's name (also for classes registered under several names).
        plugin.name = info.name
        plugins.append(plugin)
    return plugins
