"""The vectorized engine against the serial engine: the same scenario, the same numbers.

Why: vectorized training (``engine.vectorize``) promises the serial engine's local training, only
faster on a GPU. vmap also runs on a CPU, so every test here runs the same tiny scenario twice,
serially and vectorized, and compares what a run produces: the final global weights (BatchNorm
buffers included), every client's per-plugin state, and each evaluation's train loss and
accuracy. Batched kernels sum in another order than one client's kernels, so the comparison is
within float rounding, :data:`WEIGHTS_TOL` and :data:`LOSS_RTOL` below, after three rounds (the
largest difference measured on these scenarios is 1.6e-5, with LDAM's logit scale of 30).
Fallbacks (a plugin that does not declare ``vectorized = True``) take the serial path itself, so
there the results must be bit for bit the serial ones.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from fedlt_plugins.gla_fr import linear_init
from pydantic import BaseModel

import fedlt
from fedlt import ClientContext, Plugin, PluginError, hookimpl
from fedlt.base.seeding import derive_seed, torch_generator
from fedlt.data.federated import build_federated_data
from fedlt.driver.runner import Run
from fedlt.engines import make_engine
from fedlt.engines.serial import SerialEngine, resolve_vectorize
from fedlt.errors import ScenarioError
from fedlt.hooks.dispatch import build_hooks
from fedlt.hooks.recipe import LocalTraining
from fedlt.prepare import prepare
from fedlt.scenario.config import load_scenario
from fedlt.training.augment import crop_flip, crop_flip_drawn, draw_crop_flip
from fedlt.training.round import ClientTask

#: Weights after 3 rounds: |vectorized - serial| <= atol + rtol * |serial|, elementwise.
WEIGHTS_TOL = {"rtol": 1e-4, "atol": 5e-5}
#: Train loss of each evaluation round, relative.
LOSS_RTOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")

BASE: dict[str, Any] = {
    "name": "vec",
    "seed": 3,
    "data": {"dataset": "digits"},
    "long_tail": {"profile": "exponential", "imbalance_factor": 10},
    # Dirichlet clients have unequal sizes: different step counts and partial last batches.
    "partition": {"kind": "dirichlet", "n_clients": 4, "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [32]},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "federation": {"rounds": 3, "fraction_clients": 0.75, "eval_every": 1},
    "eval": {"shot_rule": "count", "shot_thresholds": [60, 20], "personalized": False},
}

#: Small images for BatchNorm models and crop-flip augmentation.
IMAGES: dict[str, Any] = {
    "data": {
        "dataset": "synthetic",
        "n_train": 240,
        "n_test": 40,
        "num_classes": 4,
        "shape": [3, 8, 8],
        "augment": "crop-flip",
    },
    "long_tail": {"profile": "exponential", "imbalance_factor": 4},
    "model": {"name": "resnet8", "width": 4},
    "eval": {"shot_rule": "count", "shot_thresholds": [40, 20], "personalized": False},
}


def scenario(**changes: Any) -> dict[str, Any]:
    """BASE with sections replaced (``model={...}``, ``plugins=[...]``); ``train`` and
    ``federation`` are merged key by key."""
    out = copy.deepcopy(BASE)
    for key, value in changes.items():
        out[key] = {**out[key], **value} if key in ("train", "federation") else value
    return out


def with_engine(spec: Mapping[str, Any] | Any, **settings: Any) -> Any:
    """The scenario with ``engine.<key> = value`` set, whether or not the schema has the key yet."""
    sc = load_scenario(dict(spec)) if isinstance(spec, Mapping) else spec
    return sc.model_copy(update={"engine": sc.engine.model_copy(update=settings)})


def run(spec: Mapping[str, Any], out: Path, **settings: Any) -> Run:
    r = Run.create(with_engine(spec, **settings), out)
    r.execute()
    return r


def both(spec: Mapping[str, Any], tmp_path: Path, **settings: Any) -> tuple[Run, Run]:
    """The scenario run serially and vectorized (``engine.vectorize = "on"``)."""
    return run(spec, tmp_path / "serial"), run(spec, tmp_path / "vectorized", vectorize="on", **settings)


def tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) pairs of a plain-data tree, in a stable order."""
    if isinstance(tree, Mapping):
        for key in sorted(tree, key=str):
            yield from tensors(tree[key], f"{prefix}/{key}")
    elif isinstance(tree, list | tuple):
        for i, item in enumerate(tree):
            yield from tensors(item, f"{prefix}/{i}")
    else:
        yield prefix, tree


def assert_same_run(serial: Run, vectorized: Run, exact: bool = False) -> None:
    """Same global weights, client states and per-round train loss and accuracy."""
    tol = {"rtol": 0.0, "atol": 0.0} if exact else WEIGHTS_TOL
    a, b = serial.model.state_dict(), vectorized.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
    sa, sb = list(tensors(serial.client_states)), list(tensors(vectorized.client_states))
    assert [p for p, _ in sa] == [p for p, _ in sb]
    for (path, x), (_, y) in zip(sa, sb, strict=True):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(y, x, **tol, msg=lambda m, path=path: f"state {path}: {m}")
        else:
            assert y == x, path
    assert len(serial.history) == len(vectorized.history) == serial.scenario.federation.rounds
    for ra, rb in zip(serial.history, vectorized.history, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=0.0 if exact else LOSS_RTOL)
        assert rb["accuracy"] == pytest.approx(ra["accuracy"], abs=0.0 if exact else 0.02)


def assert_vectorized(r: Run) -> None:
    """The run really trained vectorized: calls made, no client trained one by one."""
    assert isinstance(r.engine, SerialEngine) and r.engine.vectorize
    assert r.engine.stats["calls"] > 0 and r.engine.stats["one_by_one"] == 0, r.engine.stats


# --------------------------------------------------------------------------- choosing the engine


def test_auto_trains_one_by_one_on_cpu_and_vectorized_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_vectorize("auto", cpu)[0] is False
    assert resolve_vectorize("auto", cuda)[0] is True
    assert resolve_vectorize("on", cpu)[0] is True
    assert resolve_vectorize("off", cuda)[0] is False
    with pytest.raises(ScenarioError, match=r"engine\.vectorize"):
        load_scenario({**scenario(), "engine": {"vectorize": "yes"}})

    sc = load_scenario(scenario())
    engine = make_engine(prepare(sc, cpu))
    assert type(engine) is SerialEngine and not engine.vectorize  # "auto" on a CPU: one by one
    engine = make_engine(prepare(with_engine(sc, vectorize="on"), cpu))
    assert type(engine) is SerialEngine and engine.vectorize and engine.name == "serial"


# --------------------------------------------------------------------------- the local recipe


def test_sgd_momentum_weight_decay_unequal_clients(tmp_path):
    serial, vectorized = both(scenario(), tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)
    # Unequal clients: plans of different lengths, partial last batches trained in calls of their
    # own, some of them on rows gathered out of the stack.
    assert len(set(vectorized.data.client_counts.sum(1).tolist())) > 1
    assert vectorized.engine.stats["gathered"] > 0


def test_empty_clients_and_many_batch_lengths(tmp_path):
    # alpha = 0.01 over 10 clients: two clients hold no sample (no step, weights unchanged, not
    # averaged); others hold 21 to 124 samples, so many batch lengths meet at the same step.
    spec = scenario(
        partition={"kind": "dirichlet", "n_clients": 10, "alpha": 0.01}, federation={"fraction_clients": 1.0}
    )
    serial, vectorized = both(spec, tmp_path)
    sizes = vectorized.data.client_counts.sum(1)
    assert (sizes == 0).sum() >= 1 and len(set(sizes.tolist())) >= 6
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)


@pytest.mark.parametrize(
    "train",
    [
        {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3},
        {"local_steps": 3, "local_epochs": 1},
        {"local_epochs": 2, "batch_size": 16},
        {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0},
    ],
    ids=["adam", "local-steps", "two-epochs", "plain-sgd"],
)
def test_local_recipes(tmp_path, train):
    serial, vectorized = both(scenario(train=train), tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)


def test_gradient_clipping(tmp_path):
    clipped = scenario(train={"max_grad_norm": 0.05, "local_epochs": 2})
    serial, vectorized = both(clipped, tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)
    # The clip is active: without it the vectorized run ends elsewhere.
    free = run(scenario(train={"local_epochs": 2}), tmp_path / "free", vectorize="on")
    diff = max(
        (free.model.state_dict()[k] - vectorized.model.state_dict()[k]).abs().max().item() for k in free.keys
    )
    assert diff > 1e-3


@pytest.mark.parametrize("model", [{"name": "resnet8", "width": 4}, {"name": "cnn", "widths": [4, 8]}])
def test_batchnorm_and_crop_flip_on_images(tmp_path, model):
    serial, vectorized = both(scenario(**{**IMAGES, "model": model}), tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)
    if model["name"] == "resnet8":
        # BatchNorm running statistics are aggregated like weights, and they moved.
        assert "stem.1.running_mean" in vectorized.keys
        assert vectorized.model.state_dict()["stem.1.running_var"].ne(1.0).any()


def test_group_size_splits_a_round_into_groups(tmp_path):
    spec = scenario(federation={"fraction_clients": 1.0})
    serial, vectorized = both(spec, tmp_path, group_size=3)
    assert_vectorized(vectorized)
    assert vectorized.engine.stats["groups"] >= 2 * 3  # 4 clients in groups of <= 3, per round
    assert_same_run(serial, vectorized)


def test_stream_with_seen_class_mask(tmp_path):
    # Two stream batches per slice, two steps each: the mask changes mid-round (client_stream_batch
    # runs per client, its new tensors are restacked before the next step).
    spec = scenario(
        plugins=[{"name": "seen-class-mask"}],
        stream={"kind": "si-blurry", "n_tasks": 2, "samples_per_round": 64, "online_iter": 2},
        train={"momentum": 0.0, "weight_decay": 0.0},
    )
    serial, vectorized = both(spec, tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)


# --------------------------------------------------------------------------- plugins


PLUGINS = {
    "focal": [{"name": "focal", "gamma": 2.0, "alpha": [0.5, 1, 1, 1, 1, 1, 1, 1, 1, 2]}],
    "balanced-softmax": [{"name": "balanced-softmax"}],
    "logit-adjust": [{"name": "logit-adjust", "tau": 1.5, "prior": "global"}],
    "ldam-drw": [{"name": "ldam", "drw": True, "drw_start_round": 2}],
    "ldam-linear": [{"name": "ldam", "head": "linear"}],
    "class-balanced": [{"name": "class-balanced", "drw_start_round": 2}],
    "focal+class-balanced": [{"name": "focal"}, {"name": "class-balanced", "prior": "estimated"}],
    "etf": [{"name": "etf"}],
    "sse-c+gla-fr": [{"name": "sse-c", "n_refit_steps": 20}, {"name": "gla-fr"}],
    "gsf": [{"name": "gsf"}],
    "seen-class-mask": [{"name": "seen-class-mask"}],
    "afs+gsf": [{"name": "afs"}, {"name": "gsf"}],
    "glfc-compensation": [{"name": "glfc-compensation", "loss": "bce"}],
}


@pytest.mark.parametrize("name", list(PLUGINS))
def test_built_in_plugins_run_vectorized(tmp_path, name):
    # Each plugin with per-batch hooks here declares vectorized = True; etf and sse-c have none
    # (a frozen head), so they need no declaration and must train vectorized too.
    serial, vectorized = both(scenario(plugins=PLUGINS[name]), tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)


def test_gla_fr_local_head_is_trained_and_kept(tmp_path):
    serial, vectorized = both(scenario(plugins=PLUGINS["sse-c+gla-fr"]), tmp_path)
    heads = [s["gla-fr"]["local_weight"] for s in vectorized.client_states.values() if "gla-fr" in s]
    assert heads
    cid = next(c for c, s in vectorized.client_states.items() if "gla-fr" in s)
    init, _ = linear_init(10, 32, torch_generator(3, "gla-fr-local-head", cid))
    assert not torch.allclose(vectorized.client_states[cid]["gla-fr"]["local_weight"], init)
    assert_same_run(serial, vectorized)


class UndeclaredLoss(Plugin):
    """Cross-entropy with label noise 0, from a plugin that does not declare vectorized = True."""

    @hookimpl
    def client_loss(self, logits, y):
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def test_plugin_without_declaration_trains_one_by_one_with_one_notice(tmp_path, capsys, install_plugins):
    install_plugins(**{"undeclared-loss": UndeclaredLoss})
    spec = scenario(plugins=[{"name": "undeclared-loss"}])
    serial = run(spec, tmp_path / "serial")
    capsys.readouterr()
    vectorized = run(spec, tmp_path / "vectorized", vectorize="on")
    err = capsys.readouterr().err
    assert err.count("fedlt: training clients one by one") == 1
    assert "'undeclared-loss' implements client_loss without declaring vectorized = True" in err
    assert vectorized.engine.stats["calls"] == 0 and vectorized.engine.stats["one_by_one"] > 0
    assert_same_run(serial, vectorized, exact=True)


# --------------------------------------------------------------------------- contract edges


class ReadsClientId(Plugin):
    """Declares vectorized = True but reads a per-client fact in a per-batch hook."""

    vectorized = True

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, y, reduction="none") * (1 + ctx.client_id)


class ReadsRound(Plugin):
    """Per-batch hooks may read facts every client shares (round, num_classes, step)."""

    vectorized = True

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        scale = 1.0 + 0.1 * ctx.round + 0.01 * ctx.step
        return torch.nn.functional.cross_entropy(logits * scale, y, reduction="none")


def test_per_client_fact_in_a_vectorized_hook_names_the_plugin(tmp_path, install_plugins):
    install_plugins(**{"reads-id": ReadsClientId})
    with pytest.raises(PluginError, match=r"ctx.client_id is a per-client fact") as info:
        run(scenario(plugins=[{"name": "reads-id"}]), tmp_path / "v", vectorize="on")
    assert info.value.plugin == "reads-id" and info.value.hook == "client_loss"


def test_shared_facts_in_a_vectorized_hook(tmp_path, install_plugins):
    install_plugins(**{"reads-round": ReadsRound})
    serial, vectorized = both(scenario(plugins=[{"name": "reads-round"}]), tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)


class PerClientRecipe(Plugin):
    """Odd clients train with half the learning rate and batch 16: their own vectorized group."""

    @hookimpl
    def client_configure_training(self, recipe: Any, ctx: ClientContext) -> Any:
        return recipe.replace(lr=recipe.lr / 2, batch_size=16) if ctx.client_id % 2 else recipe


def test_clients_with_different_recipes_train_in_separate_groups(tmp_path, install_plugins, capsys):
    install_plugins(**{"per-client-recipe": PerClientRecipe})
    spec = scenario(plugins=[{"name": "per-client-recipe"}], federation={"fraction_clients": 1.0})
    serial = run(spec, tmp_path / "serial")
    capsys.readouterr()
    vectorized = run(spec, tmp_path / "vectorized", vectorize="on")
    assert "vectorized groups, not one" in capsys.readouterr().err
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)


class ShiftsHeadAtStart(Plugin):
    """Changes the model in client_start (per client): training must start from the changed model."""

    @hookimpl
    def client_start(self, model: torch.nn.Module, ctx: ClientContext) -> None:
        with torch.no_grad():
            model.head.bias.add_(0.05 * (ctx.client_id + 1))


class IdleExtra(Plugin):
    """An extra trainable tensor that never reaches the loss: the serial optimizer skips it
    (its ``.grad`` is None), so weight decay must not shrink it on the vectorized path either."""

    @hookimpl
    def client_start(self, ctx: ClientContext, state: dict[str, Any]) -> None:
        self.idle = state.get("idle", torch.ones(3)).clone().requires_grad_(True)

    @hookimpl
    def client_trainable_parameters(self) -> list[torch.Tensor]:
        return [self.idle]

    @hookimpl
    def client_end(self, state: dict[str, Any], model: torch.nn.Module) -> dict[str, float]:
        state["idle"] = self.idle.detach().clone()
        # a payload computed from the trained model: the resident model holds this client's weights
        return {"head_norm": float(model.head.weight.detach().norm())}


def test_model_changed_at_start_and_unused_trainable_tensor(tmp_path, install_plugins):
    install_plugins(**{"shifts-head": ShiftsHeadAtStart, "idle-extra": IdleExtra})
    spec = scenario(plugins=[{"name": "shifts-head"}, {"name": "idle-extra"}])
    serial, vectorized = both(spec, tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)
    for states in vectorized.client_states.values():
        if "idle" in states.get("idle-extra", {}):
            assert torch.equal(states["idle-extra"]["idle"], torch.ones(3))


def test_client_end_payloads_see_each_clients_trained_model(install_plugins):
    install_plugins(**{"idle-extra": IdleExtra})
    sc = load_scenario(scenario(plugins=[{"name": "idle-extra"}]))
    cpu = torch.device("cpu")
    results = {}
    for kind in ("serial", "on"):
        spec = sc if kind == "serial" else with_engine(sc, vectorize="on")
        engine = make_engine(prepare(spec, cpu))
        state = {
            k: v.clone() for k, v in engine.trainer.model.state_dict().items() if k in engine.trainer.keys
        }
        tasks = [ClientTask(c, 1, {"round": 1}, {}) for c in range(4)]
        results[kind] = [
            (r.client_id, r.n_steps, r.n_samples, r.payloads, r.loss)
            for r in engine.train_round(tasks, state)
        ]
    steps = [r[1] for r in results["serial"]]
    assert len(set(steps)) > 1  # unequal clients
    for a, b in zip(results["serial"], results["on"], strict=True):
        assert a[:3] == b[:3]
        assert b[3]["idle-extra"]["head_norm"] == pytest.approx(a[3]["idle-extra"]["head_norm"], rel=1e-5)
        assert b[4] == pytest.approx(a[4], rel=LOSS_RTOL)
    # each payload is its own client's: they differ between clients
    assert len({round(r[3]["idle-extra"]["head_norm"], 6) for r in results["on"]}) == 4


# --------------------------------------------------------------------------- pieces


def test_batched_crop_flip_equals_crop_flip_per_client():
    x = torch.arange(3 * 5 * 2 * 6 * 6, dtype=torch.float32).view(3 * 5, 2, 6, 6)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    again = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    expected = torch.cat([crop_flip(x[5 * i : 5 * (i + 1)], g) for i, g in enumerate(gens)])
    draws = [draw_crop_flip(g, 5) for g in again]
    got = crop_flip_drawn(x, torch.cat([d[0] for d in draws], 1), torch.cat([d[1] for d in draws]))
    assert torch.equal(got, expected)
    # the generators end in the same state
    for g, h in zip(gens, again, strict=True):
        assert torch.equal(g.get_state(), h.get_state())


def test_bfloat16_autocast_trains_close_to_float32(tmp_path):
    # engine.dtype = "bfloat16" autocasts the forward pass. Under vmap, PyTorch autocasts the
    # matrix products and convolutions but not the bias additions after them (pytorch#192617),
    # so the vectorized bf16 run stays closer to float32 than a one-by-one autocast run (whose
    # logits are bf16); it is checked against the float32 serial run at bf16's tolerance.
    spec = scenario(federation={"rounds": 1})
    serial = run(spec, tmp_path / "serial")
    vec32 = run(spec, tmp_path / "vec32", vectorize="on")
    vec16 = run(spec, tmp_path / "vec16", vectorize="on", dtype="bfloat16")
    one16 = run(spec, tmp_path / "one16", vectorize="off", dtype="bfloat16")
    assert_vectorized(vec16)
    assert one16.engine.stats["one_by_one"] > 0
    a, b, c = serial.model.state_dict(), vec16.model.state_dict(), vec32.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=5e-2, atol=1e-2)
    assert max((b[k] - c[k]).abs().max().item() for k in a) > 1e-5  # autocast took effect
    assert vec16.history[-1]["train_loss"] == pytest.approx(serial.history[-1]["train_loss"], rel=5e-2)
    assert math.isfinite(one16.history[-1]["train_loss"])  # the one-by-one path autocasts too


def test_fedlt_run_api_accepts_the_vectorized_engine(tmp_path):
    # the public API end to end: fedlt.run on a scenario with engine.vectorize = "on"
    sc = with_engine(scenario(federation={"rounds": 1}), vectorize="on")
    summary = fedlt.run(sc, out=tmp_path / "api")
    assert summary["engine"] == "serial"
    assert math.isfinite(summary["final"]["accuracy"])


# --------------------------------------------------------------------------- the GPU benchmark


def test_gpu_benchmark_runs_at_smoke_size():
    # benchmarks/bench_gpu.py is run by hand on a GPU; this keeps it working in between: the
    # floors, both fedlt engines and the FedLoGe protocol round at tiny sizes on this device.
    from support.scripts import load_script

    bench = load_script(Path("benchmarks/bench_gpu.py"), "fedlt_bench_gpu")
    if bench.find_file(None, bench.FLOOR_CANDIDATES) is None:
        pytest.skip("gpu_floor.py (../shared/bench) is not on this machine")
    lines: list[str] = []
    out = bench.main(["--smoke", "--dtypes", "float32", "--clients", "4,8"], log=lines.append)
    assert [r["clients"] for r in out["rows"]] == [4, 8]
    for r in out["rows"]:
        for key in ("floor_seq", "floor_vmap", "serial", "vectorized"):
            assert r[key] > 0
        assert r["vs_serial"] == pytest.approx(r["vectorized"] / r["serial"])
    assert out["fedloge"]["serial"] > 0 and out["fedloge"]["vectorized"] > 0
    assert "| 8 | float32 |" in out["section"] and "FedLoGe protocol" in out["section"]


# --------------------------------------------------------------------------- one client round
# Each test below is a defect the vectorized path once had in its own copy of the client round;
# with one client round shared by every engine, each must hold serial == vectorized.

STREAM = {"kind": "si-blurry", "n_tasks": 2, "samples_per_round": 64, "online_iter": 2}


@pytest.mark.parametrize("prior", ["local", "estimated"])
@pytest.mark.parametrize("plugin", ["balanced-softmax", "logit-adjust", "ldam", "class-balanced"])
def test_stream_with_prior_based_losses(tmp_path, plugin, prior):
    # These refresh their class counts in client_stream_batch, which takes the model (the
    # "estimated" prior reads the head): a group gives each client's hook that client's current
    # weights. Before, every such stream run crashed vectorized (and so on every GPU, by "auto").
    spec = scenario(plugins=[{"name": plugin, "prior": prior}], stream=STREAM)
    serial, vectorized = both(spec, tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)


class DetachParams(BaseModel):
    when: Literal["round-1", "step-0"] = "round-1"


class DetachesSometimes(Plugin):
    """Detaches the features (only the head learns) in round 1, or at local step 0: which
    parameters reach the loss changes by round and by step (ctx.round and ctx.step are shared by a
    group), so which ones the optimizer updates must too."""

    Params = DetachParams
    vectorized = True

    @hookimpl
    def client_forward(self, model: torch.nn.Module, x: torch.Tensor, ctx: ClientContext) -> Any:
        h = model.features(x)
        if (self.params.when == "round-1" and ctx.round == 1) or (
            self.params.when == "step-0" and ctx.step == 0
        ):
            h = h.detach()
        return h, model.head(h)


@pytest.mark.parametrize(
    ("when", "train"),
    [
        ("round-1", {}),
        ("step-0", {"momentum": 0.9, "weight_decay": 1e-3}),
        ("step-0", {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-3}),
    ],
    ids=["round-1-sgd", "step-0-momentum", "step-0-adam"],
)
def test_parameters_without_gradient_at_some_steps(tmp_path, install_plugins, when, train):
    # Before, the unused parameters were found once, from the first client's first batch, and
    # cached across rounds and steps: balanced accuracy 0.217 serial vs 0.100 vectorized.
    install_plugins(**{"detaches": DetachesSometimes})
    spec = scenario(plugins=[{"name": "detaches", "when": when}], train=train)
    serial, vectorized = both(spec, tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)
    plain = run(scenario(train=train), tmp_path / "plain")
    assert not torch.equal(plain.model.state_dict()["head.weight"], serial.model.state_dict()["head.weight"])


class MemoryScale(Plugin):
    """A per-sample weight that client_update_memory changes between steps (a new tensor, then an
    in-place change): the next steps must see the new value, trained alone or in a group."""

    vectorized = True

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        self.scale = torch.ones((), device=ctx.device)
        self.step = torch.zeros((), device=ctx.device)

    @hookimpl
    def client_update_memory(self, batch: torch.Tensor, ctx: ClientContext) -> None:
        self.scale = self.scale * 1.5
        self.step.add_(1.0)

    @hookimpl
    def client_sample_weights(self, y: torch.Tensor) -> torch.Tensor:
        return (self.scale + 0.1 * self.step).expand(y.shape[0])


def test_tensors_changed_by_memory_updates_reach_the_next_steps(tmp_path, install_plugins):
    install_plugins(**{"memory-scale": MemoryScale})
    spec = scenario(plugins=[{"name": "memory-scale"}], stream=STREAM)
    serial, vectorized = both(spec, tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)


class DrawsGlobalRandom(Plugin):
    """Draws from torch's global RNG at its start and its end (as a plugin drawing with plain
    torch.rand would): each client must draw what it draws when trained alone."""

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        self.first = torch.rand(3)

    @hookimpl
    def client_end(self) -> dict[str, torch.Tensor]:
        return {"start": self.first, "end": torch.rand(3)}


def test_global_rng_is_each_clients_own_in_a_group(install_plugins):
    install_plugins(**{"draws": DrawsGlobalRandom})
    sc = load_scenario(scenario(plugins=[{"name": "draws"}], federation={"fraction_clients": 1.0}))
    cpu = torch.device("cpu")
    payloads = {}
    for mode in ("off", "on"):
        spec = with_engine(sc, vectorize=mode)
        engine = make_engine(prepare(spec, cpu))
        state = {
            k: v.clone() for k, v in engine.trainer.model.state_dict().items() if k in engine.trainer.keys
        }
        tasks = [ClientTask(c, 2, {"round": 2}, {}) for c in range(4)]
        payloads[mode] = {r.client_id: r.payloads["draws"] for r in engine.train_round(tasks, state)}
        assert engine.vectorize == (mode == "on")
    for client in range(4):
        # Independent of the engine: torch's generator seeded from (seed, "torch", round, client)
        # gives the start's draw, then the end's (an MLP without dropout draws nothing in between).
        g = torch.Generator().manual_seed(derive_seed(3, "torch", 2, client))
        expected_start, expected_end = torch.rand(3, generator=g), torch.rand(3, generator=g)
        for mode in ("off", "on"):
            assert torch.equal(payloads[mode][client]["start"], expected_start), (mode, client)
            assert torch.equal(payloads[mode][client]["end"], expected_end), (mode, client)


class PenalisesTrainable(Plugin):
    """An L2 penalty over ``[p for p in model.parameters() if p.requires_grad]``, the common idiom:
    inside a vectorized hook the swapped-in parameters must still say they require grad."""

    vectorized = True

    @hookimpl
    def client_extra_losses(self, model: torch.nn.Module) -> torch.Tensor:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no parameter requires grad")
        return 1e-2 * sum((p**2).sum() for p in params)


def test_parameters_require_grad_inside_vectorized_hooks(tmp_path, install_plugins):
    install_plugins(**{"l2": PenalisesTrainable})
    serial, vectorized = both(scenario(plugins=[{"name": "l2"}]), tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)
    plain = run(scenario(), tmp_path / "plain")
    assert plain.history[-1]["train_loss"] < serial.history[-1]["train_loss"]  # the penalty counted


class KeepsSelf(Plugin):
    """Sets a tensor in client_start, reads it per batch, and checks at its end that its own
    instance was never handed a vmapped tensor."""

    vectorized = True

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        self.w = torch.linspace(0.5, 1.5, 10, device=ctx.device)
        self.original = self.w

    @hookimpl
    def client_class_weights(self, y: torch.Tensor) -> torch.Tensor:
        return self.w[y]

    @hookimpl
    def client_end(self) -> dict[str, bool]:
        plain = not torch._C._functorch.is_batchedtensor(self.w) and self.w is self.original
        return {"untouched": plain and vars(self).keys() == {"params", "name", "w", "original"}}


class WritesSelf(Plugin):
    """Writes self in a per-batch hook while declaring vectorized = True: refused, not lost."""

    vectorized = True

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.last = logits
        return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def test_no_plugin_object_is_changed_under_the_transform(tmp_path, install_plugins):
    install_plugins(**{"keeps-self": KeepsSelf, "writes-self": WritesSelf})
    serial, vectorized = both(scenario(plugins=[{"name": "keeps-self"}]), tmp_path)
    assert_vectorized(vectorized)
    assert_same_run(serial, vectorized)
    run(scenario(plugins=[{"name": "writes-self"}]), tmp_path / "serial-writes")  # fine one by one
    with pytest.raises(PluginError, match=r"changed self\.last.*vectorized = True") as info:
        run(scenario(plugins=[{"name": "writes-self"}]), tmp_path / "vec-writes", vectorize="on")
    assert info.value.plugin == "writes-self"


def test_untouched_plugin_instances_in_a_group(install_plugins):
    install_plugins(**{"keeps-self": KeepsSelf})
    sc = with_engine(scenario(plugins=[{"name": "keeps-self"}]), vectorize="on")
    cpu = torch.device("cpu")
    engine = make_engine(prepare(sc, cpu))
    state = {k: v.clone() for k, v in engine.trainer.model.state_dict().items() if k in engine.trainer.keys}
    results = list(engine.train_round([ClientTask(c, 1, {"round": 1}, {}) for c in range(4)], state))
    assert engine.stats["calls"] > 0
    assert all(r.payloads["keeps-self"]["untouched"] for r in results)


def test_per_client_fact_fails_whatever_the_group_size(tmp_path, install_plugins):
    # Before, a group of one client answered ctx.client_id, so the plugin's failure depended on
    # engine.group_size; now it fails the same way with groups of one, and says what to do.
    install_plugins(**{"reads-id": ReadsClientId})
    with pytest.raises(PluginError, match=r'ctx.client_id is a per-client fact.*engine.vectorize = "off"'):
        run(scenario(plugins=[{"name": "reads-id"}]), tmp_path / "v", vectorize="on", group_size=1)
    run(scenario(plugins=[{"name": "reads-id"}]), tmp_path / "off", vectorize="off")  # one by one: fine


def test_bfloat16_autocasts_each_step_one_by_one(install_plugins):
    # Before, a client's whole local training ran inside one torch.autocast, whose cache kept the
    # step-0 bf16 copies of the weights (quickstart at 5 rounds: accuracy 0.41 in fp32, 0.17 in bf16).
    # Against a hand-written loop: torch.optim.SGD, each step's forward under its own autocast.
    sc = with_engine(scenario(train={"momentum": 0.9, "local_epochs": 2}), vectorize="off", dtype="bfloat16")
    cpu = torch.device("cpu")
    data = build_federated_data(sc, cpu)
    engine = make_engine(prepare(sc, cpu))
    model = engine.trainer.model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = engine.trainer.run(
        ClientTask(1, 1, {"round": 1}, {}), {k: start[k] for k in engine.trainer.keys}
    )
    trained = {k: v.clone() for k, v in result.weights.items()}

    model.load_state_dict(start)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    idx = data.client_tensor(1)
    g = torch_generator(3, "client", 1, 1)
    order = torch.cat([idx[torch.randperm(len(idx), generator=g)] for _ in range(2)])
    for i in range(0, len(order), 32):
        batch = order[i : i + 32]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in trained.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_group_size_from_the_memory_estimate(tmp_path, monkeypatch):
    # Free memory for exactly two clients' estimate: the round trains in groups of two.
    import fedlt.engines.serial as serial_engine
    from fedlt.training.sizing import MEMORY_SHARE, activation_bytes, client_bytes

    sc = load_scenario(scenario(federation={"fraction_clients": 1.0}))
    model = build_run_model_for(sc)
    x = build_federated_data(sc, torch.device("cpu")).x_train[:32]
    per_client = client_bytes(model, LocalTraining.from_scenario(sc), activation_bytes(model, x))
    # the estimate holds at least the stacked weights, their gradients and the momentum buffers
    n_params = sum(p.numel() for p in model.parameters())
    assert per_client >= 3 * 4 * n_params
    monkeypatch.setattr(
        serial_engine, "device_free_memory", lambda device: int(2.5 * per_client / MEMORY_SHARE)
    )
    serial, vectorized = both(scenario(federation={"fraction_clients": 1.0}), tmp_path)
    assert_same_run(serial, vectorized)
    assert [t["group_size"] for t in per_round(vectorized.training)] == [2, 2, 2]
    assert [t["groups"] for t in per_round(vectorized.training)] == [2, 2, 2]  # 4 clients, 2 a group


def test_out_of_memory_retries_in_halves_from_the_same_states(tmp_path, monkeypatch):
    # A group of more than two clients "runs out of memory": it is retried in halves, from the
    # states it started with, and the numbers are the serial ones.
    from fedlt.training.vectorized import GroupUpdate

    real = GroupUpdate._losses_and_grads

    def limited(self, params, *args):
        if next(iter(params.values())).shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, params, *args)

    monkeypatch.setattr(GroupUpdate, "_losses_and_grads", limited)
    spec = scenario(plugins=[{"name": "sse-c", "n_refit_steps": 5}, {"name": "gla-fr"}])
    spec["federation"]["fraction_clients"] = 1.0
    serial, vectorized = both(spec, tmp_path)
    assert_same_run(serial, vectorized)
    training = per_round(vectorized.training)
    assert training[0]["oom_retries"] >= 1 and training[-1]["group_size"] <= 2


def per_round(training: list[dict]) -> list[dict]:
    """The training log one record per round (rounds trained alike share a record)."""
    return [{**t, "round": r} for t in training for r in range(t["round"], t["through"] + 1)]


def test_summary_says_how_each_round_was_trained(tmp_path, install_plugins):
    vectorized = run(scenario(), tmp_path / "v", vectorize="on")
    summary = json.loads((tmp_path / "v" / "summary.json").read_text())
    assert [t["round"] for t in per_round(summary["training"])] == [1, 2, 3]
    for t in summary["training"]:
        assert t["vectorized"] is True and t["why"] == 'engine.vectorize = "on"'
        assert t["groups"] >= 1 and t["peak_memory_mb"] > 0 and t["memory"].startswith("process rss")
    assert vectorized.engine.vectorize
    install_plugins(**{"undeclared-loss": UndeclaredLoss})
    run(scenario(plugins=[{"name": "undeclared-loss"}]), tmp_path / "u", vectorize="on")
    summary = json.loads((tmp_path / "u" / "summary.json").read_text())
    assert summary["training"][0]["vectorized"] is False
    assert (
        "'undeclared-loss' implements client_loss without declaring vectorized = True"
        in summary["training"][0]["why"]
    )
    auto = run(scenario(), tmp_path / "a")
    assert auto.training[0] == {
        **auto.training[0],
        "vectorized": False,
        "why": 'engine.vectorize = "auto" trains one by one on a CPU',
    }


def build_run_model_for(sc: Any) -> torch.nn.Module:
    from fedlt.training.worker import build_run_model

    data = build_federated_data(sc, torch.device("cpu"))
    return build_run_model(sc, data, build_hooks(sc.plugins), torch.device("cpu"))


def test_gpu_check_runs_at_smoke_size():
    # benchmarks/gpu_check.py (vectorized vs serial on CUDA, syncs counted) is run by hand on a
    # GPU; here, on this device, it must run and find serial == vectorized on every scenario.
    from support.scripts import load_script

    check = load_script(Path("benchmarks/gpu_check.py"), "fedlt_gpu_check")
    out = check.main(["--device", "cpu", "--rounds", "1", "--no-doc"])
    assert [r["scenario"] for r in out["rows"]] == list(check.SCENARIOS)
    assert all(r["vectorized"] and r["within_tolerance"] for r in out["rows"]), out["rows"]
