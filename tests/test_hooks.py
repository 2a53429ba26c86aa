"""The hook contract: discovery, declarations, scenario order, state, instances, checked results."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import fedlt
from fedlt.errors import PluginError, ScenarioError
from fedlt.hooks import hookspecs
from fedlt.hooks.discovery import PluginInfo, discover_plugins
from fedlt.hooks.dispatch import build_hooks
from fedlt.hooks.lifetimes import PluginWarning
from fedlt.hooks.plugin import Plugin, hookimpl, implementations
from fedlt.hooks.spec import COMBINE_RULES, HookSpec
from fedlt.server.aggregation import FedAvg
from fedlt.server.rounds import select_clients


class Tagger(Plugin):
    """Appends its tag to a shared log in a chain hook, to observe call order."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tag: str = "x"

    log: ClassVar[list[str]] = []

    @hookimpl
    def eval_logits(self, logits):
        Tagger.log.append(self.params.tag)
        return logits


class Counter(Plugin):
    """Counts rounds per client in `state` and in global state, and sends a payload."""

    def __init__(self, params=None):
        super().__init__(params)
        self.total = 0

    @hookimpl
    def client_start(self, ctx, state):
        state["rounds"] = state.get("rounds", 0) + 1
        state["last"] = ctx.round

    @hookimpl
    def client_end(self, ctx, state):
        return state["rounds"]

    @hookimpl
    def server_after_aggregate(self, ctx, payloads):
        self.total += len(payloads)

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state):
        self.total = state["total"]


def _hooks(classes: dict[str, type[Plugin]], specs: list[dict]) -> object:
    infos = {n: PluginInfo(n, "t", "t", c) for n, c in classes.items()}
    return build_hooks(fedlt.load_scenario({"plugins": specs}).plugins, infos)


# --------------------------------------------------------------------------- declarations


def test_every_hook_is_declared_once_with_its_rules():
    assert list(hookspecs.SPECS) == [n for n, v in vars(hookspecs).items() if isinstance(v, HookSpec)]
    for name, spec in hookspecs.SPECS.items():
        assert spec.name == name and spec.combine in COMBINE_RULES
        assert spec.side in ("model", "data", "server", "client", "eval") and spec.when and spec.since
        assert spec.summary, name
        if spec.combine == "chain":
            assert spec.chain_arg == spec.params[0]
    # The old parallel tables are gone: the declaration is the only source.
    assert not hasattr(hookspecs, "COMBINE") and not hasattr(hookspecs, "FIRSTRESULT")


def test_builtin_plugins_are_discovered_through_entry_points():
    found = discover_plugins()
    assert {"focal", "balanced-softmax"} <= set(found)
    assert found["focal"].distribution == "fedlt"
    assert found["focal"].value == "fedlt_plugins.focal:Focal"
    assert sorted(found["focal"].hooks) == ["client_loss", "client_start", "configure_model"]
    assert [p["name"] for p in found["focal"].parameters()] == ["gamma", "alpha"]
    assert found["focal"].description.startswith("Focal loss")


# --------------------------------------------------------------------------- order and combine


def test_calls_follow_scenario_order_not_registration_order():
    class First(Tagger):
        pass

    class Second(Tagger):
        pass

    hooks = _hooks(
        {"second": Second, "first": First}, [{"name": "second", "tag": "B"}, {"name": "first", "tag": "A"}]
    )
    Tagger.log = []
    assert hooks.eval_logits.plugin_names == ["second", "first"]
    hooks.eval_logits(logits=torch.zeros(1), features=None, model=None, ctx=None)
    assert Tagger.log == ["B", "A"]


def test_chain_passes_each_output_to_the_next():
    class AddOne(Plugin):
        @hookimpl
        def eval_logits(self, logits):
            return logits + 1

    class Double(Plugin):
        @hookimpl
        def eval_logits(self, logits):
            return logits * 2

    classes = {"add": AddOne, "double": Double}
    hooks = _hooks(classes, [{"name": "add"}, {"name": "double"}])
    assert hooks.eval_logits(logits=torch.tensor([1.0])).item() == 4.0  # (1 + 1) * 2
    hooks = _hooks(classes, [{"name": "double"}, {"name": "add"}])
    assert hooks.eval_logits(logits=torch.tensor([1.0])).item() == 3.0  # 1 * 2 + 1


def test_merge_later_plugins_win_and_first_result_stops():
    class A(Plugin):
        @hookimpl
        def server_configure_round(self):
            return {"k": 1, "a": 1}

    class B(Plugin):
        @hookimpl
        def server_configure_round(self):
            return {"k": 2}

    hooks = _hooks({"a": A, "b": B}, [{"name": "a"}, {"name": "b"}])
    assert hooks.server_configure_round(ctx=None) == {"k": 2, "a": 1}


# --------------------------------------------------------------------------- registration errors


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "@hookimpl\n    def client_los(self, logits): return logits",
            "unknown hook 'client_los'.*client_loss",
        ),
        (
            "@hookimpl\n    def client_loss(self, logits, labels): return logits",
            r"\['labels'\] are not passed",
        ),
        ("def client_loss(self, logits, y): return logits", "named like a hook but is not marked @hookimpl"),
        ("@hookimpl\n    def client_loss(self, **kw): return None", "named arguments only"),
    ],
    ids=["misspelt", "unknown-argument", "unmarked", "varkw"],
)
def test_plugin_class_mistakes_are_rejected_at_registration(body, message):
    namespace: dict = {"Plugin": Plugin, "hookimpl": hookimpl}
    exec(f"class Bad(Plugin):\n    {body}\n", namespace)
    with pytest.raises(PluginError, match=message) as info:
        _hooks({"bad": namespace["Bad"]}, [{"name": "bad"}])
    assert info.value.plugin == "bad"


def test_unknown_plugin_and_bad_parameter(tiny):
    tiny["plugins"] = [{"name": "focall"}]
    with pytest.raises(ScenarioError, match=r"'plugins\[0\].name'.*installed plugin: .*focal"):
        build_hooks(fedlt.load_scenario(tiny).plugins)
    tiny["plugins"] = [{"name": "focal", "gamma": -1}]
    with pytest.raises(ScenarioError, match=r"'plugins\[0\].gamma' value must be a number >= 0.*Got -1"):
        build_hooks(fedlt.load_scenario(tiny).plugins)
    tiny["plugins"] = [{"name": "focal", "gama": 1}]
    with pytest.raises(ScenarioError, match=r"'plugins\[0\].gama'.*a parameter of plugin 'focal'"):
        build_hooks(fedlt.load_scenario(tiny).plugins)


def test_plugin_params_typed_with_field_constraints():
    class P(Plugin):
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            beta: float = Field(0.9, gt=0, lt=1)

    assert _hooks({"p": P}, [{"name": "p", "beta": 0.5}]).plugins[0].params.beta == 0.5


# --------------------------------------------------------------------------- state and instances


def test_per_client_and_global_state_round_trip_through_resume(install_plugins, tiny, tmp_path):
    install_plugins(counter=Counter)
    tiny["plugins"] = [{"name": "counter"}]
    tiny["federation"].update(rounds=4, fraction_clients=0.5)
    fedlt.run(tiny, out=tmp_path / "a")
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    expected: dict[int, int] = {}
    for r in range(1, 5):
        for c in select_clients(3, r, 4, 0.5):
            expected[c] = expected.get(c, 0) + 1
    states = ckpt["client_states"]
    assert {c: s["counter"]["rounds"] for c, s in states.items() if s} == expected
    assert ckpt["plugins"]["counter"]["total"] == sum(expected.values())


class ServerToSelf(Plugin):
    """Sets an attribute in a server hook and reads it in a client hook: the mistake the
    fresh client instance makes visible on every engine."""

    @hookimpl
    def server_configure_round(self, ctx):
        self.mu = 0.1

    @hookimpl
    def client_extra_losses(self, logits):
        return self.mu * logits.square().mean()


def test_client_hooks_never_see_attributes_set_by_server_hooks(install_plugins, tiny, tmp_path):
    install_plugins(leaky=ServerToSelf)
    tiny["plugins"] = [{"name": "leaky"}]
    # Warned before the run (read from the source), then failing where the client reads it.
    with (
        pytest.warns(PluginWarning, match=r"sets self\.mu"),
        pytest.raises(PluginError, match=r"AttributeError.*mu") as info,
    ):
        fedlt.run(tiny, out=tmp_path / "r")
    assert (info.value.plugin, info.value.hook, info.value.round) == ("leaky", "client_extra_losses", 1)
    assert info.value.client == select_clients(3, 1, 4, 0.5)[0]


def test_client_instance_is_fresh_per_client_round_and_its_scratch_lives_through_it(
    install_plugins, tiny, tmp_path
):
    seen: list[tuple[int, int, int]] = []

    class Scratch(Plugin):
        @hookimpl
        def client_start(self, ctx):
            assert not hasattr(self, "calls"), "a client instance was reused"
            self.calls = 0

        @hookimpl
        def client_loss(self, logits, y):
            self.calls += 1
            return None

        @hookimpl
        def client_end(self, ctx):
            seen.append((ctx.round, ctx.client_id, self.calls))

    install_plugins(scratch=Scratch)
    tiny["plugins"] = [{"name": "scratch"}]
    fedlt.run(tiny, out=tmp_path / "r")
    assert [(r, c) for r, c, _ in seen] == [(r, c) for r in (1, 2, 3) for c in select_clients(3, r, 4, 0.5)]
    assert all(n >= 1 for _, _, n in seen)


# --------------------------------------------------------------------------- checked results


def _bad(hook: str, body: str) -> type[Plugin]:
    namespace: dict = {"Plugin": Plugin, "hookimpl": hookimpl, "torch": torch, "FedAvg": FedAvg}
    exec(f"class Bad(Plugin):\n    @hookimpl\n{body}\n", namespace)
    return namespace["Bad"]


@pytest.mark.parametrize(
    ("hook", "body", "message", "located"),
    [
        (
            "client_sample_weights",
            "    def client_sample_weights(self, y): return torch.ones(len(y), 1)",
            r"shape \(\d+, 1\).*\(B, 1\) tensor would broadcast",
            True,
        ),
        (
            "client_loss",
            "    def client_loss(self, logits, y): return torch.nn.functional.cross_entropy(logits, y)",
            r"shape \(\).*reduction='none'",
            True,
        ),
        (
            "client_extra_losses",
            "    def client_extra_losses(self, logits): return logits.sum(1)",
            r"expected a 0-dimensional \(scalar\) tensor",
            True,
        ),
        (
            "client_transform_logits",
            "    def client_transform_logits(self, logits): return logits[:, :3]",
            "expected logits of the same shape",
            True,
        ),
        (
            "client_end",
            "    def client_end(self): return {'f': lambda: 0}",
            r"payload\['f'\] is a function",
            True,
        ),
        (
            "state",
            "    def client_start(self, state): state['f'] = lambda: 0",
            r"state\['f'\] is a function",
            True,
        ),
        (
            "server_make_aggregator",
            "    def server_make_aggregator(self, global_weights):\n"
            "        class Agg:\n"
            "            def add(self, w, n, c): pass\n"
            "            def result(self): return {k: torch.zeros(1) for k in global_weights}\n"
            "        return Agg()",
            r"result\(\) returned shape \(1,\)",
            False,
        ),
        (
            "server_make_aggregator",
            "    def server_make_aggregator(self, global_weights):\n"
            "        class Agg:\n"
            "            def add(self, w, n, c): pass\n"
            "            def result(self): return {'nope': torch.zeros(1)}\n"
            "        return Agg()",
            r"unknown key 'nope'",
            False,
        ),
        (
            "server_configure_round",
            "    def server_configure_round(self): return {'f': print}",
            r"config\['f'\] is a function",
            False,
        ),
        (
            "eval_metrics",
            "    def eval_metrics(self, logits): return {'m': torch.ones(1)}",
            "values must be numbers",
            False,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v and len(v) < 30 else None,
)
def test_hook_results_are_checked_on_arrival(install_plugins, tiny, tmp_path, hook, body, message, located):
    install_plugins(bad=_bad(hook, body))
    tiny["plugins"] = [{"name": "bad"}]
    with pytest.raises(PluginError, match=message) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert info.value.plugin == "bad" and info.value.hook == hook
    assert info.value.round == 1
    if located:
        assert info.value.client == select_clients(3, 1, 4, 0.5)[0]


def test_sampler_may_only_draw_the_clients_own_samples(install_plugins, tiny, tmp_path):
    class Thief(Plugin):
        @hookimpl
        def client_select_indices(self, ctx):
            return torch.arange(ctx.x_train.shape[0])  # the whole federation's data

    install_plugins(thief=Thief)
    tiny["plugins"] = [{"name": "thief"}]
    with pytest.raises(PluginError, match="not the client's own samples") as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert info.value.hook == "client_select_indices"


def test_global_state_must_be_plain_data(install_plugins, tiny, tmp_path):
    class Keeper(Plugin):
        def state_dict(self):
            return {"fn": np.zeros(2)}

    install_plugins(keeper=Keeper)
    tiny["plugins"] = [{"name": "keeper"}]
    with pytest.raises(PluginError, match=r"state_dict\(\)\['fn'\] is a numpy.ndarray") as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert info.value.hook == "state_dict"


# --------------------------------------------------------------------------- hooks with behaviour


def test_server_make_aggregator_gets_global_weights_and_its_result_is_the_model(
    install_plugins, tiny, tmp_path
):
    """A plugin aggregator that keeps the global weights and adds 1 to every bias: the model
    after each round must be exactly that (computed here by hand from the weights it received)."""
    received: dict[int, dict[str, torch.Tensor]] = {}

    class ShiftBias(Plugin):
        @hookimpl
        def server_make_aggregator(self, global_weights, ctx):
            received[ctx.round] = {k: v.clone() for k, v in global_weights.items()}

            class Agg:
                def add(self, weights, n_samples, client_id):
                    pass

                def result(self):
                    return {k: v + 1.0 for k, v in received[ctx.round].items() if k.endswith("bias")}

            return Agg()

    install_plugins(shift=ShiftBias)
    tiny["plugins"] = [{"name": "shift"}]
    tiny["federation"]["rounds"] = 2
    fedlt.run(tiny, out=tmp_path / "r")
    final = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["global"]
    for k, v in received[2].items():
        expected = v + 1.0 if k.endswith("bias") else v
        assert torch.equal(final[k], expected), k
    for k, v in received[1].items():  # round 2 started from round 1's result
        assert torch.equal(received[2][k], v + 1.0 if k.endswith("bias") else v), k


def test_client_after_backward_runs_before_the_step(install_plugins, tiny, tmp_path):
    """Zeroing every gradient after backward freezes training: plain SGD without momentum or
    weight decay then leaves every client's weights where they were, and their average equals
    them up to the rounding of the sample-weighted mean."""

    class ZeroGrads(Plugin):
        @hookimpl
        def client_after_backward(self, model):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    install_plugins(zero=ZeroGrads)
    tiny["plugins"] = [{"name": "zero"}]
    tiny["federation"]["rounds"] = 2
    from fedlt.driver.runner import Run

    run = Run.create(fedlt.load_scenario(tiny), tmp_path / "r")
    initial = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.execute()
    for k, v in run.model.state_dict().items():
        assert torch.allclose(v, initial[k], rtol=1e-6, atol=1e-7), k


def test_per_client_channel_sets_one_clients_learning_rate(install_plugins, tiny, tmp_path):
    """server_configure_client sends lr=0 to the first selected client only; its
    client_configure_training applies it, so that client returns the global weights unchanged
    while the others move."""
    returned: dict[int, dict[str, torch.Tensor]] = {}
    frozen = select_clients(3, 1, 4, 0.5)[0]

    class PerClientLR(Plugin):
        @hookimpl
        def server_configure_client(self, client_id, ctx):
            return {"lr": 1e-30} if client_id == frozen else None

        @hookimpl
        def client_configure_training(self, recipe, ctx):
            return recipe.replace(lr=ctx.config["lr"]) if "lr" in ctx.config else recipe

        @hookimpl
        def server_make_aggregator(self, global_weights, ctx):
            start = {k: v.clone() for k, v in global_weights.items()}

            class Spy(FedAvg):
                def add(self, weights, n_samples, client_id):
                    returned[client_id] = {k: weights[k] - start[k] for k in start}
                    super().add(weights, n_samples, client_id)

            return Spy(global_weights)

    install_plugins(lr=PerClientLR)
    tiny["plugins"] = [{"name": "lr"}]
    tiny["federation"]["rounds"] = 1
    fedlt.run(tiny, out=tmp_path / "r")
    for client, delta in returned.items():
        moved = max(float(d.abs().max()) for d in delta.values())
        assert (moved < 1e-20) == (client == frozen), (client, moved)


def test_round_context_generator_is_seeded_by_seed_round_and_purpose():
    from fedlt.hooks.context import RoundContext

    def ctx(seed: int, r: int) -> RoundContext:
        return RoundContext(r, 5, seed, 3, (0,), {}, np.zeros(3), np.zeros((1, 3)))

    draw = lambda c, p: torch.rand(4, generator=c.generator(p))  # noqa: E731
    assert torch.equal(draw(ctx(1, 2), "a"), draw(ctx(1, 2), "a"))
    assert not torch.equal(draw(ctx(1, 2), "a"), draw(ctx(1, 3), "a"))
    assert not torch.equal(draw(ctx(1, 2), "a"), draw(ctx(1, 2), "b"))
    assert not torch.equal(draw(ctx(1, 2), "a"), draw(ctx(2, 2), "a"))


def test_class_weights_normalise_the_loss_by_their_sum(install_plugins, tiny, tmp_path):
    """Constant class weights c: the loss is sum(c l) / sum(c) = mean(l), so training equals plain
    FedAvg; as sample weights they scale the loss by c. A plugin still declaring the deprecated
    ``class_weighting`` has its sample weights taken as class weights, with a warning."""

    class ClassWeights(Plugin):
        @hookimpl
        def client_class_weights(self, y):
            return torch.full(y.shape, 3.0)

    class SampleWeights(Plugin):
        @hookimpl
        def client_sample_weights(self, y):
            return torch.full(y.shape, 3.0)

    class Legacy(SampleWeights):
        class_weighting = True

    with pytest.warns(DeprecationWarning, match="class_weighting = True is deprecated"):
        install_plugins(cw=ClassWeights, sw=SampleWeights, legacy=Legacy)
        implementations(Legacy, "legacy")
    tiny["federation"]["rounds"] = 2
    base = fedlt.run(tiny, out=tmp_path / "base")["final"]["accuracy"]
    w = {}
    for name in ("cw", "sw", "legacy"):
        tiny["plugins"] = [{"name": name}]
        fedlt.run(tiny, out=tmp_path / name)
        w[name] = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["global"]
    plain = torch.load(tmp_path / "base" / "checkpoint.pt", weights_only=True)["global"]
    assert base is not None
    assert all(torch.allclose(w["cw"][k], plain[k], atol=1e-6) for k in plain)
    assert all(torch.equal(w["legacy"][k], w["cw"][k]) for k in plain)
    assert not all(torch.allclose(w["sw"][k], plain[k], atol=1e-3) for k in plain)


def test_eval_metrics_and_loggers(install_plugins, tiny, tmp_path):
    logged: list[dict] = []
    ended: list[dict] = []

    class Metric(Plugin):
        @hookimpl
        def eval_metrics(self, logits, labels, ctx):
            return {"n": int(labels.numel()), "client": ctx.client_id}

        @hookimpl
        def server_log_metrics(self, record, ctx):
            assert ctx.run_dir == tmp_path / "r" and ctx.round == record["round"]
            logged.append(dict(record))

        @hookimpl
        def server_end(self, summary):
            ended.append(dict(summary))

    install_plugins(metric=Metric)
    tiny["plugins"] = [{"name": "metric"}]
    summary = fedlt.run(tiny, out=tmp_path / "r")
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    from fedlt.data.federated import build_federated_data

    data = build_federated_data(fedlt.load_scenario(tiny))
    assert [rec["metric.n"] for rec in lines] == [int(data.y_test.numel())] * 3
    views = [k for k in range(4) if len(data.test_views[k])]
    assert lines[-1]["client_metrics"]["clients"] == views
    assert lines[-1]["client_metrics"]["metric.n"] == [len(data.test_views[k]) for k in views]
    assert lines[-1]["personalized.metric.n"] == pytest.approx(
        np.mean([len(data.test_views[k]) for k in views])
    )
    assert summary["final"]["metric.n"] == int(data.y_test.numel())
    assert [rec["round"] for rec in logged] == [1, 2, 3] and logged == lines
    assert ended == [summary]


def test_hookspecs_imports_nothing_of_the_engine_at_runtime():
    tree = ast.parse(Path(hookspecs.__file__).read_text())
    runtime = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert {getattr(n, "module", None) for n in runtime} <= {"__future__", "typing", "fedlt.hooks.spec"}


# --------------------------------------------------------------------------- the spec carries it all


def test_every_check_rule_is_implemented_and_every_declared_check_known():
    from fedlt.hooks.dispatch import CHECKS
    from fedlt.hooks.spec import CHECK_RULES

    assert set(CHECKS) == set(CHECK_RULES)
    for spec in hookspecs.SPECS.values():
        assert spec.check is None or spec.check in CHECK_RULES, spec.name
        assert not (spec.vmap or spec.stream_only) or spec.side == "client", spec.name
        assert set(spec.by_plugin) <= set(spec.params), spec.name


def test_bad_declarations_fail_when_declared():
    from fedlt.hooks.spec import hookspec

    def f(x):  # pragma: no cover - only its signature is read
        """A hook."""

    with pytest.raises(ValueError, match="unknown check rule"):
        hookspec(combine="all", side="client", when="x", check="nope")(f)
    with pytest.raises(ValueError, match="only client-side hooks"):
        hookspec(combine="all", side="server", when="x", vmap=True)(f)
    with pytest.raises(ValueError, match="routes unknown arguments"):
        hookspec(combine="all", side="server", when="x", by_plugin=("y",))(f)


def test_stream_only_hooks_are_not_bound_offline(install_plugins):
    arrived = []

    class Arrives(Plugin):
        @hookimpl
        def client_stream_batch(self, batch):
            arrived.append(batch)

        @hookimpl
        def client_start(self):
            pass

    install_plugins(arrives=Arrives)
    hooks = build_hooks(fedlt.load_scenario({"plugins": [{"name": "arrives"}]}).plugins)
    assert hooks.for_client(0, 1, {}, streaming=True).client_stream_batch
    offline = hooks.for_client(0, 1, {}, streaming=False)
    assert not offline.client_stream_batch and offline.client_start


def test_routed_arguments_reach_each_plugin_its_own(install_plugins):
    got = {}

    def plugin(tag: str) -> type[Plugin]:
        class Reads(Plugin):
            @hookimpl
            def server_after_aggregate(self, payloads):
                got[f"{tag}.payloads"] = payloads

            @hookimpl
            def eval_logits(self, logits, state):
                got[f"{tag}.state"] = state
                return logits

        return Reads

    install_plugins(a=plugin("a"), b=plugin("b"))
    hooks = build_hooks(fedlt.load_scenario({"plugins": [{"name": "a"}, {"name": "b"}]}).plugins)
    hooks.server_after_aggregate(payloads={"a": {1: "x"}}, model=None, ctx=None)
    hooks.eval_logits(logits=torch.zeros(1), features=None, model=None, ctx=None, state={"b": {"k": 2}})
    assert got == {"a.payloads": {1: "x"}, "b.payloads": {}, "a.state": {}, "b.state": {"k": 2}}
