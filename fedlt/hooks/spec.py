"""How a hook is declared: one :class:`HookSpec` per hook, made by the :func:`hookspec` decorator.

A declaration is the single source of everything about a hook: its signature, how results
combine, how a result is checked, where it runs, how often, whether it only runs in a stream,
whether it may run inside a vectorized (vmapped) step, which arguments reach each plugin
separately, and since which version. The dispatcher (:mod:`fedlt.hooks.dispatch`) calls, routes,
combines and checks by it; the training loop and the vectorized step read ``stream_only`` and
``vmap`` from it; the validator checks implementations against it; the docs are generated
from it. Nothing about a hook is decided by its name anywhere else (as pluggy's
``HookspecOpts`` carries a hook's options).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CHECK_RULES", "COMBINE_RULES", "SIDES", "Combine", "HookSpec", "Side", "hookspec"]

#: How the results of a hook's implementations combine.
Combine = Literal["all", "first", "chain", "product", "sum", "concat", "extend", "merge", "per-plugin"]

#: What each combine rule means, for the docs.
COMBINE_RULES: dict[str, str] = {
    "all": "every implementation runs; return ignored",
    "first": "the first non-`None` result wins; later plugins are not called",
    "chain": "each receives the previous output as its first argument and returns the new one (never `None`)",
    "product": "product of the non-`None` tensors",
    "sum": "sum of the non-`None` scalars",
    "concat": "non-`None` index tensors joined in order",
    "extend": "non-`None` iterables of tensors joined into one list in order",
    "merge": "mappings merged in order; later plugins win on equal keys",
    "per-plugin": "each plugin's non-`None` result kept apart, by plugin name",
}

#: How a result is checked where fedlt receives it, for the docs (implemented in
#: :mod:`fedlt.hooks.dispatch`; a test keeps the two in step).
CHECK_RULES: dict[str, str] = {
    "config": "a mapping with string keys and plain-data values (or `None`)",
    "aggregator": "an object with `add()` and `result()`",
    "clients": "1 to `k` distinct client ids from `candidates`",
    "update": "a mapping with the update's keys, shapes and finite values",
    "recipe": "a `LocalTraining`",
    "parameters": "an iterable of tensors with `requires_grad=True`",
    "indices": "a 1-D integer tensor",
    "forward": "a `Forward` or a `(features, logits)` pair with `B` rows",
    "like-logits": "a tensor of the logits' shape",
    "per-sample": "a `(B,)` tensor (one value per sample)",
    "scalar": "a 0-dimensional tensor",
    "payload": "plain data (tensors, numbers, strings, lists, dicts)",
    "metrics": "a mapping of names to JSON-ready values",
    "samples": "a pair `(x, y)`: `x` of the client inputs' dtype and sample shape, `y` `(n,)` labels "
    "in `[0, C)`",
}

#: Where a hook runs and on which instance of the plugin.
Side = Literal["model", "data", "server", "client", "eval"]

SIDES: dict[str, str] = {
    "model": "wherever a model is built (driver and every worker), on that process's plugin instance",
    "data": "wherever the run's data is built (the driver; Flower nodes rebuild it), on that process's "
    "plugin instance (Ray workers receive the driver's data)",
    "server": "in the driver, on the plugin's one server-side instance (kept for the whole run)",
    "client": "where the client is trained, on a fresh instance made for this client-round",
    "eval": "in the driver, on the server-side instance, during evaluation",
}


@dataclass(frozen=True)
class HookSpec:
    """One hook: what it receives, how results combine, where and when it runs.

    Attributes
    ----------
    name : str
        The hook's name (what a plugin method is called).
    params : tuple of str
        Argument names, in signature order; implementations take any subset.
    combine : Combine
        How results of the implementations combine (see :data:`COMBINE_RULES`).
    side : Side
        Where it runs and on which plugin instance (see :data:`SIDES`).
    when : str
        How often, in words (``"per batch"``, ``"once per round"``).
    since : str
        The fedlt version that introduced it.
    chain_arg : str or None
        For ``combine="chain"``, the argument that carries the value from one plugin to the next.
    doc : str
        The docstring of the declaration.
    check : str or None
        How a result is checked (a key of :data:`CHECK_RULES`); None: not checked.
    stream_only : bool
        Called only in continual (stream) scenarios; offline its implementations are not bound.
    vmap : bool
        A per-batch hook that runs inside the vectorized step (vmapped over a group of clients)
        for plugins that declare ``vectorized = True``.
    by_plugin : tuple of str
        Arguments whose value differs by plugin: the caller passes ``{plugin name: value}`` and
        each implementation receives its own (an empty dict when absent).
    serial : str or None
        Why a plugin implementing this hook makes the run train its clients one by one, never
        vectorized (the reason the training log records); None: the hook does not.
    """

    name: str
    params: tuple[str, ...]
    combine: Combine
    side: Side
    when: str
    since: str
    chain_arg: str | None
    doc: str
    check: str | None = None
    stream_only: bool = False
    vmap: bool = False
    by_plugin: tuple[str, ...] = ()
    serial: str | None = None

    @property
    def summary(self) -> str:
        """The first line of the docstring."""
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""


def hookspec(
    *,
    combine: Combine,
    side: Side,
    when: str,
    since: str = "0.1",
    chain_arg: str | None = None,
    check: str | None = None,
    stream_only: bool = False,
    vmap: bool = False,
    by_plugin: tuple[str, ...] = (),
    serial: str | None = None,
) -> Callable[[Callable[..., Any]], HookSpec]:
    """Declare a hook from a function whose signature and docstring are the contract.

    The decorated name becomes a :class:`HookSpec`, so ``hookspecs.client_loss`` *is* the
    declaration the dispatcher and the docs read. Bad combinations fail here, when the contract
    is imported, not when a plugin first calls the hook.
    """
    if combine not in COMBINE_RULES:
        raise ValueError(f"unknown combine rule {combine!r}; known: {sorted(COMBINE_RULES)}")
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; known: {sorted(SIDES)}")
    if check is not None and check not in CHECK_RULES:
        raise ValueError(f"unknown check rule {check!r}; known: {sorted(CHECK_RULES)}")
    if (vmap or stream_only or serial) and side != "client":
        raise ValueError("only client-side hooks can be stream-only, run vectorized or force serial training")
    if vmap and serial:
        raise ValueError("a hook cannot both run vectorized and force serial training")

    def declare(fn: Callable[..., Any]) -> HookSpec:
        params = tuple(inspect.signature(fn).parameters)
        if combine == "chain" and (chain_arg is None or chain_arg not in params):
            raise ValueError(f"chain hook {fn.__name__!r} must name its chained argument")
        unknown = [a for a in by_plugin if a not in params]
        if unknown:
            raise ValueError(f"hook {fn.__name__!r} routes unknown arguments by plugin: {unknown}")
        return HookSpec(
            fn.__name__,
            params,
            combine,
            side,
            when,
            since,
            chain_arg,
            inspect.getdoc(fn) or "",
            check,
            stream_only,
            vmap,
            tuple(by_plugin),
            serial,
        )

    return declare
