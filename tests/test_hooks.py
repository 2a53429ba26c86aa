"""The hook contract: discovery, scenario order, state round-trip, error attribution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import fedlt
from fedlt import pluginmanager
from fedlt.errors import PluginError, ScenarioError
from fedlt.pluginmanager import Plugin, PluginInfo, build_hooks, discover_plugins, hookimpl


def _install(monkeypatch, **classes: type[Plugin]) -> None:
    """Make inline plugin classes discoverable, as if installed by some distribution."""
    real = discover_plugins()
    fake = {name: PluginInfo(name, f"tests:{cls.__name__}", "tests", cls) for name, cls in classes.items()}
    monkeypatch.setattr(pluginmanager, "discover_plugins", lambda: {**real, **fake})


class Tagger(Plugin):
    """Appends its tag to a shared log in a chain hook, to observe call order."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tag: str = "x"

    log: ClassVar[list[str]] = []

    @hookimpl
    def client_transform_logits(self, logits):
        Tagger.log.append(self.params.tag)
        return logits


class Counter(Plugin):
    """Counts rounds per client in `state` and in global state, and sends a payload."""

    def __init__(self, params=None):
        super().__init__(params)
        self.total = 0
        self.payloads: dict[int, dict[int, int]] = {}

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
        self.payloads[ctx.round] = dict(payloads)

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state):
        self.total = state["total"]


class Exploder(Plugin):
    @hookimpl
    def client_loss(self, logits, y):
        raise RuntimeError("boom")


def test_builtin_plugins_are_discovered_through_entry_points():
    found = discover_plugins()
    assert {"focal", "balanced-softmax"} <= set(found)
    assert found["focal"].distribution == "fedlt"
    assert found["focal"].value == "fedlt_plugins.focal:Focal"
    assert found["focal"].hooks == ["client_loss", "configure_model"]
    assert [p["name"] for p in found["focal"].parameters()] == ["gamma", "alpha"]


def test_calls_follow_scenario_order_not_registration_order(monkeypatch, tiny):
    class First(Tagger):
        pass

    class Second(Tagger):
        pass

    _install(monkeypatch, second=Second, first=First)
    Tagger.log = []
    tiny["federation"]["rounds"] = 1
    tiny["plugins"] = [{"name": "second", "tag": "B"}, {"name": "first", "tag": "A"}]
    hooks = build_hooks(fedlt.load_scenario(tiny).plugins)
    assert hooks.client_transform_logits.plugin_names == ["second", "first"]
    hooks.client_transform_logits.chain("logits", logits=torch.zeros(1), states={})
    assert Tagger.log == ["B", "A"]


def test_chain_passes_each_output_to_the_next(monkeypatch):
    class AddOne(Plugin):
        @hookimpl
        def eval_logits(self, logits):
            return logits + 1

    class Double(Plugin):
        @hookimpl
        def eval_logits(self, logits):
            return logits * 2

    infos = {n: PluginInfo(n, "t", "t", c) for n, c in {"add": AddOne, "double": Double}.items()}
    spec = fedlt.load_scenario({"plugins": [{"name": "add"}, {"name": "double"}]}).plugins
    hooks = build_hooks(spec, infos)
    assert hooks.eval_logits.chain("logits", logits=torch.tensor([1.0]), states=None).item() == 4.0
    hooks = build_hooks(list(reversed(spec)), infos)
    assert hooks.eval_logits.chain("logits", logits=torch.tensor([1.0]), states=None).item() == 3.0


def test_per_client_and_global_state_round_trip_through_resume(monkeypatch, tiny, tmp_path):
    _install(monkeypatch, counter=Counter)
    tiny["plugins"] = [{"name": "counter"}]
    tiny["federation"].update(rounds=4, fraction_clients=0.5)
    fedlt.run(tiny, out=tmp_path / "a")
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    states = ckpt["client_states"]
    # Every selection of every round is counted in the client's own state ...
    from fedlt.runner import select_clients

    expected: dict[int, int] = {}
    for r in range(1, 5):
        for c in select_clients(3, r, 4, 0.5):
            expected[c] = expected.get(c, 0) + 1
    assert {c: s["counter"]["rounds"] for c, s in states.items() if s} == expected
    # ... and the global state counts all client-rounds.
    assert ckpt["plugins"]["counter"]["total"] == sum(expected.values())


def test_payloads_reach_the_plugins_server_half(monkeypatch, tiny, tmp_path):
    captured = {}

    class Spy(Counter):
        def server_after_aggregate(self, ctx, payloads):
            captured[ctx.round] = dict(payloads)

    Spy.server_after_aggregate = hookimpl(Spy.server_after_aggregate)
    _install(monkeypatch, spy=Spy)
    tiny["plugins"] = [{"name": "spy"}]
    fedlt.run(tiny, out=tmp_path / "r")
    from fedlt.runner import select_clients

    for r in (1, 2, 3):
        selected = select_clients(3, r, 4, 0.5)
        assert sorted(captured[r]) == selected
        assert all(captured[r][c] >= 1 for c in selected)


def test_error_in_hook_names_plugin_and_hook(monkeypatch, tiny, tmp_path):
    _install(monkeypatch, exploder=Exploder)
    tiny["plugins"] = [{"name": "exploder"}]
    with pytest.raises(PluginError) as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert info.value.plugin == "exploder" and info.value.hook == "client_loss"
    assert "RuntimeError: boom" in str(info.value)


def test_misspelt_hook_is_rejected_at_registration(monkeypatch):
    class Typo(Plugin):
        @hookimpl
        def client_los(self, logits):
            return logits

    with pytest.raises(PluginError, match="unknown hook 'client_los'") as info:
        build_hooks(
            fedlt.load_scenario({"plugins": [{"name": "typo"}]}).plugins,
            {"typo": PluginInfo("typo", "t", "t", Typo)},
        )
    assert info.value.plugin == "typo"


def test_unknown_hook_argument_is_rejected(monkeypatch):
    class BadArg(Plugin):
        @hookimpl
        def client_loss(self, logits, labels):
            return logits

    with pytest.raises(PluginError, match="labels") as info:
        build_hooks(
            fedlt.load_scenario({"plugins": [{"name": "bad"}]}).plugins,
            {"bad": PluginInfo("bad", "t", "t", BadArg)},
        )
    assert info.value.plugin == "bad"


def test_unknown_plugin_and_bad_parameter(tiny):
    tiny["plugins"] = [{"name": "focall"}]
    with pytest.raises(ScenarioError, match=r"'plugins\[0\].name'.*installed plugin: .*focal"):
        build_hooks(fedlt.load_scenario(tiny).plugins)
    tiny["plugins"] = [{"name": "focal", "gamma": -1}]
    with pytest.raises(ScenarioError, match=r"'plugins\[0\].gamma'.*plugin 'focal'.*Got -1"):
        build_hooks(fedlt.load_scenario(tiny).plugins)
    tiny["plugins"] = [{"name": "focal", "gama": 1}]
    with pytest.raises(ScenarioError, match=r"'plugins\[0\].gama'.*a parameter of plugin 'focal'"):
        build_hooks(fedlt.load_scenario(tiny).plugins)


def test_plugin_params_typed_with_field_constraints():
    class P(Plugin):
        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")
            beta: float = Field(0.9, gt=0, lt=1)

    hooks = build_hooks(
        fedlt.load_scenario({"plugins": [{"name": "p", "beta": 0.5}]}).plugins,
        {"p": PluginInfo("p", "t", "t", P)},
    )
    assert hooks.plugins[0].params.beta == 0.5


def test_engine_never_imports_plugins():
    code = (
        "import sys, fedlt, fedlt.runner, fedlt.cli, fedlt.pluginmanager, fedlt.evaluation;"
        "assert not any(m == 'fedlt_plugins' or m.startswith('fedlt_plugins.') for m in sys.modules), "
        "[m for m in sys.modules if 'plugins' in m]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    engine = Path(fedlt.__file__).parent
    for path in engine.rglob("*.py"):
        text = path.read_text()
        assert "fedlt_plugins" not in text and "from plugins" not in text, path
