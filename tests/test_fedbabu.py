"""fedbabu: a head frozen at its random init, and fine-tuning that personalises only a copy."""

from __future__ import annotations

import copy

import pytest
import torch
from fedlt_plugins.fedbabu import finetune

import fedlt
from fedlt.driver.runner import Run
from fedlt.metrics.classification import personalized_accuracy
from fedlt.training.worker import aggregated_keys


def _run(tiny, tmp_path, personalized=True, **params) -> tuple[Run, dict]:
    tiny["plugins"] = [{"name": "fedbabu", **params}]
    tiny["eval"]["personalized"] = personalized
    tiny["federation"].update(rounds=2, eval_every=0)  # evaluate (and fine-tune) after the last round only
    run = Run.create(fedlt.load_scenario(tiny), tmp_path / "r")
    return run, {k: v.clone() for k, v in run.model.state_dict().items()}


def test_head_stays_at_its_random_init_and_is_never_aggregated(tiny, tmp_path):
    run, start = _run(tiny, tmp_path, personalized=False)
    assert not any(k.startswith("head.") for k in aggregated_keys(run.model))
    assert not run.model.head.weight.requires_grad and not run.model.head.bias.requires_grad
    run.execute()
    end = run.model.state_dict()
    assert torch.equal(end["head.weight"], start["head.weight"]) and torch.equal(
        end["head.bias"], start["head.bias"]
    )
    assert bool(start["head.weight"].abs().sum() > 0)  # a random init, not zeros
    assert not torch.equal(end["body.0.weight"], start["body.0.weight"])  # the body trained


def test_fine_tuning_personalises_a_copy_and_leaves_the_global_model_untouched(tiny, tmp_path):
    run, _ = _run(tiny, tmp_path, n_finetune_epochs=2, finetune_lr=0.05)
    summary = run.execute()
    model, data = run.model, run.data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = run.evaluator.evaluate(model, 2, run.client_states)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.requires_grad == (not n.startswith("head.")) for n, p in model.named_parameters())
    # Deterministic: evaluating again gives the personalised accuracies of the run.
    assert again["personalized_client_accuracy"] == summary["final"]["personalized_client_accuracy"]
    # The global model's own accuracy on each client's local view, without fine-tuning.
    correct, total = [], []
    with torch.no_grad():
        for view in data.test_views:
            idx = torch.as_tensor(view, dtype=torch.long)
            correct.append(
                int((model(data.x_test[idx]).argmax(1) == data.y_test[idx]).sum()) if len(view) else 0
            )
            total.append(len(view))
    global_local = personalized_accuracy(correct, total)
    personalised = summary["final"]["personalized_accuracy"]
    # Fine-tuning on local data (whose class mix the local view mirrors) raises local accuracy.
    assert personalised > global_local + 0.05, (personalised, global_local)


def _batch(n=48, d=64, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("part", ["head", "full"])
def test_finetune_updates_only_what_it_is_asked_and_restores_the_freeze(part):
    torch.manual_seed(0)
    model = fedlt.models.build_model("mlp", (64,), 10, hidden=[16])
    for p in model.head.parameters():
        p.requires_grad_(False)  # as fedbabu leaves it for federation
    x, y = _batch()
    start = copy.deepcopy(model.state_dict())
    kwargs = {"part": part, "n_epochs": 2, "lr": 0.1, "momentum": 0.9, "batch_size": 16}
    finetune(model, x, y, generator=torch.Generator().manual_seed(5), **kwargs)
    end = model.state_dict()
    assert not torch.equal(end["head.weight"], start["head.weight"])
    assert torch.equal(end["body.0.weight"], start["body.0.weight"]) == (part == "head")
    assert not model.head.weight.requires_grad and model.body[0].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    # The sample order comes only from the generator: same seed, same result.
    other = fedlt.models.build_model("mlp", (64,), 10, hidden=[16])
    other.load_state_dict(start)
    finetune(other, x, y, generator=torch.Generator().manual_seed(5), **kwargs)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in end.items())


def test_zero_finetune_epochs_makes_personalised_equal_global_local_accuracy(tiny, tmp_path):
    run, _ = _run(tiny, tmp_path, n_finetune_epochs=0)
    summary = run.execute()
    data, model = run.data, run.model
    with torch.no_grad():
        for k, view in enumerate(data.test_views):
            if len(view) == 0:
                continue
            idx = torch.as_tensor(view, dtype=torch.long)
            acc = float((model(data.x_test[idx]).argmax(1) == data.y_test[idx]).float().mean())
            assert summary["final"]["personalized_client_accuracy"][k] == pytest.approx(acc)
