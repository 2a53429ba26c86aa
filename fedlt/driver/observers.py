"""What watches a run without steering it: the progress bar, the loggers, a script's callback.

The run loop announces events (a round starts, a client is trained, a round ends with its record,
the run ends) to its :class:`Observers`; each observer implements the events it cares about.
Nothing here changes a number, so the loop reads the same with or without any of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from fedlt.hooks.context import LogContext
from fedlt.hooks.dispatch import HookSet
from fedlt.store.checkpoint import json_safe
from fedlt.training.round import ClientResult

__all__ = ["Callback", "HookLoggers", "Observer", "Observers", "ProgressBar"]


class Observer:
    """A watcher of a run; every event is optional (the default does nothing).

    Attributes
    ----------
    wants_clients : bool
        Whether it wants :meth:`client_step` and :meth:`client_trained` (the loop skips that
        per-client work when no observer does).
    """

    wants_clients = False

    def run_started(self, start: int, rounds: int) -> None:
        """The loop starts at round ``start`` of ``rounds`` (after 1 on a resumed run)."""

    def round_started(self, round: int, n_clients: int) -> None:
        """Round ``round`` trains ``n_clients`` clients."""

    def client_step(self, index: int, step: int, steps: int) -> None:
        """The ``index``-th client of the round is at ``step`` of ``steps`` (at most twice a second)."""

    def client_trained(self, index: int, result: ClientResult) -> None:
        """The ``index``-th client of the round is trained (its result is being aggregated)."""

    def evaluated(self, round: int, record: dict[str, Any]) -> None:
        """Round ``round``'s evaluation record was just written to metrics.jsonl (before the round's
        checkpoint: a run killed in between logs the round again when it is redone)."""

    def round_ended(self, round: int, loss: float, record: dict[str, Any] | None) -> None:
        """Round ``round`` ended and is checkpointed: its mean train loss, and its evaluation
        record (None when the round was not evaluated)."""

    def run_ended(self, summary: dict[str, Any]) -> None:
        """The run finished; ``summary`` is what summary.json holds (not called on failure)."""

    def close(self) -> None:
        """The loop is over, finished or not: release what was opened."""


class Observers(Observer):
    """Several observers as one, called in order."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.items = list(observers)

    def add(self, observer: Observer) -> None:
        self.items.append(observer)

    @property
    def wants_clients(self) -> bool:  # type: ignore[override]
        return any(o.wants_clients for o in self.items)

    def run_started(self, start: int, rounds: int) -> None:
        for o in self.items:
            o.run_started(start, rounds)

    def round_started(self, round: int, n_clients: int) -> None:
        for o in self.items:
            o.round_started(round, n_clients)

    def client_step(self, index: int, step: int, steps: int) -> None:
        for o in self.items:
            o.client_step(index, step, steps)

    def client_trained(self, index: int, result: ClientResult) -> None:
        for o in self.items:
            o.client_trained(index, result)

    def evaluated(self, round: int, record: dict[str, Any]) -> None:
        for o in self.items:
            o.evaluated(round, record)

    def round_ended(self, round: int, loss: float, record: dict[str, Any] | None) -> None:
        for o in self.items:
            o.round_ended(round, loss, record)

    def run_ended(self, summary: dict[str, Any]) -> None:
        for o in self.items:
            o.run_ended(summary)

    def close(self) -> None:
        for o in self.items:
            o.close()

    def watch(self, results: Iterator[ClientResult]) -> Iterator[ClientResult]:
        """Pass a round's results through, announcing each (only when an observer wants them)."""
        if not self.wants_clients:
            return results
        return self._announce(results)

    def _announce(self, results: Iterator[ClientResult]) -> Iterator[ClientResult]:
        for i, result in enumerate(results):
            self.client_trained(i, result)
            yield result


class HookLoggers(Observer):
    """The ``server_log_metrics`` and ``server_end`` hooks of the run's plugins and loggers: each
    evaluation record (as metrics.jsonl holds it) and the finished run's summary."""

    def __init__(self, hooksets: Iterable[HookSet], run_dir: Path, scenario: str, rounds: int) -> None:
        self.hooksets = list(hooksets)
        self.run_dir, self.scenario, self.rounds = run_dir, scenario, rounds

    def _ctx(self, round: int | None) -> LogContext:
        return LogContext(self.run_dir, self.scenario, round, self.rounds)

    def evaluated(self, round: int, record: dict[str, Any]) -> None:
        safe = json_safe(record)
        for hooks in self.hooksets:
            if hooks.server_log_metrics:
                hooks.server_log_metrics(record=safe, ctx=self._ctx(round))

    def run_ended(self, summary: dict[str, Any]) -> None:
        for hooks in self.hooksets:
            if hooks.server_end:
                hooks.server_end(summary=summary, ctx=self._ctx(None))


class Callback(Observer):
    """``fn(round, record or None)`` after every round (``fedlt.run(on_round=...)``)."""

    def __init__(self, fn: Callable[[int, dict[str, Any] | None], None]) -> None:
        self.fn = fn

    def round_ended(self, round: int, loss: float, record: dict[str, Any] | None) -> None:
        self.fn(round, record)


class ProgressBar(Observer):
    """A tqdm bar over rounds, showing inside a round the clients done, samples/s and the steps of
    the client in training; after a round its loss and accuracies."""

    wants_clients = True
    SHOWN: ClassVar[dict[str, str]] = {
        "acc": "accuracy",
        "bacc": "balanced_accuracy",
        "anytime": "anytime_accuracy",
    }

    def __init__(self, name: str, batch_size: int) -> None:
        self.name, self.batch_size = name, batch_size
        self.bar: Any = None
        self._n = 0
        self._t0 = 0.0
        self._samples = 0
        self._rate = "-"

    def run_started(self, start: int, rounds: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=rounds, initial=start - 1, desc=self.name, unit="round")

    def _show(self, done: int, extra: str = "") -> None:
        self.bar.set_postfix_str(f"clients {done}/{self._n}{extra}, {self._rate} samples/s", refresh=True)

    def round_started(self, round: int, n_clients: int) -> None:
        self._n, self._t0, self._samples, self._rate = n_clients, time.perf_counter(), 0, "-"
        self._show(0)

    def client_step(self, index: int, step: int, steps: int) -> None:
        self._show(index, f" (client {index + 1}: step {step}/{steps})")

    def client_trained(self, index: int, result: ClientResult) -> None:
        self._samples += result.n_steps * self.batch_size  # trained on (last batches may be smaller)
        self._rate = f"~{self._samples / max(time.perf_counter() - self._t0, 1e-9):,.0f}"
        self._show(index + 1)

    def round_ended(self, round: int, loss: float, record: dict[str, Any] | None) -> None:
        self.bar.update(1)
        values = {k: record.get(m) for k, m in self.SHOWN.items()} if record else {}
        text = ", ".join(f"{k}={v:.3f}" for k, v in values.items() if isinstance(v, float))
        self.bar.set_postfix_str(f"loss={loss:.3f}" + (f", {text}" if text else ""), refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
