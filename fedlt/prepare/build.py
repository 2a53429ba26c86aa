"""Building what a run needs from a scenario that passed :func:`~fedlt.prepare.preflight`:
the data (the model checked against the samples as soon as they are loaded), the plugins with
every parameter spelled out, and the model configured by them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.base.seeding import torch_generator
from fedlt.data.federated import FederatedData, build_federated_data, with_client_samples
from fedlt.data.raw import RawDataset
from fedlt.errors import ScenarioError
from fedlt.hooks.dispatch import HookSet, spelled_out
from fedlt.hooks.lifetimes import warn_static_problems
from fedlt.models import check_model
from fedlt.prepare.checks import checked_plugins, raise_problems, resolve_device
from fedlt.system.devices import Devices, tail_shares
from fedlt.training.context import setup_context
from fedlt.training.worker import aggregated_keys, build_run_model

__all__ = ["Prepared", "build_data", "build_devices", "planned_samples", "prepare", "with_plugin_samples"]


def build_data(scenario: Any, device: torch.device | str = "cpu") -> FederatedData:
    """The scenario's data, with the model checked against the samples' shape and classes as soon
    as the dataset is loaded (before the long tail, the partition or any tensor is built), so a
    model that does not fit fails in milliseconds, naming the ``model.*`` key."""

    def model_fits(raw: RawDataset) -> None:
        check_model(scenario.model.name, tuple(raw.input_shape), raw.num_classes, **scenario.model.params())

    return build_federated_data(scenario, device, check_raw=model_fits)


@dataclass
class Prepared:
    """A scenario made ready to run in one process.

    Attributes
    ----------
    scenario : Scenario
        The scenario; its plugin tables now spell out every parameter.
    device : torch.device
        Where data and model live.
    hooks : HookSet
        The plugins, validated.
    data : FederatedData
        The data.
    model : nn.Module
        The model, initialised from the seed and configured by the plugins.
    keys : list of str
        The model's entries clients train and the server aggregates.
    devices : Devices or None
        The simulated devices (``[system]``), built in the driver (None on workers).
    """

    scenario: Any
    device: torch.device
    hooks: HookSet
    data: FederatedData
    model: nn.Module
    keys: list[str]
    devices: Devices | None = None


def prepare(
    scenario: Any,
    device: torch.device | str | None = None,
    *,
    data: FederatedData | None = None,
    checked: bool = False,
) -> Prepared:
    """Check (unless ``checked``: a worker whose driver already did) and build the scenario.

    Parameters
    ----------
    scenario : Scenario
        A validated scenario.
    device : torch.device or str, optional
        Default: ``engine.device``.
    data : FederatedData, optional
        Data already built (a Ray actor's copy from the object store).
    checked : bool, default=False
        The scenario already passed :func:`preflight` in this run.

    Raises
    ------
    ScenarioError, PluginError
        The first problem, with the others in its message.
    """
    plugins = None
    if not checked:
        problems, plugins = checked_plugins(scenario)
        raise_problems(problems)
    device = resolve_device(scenario.engine.device) if device is None else torch.device(device)
    hooks = spelled_out(scenario.plugins, plugins)  # scenario.toml then says every parameter
    if not checked:
        warn_static_problems(hooks.plugins)  # state on self that cannot reach where it is read
    data = with_plugin_samples(scenario, build_data(scenario, device), hooks) if data is None else data
    model = build_run_model(scenario, data, hooks, device)
    keys = aggregated_keys(model)
    devices = None if checked else build_devices(scenario, data, model, keys)
    return Prepared(scenario, device, hooks, data, model, keys, devices)


def with_plugin_samples(scenario: Any, data: FederatedData, hooks: HookSet) -> FederatedData:
    """``data`` with the samples ``data_client_samples`` adds to each client (none: ``data`` itself).

    Runs wherever the data is built (the driver, Flower nodes), deterministically from the seed,
    so every process that builds the data gets the same samples; Ray workers get the driver's.
    A stream scenario with such a plugin was refused by the preflight checks.
    """
    if not hooks.implements("data_client_samples"):
        return data
    hook = hooks.data_client_samples
    ctx = setup_context(scenario, data, data.x_train.device)
    added: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, idx in enumerate(data.client_indices):
        rows = torch.as_tensor(idx, dtype=torch.long, device=data.x_train.device)
        x, y = data.x_train[rows].cpu(), data.y_train[rows].cpu()
        g = torch_generator(scenario.seed, "client-samples", k)
        parts = list(hook(x=x, y=y, client_id=k, generator=g, ctx=ctx).values())
        if parts:
            added[k] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return with_client_samples(data, added)


def build_devices(scenario: Any, data: FederatedData, model: nn.Module, keys: list[str]) -> Devices:
    """The run's simulated devices, checked against the data: a deadline no client can meet is
    refused here, before training (``federation.deadline``)."""
    ev = scenario.eval
    shares = tail_shares(data.client_counts, data.train_class_counts, ev.shot_rule, ev.shot_thresholds)
    state = model.state_dict()
    size = sum(state[k].numel() * state[k].element_size() for k in keys)
    devices = Devices(scenario.system, scenario.seed, shares, size)
    f = scenario.federation
    if f.mode == "deadline":
        fastest = float(devices.expected_durations(planned_samples(scenario, data)).min())
        if fastest > f.deadline:
            raise ScenarioError(
                "federation.deadline",
                f.deadline,
                f"at least {fastest:.6g} virtual seconds, the fastest client's round "
                "(download, compute, upload)",
                hint="No client could ever meet it. Lower [system] times or raise the deadline.",
            )
    return devices


def planned_samples(scenario: Any, data: FederatedData) -> np.ndarray:
    """``(n_clients,)`` samples each client's first round trains on by the scenario's plan."""
    t = scenario.train
    if scenario.stream.kind != "none" and data.streams is not None:
        lengths = np.asarray([len(s.indices) for s in data.streams])
        return np.minimum(lengths, scenario.stream.samples_per_round) * scenario.stream.online_iter
    if t.local_steps is not None:
        return np.full(data.n_clients, t.local_steps * t.batch_size)
    return np.asarray([len(i) for i in data.client_indices]) * t.local_epochs
