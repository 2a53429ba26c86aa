"""fedlt: federated and continual learning under class imbalance, with remedies as plugins.

Public names load on first use (PEP 562), so ``import fedlt`` and commands that need no torch
(``fedlt --help``, ``fedlt --version``, listing plugin names) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    "Aggregator": "fedlt.aggregation",
    "FedAvg": "fedlt.aggregation",
    "run": "fedlt.api",
    "resume": "fedlt.api",
    "history": "fedlt.api",
    "Scenario": "fedlt.config",
    "load_scenario": "fedlt.config",
    "ClientContext": "fedlt.context",
    "EvalContext": "fedlt.context",
    "Forward": "fedlt.context",
    "LogContext": "fedlt.context",
    "RoundContext": "fedlt.context",
    "SetupContext": "fedlt.context",
    "FedltError": "fedlt.errors",
    "NonFiniteLossError": "fedlt.errors",
    "PluginError": "fedlt.errors",
    "ScenarioError": "fedlt.errors",
    "Plugin": "fedlt.plugin",
    "hookimpl": "fedlt.plugin",
    "LocalTraining": "fedlt.recipe",
}

__all__ = [
    "Aggregator",
    "ClientContext",
    "EvalContext",
    "FedAvg",
    "FedltError",
    "Forward",
    "LocalTraining",
    "LogContext",
    "NonFiniteLossError",
    "Plugin",
    "PluginError",
    "RoundContext",
    "Scenario",
    "ScenarioError",
    "SetupContext",
    "__version__",
    "history",
    "hookimpl",
    "load_scenario",
    "resume",
    "run",
]

if TYPE_CHECKING:
    from fedlt.aggregation import Aggregator, FedAvg
    from fedlt.api import history, resume, run
    from fedlt.config import Scenario, load_scenario
    from fedlt.context import ClientContext, EvalContext, Forward, LogContext, RoundContext, SetupContext
    from fedlt.errors import FedltError, NonFiniteLossError, PluginError, ScenarioError
    from fedlt.plugin import Plugin, hookimpl
    from fedlt.recipe import LocalTraining


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
