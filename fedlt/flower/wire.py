"""The wire format between fedlt's driver and its Flower ClientApps: Flower records only.

Nothing is pickled in either direction, so neither side ever runs code the other sent. Plain
trees (round config, plugin state, ``client_end`` payloads; see :mod:`fedlt.base.safe`) travel as
JSON in a ConfigRecord with their tensors in an ArrayRecord. A train message holds

- ``"arrays"`` (ArrayRecord): the global weights of the entries clients train;
- ``"fedlt"`` (ConfigRecord): client id, round, a token naming the run, the resolved scenario as
  TOML (so any worker can rebuild the model, data and plugins, once), the client's config as a
  tree, its plugin state only when the node does not hold it yet, and in continual runs the
  stream slice;
- ``"tensors"`` (ArrayRecord): the tensors the trees refer to (and the stream slice).

A reply holds ``"arrays"`` (the trained weights), ``"metrics"`` (``num-examples``, ``loss``,
``n-steps``), ``"fedlt"`` with the new state and payloads as trees and ``"tensors"``; or
``"fedlt"`` with the error's fields (kind, plugin, hook, message, client, round).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlt.base.safe import decode_tree, encode_tree
from fedlt.errors import FedltError, NonFiniteLossError, PluginError, ScenarioError
from fedlt.training.round import ClientResult, ClientTask

__all__ = [
    "ARRAYS",
    "FEDLT",
    "METRICS",
    "TENSORS",
    "FlowerClientError",
    "decode_error",
    "decode_result",
    "decode_task",
    "decode_tree_from",
    "encode_error",
    "encode_result",
    "encode_task",
    "encode_tree_into",
    "reply_needs_state",
]

ARRAYS, FEDLT, METRICS, TENSORS = "arrays", "fedlt", "metrics", "tensors"


class FlowerClientError(FedltError):
    """Training a client failed inside a Flower ClientApp (or Flower could not deliver it)."""

    exit_status = 1

    def __init__(self, client: int, round: int, message: str) -> None:
        self.client = client
        self.round = round
        self.message = message
        super().__init__(f"Client {client} failed in round {round} on Flower: {message}")

    def __reduce__(self):  # picklable between local processes, attributes included
        return (FlowerClientError, (self.client, self.round, self.message))


# --------------------------------------------------------------------------- trees


def encode_tree_into(tree: Any, prefix: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put a plain tree into ``meta[prefix]`` (JSON) and its tensors into ``tensors[prefix.i]``."""
    text, found = encode_tree(tree)
    meta[prefix] = text
    for i, t in enumerate(found):
        tensors[f"{prefix}.{i}"] = t.contiguous()


def decode_tree_from(prefix: str, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree_into`."""
    count = sum(1 for k in tensors if k.rsplit(".", 1)[0] == prefix)
    return decode_tree(str(meta[prefix]), [tensors[f"{prefix}.{i}"] for i in range(count)])


def _tensors(content: RecordDict) -> dict[str, torch.Tensor]:
    return content[TENSORS].to_torch_state_dict() if TENSORS in content else {}


# --------------------------------------------------------------------------- tasks


def encode_task(
    task: ClientTask, arrays: ArrayRecord, scenario_toml: str, token: str, send_state: bool
) -> RecordDict:
    """The content of one client's train message."""
    meta: dict[str, Any] = {
        "client-id": task.client_id,
        "round": task.round,
        "dispatch": task.dispatch,
        "token": token,
        "scenario": scenario_toml,
    }
    tensors: dict[str, torch.Tensor] = {}
    encode_tree_into(dict(task.config), "config", meta, tensors)
    if send_state:
        encode_tree_into(task.states, "states", meta, tensors)
    if task.indices is not None:
        tensors["stream.indices"] = torch.as_tensor(np.asarray(task.indices, dtype=np.int64))
        tensors["stream.seen"] = torch.as_tensor(np.asarray(task.seen_counts, dtype=np.int64))
    return RecordDict({ARRAYS: arrays, FEDLT: ConfigRecord(meta), TENSORS: ArrayRecord(tensors)})


def decode_task(content: RecordDict, stored_states: dict[str, dict[str, Any]] | None) -> ClientTask | None:
    """The task a train message carries; ``None`` when it has no state and the node holds none."""
    meta = content[FEDLT]
    tensors = _tensors(content)
    states = decode_tree_from("states", meta, tensors) if "states" in meta else stored_states
    if states is None:
        return None
    indices = seen = None
    if "stream.indices" in tensors:
        indices, seen = tensors["stream.indices"].numpy(), tensors["stream.seen"].numpy()
    config = decode_tree_from("config", meta, tensors)
    dispatch = int(meta.get("dispatch", 0))
    return ClientTask(int(meta["client-id"]), int(meta["round"]), config, states, indices, seen, dispatch)


# --------------------------------------------------------------------------- results


def encode_result(result: ClientResult) -> RecordDict:
    """The content of a successful train reply."""
    meta: dict[str, Any] = {"client-id": result.client_id}
    tensors: dict[str, torch.Tensor] = {}
    encode_tree_into(result.states, "states", meta, tensors)
    encode_tree_into(result.payloads, "payloads", meta, tensors)
    weights = OrderedDict((k, v.detach().cpu()) for k, v in result.weights.items())
    metrics = {"num-examples": result.n_samples, "loss": result.loss, "n-steps": result.n_steps}
    return RecordDict(
        {
            ARRAYS: ArrayRecord(weights),
            METRICS: MetricRecord(metrics),
            FEDLT: ConfigRecord(meta),
            TENSORS: ArrayRecord(tensors),
        }
    )


def decode_result(reply: Message, device: torch.device | str = "cpu") -> ClientResult:
    """A successful train reply as the ClientResult fedlt aggregates."""
    content = reply.content
    meta, metrics, tensors = content[FEDLT], content[METRICS], _tensors(content)
    weights = content[ARRAYS].to_torch_state_dict()
    if torch.device(device).type != "cpu":
        weights = OrderedDict((k, v.to(device)) for k, v in weights.items())
    return ClientResult(
        client_id=int(meta["client-id"]),
        weights=weights,
        n_samples=int(metrics["num-examples"]),
        loss=float(metrics["loss"]),
        n_steps=int(metrics["n-steps"]),
        payloads=decode_tree_from("payloads", meta, tensors),
        states=decode_tree_from("states", meta, tensors),
    )


def needs_state_reply(client: int, msg: Message) -> Message:
    """The reply of a node that holds no state for this run (the driver resends with state)."""
    return Message(RecordDict({FEDLT: ConfigRecord({"client-id": client, "need-state": True})}), reply_to=msg)


def reply_needs_state(reply: Message) -> bool:
    """True when the node answered that it holds no state for this run."""
    if reply.has_error() or FEDLT not in reply.content:
        return False
    return bool(reply.content[FEDLT].get("need-state", False))


# --------------------------------------------------------------------------- errors


def encode_error(exc: BaseException, client: int, round: int) -> RecordDict:
    """An error as plain fields: what the driver needs to raise the same fedlt error."""
    meta: dict[str, Any] = {"client-id": client, "error-kind": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, PluginError):
        meta.update(
            {
                "message": exc.message,
                "plugin": exc.plugin,
                "hook": exc.hook or "",
                "error-client": client if exc.client is None else exc.client,
                "error-round": round if exc.round is None else exc.round,
            }
        )
    elif isinstance(exc, ScenarioError):
        meta.update(
            {"key": exc.key, "value": repr(exc.value), "allowed": exc.allowed, "hint": exc.hint or ""}
        )
    elif isinstance(exc, NonFiniteLossError):
        meta.update({"loss": float(exc.loss), "plugins": ",".join(exc.plugins)})
    return RecordDict({FEDLT: ConfigRecord(meta)})


def decode_error(reply: Message, client: int, round: int) -> FedltError | None:
    """The fedlt error a reply carries, or ``None`` for a successful one."""
    if reply.has_error():
        err = reply.error
        return FlowerClientError(client, round, f"Flower error code {err.code}: {err.reason}")
    meta = reply.content.get(FEDLT)
    if meta is None or "error-kind" not in meta:
        return None
    kind, message = str(meta["error-kind"]), str(meta["message"])
    if kind == "PluginError":
        return PluginError(
            str(meta["plugin"]),
            str(meta["hook"]) or None,
            message,
            int(meta["error-client"]),
            int(meta["error-round"]),
        )
    if kind == "ScenarioError":
        err = ScenarioError(
            str(meta["key"]), str(meta["value"]), str(meta["allowed"]), str(meta["hint"]) or None
        )
        err.args = (message,)
        return err
    if kind == "NonFiniteLossError":
        plugins = [p for p in str(meta["plugins"]).split(",") if p]
        return NonFiniteLossError(round, client, plugins, float(meta["loss"]))
    return FlowerClientError(client, round, f"{kind}: {message}")
