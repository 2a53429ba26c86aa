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
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from fedlt_plugins.gla_fr import linear_init

import fedlt
from fedlt import ClientContext, Plugin, PluginError, hookimpl
from fedlt.base.seeding import torch_generator
from fedlt.data.federated import build_federated_data
from fedlt.driver.runner import Run
from fedlt.engines import make_engine
from fedlt.engines.serial import SerialEngine
from fedlt.engines.vectorized import VectorizedEngine, resolve_vectorize, wants_vectorized_engine
from fedlt.engines.vgroup import crop_flip_drawn, draw_crop_flip
from fedlt.errors import ScenarioError
from fedlt.hooks.dispatch import build_hooks
from fedlt.scenario.config import load_scenario
from fedlt.training.augment import crop_flip
from fedlt.training.client import ClientTask

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
    assert isinstance(r.engine, VectorizedEngine)
    assert r.engine.stats["calls"] > 0 and r.engine.stats["one_by_one"] == 0, r.engine.stats


# --------------------------------------------------------------------------- choosing the engine


def test_auto_trains_one_by_one_on_cpu_and_vectorized_on_cuda():
    sc = load_scenario(scenario())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert getattr(sc.engine, "vectorize", "auto") == "auto"
    assert resolve_vectorize(sc, cpu) is False
    assert resolve_vectorize(sc, cuda) is True
    assert resolve_vectorize(with_engine(sc, vectorize="on"), cpu) is True
    assert resolve_vectorize(with_engine(sc, vectorize="off"), cuda) is False
    with pytest.raises(ScenarioError, match=r"engine\.vectorize"):
        resolve_vectorize(with_engine(sc, vectorize="yes"), cpu)
    assert not wants_vectorized_engine(sc, cpu)
    assert wants_vectorized_engine(with_engine(sc, dtype="bfloat16"), cpu)

    hooks = build_hooks(sc.plugins)
    data = build_federated_data(sc, cpu)
    engine = make_engine(sc, data, hooks, cpu)
    assert type(engine) is SerialEngine  # "auto" on a CPU: the plain serial engine
    engine = make_engine(with_engine(sc, vectorize="on"), data, hooks, cpu)
    assert type(engine) is VectorizedEngine and engine.name == "serial"


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
    with pytest.raises(PluginError, match=r"ctx.client_id differs between clients") as info:
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
        hooks = build_hooks(spec.plugins)
        engine = make_engine(spec, build_federated_data(spec, cpu), hooks, cpu)
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
