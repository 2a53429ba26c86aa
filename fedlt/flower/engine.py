"""The Flower engine: a round's clients trained by Flower ClientApps (Message API).

It only moves tasks and results: fedlt's runner keeps the round loop (selection, aggregation,
evaluation, checkpoints). Each task becomes one train message to the client's SuperNode
(:mod:`fedlt.flower.wire`, records only, no pickles), replies become ``ClientResult``s, yielded
in task order so the numbers match the serial engine. The Grid comes from a ServerApp
(``flwr run``), a shared ``FlowerSimulation``, or a simulation of its own
(:mod:`fedlt.flower.simulation`).

Faults: a client that fails (its error comes back in the reply) or that Flower cannot reach is
re-sent, with its state, up to ``engine.max_retries`` times; then the run stops with the
client's error (a ``PluginError`` names plugin, hook, client and round).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fedlt.engines.base import Engine
from fedlt.errors import FedltError, ScenarioError
from fedlt.flower.nodes import map_clients_to_nodes
from fedlt.flower.simulation import FlowerSimulation, Link, active_link
from fedlt.flower.wire import decode_error, decode_result, encode_task, reply_needs_state
from fedlt.prepare import Prepared
from fedlt.scenario.config import scenario_to_toml
from fedlt.training.round import ClientResult, ClientTask

__all__ = ["FlowerEngine"]

#: Seconds between polls for replies (Flower's own ``send_and_receive`` sleeps 0.1 s).
POLL = 0.01


class FlowerEngine(Engine):
    """Clients trained on Flower: through the ServerApp's Grid, a shared simulation, or its own."""

    name = "flower"

    def __init__(self, prepared: Prepared) -> None:
        super().__init__(prepared)
        scenario, data = self.scenario, self.data
        self.max_retries = scenario.engine.max_retries
        self.scenario_toml = scenario_to_toml(scenario)
        #: Names this run's state on nodes: a node holding another token's state (an earlier run
        #: sharing the simulation) is sent the state again.
        self.token = uuid.uuid4().hex
        self.retried = 0
        self._synced: set[int] = set()  # clients whose node holds their current state
        link = active_link()
        self._own: FlowerSimulation | None = None
        if link is None:
            link = self._own = FlowerSimulation.for_scenario(scenario)
        elif link.num_supernodes is not None and link.num_supernodes < data.n_clients:
            raise ScenarioError(
                "partition.n_clients",
                data.n_clients,
                f"at most the {link.num_supernodes} SuperNodes of the shared Flower simulation",
            )
        self.link: Link = link
        try:
            self.node_of = map_clients_to_nodes(link.grid, data.n_clients, link.check)
        except BaseException:
            self.close()
            raise

    def _message(self, task: ClientTask, arrays: Any, force_state: bool = False) -> Any:
        from flwr.app import Message, MessageType

        send_state = force_state or task.client_id not in self._synced
        content = encode_task(task, arrays, self.scenario_toml, self.token, send_state)
        return Message(content, self.node_of[task.client_id], MessageType.TRAIN, group_id=str(task.round))

    def _result(self, task: ClientTask, reply: Any) -> ClientResult:
        error = decode_error(reply, task.client_id, task.round)
        if error is not None:
            self._synced.discard(task.client_id)
            raise error
        result = decode_result(reply, self.device)
        self._synced.add(task.client_id)
        return result

    def train_round(
        self, tasks: Sequence[ClientTask], global_state: Mapping[str, torch.Tensor]
    ) -> Iterator[ClientResult]:
        if not tasks:
            return
        from flwr.app import ArrayRecord

        grid = self.link.grid
        arrays = ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in global_state.items()))
        outstanding: dict[str, int] = {}  # message id -> task index

        def push(indexed: list[tuple[int, Any]]) -> None:
            ids = list(grid.push_messages([m for _, m in indexed]))
            if len(ids) != len(indexed):
                raise FedltError(f"Flower accepted {len(ids)} of {len(indexed)} messages")
            outstanding.update(zip(ids, (i for i, _ in indexed), strict=True))

        push([(i, self._message(t, arrays)) for i, t in enumerate(tasks)])
        attempts = [0] * len(tasks)
        done: dict[int, ClientResult] = {}
        nxt = 0
        while nxt < len(tasks):
            if nxt in done:
                yield done.pop(nxt)
                nxt += 1
                continue
            replies = list(grid.pull_messages(list(outstanding)))
            if not replies:
                self.link.check()
                time.sleep(POLL)
                continue
            resend = []
            for reply in replies:
                i = outstanding.pop(reply.metadata.reply_to_message_id, None)
                if i is None:
                    continue
                if reply_needs_state(reply):  # the node lost or never had the state: not a failure
                    self._synced.discard(tasks[i].client_id)
                    resend.append(i)
                    continue
                try:
                    done[i] = self._result(tasks[i], reply)
                except FedltError:
                    attempts[i] += 1
                    if attempts[i] > self.max_retries:
                        raise
                    self.retried += 1
                    resend.append(i)
            if resend:
                push([(i, self._message(tasks[i], arrays, force_state=True)) for i in resend])

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None
