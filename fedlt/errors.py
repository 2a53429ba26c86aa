"""Errors fedlt raises on purpose.

Every error a user can cause names *what* is wrong (a scenario key, a plugin and hook), the
value that was given and what is allowed, so the CLI can print it as one paragraph and exit 2.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FedltError", "ScenarioError", "PluginError", "NonFiniteLossError"]


class FedltError(Exception):
    """Base class of the errors fedlt raises for the user to read."""


class ScenarioError(FedltError, ValueError):
    """A scenario key holds a value that is not allowed.

    Parameters
    ----------
    key : str
        Dotted scenario key, e.g. ``"partition.alpha"`` or ``"plugins[0].gamma"``.
    value : Any
        The value that was given.
    allowed : str
        What is allowed, phrased to follow "must be", e.g. ``"a float > 0"``.
    hint : str, optional
        One sentence on how to fix it.
    """

    def __init__(self, key: str, value: Any, allowed: str, hint: str | None = None) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.hint = hint
        message = f"The {key!r} value must be {allowed}. Got {value!r} instead."
        if hint:
            message += f" {hint}"
        super().__init__(message)


class PluginError(FedltError):
    """A plugin raised inside a hook, or declared itself wrongly.

    Carries ``plugin`` (its name) and ``hook`` so callers and tests can locate the fault.
    """

    def __init__(self, plugin: str, hook: str | None, message: str) -> None:
        self.plugin = plugin
        self.hook = hook
        where = f"Plugin {plugin!r}" + (f" in hook {hook!r}" if hook else "")
        super().__init__(f"{where}: {message}")


class NonFiniteLossError(FedltError):
    """A client's training loss became NaN or infinite; the run stops, keeping its last good checkpoint."""

    def __init__(self, round: int, client: int, plugins: list[str], loss: float) -> None:
        self.round = round
        self.client = client
        self.plugins = plugins
        self.loss = loss
        stack = ", ".join(plugins) if plugins else "none"
        super().__init__(
            f"Training loss became {loss} in round {round} on client {client} "
            f"(plugins, in order: {stack}). The run stopped; the last good checkpoint is kept, "
            "so lower the learning rate or fix the plugin and run 'fedlt resume'."
        )
