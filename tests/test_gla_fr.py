"""gla-fr: realignment formulas by hand, local heads that never leave the client, and FedLoGe."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from fedlt_plugins.gla_fr import MASK_VALUE
from support.contexts import eval_ctx

import fedlt
from fedlt.data.federated import build_federated_data
from fedlt.driver.runner import Run
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
    out = _plugin("gla-fr", gamma=2.0, **params).eval_logits(
        logits=torch.zeros(1, 2),
        features=H,
        model=_hand_model(),
        ctx=_eval_ctx(0, [5, 0], test_counts=[0, 3]),
        state=dict(LOCAL),
    )
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_untrained_client_falls_back_to_the_realigned_global_head_with_mask():
    plugin = _plugin("gla-fr", gamma=2.0, mask="train")
    model = _hand_model()
    present = plugin.eval_logits(
        logits=torch.zeros(1, 2), features=H, model=model, ctx=_eval_ctx(3, [0, 7]), state={}
    )
    torch.testing.assert_close(
        present, torch.tensor([[MASK_VALUE, 3.5]])
    )  # global [6.5, 3.5], class 1 absent


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
            z = plugin.eval_logits(
                logits=run.model.head(h),
                features=h,
                model=run.model,
                ctx=EvalContext(
                    round=2,
                    n_rounds=2,
                    num_classes=data.num_classes,
                    client_id=k,
                    local_class_counts=counts,
                    global_class_counts=data.train_class_counts,
                    test_class_counts=np.bincount(
                        data.y_test[view].cpu().numpy(), minlength=data.num_classes
                    ),
                ),
                state=run.client_states.get(k, {}).get("gla-fr", {}),
            )
        assert bool((z[:, counts == 0] == MASK_VALUE).all())
        assert not bool(np.isin(z.argmax(1).numpy(), np.flatnonzero(counts == 0)).any())
        break
    else:
        pytest.fail("no client with an absent class in this scenario: the masking check ran on nothing")
