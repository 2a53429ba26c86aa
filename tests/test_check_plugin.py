"""What plugin authors are told: fedlt.testing's checks, state on self, contracts, removed names,
distribution-qualified names.

Each bad plugin here is a mistake a plugin author made against an earlier fedlt and that ran
without a word: a server attribute read by a client hook (plain FedAvg), a client counter on self
(always 1), a client writing self for the server (never seen), a loss that is the default one, a
vectorized hook reading a per-client fact. Each must now fail, naming the check and the attribute.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel

import fedlt
from fedlt import ClientContext, Plugin, PluginError, hookimpl
from fedlt.cli import main
from fedlt.hooks import discovery
from fedlt.hooks.lifetimes import PluginWarning, static_problems
from fedlt.testing import PluginCheckError, check_plugin, parametrize_with_checks, plugin_checks

# --------------------------------------------------------------------------- plugins


class ProxParams(BaseModel):
    mu: float = 0.5


class GoodProx(Plugin):
    """FedProx done right: the anchor is copied onto this client-round's instance in client_start."""

    Params = ProxParams
    vectorized = True

    @hookimpl
    def client_start(self, model: torch.nn.Module) -> None:
        self.anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    @hookimpl
    def client_extra_losses(self, model: torch.nn.Module) -> torch.Tensor:
        trained = [p for p in model.parameters() if p.requires_grad]
        return (
            0.5
            * self.params.mu
            * sum((p - a).pow(2).sum() for p, a in zip(trained, self.anchor, strict=True))
        )


class ServerDefault(Plugin):
    """Sets mu in server_setup and reads it in a client hook: clients see the class default (0)."""

    mu: ClassVar[float] = 0.0

    @hookimpl
    def server_setup(self) -> None:
        self.mu = 0.5

    @hookimpl
    def client_extra_losses(self, model: torch.nn.Module) -> torch.Tensor:
        return self.mu * sum(p.pow(2).sum() for p in model.parameters())


class ClientCounter(Plugin):
    """Counts its client's rounds on self: a fresh instance each round, so it is always 1."""

    @hookimpl
    def client_start(self) -> None:
        self.count = getattr(self, "count", 0) + 1

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / self.count, y, reduction="none")


class ClientTellsServer(Plugin):
    """A client writes self for the server: the server's instance never sees it."""

    @hookimpl
    def client_end(self, ctx: ClientContext) -> None:
        self.last_client = ctx.client_id

    @hookimpl
    def server_after_aggregate(self, model: torch.nn.Module) -> None:
        if getattr(self, "last_client", None) is not None:
            with torch.no_grad():
                model.head.bias.add_(0.01)


class DefaultLoss(Plugin):
    """Returns the default loss: it changes nothing."""

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none")


class VectorizedReadsId(Plugin):
    """Declares vectorized = True but reads a per-client fact per batch."""

    vectorized = True

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none") * (1 + ctx.client_id % 2)


class PerSampleClassWeights(Plugin):
    """Returns per-sample (not per-class) weights from client_class_weights."""

    @hookimpl
    def client_class_weights(self, y: torch.Tensor) -> torch.Tensor:
        return torch.linspace(0.5, 1.5, y.shape[0])


class UsesExtra(Plugin):
    """Written for contract 0.1: keeps scratch in ctx.extra."""

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        ctx.extra["seen"] = True


# --------------------------------------------------------------------------- the checks


def test_a_good_plugin_passes_every_check_that_applies(tmp_path):
    report = check_plugin(GoodProx, {"mu": 0.5}, engines=("serial", "vectorized"), out=tmp_path)
    assert report["checks"] == [
        "registration",
        "fresh instances and checked results",
        "self lives where it is read",
        "state round-trip",
        "resume == uninterrupted",
        "has an effect",
        "serial == vectorized",
    ]
    assert report["skipped"] == []


@pytest.mark.parametrize(
    ("plugin", "check", "says"),
    [
        (ServerDefault, "self lives where it is read", "server hook server_setup sets self.mu"),
        (ClientCounter, "self lives where it is read", "reads self.count before this client-round set it"),
        (ClientTellsServer, "self lives where it is read", "client hook client_end sets self.last_client"),
        (DefaultLoss, "has an effect", "exactly the weights of training without it"),
        (VectorizedReadsId, "serial == vectorized", "ctx.client_id is a per-client fact"),
        (PerSampleClassWeights, "class weights depend only on the class", "per-sample weights belong"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_each_silent_mistake_fails_its_check(plugin, check, says, tmp_path):
    with pytest.raises(PluginCheckError) as info:
        check_plugin(plugin, engines=("serial", "vectorized"), out=tmp_path)
    assert info.value.check == check and says in str(info.value), str(info.value)


def test_checks_follow_the_declarations():
    names = lambda plugin, **kw: [c.name for c in plugin_checks(plugin, **kw)]  # noqa: E731
    assert "serial == vectorized" in names(GoodProx)
    assert "serial == vectorized" not in names(DefaultLoss)  # not declared vectorized
    assert "class weights depend only on the class" in names(PerSampleClassWeights)
    assert "has an effect" not in names(GoodProx, skip=("has an effect",))
    # a plugin needing a stream gets one; a plugin needing another gets it listed first
    (check, *_) = plugin_checks("replay")
    assert check.session.base["stream"]["kind"] == "si-blurry"
    (check, *_) = plugin_checks("mvp-mask")
    assert [p["name"] for p in check.session.base["plugins"]] == ["mvp-prompts", "mvp-mask"]
    assert check.session.base["model"]["name"] == "vit"


@parametrize_with_checks(GoodProx, {"mu": 0.5}, engines=("serial", "vectorized"))
def test_each_check_is_a_test_of_its_own(check):
    check()


def test_built_in_plugins_pass_their_checks(tmp_path):
    for name, params in [("class-balanced", {}), ("logit-adjust", {"tau": 1.5}), ("gla-fr", {})]:
        report = check_plugin(name, params, engines=("serial", "vectorized"), out=tmp_path / name)
        assert "serial == vectorized" in report["checks"], name


# --------------------------------------------------------------------------- state on self at run time


def test_a_run_warns_of_state_on_self_that_cannot_be_seen(tiny, tmp_path, install_plugins):
    install_plugins(**{"server-default": ServerDefault})
    tiny["plugins"] = [{"name": "server-default"}]
    with pytest.warns(PluginWarning, match=r"server hook server_setup sets self\.mu.*ctx\.config"):
        fedlt.run(tiny, out=tmp_path / "r", federation__rounds=1)
    assert static_problems(GoodProx, "good") == ()


# --------------------------------------------------------------------------- contract versions


class Declares01(DefaultLoss):
    contract = "0.1"


class Declares04(DefaultLoss):
    contract = "0.4"


class Declares02(DefaultLoss):
    contract = "0.2"


def test_a_plugin_written_for_an_old_contract_is_told_what_changed(tiny, tmp_path, install_plugins, capsys):
    install_plugins(old=Declares01, new=Declares04, compatible=Declares02)
    for name, says in [("old", "ctx.extra is gone"), ("new", "upgrade fedlt")]:
        tiny["plugins"] = [{"name": name}]
        path = tmp_path / f"{name}.toml"
        import tomli_w

        path.write_text(tomli_w.dumps(tiny))
        assert main(["validate", str(path)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert says in err and f"'{name}'" in err, err
    tiny["plugins"] = [{"name": "compatible"}]
    fedlt.run(tiny, out=tmp_path / "ok", federation__rounds=1)  # 0.2 plugins still run


def test_removed_context_names_say_what_replaced_them(tiny, tmp_path, install_plugins):
    install_plugins(**{"uses-extra": UsesExtra})
    tiny["plugins"] = [{"name": "uses-extra"}]
    with pytest.raises(PluginError, match=r"ctx\.extra was removed in plugin contract 0\.2.*self") as info:
        fedlt.run(tiny, out=tmp_path / "r", federation__rounds=1)
    assert info.value.plugin == "uses-extra" and info.value.hook == "client_start"


# --------------------------------------------------------------------------- two distributions, one name


class _EntryPoint:
    """A fake installed entry point (as pluggy's tests fake importlib.metadata)."""

    def __init__(self, name: str, cls: type, dist: str) -> None:
        self.name, self.dist, self._cls = name, SimpleNamespace(name=dist), cls
        self.value = f"{dist.replace('-', '_')}:{cls.__name__}"
        self.group = discovery.ENTRY_POINT_GROUP

    def load(self) -> type:
        return self._cls


def test_two_distributions_registering_one_name(tiny, tmp_path, monkeypatch):
    fake = [_EntryPoint("prox", GoodProx, "dist-a"), _EntryPoint("prox", DefaultLoss, "dist-b")]

    def entry_points(group: str, name: str | None = None) -> list[Any]:
        return [ep for ep in fake if name is None or ep.name == name]

    monkeypatch.setattr(discovery.md, "entry_points", entry_points)
    tiny["plugins"] = [{"name": "prox"}]
    with pytest.raises(PluginError, match=r"registered twice.*name = 'dist-a:prox' or name = 'dist-b:prox'"):
        fedlt.run(tiny, out=tmp_path / "bare", federation__rounds=1)
    tiny["plugins"] = [{"name": "dist-a:prox", "mu": 0.5}]
    summary = fedlt.run(tiny, out=tmp_path / "a", federation__rounds=1)
    assert summary["plugins"] == ["dist-a:prox"]


def test_check_helpers_leave_no_trace():
    # check_plugin registers a class for its runs only: afterwards it is neither discoverable nor
    # left on its module.
    plugin_checks(GoodProx)[1]()
    module = sys.modules[GoodProx.__module__]
    assert not [a for a in vars(module) if a.startswith("_fedlt_checked_")]
    assert "good-prox" not in discovery.discover_plugins()
