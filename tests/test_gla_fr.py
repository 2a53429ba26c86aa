"""gla-fr: realignment formulas by hand, local heads that never leave the client, and FedLoGe."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fedlt_plugins.gla_fr import MASK_VALUE, initial_local_head
from support.contexts import eval_ctx

import fedlt
from fedlt.base.seeding import torch_generator
from fedlt.data.federated import build_federated_data
from fedlt.driver.runner import Run
from fedlt.evaluation.evaluator import PERSONAL_MASKED, personal_mask
from fedlt.hooks.context import EvalContext
from fedlt.hooks.dispatch import build_hooks
from fedlt.training.round import ClientTask
from fedlt.training.worker import ClientTrainer, aggregated_keys, build_run_model


def _plugin(name, **params):
    return build_hooks(fedlt.load_scenario({"plugins": [{"name": name, **params}]}).plugins).plugins[0]


def _eval_ctx(client_id, counts=None, test_counts=(4, 4)) -> EvalContext:
    return eval_ctx(client_id, local_counts=counts, global_counts=[10, 10], test_counts=test_counts)


def _hand_model() -> torch.nn.Module:
    """2 classes, 3-d features: aux rows w_1 = [3, 0, 4] (norm 5), w_2 = [0, 1, 0] (norm 1)."""
    model = torch.nn.Module()
    model.gla_aux = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.gla_aux.weight.copy_(torch.tensor([[3.0, 0.0, 4.0], [0.0, 1.0, 0.0]]))
        model.gla_aux.bias.copy_(torch.tensor([0.5, -0.5]))
    return model


H = torch.tensor([[1.0, 2.0, 3.0]])
#: Local head l_k: rows [0, 0, 2] (norm 2) and [1, 0, 0] (norm 1), bias [0.1, 0.2].
LOCAL = {
    "local_weight": torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]]),
    "local_bias": torch.tensor([0.1, 0.2]),
}


def test_global_realignment_matches_hand_computation():
    # gamma = 2: w^G_1 = 2 * [3, 0, 4] / 5 = [1.2, 0, 1.6]; w^G_2 = 2 * [0, 1, 0] / 1 = [0, 2, 0].
    # h = [1, 2, 3]: z_1 = 1.2 + 0 + 4.8 + 0.5 = 6.5; z_2 = 0 + 4 + 0 - 0.5 = 3.5.
    # The incoming head logits are replaced, whatever they were.
    incoming = torch.full((1, 2), 99.0)
    for head in ("realigned", "both"):
        out = _plugin("gla-fr", gamma=2.0, global_head=head).eval_logits(
            logits=incoming, features=H, model=_hand_model(), ctx=_eval_ctx(None), state={}
        )
        torch.testing.assert_close(out, torch.tensor([[6.5, 3.5]]))
    # global_head "sse-c" reports the model's own head: its logits pass through.
    out = _plugin("gla-fr", gamma=2.0, global_head="sse-c").eval_logits(
        logits=incoming, features=H, model=_hand_model(), ctx=_eval_ctx(None), state={}
    )
    assert torch.equal(out, incoming)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"mask": "none"}, [36.6, 2.7]),
        ({"mask": "train"}, [36.6, MASK_VALUE]),
        ({"mask": "test"}, [MASK_VALUE, 2.7]),
        ({"mask": "none", "personal_head": "local+aux"}, [21.6, 2.7]),
    ],
)
def test_local_realignment_matches_hand_computation(params, expected):
    # Norm transfer: w_k1 = [3, 0, 4] * ||[0, 0, 2]|| = [6, 0, 8]; w_k2 = [0, 1, 0] * 1 = [0, 1, 0].
    # l_k(h) = [2 * 3 + 0.1, 1 * 1 + 0.2] = [6.1, 1.2]; W_k h + b^aux = [6 + 24 + 0.5, 2 - 0.5] = [30.5, 1.5].
    # Sum: [36.6, 2.7]. The client has no training sample of class 2 (mask "train" sets it to
    # -1e9); its local test view [0, 3] has no sample of class 1 (mask "test" masks that one).
    # personal_head "local+aux": l_k(h) + aux(h) = [6.1, 1.2] + [3 + 12 + 0.5, 2 - 0.5] = [21.6, 2.7].
    # The mask is the evaluator's (gla-fr asks for it through eval_personalized_mask).
    plugin = _plugin("gla-fr", gamma=2.0, **params)
    ctx = _eval_ctx(0, [5, 0], test_counts=[0, 3])
    out = plugin.eval_logits(
        logits=torch.zeros(1, 2), features=H, model=_hand_model(), ctx=ctx, state=dict(LOCAL)
    )
    out = personal_mask(out, plugin.eval_personalized_mask(), ctx)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_gla_fr_asks_the_evaluator_for_its_mask():
    assert MASK_VALUE == PERSONAL_MASKED
    asked = {m: _plugin("gla-fr", mask=m).eval_personalized_mask() for m in ("train", "test", "none")}
    assert asked == {"train": "train-classes", "test": "test-classes", "none": "none"}


def test_untrained_client_falls_back_to_the_realigned_global_head_with_mask():
    plugin = _plugin("gla-fr", gamma=2.0, mask="train")
    model = _hand_model()
    ctx = _eval_ctx(3, [0, 7])
    present = plugin.eval_logits(logits=torch.zeros(1, 2), features=H, model=model, ctx=ctx, state={})
    present = personal_mask(present, plugin.eval_personalized_mask(), ctx)
    torch.testing.assert_close(
        present, torch.tensor([[MASK_VALUE, 3.5]])
    )  # global [6.5, 3.5], class 1 absent


def test_untrained_client_in_local_aux_mode_uses_its_random_initial_local_head_plus_raw_aux():
    """The authors' code: a client that never trained still has its randomly initialised local
    head, added to the raw (not realigned) auxiliary head."""
    plugin = _plugin("gla-fr", gamma=2.0, personal_head="local+aux", mask="none")
    ctx = _eval_ctx(3, [0, 7])
    out = plugin.eval_logits(logits=torch.zeros(1, 2), features=H, model=_hand_model(), ctx=ctx, state={})
    # nn.Linear's init from the stream (seed, "gla-fr-local-head", client 3), by hand:
    g = torch_generator(ctx.seed, "gla-fr-local-head", 3)
    bound = 1.0 / math.sqrt(3)
    w = (torch.rand(2, 3, generator=g) * 2 - 1) * bound
    b = (torch.rand(2, generator=g) * 2 - 1) * bound
    aux = torch.tensor([3 + 12 + 0.5, 2 - 0.5])  # the raw aux head, [15.5, 1.5]
    torch.testing.assert_close(out, (H @ w.t() + b + aux).reshape(1, 2))
    # Not the realigned generic model's [6.5, 3.5].
    assert not torch.allclose(out, torch.tensor([[6.5, 3.5]]))


def test_initial_local_head_is_the_one_client_start_draws(tiny):
    """The head evaluation assumes for a never-trained client is exactly what its first round
    starts from."""
    trainer, _ = _trainer(tiny, personal_head="local+aux")
    scenario = trainer.scenario
    plugin = trainer.hooks.plugins[0]
    # ClientContext.generator_for(purpose, per_round=False) is the stream (seed, purpose, client).
    ctx = SimpleNamespace(
        num_classes=10,
        device=torch.device("cpu"),
        generator_for=lambda purpose, per_round=True: torch_generator(scenario.seed, purpose, 4),
    )
    state: dict = {}
    model = torch.nn.Module()
    model.head = torch.nn.Linear(32, 10)
    plugin.client_start(model=model, ctx=ctx, state=state)
    view = dataclasses.replace(_eval_ctx(4), seed=scenario.seed, num_classes=10, round=7)
    w, b = initial_local_head(view, 32)
    assert torch.equal(state["local_weight"], w) and torch.equal(state["local_bias"], b)


# --------------------------------------------------------------------------- training side


def _trainer(tiny, **plugin_params):
    tiny["plugins"] = [{"name": "gla-fr", **plugin_params}]
    scenario = fedlt.load_scenario(tiny)
    data = build_federated_data(scenario)
    hooks = build_hooks(scenario.plugins)
    device = torch.device("cpu")
    global_state = {
        k: v.clone() for k, v in build_run_model(scenario, data, hooks, device).state_dict().items()
    }
    return ClientTrainer(scenario, data, hooks, device), global_state


def test_local_head_is_trained_but_never_sent(tiny):
    trainer, global_state = _trainer(tiny)
    states: dict = {}
    result = trainer.run(ClientTask(0, 1, {"round": 1}, states), global_state)
    local = states["gla-fr"]
    w, b = local["local_weight"], local["local_bias"]
    assert w.shape == (10, 32) and b.shape == (10,)
    assert not w.requires_grad and not b.requires_grad  # plain tensors in the checkpointed state
    # What goes to the server: the model's aggregated entries (aux head included), nothing else.
    assert set(result.weights) == set(aggregated_keys(trainer.model))
    assert {"gla_aux.weight", "gla_aux.bias", "head.weight"} <= set(result.weights)
    assert not any(v.shape == w.shape and torch.equal(v, w) for v in result.weights.values())
    assert not any(v.shape == b.shape and torch.equal(v, b) for v in result.weights.values())
    assert result.payloads == {}
    # Both extra heads trained; the aux head is a model entry the server averages.
    assert not torch.equal(result.weights["gla_aux.weight"], global_state["gla_aux.weight"])
    fresh: dict = {}
    hooks = trainer.hooks.for_client(0, 1, {"gla-fr": fresh})  # a fresh instance, client 0's first round
    hooks.client_start(model=trainer.model, ctx=_client_ctx(trainer, 0))
    assert not torch.equal(fresh["local_weight"], w)  # moved away from its initialisation


def _client_ctx(trainer, client_id):
    from fedlt.training.context import client_context

    return client_context(
        trainer.scenario, trainer.data, ClientTask(client_id, 1, {}), torch.device("cpu"), trainer.recipe
    )


def test_local_head_persists_in_state_across_rounds(tiny):
    trainer, global_state = _trainer(tiny)
    states: dict = {}
    trainer.run(ClientTask(1, 1, {"round": 1}, states), global_state)
    after_round_1 = states["gla-fr"]["local_weight"].clone()
    # Round 2 with lr 0: a head re-created from its seed would differ; the kept one is unchanged.
    trainer.recipe = dataclasses.replace(trainer.recipe, lr=0.0)
    trainer.run(ClientTask(1, 2, {"round": 2}, states), global_state)
    assert torch.equal(states["gla-fr"]["local_weight"], after_round_1)


def test_local_heads_survive_checkpoint_and_resume(tiny, tmp_path):
    tiny["plugins"] = [{"name": "gla-fr"}]
    tiny["federation"].update(rounds=4, eval_every=1)
    full = fedlt.run(tiny, out=tmp_path / "full")
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    trained = [c for c, s in ckpt["client_states"].items() if "gla-fr" in s]
    assert trained and all(
        ckpt["client_states"][c]["gla-fr"]["local_weight"].shape == (10, 32) for c in trained
    )
    assert not any("local" in k for k in ckpt["global"])

    class Stop(Exception):
        pass

    def stop_after_2(r, record):
        if r == 2:
            raise Stop

    run = Run.create(fedlt.load_scenario(tiny), tmp_path / "cut")
    run.on_round = stop_after_2
    with pytest.raises(Stop):
        run.execute()
    resumed = fedlt.resume(tmp_path / "cut")
    assert resumed["final"] == full["final"]
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "cut")]
    assert [json.loads(x) for x in lines[0]] == [json.loads(x) for x in lines[1]]


# --------------------------------------------------------------------------- FedLoGe = sse-c + gla-fr


def test_fedloge_runs_and_only_the_frozen_sse_c_head_drives_the_backbone(tiny, tmp_path):
    tiny["federation"].update(rounds=2, eval_every=1)
    tiny["plugins"] = [{"name": "sse-c", "n_refit_steps": 100}, {"name": "gla-fr", "mask": "train"}]
    run = Run.create(fedlt.load_scenario(tiny), tmp_path / "fedloge")
    start = {k: v.clone() for k, v in run.model.state_dict().items()}
    summary = run.execute()
    final = summary["final"]
    scalars = {k: v for k, v in final.items() if isinstance(v, float)}
    assert {"accuracy", "balanced_accuracy", "auroc_macro", "personalized_accuracy"} <= set(scalars)
    assert all(math.isfinite(v) for v in scalars.values()), scalars
    end = run.model.state_dict()
    assert torch.equal(end["head.weight"], start["head.weight"])  # SSE-C stays frozen
    assert not torch.equal(end["gla_aux.weight"], start["gla_aux.weight"])  # the aux head trained
    # Same scenario without gla-fr: the backbone ends bit-identical, so the extra heads (on
    # detached features) never touched it and the frozen SSE-C head alone trained it.
    tiny["plugins"] = [{"name": "sse-c", "n_refit_steps": 100}]
    alone = Run.create(fedlt.load_scenario(tiny), tmp_path / "alone")
    alone.execute()
    body = [k for k in alone.model.state_dict() if not k.startswith("head.")]
    assert body and all(torch.equal(alone.model.state_dict()[k], end[k]) for k in body)

    # Personalised evaluation masks every class a client has no training sample of.
    plugin = run.hooks.plugins[1]
    data = run.data
    for k in range(data.n_clients):
        counts = data.client_counts[k]
        view = torch.as_tensor(data.test_views[k])
        if (counts > 0).all() or len(view) == 0:
            continue
        with torch.no_grad():
            h = run.model.features(data.x_test[view])
            ctx = EvalContext(
                round=2,
                n_rounds=2,
                num_classes=data.num_classes,
                client_id=k,
                local_class_counts=counts,
                global_class_counts=data.train_class_counts,
                test_class_counts=np.bincount(data.y_test[view].cpu().numpy(), minlength=data.num_classes),
            )
            z = plugin.eval_logits(
                logits=run.model.head(h),
                features=h,
                model=run.model,
                ctx=ctx,
                state=run.client_states.get(k, {}).get("gla-fr", {}),
            )
            z = personal_mask(z, run.evaluator.personalized_mask, ctx)
        assert run.evaluator.personalized_mask == "train-classes"
        assert final["personalized_mask"] == "train-classes" and final["personalized_mask_source"] == "gla-fr"
        assert bool((z[:, counts == 0] == MASK_VALUE).all())
        assert not bool(np.isin(z.argmax(1).numpy(), np.flatnonzero(counts == 0)).any())
        break
    else:
        pytest.fail("no client with an absent class in this scenario: the masking check ran on nothing")
