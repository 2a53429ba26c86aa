"""fedlt's Flower ClientApp: trains the client a message names and replies with records.

Scenario-agnostic: every train message carries its resolved scenario, from which a worker
process builds the model, data and plugins once (cached by the scenario's hash). The node keeps
the client's plugin state in ``context.state`` between rounds (as records, like the messages),
so the driver sends it only when the node lacks it.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read by flwr when it is first imported
# Keep Ray from rewriting CUDA_VISIBLE_DEVICES for CPU-only workers (and from warning about it).
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import hashlib
import tomllib
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlt.flower.wire import (
    ARRAYS,
    FEDLT,
    decode_task,
    decode_tree_from,
    encode_error,
    encode_result,
    encode_tree_into,
    needs_state_reply,
)
from fedlt.hooks.context import frozen_config

__all__ = ["make_client_app"]

#: Key of the node's stored plugin state in ``context.state``.
NODE_STATE = "fedlt-client-state"
NODE_TENSORS = "fedlt-client-state-tensors"

_TRAINERS: dict[str, tuple[Any, int]] = {}


def _trainer(scenario_toml: str) -> Any:
    """This process's ClientTrainer for the scenario, built once (cached by the scenario's hash).

    The data is rebuilt from the scenario (deterministic from its seed), so nothing but the
    scenario travels to a worker.
    """
    key = hashlib.sha256(scenario_toml.encode()).hexdigest()
    if key not in _TRAINERS:
        from fedlt.prepare import prepare
        from fedlt.scenario.config import load_scenario
        from fedlt.training.worker import ClientTrainer

        scenario = load_scenario(tomllib.loads(scenario_toml))
        cfg = scenario.engine
        threads = cfg.threads if isinstance(cfg.threads, int) else max(int(cfg.num_cpus), 1)
        torch.set_num_threads(threads)
        device = torch.device("cuda" if cfg.num_gpus > 0 else cfg.device)
        p = prepare(scenario, device, checked=True)  # the driver checked the scenario
        trainer = ClientTrainer(p.scenario, p.data, p.hooks, p.device, p.model)
        _TRAINERS.clear()  # one scenario at a time per worker: free the previous model and data
        _TRAINERS[key] = (trainer, threads)
    trainer, threads = _TRAINERS[key]
    if torch.get_num_threads() != threads:  # a shared worker may have served another scenario
        torch.set_num_threads(threads)
    return trainer


def _stored_states(context: Context, token: str) -> dict[str, dict[str, Any]] | None:
    record = context.state.get(NODE_STATE)
    if record is None or record["token"] != token:
        return None
    tensors = context.state[NODE_TENSORS].to_torch_state_dict()
    return decode_tree_from("states", record, tensors)


def _store_states(context: Context, token: str, states: dict[str, dict[str, Any]]) -> None:
    meta: dict[str, Any] = {"token": token}
    tensors: dict[str, torch.Tensor] = {}
    encode_tree_into(states, "states", meta, tensors)
    context.state[NODE_STATE] = ConfigRecord(meta)
    context.state[NODE_TENSORS] = ArrayRecord(tensors)


def _query(msg: Message, context: Context) -> Message:
    """Answer which fedlt client (partition) this node is: the driver maps clients to nodes once."""
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no node_config 'partition-id'; fedlt needs one per client")
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({FEDLT: ConfigRecord({"partition-id": pid})}), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    """Train the client the message names; reply with weights, metrics, new state (or an error)."""
    meta = msg.content[FEDLT]
    client, rnd, token = int(meta["client-id"]), int(meta["round"]), str(meta["token"])
    try:
        task = decode_task(msg.content, _stored_states(context, token))
        if task is None:
            return needs_state_reply(client, msg)
        task.config = frozen_config(task.config)
        trainer = _trainer(str(meta["scenario"]))
        result = trainer.run(task, msg.content[ARRAYS].to_torch_state_dict())
        reply = encode_result(result)
    except Exception as exc:
        # The error travels as fields (PluginError keeps plugin, hook, client, round); the node's
        # stored state is left as it was, so a retry starts from the same state.
        return Message(encode_error(exc, client, rnd), reply_to=msg)
    _store_states(context, token, result.states)
    return Message(reply, reply_to=msg)


def make_client_app() -> ClientApp:
    """The fedlt ClientApp. Scenario-agnostic: every train message carries its scenario."""
    app = ClientApp()
    app.query()(_query)
    app.train()(_train)
    return app
