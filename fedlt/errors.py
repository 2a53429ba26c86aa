"""Errors fedlt raises on purpose.

Every error a user can cause names *what* is wrong (a scenario key, a plugin and hook), the
value that was given and what is allowed, so the CLI can print it as one paragraph and exit 2.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FedltError", "NonFiniteLossError", "PluginError", "ScenarioError", "readable_constraint"]


class FedltError(Exception):
    """Base class of the errors fedlt raises for the user to read."""

    #: CLI exit status: 2 for bad input found before any work, 1 for failures while running.
    exit_status: int = 2


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

    def __reduce__(self):  # picklable across processes, with a possibly rewritten message
        return (_rebuild, (ScenarioError, (self.key, self.value, self.allowed, self.hint), self.args))


class PluginError(FedltError):
    """A plugin raised inside a hook, or declared itself wrongly.

    Carries ``plugin`` (its name) and ``hook`` so callers and tests can locate the fault.
    """

    def __init__(
        self, plugin: str, hook: str | None, message: str, client: int | None = None, round: int | None = None
    ) -> None:
        self.plugin = plugin
        self.hook = hook
        self.message = message
        self.client = client
        self.round = round
        where = f"Plugin {plugin!r}" + (f" in hook {hook!r}" if hook else "")
        if client is not None:
            where += f" on client {client}"
        if round is not None:
            where += f" in round {round}"
        super().__init__(f"{where}: {message}")

    @property
    def exit_status(self) -> int:  # type: ignore[override]
        # A plugin failing while training is a runtime failure, not bad input.
        return 1 if self.round is not None else 2

    def located(self, client: int, round: int) -> PluginError:
        """The same error, naming the client and round it happened in."""
        return PluginError(self.plugin, self.hook, self.message, client, round)

    def __reduce__(self):  # picklable across processes (Ray workers), attributes included
        return (PluginError, (self.plugin, self.hook, self.message, self.client, self.round))


class NonFiniteLossError(FedltError):
    """Training diverged (NaN/inf loss, weights or logits); the run stops, keeping its last good checkpoint.

    ``client`` is ``None`` when the divergence shows in the global model rather than one client.
    ``checkpoint``: the round of the run's last checkpoint, ``None`` when it has none yet (the
    message then says so instead of promising one), ``-1`` where the raiser cannot tell.
    """

    exit_status = 1

    def __init__(
        self, round: int, client: int | None, plugins: list[str], loss: float, checkpoint: int | None = -1
    ) -> None:
        self.round = round
        self.client = client
        self.plugins = plugins
        self.loss = loss
        self.checkpoint = checkpoint
        stack = ", ".join(plugins) if plugins else "none"
        where = f"on client {client}" if client is not None else "in the global model's test logits"
        self._init_args = (round, client, plugins, loss, checkpoint)
        if checkpoint is None:
            kept = (
                "The run stopped before its first checkpoint, so no round is kept: lower the learning rate "
                "or fix the plugin and start again ('fedlt resume' with --set restarts it from round 1)."
            )
        else:
            after = f" (round {checkpoint})" if checkpoint >= 0 else ""
            kept = (
                f"The run stopped; the last good checkpoint{after} is kept, so lower the learning rate "
                "or fix the plugin and run 'fedlt resume'."
            )
        super().__init__(
            f"Training diverged (loss, weights or logits became {loss}) in round {round} {where} "
            f"(plugins, in order: {stack}). {kept}"
        )

    def at_checkpoint(self, checkpoint: int | None) -> NonFiniteLossError:
        """The same error, saying which checkpoint the run keeps (``None``: none yet)."""
        return NonFiniteLossError(self.round, self.client, self.plugins, self.loss, checkpoint)

    def __reduce__(self):
        return (NonFiniteLossError, self._init_args)


#: Pydantic error types and the phrase (following "must be") that says what is allowed.
_PHRASES: dict[str, str] = {
    "greater_than": "a number greater than {gt}",
    "greater_than_equal": "a number >= {ge}",
    "less_than": "a number less than {lt}",
    "less_than_equal": "a number <= {le}",
    "too_short": "a list of at least {min_length} items",
    "too_long": "a list of at most {max_length} items",
    "literal_error": "one of {expected}",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "missing": "set (the key is required)",
    "finite_number": "a finite number",
}


def readable_constraint(error: dict[str, Any]) -> str:
    """What a pydantic validation error allows, phrased to follow "must be".

    ``{"type": "too_short", "ctx": {"min_length": 2}}`` -> ``"a list of at least 2 items"``.
    """
    kind, ctx = error.get("type", ""), error.get("ctx") or {}
    if kind == "value_error":
        return str(error.get("msg", "")).removeprefix("Value error, ")
    phrase = _PHRASES.get(kind)
    if phrase is not None:
        # 0.0 reads as 0; one item is not "items".
        values = {k: (f"{v:g}" if isinstance(v, float) else v) for k, v in ctx.items()}
        try:
            text = phrase.format(**values)
        except (KeyError, IndexError):
            text = None
        if text is not None:
            return text.replace(" 1 items", " 1 item")
    msg = str(error.get("msg", "valid"))
    for prefix in ("Input should be ", "Value should be "):
        msg = msg.removeprefix(prefix)
    return msg[:1].lower() + msg[1:]


def _rebuild(cls: type[Exception], init_args: tuple, args: tuple) -> Exception:
    exc = cls(*init_args)
    exc.args = args
    return exc
