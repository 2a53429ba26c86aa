"""fedlt: federated and continual learning under class imbalance, with remedies as plugins.

Public names load on first use (PEP 562), so ``import fedlt`` and commands that need no torch
(``fedlt --help``, ``fedlt --version``, listing plugin names) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedlt.version import __version__

#: Public name -> module that defines it.
_EXPORTS: dict[str, str] = {
    "Aggregator": "fedlt.server.aggregation",
    "FedAvg": "fedlt.server.aggregation",
    "FedAsync": "fedlt.server.aggregation",
    "FedBuff": "fedlt.server.aggregation",
    "staleness_weight": "fedlt.server.staleness",
    "Arrival": "fedlt.hooks.context",
    "run": "fedlt.api",
    "resume": "fedlt.api",
    "history": "fedlt.api",
    "load_model": "fedlt.api",
    "Scenario": "fedlt.scenario.config",
    "load_scenario": "fedlt.scenario.config",
    "ClientContext": "fedlt.hooks.context",
    "EvalContext": "fedlt.hooks.context",
    "Forward": "fedlt.hooks.context",
    "LogContext": "fedlt.hooks.context",
    "RoundContext": "fedlt.hooks.context",
    "SetupContext": "fedlt.hooks.context",
    "FedltError": "fedlt.errors",
    "NonFiniteLossError": "fedlt.errors",
    "PluginError": "fedlt.errors",
    "ScenarioError": "fedlt.errors",
    "Plugin": "fedlt.hooks.plugin",
    "contract_problem": "fedlt.hooks.plugin",
    "CONTRACT": "fedlt.hooks.hookspecs",
    "PluginWarning": "fedlt.hooks.lifetimes",
    "CosineLinear": "fedlt.models",
    "FedModel": "fedlt.models",
    "use_cosine_head": "fedlt.models",
    "hookimpl": "fedlt.hooks.plugin",
    "LocalTraining": "fedlt.hooks.recipe",
    "fgsm": "fedlt.evaluation.attacks",
    "pgd": "fedlt.evaluation.attacks",
    "project_to_ball": "fedlt.evaluation.attacks",
    "random_ball_point": "fedlt.evaluation.attacks",
}

__all__ = [
    "CONTRACT",
    "Aggregator",
    "Arrival",
    "ClientContext",
    "CosineLinear",
    "EvalContext",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "FedModel",
    "FedltError",
    "Forward",
    "LocalTraining",
    "LogContext",
    "NonFiniteLossError",
    "Plugin",
    "PluginError",
    "PluginWarning",
    "RoundContext",
    "Scenario",
    "ScenarioError",
    "SetupContext",
    "__version__",
    "contract_problem",
    "fgsm",
    "history",
    "hookimpl",
    "load_model",
    "load_scenario",
    "pgd",
    "project_to_ball",
    "random_ball_point",
    "resume",
    "run",
    "staleness_weight",
    "state",
    "use_cosine_head",
]

if TYPE_CHECKING:
    from fedlt.api import history, load_model, resume, run
    from fedlt.errors import FedltError, NonFiniteLossError, PluginError, ScenarioError
    from fedlt.evaluation.attacks import fgsm, pgd, project_to_ball, random_ball_point
    from fedlt.hooks import state
    from fedlt.hooks.context import (
        Arrival,
        ClientContext,
        EvalContext,
        Forward,
        LogContext,
        RoundContext,
        SetupContext,
    )
    from fedlt.hooks.hookspecs import CONTRACT
    from fedlt.hooks.lifetimes import PluginWarning
    from fedlt.hooks.plugin import Plugin, contract_problem, hookimpl
    from fedlt.hooks.recipe import LocalTraining
    from fedlt.models import CosineLinear, FedModel, use_cosine_head
    from fedlt.scenario.config import Scenario, load_scenario
    from fedlt.server.aggregation import Aggregator, FedAsync, FedAvg, FedBuff
    from fedlt.server.staleness import staleness_weight


#: Public modules reached as attributes (``from fedlt import state``).
_MODULES = {"state": "fedlt.hooks.state"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
        globals()[name] = value
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_MODULES])
