"""fedlt: federated and continual learning under class imbalance, with remedies as plugins."""

from fedlt.aggregation import Aggregator, FedAvg
from fedlt.api import resume, run
from fedlt.config import Scenario, load_scenario
from fedlt.context import ClientContext, EvalContext, RoundContext, SetupContext
from fedlt.errors import FedltError, NonFiniteLossError, PluginError, ScenarioError
from fedlt.pluginmanager import Plugin, hookimpl

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "ClientContext",
    "EvalContext",
    "FedAvg",
    "FedltError",
    "NonFiniteLossError",
    "Plugin",
    "PluginError",
    "RoundContext",
    "Scenario",
    "ScenarioError",
    "SetupContext",
    "__version__",
    "hookimpl",
    "load_scenario",
    "resume",
    "run",
]
