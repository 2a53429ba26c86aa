"""Calling hooks: scenario order, combined by each hook's declaration, results checked on arrival.

:class:`HookSet` holds a run's plugins and dispatches the server-side hooks (``server_*``,
``eval_*``, ``configure_model``) to their one server instance. :meth:`HookSet.for_client` makes
a :class:`ClientHooks` for one client-round: fresh plugin instances (so nothing a server hook
left on ``self`` is visible, on any engine), each bound to its own per-client ``state``.

Every result is checked where fedlt receives it (per-sample shapes, scalar losses, plain-data
payloads and configs, JSON-ready metrics), and a mistake raises a
:class:`~fedlt.errors.PluginError` naming plugin, hook, client and round at the moment it
happens. The checks are shape comparisons on results already in hand, so they cost nothing
measurable per batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedlt.base.safe import describe_type, find_unsafe
from fedlt.errors import FedltError, PluginError
from fedlt.hooks.context import Forward
from fedlt.hooks.hookspecs import SPECS
from fedlt.hooks.plugin import Impl, Plugin, implementations
from fedlt.hooks.recipe import LocalTraining
from fedlt.hooks.spec import HookSpec

__all__ = [
    "ClientHooks",
    "Hook",
    "HookSet",
    "bound_hook",
    "build_hooks",
    "build_hooks_spelled_out",
    "spelled_out",
]

CLIENT_HOOKS = tuple(n for n, s in SPECS.items() if s.side == "client")
SERVER_HOOKS = tuple(n for n, s in SPECS.items() if s.side != "client")

# --------------------------------------------------------------------------- result checks
# One per rule of fedlt.hooks.spec.CHECK_RULES: each gets the result, the call's arguments and the
# hook's name, and returns None when the result is acceptable, else a sentence saying what is wrong.


def _tensor_problem(result: Any, expected: str) -> str | None:
    if not isinstance(result, torch.Tensor):
        return f"returned {describe_type(result)}; expected {expected}"
    return None


#: What a per-sample hook returning a scalar is told.
_SCALAR_HINTS = {
    "client_loss": "client_loss must not reduce: compute the loss with reduction='none'.",
}


def _per_sample(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    b = kw["y"].shape[0]
    what = "per-sample losses" if hook == "client_loss" else "per-sample weights"
    expected = f"{what} of shape (B,) = ({b},)"
    problem = _tensor_problem(result, expected)
    if problem or result.shape == (b,):
        return problem
    got = f"returned a tensor of shape {tuple(result.shape)}; expected {expected}"
    if result.ndim == 0:
        return f"{got}. {_SCALAR_HINTS.get(hook, 'Return one value per sample.')}"
    if result.ndim == 2 and result.shape[0] == b and result.shape[1] == 1:
        return f"{got}: a (B, 1) tensor would broadcast into a (B, B) loss. Squeeze the last dimension."
    return got


def _like_logits(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    shape = tuple(kw["logits"].shape)
    problem = _tensor_problem(result, f"logits of shape {shape}")
    if problem is None and tuple(result.shape) != shape:
        return f"returned a tensor of shape {tuple(result.shape)}; expected logits of the same shape {shape}"
    return problem


def _scalar(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    problem = _tensor_problem(result, "a 0-dimensional (scalar) tensor")
    if problem is None and result.ndim != 0:
        return (
            f"returned a tensor of shape {tuple(result.shape)}; expected a 0-dimensional (scalar) tensor "
            "(reduce it, e.g. with .mean() or .sum())"
        )
    return problem


def _forward(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        return f"returned {describe_type(result)}; expected a Forward or a (features, logits) pair"
    if not all(isinstance(t, torch.Tensor) for t in result):
        return "returned a tuple that holds something other than tensors"
    b = kw["x"].shape[0]
    logits = result[1]
    if logits.ndim != 2 or logits.shape[0] != b or result[0].shape[0] != b:
        return (
            f"returned features of shape {tuple(result[0].shape)} and logits of shape {tuple(logits.shape)}; "
            f"expected (B, d) and (B, C) with B = {b}"
        )
    return None


def _indices(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    problem = _tensor_problem(result, "a 1-D integer tensor of dataset indices")
    if problem is None and (result.ndim != 1 or result.dtype.is_floating_point or result.dtype == torch.bool):
        shape = tuple(result.shape)
        return f"returned a tensor of shape {shape} and dtype {result.dtype}; expected a 1-D integer tensor"
    return problem


def _parameters(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    if isinstance(result, torch.Tensor) or not isinstance(result, Iterable):
        return f"returned {describe_type(result)}; expected a list of tensors"
    for t in result:
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            return "returned something other than tensors with requires_grad=True"
    return None


def _recipe(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    if not isinstance(result, LocalTraining):
        return f"returned {describe_type(result)}; expected a LocalTraining (recipe or recipe.replace(...))"
    return None


def _payload(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    return find_unsafe(result, "the payload")


def _config(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    if not isinstance(result, Mapping):
        return f"returned {describe_type(result)}; expected a mapping of config entries (or None)"
    for key in result:
        if not isinstance(key, str):
            return f"returned a config key {key!r} of type {describe_type(key)}; keys must be strings"
    return find_unsafe(dict(result), "the config")


def _aggregator(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    if not (callable(getattr(result, "add", None)) and callable(getattr(result, "result", None))):
        return f"returned {describe_type(result)}; expected an Aggregator with add() and result()"
    return None


def _clients(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    k, candidates = kw.get("k"), kw.get("candidates", ())
    if isinstance(result, str | bytes) or not isinstance(result, Iterable):
        return f"returned {describe_type(result)}; expected a list of client ids (or None)"
    chosen = list(result)
    if not all(isinstance(c, int | np.integer) and not isinstance(c, bool) for c in chosen):
        return "returned something other than integer client ids"
    if len(set(chosen)) != len(chosen):
        return f"returned a client twice ({sorted(chosen)[:10]})"
    if not chosen or (k is not None and len(chosen) > k):
        return f"returned {len(chosen)} clients; expected 1 to k = {k}"
    allowed = set(candidates)
    stranger = next((c for c in chosen if c not in allowed), None)
    if stranger is not None:
        return f"returned client {stranger}, which is not a candidate (offline or already training)"
    return None


def _update(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    weights = kw.get("weights") or {}
    if not isinstance(result, Mapping):
        return f"returned {describe_type(result)}; expected a mapping of weight names to tensors (or None)"
    if set(result) != set(weights):
        missing, extra = sorted(set(weights) - set(result)), sorted(set(result) - set(weights))
        return f"returned keys that differ from the update's (missing {missing[:3]}, unknown {extra[:3]})"
    for key, value in result.items():
        if not isinstance(value, torch.Tensor) or value.shape != weights[key].shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else describe_type(value)
            return f"returned {got} for {key!r}; expected a tensor of shape {tuple(weights[key].shape)}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"returned non-finite values for {key!r}"
    return None


def _json_ready(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_json_ready(v) for v in value)
    return False


def _metrics(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    if not isinstance(result, Mapping):
        return f"returned {describe_type(result)}; expected a mapping of metric names to values"
    for key, value in result.items():
        if not isinstance(key, str):
            return f"returned a metric name {key!r}; names must be strings"
        if not _json_ready(value):
            return (
                f"returned metric {key!r} = {describe_type(value)}; values must be numbers, strings, None "
                "or lists of them (call .item() / .tolist() on tensors)"
            )
    return None


def _samples(result: Any, kw: Mapping[str, Any], hook: str) -> str | None:
    x_in, n_classes = kw["x"], kw["ctx"].num_classes
    if not (isinstance(result, tuple | list) and len(result) == 2):
        return f"returned {describe_type(result)}; expected a pair (x, y) of new samples and their labels"
    x, y = result
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return "returned a pair that holds something other than tensors"
    if x.dtype != x_in.dtype or tuple(x.shape[1:]) != tuple(x_in.shape[1:]):
        return (
            f"returned x of shape {tuple(x.shape)} and dtype {x.dtype}; expected (n, "
            f"{', '.join(map(str, x_in.shape[1:]))}) and dtype {x_in.dtype}, like the client's inputs"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.dtype.is_floating_point or y.dtype == torch.bool:
        shape = tuple(y.shape)
        return f"returned y of shape {shape} and dtype {y.dtype}; expected ({x.shape[0]},) integer labels"
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        return f"returned labels in [{int(y.min())}, {int(y.max())}]; expected labels in [0, {n_classes})"
    return None


#: The implementation of each check rule a hook declares (``HookSpec.check``).
CHECKS: dict[str, Callable[[Any, Mapping[str, Any], str], str | None]] = {
    "config": _config,
    "aggregator": _aggregator,
    "clients": _clients,
    "update": _update,
    "recipe": _recipe,
    "parameters": _parameters,
    "indices": _indices,
    "forward": _forward,
    "like-logits": _like_logits,
    "per-sample": _per_sample,
    "scalar": _scalar,
    "payload": _payload,
    "metrics": _metrics,
    "samples": _samples,
}

# --------------------------------------------------------------------------- one hook


class _Bound:
    """One plugin's implementation, bound to an instance (and, client side, to its state).

    Arguments come from three places, settled once here rather than per call: ``state`` bound to
    this client's state (client side), arguments the hook routes by plugin (``routed``: the
    caller passes ``{plugin: value}`` and this plugin receives its own, ``{}`` when absent), and
    the rest as passed (``plain``).
    """

    __slots__ = ("argnames", "call", "plain", "plugin", "routed", "state")

    def __init__(
        self,
        plugin: str,
        call: Callable[..., Any],
        argnames: tuple[str, ...],
        state: Any,
        routed: tuple[str, ...] = (),
    ) -> None:
        self.plugin = plugin
        self.call = call
        self.argnames = argnames
        self.state = state
        self.routed = routed
        bound = ("state",) if state is not None else ()
        self.plain = tuple(a for a in argnames if a not in routed and a not in bound)


def bound_hook(
    plugin: str,
    call: Callable[..., Any],
    argnames: tuple[str, ...],
    state: Any = None,
    spec: HookSpec | None = None,
) -> _Bound:
    """One plugin's implementation ``call`` of a hook, bound to ``state`` (client side) or None;
    ``spec`` says which of its arguments are routed by plugin."""
    by_plugin = spec.by_plugin if spec is not None else ()
    routed = tuple(a for a in argnames if a in by_plugin and not (a == "state" and state is not None))
    return _Bound(plugin, call, argnames, state, routed)


class Hook:
    """One hook's implementations in scenario order, called, routed, combined and checked by its
    declaration.

    ``hook(**kwargs)`` calls every implementation (each with the arguments it declares; an
    argument the spec routes ``by_plugin`` is passed as ``{plugin: value}`` and each plugin gets
    its own) and combines the results by ``spec.combine``, checking each by ``spec.check``.
    ``bool(hook)`` says whether any plugin implements it, so hot loops skip hooks nobody
    implements.
    """

    __slots__ = ("_check", "_combine", "client", "impls", "round", "spec", "winner")

    def __init__(
        self, spec: HookSpec, impls: list[_Bound], client: int | None = None, round: int | None = None
    ) -> None:
        self.spec = spec
        self.impls = impls
        self.client = client
        self.round = round
        self._check = CHECKS[spec.check] if spec.check is not None else None
        self._combine = getattr(self, "_" + spec.combine.replace("-", "_"))
        #: The plugin whose result won the last call of a first-result hook.
        self.winner: str | None = None

    def __bool__(self) -> bool:
        return bool(self.impls)

    @property
    def plugin_names(self) -> list[str]:
        return [b.plugin for b in self.impls]

    def __call__(self, **kwargs: Any) -> Any:
        """Call the implementations and combine their results."""
        return self._combine(kwargs)

    def error(self, plugin: str, message: str, kwargs: Mapping[str, Any] | None = None) -> PluginError:
        """A PluginError naming this hook, and the client and round where they apply (client side
        from the client-round; server and eval side from the hook's ``ctx``)."""
        client, round = self.client, self.round
        if round is None and kwargs is not None:
            ctx = kwargs.get("ctx")
            round = getattr(ctx, "round", None)
            client = getattr(ctx, "client_id", None)
        return PluginError(plugin, self.spec.name, message, client, round)

    def _invoke(self, b: _Bound, kwargs: Mapping[str, Any]) -> Any:
        __tracebackhide__ = True
        try:
            args = {a: kwargs[a] for a in b.plain}
            if b.state is not None:
                args["state"] = b.state
            for a in b.routed:
                args[a] = (kwargs.get(a) or {}).get(b.plugin, {})
            out = b.call(**args)
        except FedltError as exc:
            if isinstance(exc, PluginError) and exc.client is None and self.client is not None:
                raise exc.located(self.client, self.round) from exc.__cause__
            raise
        except torch.OutOfMemoryError:
            raise  # not the plugin's fault: an engine may retry with less memory in use
        except Exception as exc:
            raise self.error(b.plugin, f"{type(exc).__name__}: {exc}", kwargs) from exc
        if out is not None and self._check is not None:
            problem = self._check(out, kwargs, self.spec.name)
            if problem is not None:
                raise self.error(b.plugin, problem, kwargs)
        return out

    # ------------------------------------------------------------------ combine rules

    def _all(self, kwargs: dict[str, Any]) -> None:
        for b in self.impls:
            self._invoke(b, kwargs)

    def _first(self, kwargs: dict[str, Any]) -> Any:
        for b in self.impls:
            out = self._invoke(b, kwargs)
            if out is not None:
                self.winner = b.plugin
                return out
        self.winner = None
        return None

    def _chain(self, kwargs: dict[str, Any]) -> Any:
        arg = self.spec.chain_arg
        for b in self.impls:
            out = self._invoke(b, kwargs)
            if out is None:
                raise self.error(b.plugin, f"returned None; a chain hook must return the new {arg}", kwargs)
            kwargs[arg] = out
        return kwargs[arg]

    def _product(self, kwargs: dict[str, Any]) -> torch.Tensor | None:
        acc = None
        for b in self.impls:
            out = self._invoke(b, kwargs)
            if out is not None:
                acc = out if acc is None else acc * out
        return acc

    def _sum(self, kwargs: dict[str, Any]) -> torch.Tensor | None:
        acc = None
        for b in self.impls:
            out = self._invoke(b, kwargs)
            if out is not None:
                acc = out if acc is None else acc + out
        return acc

    def _concat(self, kwargs: dict[str, Any]) -> torch.Tensor | None:
        parts = [out for b in self.impls if (out := self._invoke(b, kwargs)) is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _extend(self, kwargs: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for b in self.impls:
            more = self._invoke(b, kwargs)
            if more is not None:
                out.extend(more)
        return out

    def _merge(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for b in self.impls:
            more = self._invoke(b, kwargs)
            if more is not None:
                merged.update(more)
        return merged

    def _per_plugin(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Each plugin's non-None result, by plugin name."""
        out: dict[str, Any] = {}
        for b in self.impls:
            result = self._invoke(b, kwargs)
            if result is not None:
                out[b.plugin] = result
        return out


# --------------------------------------------------------------------------- server side


class HookSet:
    """A run's plugins: server-side dispatch, and per-client-round :class:`ClientHooks`.

    ``hooks.server_setup(model=..., ctx=...)`` calls a server-side hook; client-side hooks are
    reached through :meth:`for_client`. ``hooks.implements(name)`` says whether any plugin
    implements a hook.
    """

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self.plugins = list(plugins)
        self.by_name = {p.name: p for p in self.plugins}
        impls = [(p, implementations(type(p), p.name)) for p in self.plugins]
        self._hooks: dict[str, Hook] = {}
        for name in SERVER_HOOKS:
            spec = SPECS[name]
            bound = [
                bound_hook(p.name, getattr(p, name), i[name].argnames, None, spec)
                for p, i in impls
                if name in i
            ]
            self._hooks[name] = Hook(spec, bound)
        #: Client-side implementations: hook -> [(plugin index, Impl)], in scenario order. A plugin
        #: still declaring ``class_weighting = True`` (before contract 0.3) has its
        #: ``client_sample_weights`` routed to ``client_class_weights``.
        legacy = {k for k, (p, _) in enumerate(impls) if getattr(p, "class_weighting", False)}
        self._client: dict[str, list[tuple[int, Impl]]] = {}
        for name in CLIENT_HOOKS:
            source = "client_sample_weights" if name == "client_class_weights" else name
            pairs = []
            for k, (_, i) in enumerate(impls):
                if name == "client_class_weights" and name in i:
                    pairs.append((k, i[name]))
                elif source in i and (name == "client_class_weights") == (k in legacy):
                    pairs.append((k, i[source]))
            self._client[name] = pairs
        self._client_plugins = sorted({k for pairs in self._client.values() for k, _ in pairs})
        self._empty: ClientHooks | None = None

    def __getattr__(self, name: str) -> Hook:
        try:
            return self.__dict__["_hooks"][name]
        except KeyError:
            if name in CLIENT_HOOKS:
                raise AttributeError(
                    f"{name} is a client-side hook: call it through HookSet.for_client(...)"
                ) from None
            raise AttributeError(name) from None

    def implements(self, hook: str) -> bool:
        """Whether any plugin implements ``hook``."""
        if hook in self._client:
            return bool(self._client[hook])
        return bool(self._hooks[hook])

    @property
    def has_client_hooks(self) -> bool:
        """Whether any plugin implements a client-side hook (else client-rounds need no instances)."""
        return bool(self._client_plugins)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.plugins]

    def for_client(
        self, client_id: int, round: int, states: dict[str, dict[str, Any]], streaming: bool = True
    ) -> ClientHooks:
        """The client-side hooks of one client-round, on fresh plugin instances. Offline
        (``streaming=False``) the stream-only hooks are left unbound."""
        if not self._client_plugins:  # nothing to instantiate or bind: share the empty hooks
            if self._empty is None:
                self._empty = ClientHooks(self, client_id, round, {}, streaming)
            return self._empty.rebound(client_id, round, states)
        return ClientHooks(self, client_id, round, states, streaming)

    def state_dict(self) -> dict[str, Any]:
        """Every plugin's global state, by plugin name, checked to be plain data."""
        out = {}
        for p in self.plugins:
            state = p.state_dict()
            problem = find_unsafe(state, "state_dict()")
            if problem is not None:
                raise PluginError(p.name, "state_dict", problem)
            out[p.name] = state
        return out

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        for p in self.plugins:
            if p.name in states:
                try:
                    p.load_state_dict(states[p.name])
                except Exception as exc:
                    raise PluginError(p.name, "load_state_dict", f"{type(exc).__name__}: {exc}") from exc


class ClientHooks:
    """The client-side hooks of one client-round, bound to fresh plugin instances.

    Attribute access by hook name gives a :class:`Hook` (falsy when no plugin implements it);
    ``hooks["client_loss"]`` too. ``instance(name)`` is a plugin's instance for this client-round.
    """

    def __init__(
        self,
        hookset: HookSet,
        client_id: int,
        round: int,
        states: dict[str, dict[str, Any]],
        streaming: bool = True,
    ) -> None:
        self.client_id = client_id
        self.round = round
        self.states = states
        plugins = hookset.plugins
        instances = {k: plugins[k].client_instance() for k in hookset._client_plugins}
        self._instances = {plugins[k].name: inst for k, inst in instances.items()}
        self._hooks: dict[str, Hook] = {}
        for name in CLIENT_HOOKS:
            spec = SPECS[name]
            pairs = hookset._client[name] if streaming or not spec.stream_only else []
            bound = [
                bound_hook(
                    plugins[k].name,
                    getattr(instances[k], impl.hook),
                    impl.argnames,
                    states.setdefault(plugins[k].name, {}) if "state" in impl.argnames else None,
                    spec,
                )
                for k, impl in pairs
            ]
            self._hooks[name] = Hook(spec, bound, client_id, round)

    def __getattr__(self, name: str) -> Hook:
        try:
            return self.__dict__["_hooks"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Hook:
        """``hooks["client_loss"]`` as ``hooks.client_loss``: the per-batch loss reads hooks by name."""
        return self._hooks[name]

    def rebound(self, client_id: int, round: int, states: dict[str, dict[str, Any]]) -> ClientHooks:
        """These hooks for another client-round (for hooks no plugin implements: nothing to bind)."""
        other = object.__new__(ClientHooks)
        other.__dict__.update(self.__dict__, client_id=client_id, round=round, states=states)
        return other

    def instance(self, plugin: str) -> Plugin:
        """This client-round's instance of ``plugin`` (the object its client hooks run on)."""
        return self._instances[plugin]

    def check_states(self) -> None:
        """Every plugin's per-client state is plain data (checked at the end of the client-round)."""
        for plugin, state in self.states.items():
            if type(state) is not dict:
                raise PluginError(
                    plugin, "state", f"the state is {describe_type(state)}", self.client_id, self.round
                )
            problem = find_unsafe(state, "state")
            if problem is not None:
                raise PluginError(
                    plugin,
                    "state",
                    f"{problem}. Per-client state is checkpointed and sent to workers, so it must be "
                    "plain data.",
                    self.client_id,
                    self.round,
                )


def as_forward(out: Any) -> Forward:
    """A ``client_forward`` result as a :class:`Forward` (a pair means ``head_input = features``)."""
    if isinstance(out, Forward):
        return out
    if len(out) == 2:
        return Forward(out[0], out[1], out[0])
    return Forward(*out)


def build_hooks(specs: Iterable[Any], available: Mapping[str, Any] | None = None) -> HookSet:
    """Discover, validate and register the scenario's plugins; the entry point for engines."""
    from fedlt.hooks.discovery import instantiate_plugins

    return HookSet(instantiate_plugins(list(specs), available))


def build_hooks_spelled_out(specs: Sequence[Any]) -> HookSet:
    """:func:`build_hooks`, then every plugin parameter, defaults included, written back into its
    spec, so a resolved scenario says exactly what ran even after a plugin's defaults change."""
    return spelled_out(specs)


def spelled_out(specs: Sequence[Any], plugins: Sequence[Plugin] | None = None) -> HookSet:
    """The :class:`HookSet` of ``plugins`` (instances already made for ``specs``; made here when
    None), with every parameter written back into its spec (see :func:`build_hooks_spelled_out`)."""
    hooks = build_hooks(specs) if plugins is None else HookSet(plugins)
    for spec, plugin in zip(specs, hooks.plugins, strict=True):
        spec.params = plugin.params.model_dump()
    return hooks


def check_json_ready(record: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` if a metrics record cannot be written as JSON."""
    json.dumps(record, allow_nan=True)
