"""Every check a scenario alone can answer, collected as problems rather than raised one by one.

The device; the packages an engine or a logger needs; the plugins (discovered, parameters
validated); each plugin's declared requirements (a model capability from the model registry, a
stream, another plugin listed before it); data that cannot fit in memory. Nothing here loads data
or builds a model, so it runs in milliseconds, and the same list is what ``fedlt validate``,
``fedlt run`` and ``fedlt export-flower`` refuse a scenario for.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from fedlt.data.federated import check_data_feasible
from fedlt.errors import FedltError, PluginError, ScenarioError
from fedlt.hooks.discovery import instantiate_plugins
from fedlt.hooks.plugin import implementations
from fedlt.models import MODELS
from fedlt.system.traces import read_availability_trace, read_speed_trace

__all__ = [
    "NEEDS",
    "REQUIREMENTS",
    "check_requirements",
    "checked_plugins",
    "preflight",
    "raise_problems",
    "resolve_device",
]

#: Optional parts of a scenario and what they need installed: (key, value that needs it, module
#: to find, what to install).
NEEDS: tuple[tuple[str, Any, str, str], ...] = (
    ("engine.kind", "ray", "ray", "fedlt[ray]"),
    ("engine.kind", "flower", "flwr", "fedlt[flower]"),
    ("log.tensorboard", True, "tensorboard", "tensorboard"),
    ("log.wandb", True, "wandb", "wandb"),
)

#: What a plugin may list in ``requires``: a model capability (from the model registry's
#: ``provides``), a stream, or ``"plugin:<name>"`` (that plugin listed before this one).
REQUIREMENTS = {
    "head": "a model with a linear `head`",
    "prompts": "a model with a prompt slot (model.name = 'vit')",
    "stream": "a continual scenario ([stream] kind set)",
    "async": "an asynchronous federation (federation.mode = 'async' or 'buffered': updates can be stale)",
}

#: Requirements the scenario answers (the rest are model capabilities): whether it meets each.
_SCENARIO_NEEDS = {
    "stream": lambda s: s.stream.kind != "none",
    "async": lambda s: s.federation.mode in ("async", "buffered"),
}


def resolve_device(name: str) -> torch.device:
    """The scenario's ``engine.device``, or a ScenarioError where this machine lacks it."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError("engine.device", name, "'cpu' on this machine (CUDA is not available)")
    return torch.device(name)


def _value(scenario: Any, key: str) -> Any:
    section, _, field = key.partition(".")
    return getattr(getattr(scenario, section), field)


def _missing_packages(scenario: Any) -> list[ScenarioError]:
    problems = []
    for key, value, module, package in NEEDS:
        if _value(scenario, key) == value and importlib.util.find_spec(module) is None:
            if key == "engine.kind":
                allowed = "an engine whose dependencies are installed ('serial' always is)"
            else:
                allowed = f"false unless {package!r} is installed"
            problems.append(
                ScenarioError(
                    key,
                    value,
                    allowed,
                    hint=f"pip install '{package}' (the '{module}' package is missing).",
                )
            )
    return problems


def check_requirements(scenario: Any, plugins: Sequence[Any]) -> list[FedltError]:
    """Every plugin's declared ``requires``, checked against the scenario: model capabilities from
    the model registry, a stream, plugins listed before it."""
    problems: list[FedltError] = []
    provides = MODELS[scenario.model.name].provides
    before: list[str] = []
    for i, plugin in enumerate(plugins):
        for req in sorted(plugin.requires):
            other = req.partition(":")[2] if req.startswith("plugin:") else None
            if other is None and req not in REQUIREMENTS:
                known = ", ".join(sorted(REQUIREMENTS)) + ", plugin:<name>"
                problems.append(
                    PluginError(plugin.name, None, f"requires unknown capability {req!r}; known: {known}")
                )
            elif other is not None and other not in before:
                problems.append(
                    ScenarioError(
                        f"plugins[{i}].name",
                        plugin.name,
                        f"listed after {other!r}",
                        hint=f"It builds on {other!r}; list {other!r} before it.",
                    )
                )
            elif req in _SCENARIO_NEEDS and not _SCENARIO_NEEDS[req](scenario):
                problems.append(
                    ScenarioError(
                        f"plugins[{i}].name",
                        plugin.name,
                        f"used with {REQUIREMENTS[req]}",
                        hint="It requires it.",
                    )
                )
            elif other is None and req not in _SCENARIO_NEEDS and req not in provides:
                has = ", ".join(n for n in MODELS if req in MODELS[n].provides)
                problems.append(
                    ScenarioError(
                        f"plugins[{i}].name",
                        plugin.name,
                        f"used with {REQUIREMENTS[req]}",
                        hint=f"Model {scenario.model.name!r} has none; models that do: {has}.",
                    )
                )
        before.append(plugin.name)
    return problems


def preflight(scenario: Any) -> list[FedltError]:
    """Every problem the scenario alone shows, in the order a user would fix them (empty: none).

    Loads no data and builds no model.
    """
    return checked_plugins(scenario)[0]


def checked_plugins(scenario: Any) -> tuple[list[FedltError], list[Any]]:
    """:func:`preflight`'s problems, and the scenario's plugin instances it validated on the way
    (empty when they could not be made), so that preparing a run discovers plugins once."""
    problems: list[FedltError] = []
    plugins: list[Any] = []
    try:
        resolve_device(scenario.engine.device)
    except ScenarioError as exc:
        problems.append(exc)
    problems += _missing_packages(scenario)
    try:
        plugins = instantiate_plugins(list(scenario.plugins))
    except (PluginError, ScenarioError) as exc:
        problems.append(exc)
    else:
        problems += check_requirements(scenario, plugins)
        problems += _samples_in_stream(scenario, plugins)
    try:
        check_data_feasible(scenario)
    except ScenarioError as exc:
        problems.append(exc)
    problems += _trace_problems(scenario)
    return problems, plugins


def _samples_in_stream(scenario: Any, plugins: Sequence[Any]) -> list[FedltError]:
    """A plugin adding samples to clients' data (``data_client_samples``) in a stream scenario,
    whose stream fixes what a client reads."""
    if scenario.stream.kind == "none":
        return []
    return [
        ScenarioError(
            f"plugins[{i}].name",
            p.name,
            "used offline (no [stream]): it adds samples to clients' data (data_client_samples)",
            hint=f"A stream fixes what a client reads, so added samples have no place in it "
            f"(stream.kind = {scenario.stream.kind!r}).",
        )
        for i, p in enumerate(plugins)
        if "data_client_samples" in implementations(type(p), p.name)
    ]


def _trace_problems(scenario: Any) -> list[FedltError]:
    """A ``[system]`` trace that is missing, malformed or names unknown clients."""
    sys_, n = scenario.system, scenario.partition.n_clients
    problems: list[FedltError] = []
    for needed, read in ((sys_.speed == "trace", read_speed_trace), (sys_.availability == "trace", None)):
        if not needed:
            continue
        try:
            if read is not None:
                read(sys_.speed_trace, n)
            else:
                read_availability_trace(sys_.availability_trace, n)
        except ScenarioError as exc:
            problems.append(exc)
    return problems


def raise_problems(problems: Sequence[FedltError]) -> None:
    """Raise the first problem, its message followed by the others' (so one run of ``fedlt
    validate`` shows everything to fix); nothing when there is none."""
    if not problems:
        return
    first = problems[0]
    if len(problems) > 1:
        first.args = (" ".join([str(first), *(f"Also: {p}" for p in problems[1:])]),)
    raise first
