"""fedlt on Flower's Message API: the ClientApp, the Strategy, the ServerApp and their wire format.

fedlt keeps its one round loop (``fedlt.runner.Run``); Flower carries the messages. Per
selected client, a train message holds

- ``"arrays"`` (ArrayRecord): the global weights of the entries clients train;
- ``"config"`` (ConfigRecord): the round config entries that are plain scalars;
- ``"fedlt"`` (ConfigRecord): client id, round, the resolved scenario as TOML (so any worker
  process can rebuild the model, data and plugins, once, cached by the scenario's hash), the
  other round config entries pickled, the stream slice of continual runs and, only when the node
  does not hold it yet, the client's plugin state (pickled).

The reply holds ``"arrays"`` (the trained weights), ``"metrics"`` (``num-examples``, ``loss``,
``n-steps``) and ``"fedlt"`` (client id, the new plugin state and ``client_end`` payloads,
pickled), or ``"fedlt"`` with a pickled error. The node keeps the state in its
``context.state`` between rounds, and the server keeps the returned copy, so checkpoints hold it.

Flower's telemetry is off unless ``FLWR_TELEMETRY_ENABLED`` is set: fedlt does not report on
its users' behalf.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read by flwr when it is first imported
# Keep Ray from rewriting CUDA_VISIBLE_DEVICES for CPU-only workers (and from warning about it).
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import hashlib
import logging
import pickle
import time
import tomllib
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedlt.client import ClientResult, ClientTask
from fedlt.config import Scenario, load_scenario, scenario_to_toml
from fedlt.context import frozen_config
from fedlt.data.federated import FederatedData
from fedlt.errors import FedltError, PluginError, ScenarioError
from fedlt.pluginmanager import HookSet
from fedlt.rounds import aggregate_round, configure_round, round_context

__all__ = [
    "FedltStrategy",
    "FlowerClientError",
    "decode_config",
    "encode_config",
    "exchange",
    "make_client_app",
    "make_server_app",
]

log = logging.getLogger(__name__)

#: Record names in messages, and the key of the node's stored state in ``context.state``.
ARRAYS, CONFIG, FEDLT, METRICS = "arrays", "config", "fedlt", "metrics"
NODE_STATE = "fedlt-client-state"
#: Flower's ConfigRecord holds these types as they are; anything else is pickled.
PLAIN = (bool, int, float, str, bytes)


class FlowerClientError(FedltError):
    """Training a client failed inside a Flower ClientApp (or Flower could not deliver it).

    Plugin errors come back as :class:`~fedlt.errors.PluginError`; this names the client, the
    round and what the ClientApp or Flower reported for anything else.
    """

    exit_status = 1

    def __init__(self, client: int, round: int, message: str) -> None:
        self.client = client
        self.round = round
        self.message = message
        super().__init__(f"Client {client} failed in round {round} on Flower: {message}")

    def __reduce__(self):  # picklable from a worker process, attributes included
        return (FlowerClientError, (self.client, self.round, self.message))


# --------------------------------------------------------------------------- wire format


def encode_config(config: Mapping[str, Any]) -> tuple[ConfigRecord, bytes]:
    """The round config as a ConfigRecord of its plain scalars, plus the rest pickled.

    The pickle also records the key order, so the client sees the very mapping the server built.
    """
    plain = {k: v for k, v in config.items() if type(v) in PLAIN}
    rest = {k: v for k, v in config.items() if k not in plain}
    return ConfigRecord(plain), pickle.dumps((list(config), rest))


def decode_config(record: ConfigRecord, pickled: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_config`."""
    order, rest = pickle.loads(pickled)
    return {k: rest[k] if k in rest else record[k] for k in order}


def _scenario_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def train_content(
    task: ClientTask, arrays: ArrayRecord, scenario_toml: str, token: str, send_state: bool
) -> RecordDict:
    """The content of one client's train message (see the module docstring)."""
    config, pickled = encode_config(task.config)
    meta: dict[str, Any] = {
        "client-id": task.client_id,
        "round": task.round,
        "token": token,
        "scenario": scenario_toml,
        "config-pickled": pickled,
    }
    if send_state:
        meta["states"] = pickle.dumps(task.states)
    if task.indices is not None:
        meta["stream"] = pickle.dumps((task.indices, task.seen_counts))
    return RecordDict({ARRAYS: arrays, CONFIG: config, FEDLT: ConfigRecord(meta)})


def _reply_meta(reply: Message) -> ConfigRecord | None:
    if reply.has_error() or FEDLT not in reply.content:
        return None
    return reply.content[FEDLT]


def reply_client(reply: Message) -> int | None:
    """The client a train reply is about (``None`` for a Flower-level error reply)."""
    meta = _reply_meta(reply)
    return None if meta is None else int(meta["client-id"])


def reply_needs_state(reply: Message) -> bool:
    """True when the node answered that it holds no state for this run (resend with state)."""
    meta = _reply_meta(reply)
    return meta is not None and bool(meta.get("need-state", False))


def reply_error(reply: Message, client: int, round: int) -> FedltError | None:
    """The fedlt error a reply carries, or ``None`` for a successful one."""
    if reply.has_error():
        err = reply.error
        return FlowerClientError(client, round, f"Flower error code {err.code}: {err.reason}")
    meta = _reply_meta(reply)
    if meta is None or "error" not in meta:
        return None
    try:
        exc = pickle.loads(meta["error"])
    except Exception:  # an unpicklable error: its text still says what happened
        exc = None
    if isinstance(exc, FedltError):
        return exc
    return FlowerClientError(client, round, str(meta.get("error-text", "unknown error")))


def reply_result(reply: Message, device: torch.device | str = "cpu") -> ClientResult:
    """A successful train reply as the ClientResult the runner aggregates."""
    meta = reply.content[FEDLT]
    metrics = reply.content[METRICS]
    weights = reply.content[ARRAYS].to_torch_state_dict()
    if torch.device(device).type != "cpu":
        weights = OrderedDict((k, v.to(device)) for k, v in weights.items())
    return ClientResult(
        client_id=int(meta["client-id"]),
        weights=weights,
        n_samples=int(metrics["num-examples"]),
        loss=float(metrics["loss"]),
        n_steps=int(metrics["n-steps"]),
        payloads=pickle.loads(meta["payloads"]),
        states=pickle.loads(meta["states"]),
    )


def exchange(
    grid: Grid,
    messages: Sequence[Message],
    check: Callable[[], None] | None = None,
    poll: float = 0.01,
) -> Iterable[tuple[int, Message]]:
    """Push ``messages`` and yield ``(index, reply)`` as replies arrive.

    Only outstanding ids are pulled (a delivered reply is deleted, and asking again returns a
    "message unavailable" error). ``check`` is called between polls so a dead simulation
    raises instead of hanging.
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


# --------------------------------------------------------------------------- ClientApp side

_TRAINERS: dict[str, tuple[Any, int]] = {}


def _trainer(scenario_toml: str) -> Any:
    """This process's ClientTrainer for the scenario, built once (cached by the scenario's hash).

    The data is rebuilt from the scenario (deterministic from its seed), so nothing but the
    scenario travels to a worker.
    """
    key = _scenario_key(scenario_toml)
    if key not in _TRAINERS:
        from fedlt.data.federated import build_federated_data
        from fedlt.pluginmanager import build_hooks
        from fedlt.worker import ClientTrainer

        scenario = load_scenario(tomllib.loads(scenario_toml))
        cfg = scenario.engine
        threads = cfg.threads if cfg.threads is not None else max(int(cfg.num_cpus), 1)
        torch.set_num_threads(threads)
        device = torch.device("cuda" if cfg.num_gpus > 0 else cfg.device)
        data = build_federated_data(scenario, device)
        trainer = ClientTrainer(scenario, data, build_hooks(scenario.plugins), device)
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
    return pickle.loads(record["states"])


def _query(msg: Message, context: Context) -> Message:
    """Answer which fedlt client (partition) this node is: the server maps clients to nodes once."""
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no node_config 'partition-id'; fedlt needs one per client")
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({FEDLT: ConfigRecord({"partition-id": pid})}), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    """Train the client the message names; reply with weights, metrics, new state (or an error)."""
    meta = msg.content[FEDLT]
    client, rnd, token = int(meta["client-id"]), int(meta["round"]), str(meta["token"])
    try:
        states = pickle.loads(meta["states"]) if "states" in meta else _stored_states(context, token)
        if states is None:
            return Message(
                RecordDict({FEDLT: ConfigRecord({"client-id": client, "need-state": True})}), reply_to=msg
            )
        trainer = _trainer(str(meta["scenario"]))
        indices = seen = None
        if "stream" in meta:
            indices, seen = pickle.loads(meta["stream"])
        config = frozen_config(decode_config(msg.content[CONFIG], meta["config-pickled"]))
        task = ClientTask(client, rnd, config, states, indices, seen)
        result = trainer.run(task, msg.content[ARRAYS].to_torch_state_dict())
        weights = OrderedDict((k, v.detach().cpu()) for k, v in result.weights.items())
        new_states = pickle.dumps(result.states)
        metrics = {"num-examples": result.n_samples, "loss": result.loss, "n-steps": result.n_steps}
        reply = RecordDict(
            {
                ARRAYS: ArrayRecord(weights),
                METRICS: MetricRecord(metrics),
                FEDLT: ConfigRecord(
                    {"client-id": client, "states": new_states, "payloads": pickle.dumps(result.payloads)}
                ),
            }
        )
    except Exception as exc:
        # Carry the error itself (PluginError keeps plugin, hook, client, round); the node's
        # stored state is left as it was, so a retry starts from the same state.
        if isinstance(exc, PluginError) and exc.client is None:
            exc = exc.located(client, rnd)
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            blob = pickle.dumps(exc)
        except Exception:
            blob = pickle.dumps(None)
        error = {"client-id": client, "error": blob, "error-text": text}
        return Message(RecordDict({FEDLT: ConfigRecord(error)}), reply_to=msg)
    context.state[NODE_STATE] = ConfigRecord({"token": token, "states": new_states})
    return Message(reply, reply_to=msg)


def make_client_app() -> ClientApp:
    """The fedlt ClientApp. Scenario-agnostic: every train message carries its scenario."""
    app = ClientApp()
    app.query()(_query)
    app.train()(_train)
    return app


# --------------------------------------------------------------------------- Strategy


class FedltStrategy(Strategy):
    """A Flower Strategy that runs fedlt's round: seeded selection, fedlt aggregation, task order.

    The FlowerEngine uses :meth:`configure_train` and :meth:`result` (fedlt's runner then
    aggregates, evaluates and checkpoints). Used alone, ``strategy.start(grid, arrays,
    num_rounds)`` also works: :meth:`aggregate_train` then aggregates with the plugins'
    ``server_make_aggregator`` (else FedAvg) and runs ``server_after_aggregate``.

    Parameters
    ----------
    scenario : Scenario
        The validated scenario; its resolved TOML travels in every train message.
    data : FederatedData
        The run's data (class counts for round contexts).
    hooks : HookSet
        The server-side plugins.
    device : torch.device, default=cpu
        Where returned weights are placed.
    """

    def __init__(
        self, scenario: Scenario, data: FederatedData, hooks: HookSet, device: torch.device | str = "cpu"
    ) -> None:
        self.scenario = scenario
        self.data = data
        self.hooks = hooks
        self.device = torch.device(device)
        self.scenario_toml = scenario_to_toml(scenario)
        #: Identifies this strategy's state on nodes: a node holding another token's state (an
        #: earlier run sharing the simulation) is sent the state again.
        self.token = uuid.uuid4().hex
        #: Per-client plugin state (used by ``start``; the engine's runner keeps its own).
        self.client_states: dict[int, dict[str, dict[str, Any]]] = {}
        self.node_of: dict[int, int] | None = None
        self._synced: set[int] = set()  # clients whose node holds their current state
        self._planned: dict[int, list[ClientTask]] = {}
        self._tasks: list[ClientTask] = []
        self._messages: list[Message] = []
        self._arrays: ArrayRecord | None = None
        self._model: torch.nn.Module | None = None
        self._keys: list[str] | None = None
        self._setup_done = False
        self.rounds_done = 0

    # ------------------------------------------------------------------ model and keys

    def _server_model(self) -> torch.nn.Module:
        if self._model is None:
            from fedlt.worker import aggregated_keys, build_run_model

            self._model = build_run_model(self.scenario, self.data, self.hooks, self.device)
            self._keys = aggregated_keys(self._model)
        return self._model

    @property
    def keys(self) -> list[str]:
        """The state entries clients train (and the only ones sent)."""
        self._server_model()
        assert self._keys is not None
        return self._keys

    def global_arrays(self, state: Mapping[str, torch.Tensor]) -> ArrayRecord:
        """The global weights as sent: the trained entries only (frozen ones agree everywhere)."""
        return ArrayRecord(OrderedDict((k, state[k].detach().cpu()) for k in self.keys))

    # ------------------------------------------------------------------ nodes

    def connect(
        self,
        grid: Grid,
        check: Callable[[], None] | None = None,
        timeout: float = 300.0,
        settle: float = 15.0,
    ) -> None:
        """Map fedlt clients (partition ids) to node ids, once, by a query each node answers.

        Waits up to ``timeout`` seconds for one SuperNode per client, or ``settle`` seconds after
        the number of nodes last changed.
        """
        if self.node_of is not None:
            return
        n = self.data.n_clients
        # Wait for one SuperNode per client; give up early once the count has stopped growing.
        start = changed = time.monotonic()
        nodes = list(grid.get_node_ids())
        while len(nodes) < n and time.monotonic() - start < timeout:
            if nodes and time.monotonic() - changed > settle:
                break
            if check is not None:
                check()
            time.sleep(0.05)
            now = list(grid.get_node_ids())
            if len(now) != len(nodes):
                nodes, changed = now, time.monotonic()
        if len(nodes) < n:
            raise ScenarioError(
                "partition.n_clients",
                n,
                f"at most the {len(nodes)} SuperNodes of the Flower federation",
                hint=f"Start the federation with one SuperNode per client (num-supernodes={n}).",
            )
        queries = [Message(RecordDict({}), node, MessageType.QUERY) for node in nodes]
        node_of: dict[int, int] = {}
        for i, reply in exchange(grid, queries, check):
            if reply.has_error():
                raise FedltError(
                    f"Flower node {nodes[i]} did not say which client it is: {reply.error.reason}"
                )
            node_of[int(reply.content[FEDLT]["partition-id"])] = nodes[i]
        missing = sorted(set(range(n)) - set(node_of))
        if missing:
            raise ScenarioError(
                "partition.n_clients",
                n,
                "covered by the federation's partition ids",
                hint=f"No SuperNode has partition-id {missing[:5]}.",
            )
        self.node_of = node_of

    # ------------------------------------------------------------------ train

    def plan(self, tasks: Sequence[ClientTask]) -> None:
        """Give the next ``configure_train`` the runner's tasks (config, state, stream slice)."""
        if tasks:
            self._planned[tasks[0].round] = list(tasks)

    def _own_tasks(self, rnd: int, selected: list[int], extra: Mapping[str, Any]) -> list[ClientTask]:
        """Tasks when used alone (``start``): the runner's round config, built here."""
        if self.data.streams is not None:
            raise ScenarioError(
                "stream.kind",
                self.scenario.stream.kind,
                "'none' when FedltStrategy.start drives the rounds",
                hint="Run continual scenarios through fedlt (engine.kind = 'flower').",
            )
        if not self._setup_done:  # what the runner does before its first round
            from fedlt.worker import setup_context

            ctx0 = setup_context(self.scenario, self.data, self.device)
            self.hooks.server_setup.all(model=self._server_model(), ctx=ctx0, states=None)
            self._setup_done = True
        ctx = configure_round(self.hooks, self.scenario.seed, self.data, rnd, selected, extra)
        return [ClientTask(c, rnd, ctx.config, self.client_states.setdefault(c, {})) for c in selected]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per client fedlt's seeded ``select_clients`` picks, in that order."""
        from fedlt.runner import select_clients

        s = self.scenario
        selected = select_clients(s.seed, server_round, self.data.n_clients, s.federation.fraction_clients)
        tasks = self._planned.pop(server_round, None)
        if tasks is None:
            tasks = self._own_tasks(server_round, selected, dict(config))
        if [t.client_id for t in tasks] != selected:
            raise FedltError(
                f"round {server_round}: the tasks are for clients {[t.client_id for t in tasks]}, "
                f"fedlt's selection is {selected}"
            )
        self.connect(grid)
        self._tasks = tasks
        self._arrays = arrays
        self._messages = [self.message(i, arrays) for i in range(len(tasks))]
        return self._messages

    def message(self, i: int, arrays: ArrayRecord, force_state: bool = False) -> Message:
        """The train message of this round's ``i``-th task (with its state when the node lacks it)."""
        assert self.node_of is not None
        task = self._tasks[i]
        send_state = force_state or task.client_id not in self._synced
        content = train_content(task, arrays, self.scenario_toml, self.token, send_state)
        return Message(content, self.node_of[task.client_id], MessageType.TRAIN, group_id=str(task.round))

    def result(self, i: int, reply: Message) -> ClientResult:
        """Task ``i``'s reply as a ClientResult; raises the client's error if it failed."""
        task = self._tasks[i]
        error = reply_error(reply, task.client_id, task.round)
        if error is not None or reply_needs_state(reply):
            self._synced.discard(task.client_id)
            if error is not None:
                raise error
            raise FlowerClientError(task.client_id, task.round, "the node holds no state for this run")
        result = reply_result(reply, self.device)
        self._synced.add(task.client_id)
        return result

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the replies as fedlt does, in task order (not arrival order).

        ``server_make_aggregator`` (else FedAvg over the trained entries), then
        ``server_after_aggregate``. A failed client raises its error (naming client and round).
        """
        # Match replies to tasks by the message they answer (error replies name no client), else
        # by the client id they carry.
        sent = {m.metadata.message_id: i for i, m in enumerate(self._messages) if m.metadata.message_id}
        position = {t.client_id: i for i, t in enumerate(self._tasks)}
        by_task: dict[int, Message] = {}
        for reply in replies:
            i = sent.get(reply.metadata.reply_to_message_id, position.get(reply_client(reply), -1))
            if i >= 0:
                by_task[i] = reply
        for i, task in enumerate(self._tasks):
            if i not in by_task:
                raise FlowerClientError(task.client_id, server_round, "no reply (timed out or lost)")
        assert self._arrays is not None
        model = self._server_model()
        state = model.state_dict()
        received = self._arrays.to_torch_state_dict()
        with torch.no_grad():
            for k, v in received.items():
                if k in state:
                    state[k].copy_(v)
        selected = [t.client_id for t in self._tasks]
        config = self._tasks[0].config if self._tasks else {}
        # The tasks' config already holds what server_configure_round added: no second call.
        ctx = round_context(self.scenario.seed, self.data, server_round, selected, config)
        results = (self.result(i, by_task[i]) for i in range(len(selected)))
        loss, total = aggregate_round(self.hooks, model, self.keys, ctx, results, self.client_states)
        self.rounds_done += 1
        metrics = {"num-examples": total, "train-loss": loss}
        return self.global_arrays(model.state_dict()), MetricRecord(metrics)

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nothing: fedlt evaluates the global model on the server (fedlt's Evaluator)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the strategy's settings, as Flower's strategies do when ``start`` begins."""
        s = self.scenario
        log.info(
            "FedltStrategy: scenario %r, %d clients, fraction %.3g per round (seeded), plugins: %s",
            s.name,
            self.data.n_clients,
            s.federation.fraction_clients,
            ", ".join(self.hooks.names) or "none",
        )


# --------------------------------------------------------------------------- ServerApp


def make_server_app(
    scenario: str | Path | None = None, out: str | Path | None = None, app_dir: str | Path | None = None
) -> ServerApp:
    """A ServerApp whose main runs fedlt's whole run (``Run``) on the Grid it is given.

    ``scenario`` and ``out`` default to the run config's ``scenario`` and ``out-dir`` (as written
    by ``fedlt export-flower``); relative paths are taken from ``app_dir``. An ``out`` folder
    that already holds a run is continued from its checkpoint, like ``fedlt resume``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedlt.engines.flower_engine import attach_grid
        from fedlt.runner import Run

        base = Path(app_dir) if app_dir is not None else Path.cwd()
        cfg = context.run_config
        source = scenario if scenario is not None else cfg.get("scenario", "scenario.toml")
        out_dir = Path(out if out is not None else cfg.get("out-dir", "runs/flower"))
        out_dir = out_dir if out_dir.is_absolute() else base / out_dir
        if (out_dir / "scenario.toml").is_file():
            print(f"fedlt: continuing the run in {out_dir} from its checkpoint", flush=True)
            run = Run.open(out_dir)
        else:
            path = Path(str(source))
            resolved = load_scenario(path if path.is_absolute() else base / path)
            resolved.engine.kind = "flower"  # training goes through this Grid whatever the file says
            run = Run.create(resolved, out_dir)
        with attach_grid(grid):
            summary = run.execute()
        # print, not log: `flwr run --stream` shows the ServerApp's output.
        print(f"fedlt: run finished in {out_dir}; final metrics: {summary['final']}", flush=True)

    return app
