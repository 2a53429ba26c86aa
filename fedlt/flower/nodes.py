"""Which Flower node trains which fedlt client: asked once per run, by a query each node answers.

Each SuperNode carries a ``partition-id`` in its node config (one per fedlt client); the driver
sends every node a query message and maps client ids to node ids from the replies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import Message, MessageType, RecordDict

from fedlt.errors import FedltError, ScenarioError
from fedlt.flower.wire import FEDLT

__all__ = ["exchange", "map_clients_to_nodes"]


def exchange(
    grid: Any, messages: Sequence[Message], check: Callable[[], None] | None = None, poll: float = 0.01
) -> Iterable[tuple[int, Message]]:
    """Push ``messages`` and yield ``(index, reply)`` as replies arrive.

    Only outstanding ids are pulled (a delivered reply is deleted, and asking again returns a
    "message unavailable" error). ``check`` is called between polls so a dead simulation raises
    instead of hanging.
    """
    ids = list(grid.push_messages(messages))
    if len(ids) != len(messages):
        raise FedltError(f"Flower accepted {len(ids)} of {len(messages)} messages")
    index = {mid: i for i, mid in enumerate(ids)}
    while index:
        replies = list(grid.pull_messages(list(index)))
        for reply in replies:
            i = index.pop(reply.metadata.reply_to_message_id, None)
            if i is not None:
                yield i, reply
        if not replies:
            if check is not None:
                check()
            time.sleep(poll)


def map_clients_to_nodes(
    grid: Any,
    n_clients: int,
    check: Callable[[], None] | None = None,
    timeout: float = 300.0,
    settle: float = 15.0,
) -> dict[int, int]:
    """``{client id: node id}`` for clients ``0..n_clients-1``.

    Waits up to ``timeout`` seconds for one SuperNode per client, or ``settle`` seconds after the
    number of nodes last changed.
    """
    start = changed = time.monotonic()
    nodes = list(grid.get_node_ids())
    while len(nodes) < n_clients and time.monotonic() - start < timeout:
        if nodes and time.monotonic() - changed > settle:
            break
        if check is not None:
            check()
        time.sleep(0.05)
        now = list(grid.get_node_ids())
        if len(now) != len(nodes):
            nodes, changed = now, time.monotonic()
    if len(nodes) < n_clients:
        raise ScenarioError(
            "partition.n_clients",
            n_clients,
            f"at most the {len(nodes)} SuperNodes of the Flower federation",
            hint=f"Start the federation with one SuperNode per client (num-supernodes={n_clients}).",
        )
    queries = [Message(RecordDict({}), node, MessageType.QUERY) for node in nodes]
    node_of: dict[int, int] = {}
    for i, reply in exchange(grid, queries, check):
        if reply.has_error():
            raise FedltError(f"Flower node {nodes[i]} did not say which client it is: {reply.error.reason}")
        node_of[int(reply.content[FEDLT]["partition-id"])] = nodes[i]
    missing = sorted(set(range(n_clients)) - set(node_of))
    if missing:
        raise ScenarioError(
            "partition.n_clients",
            n_clients,
            "covered by the federation's partition ids",
            hint=f"No SuperNode has partition-id {missing[:5]}.",
        )
    return node_of
