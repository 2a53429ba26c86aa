"""mvp-prompts and mvp-mask: key selection with the frequency penalty, L_CVPT and the class mask on
hand-worked tensors, plugin wiring and order errors, a frozen backbone that stays bit-identical,
and tiny end-to-end runs on digits."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from fedlt_plugins.mvp import MaskedHead, PromptPool, cvpt_loss, key_distances, select_keys
from support.contexts import client_hooks, setup_ctx
from torch import nn

import fedlt
from fedlt.base.seeding import torch_generator
from fedlt.hooks.context import SetupContext
from fedlt.hooks.discovery import discover_plugins
from fedlt.hooks.dispatch import build_hooks
from fedlt.models import build_model
from fedlt.store.checkpoint import load_checkpoint

VIT = {"name": "vit", "dim": 16, "depth": 2, "heads": 2}
R2 = 1.0 / math.sqrt(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _plugins(*specs: dict) -> list:
    return build_hooks(fedlt.load_scenario({"plugins": list(specs)}).plugins).plugins


def _setup(num_classes: int = 4) -> SetupContext:
    return setup_ctx(num_classes, input_shape=(64,), generator=torch.Generator().manual_seed(0))


def _pool(keys, counts, frequency_penalty: bool = True) -> PromptPool:
    """A pool in 2-D with hand-set keys and counts; g-prompt at block 0, e-prompts at block 1."""
    keys = torch.tensor(keys, dtype=torch.float32)
    pool = PromptPool(2, len(keys), (0,), 1, (1,), 2, frequency_penalty, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool.keys.copy_(keys)
        pool.counts.copy_(torch.tensor(counts, dtype=torch.float32))
    return pool


def test_each_plugin_implements_exactly_its_hooks():
    found = discover_plugins()
    assert set(found["mvp-prompts"].hooks) == {"client_extra_losses", "configure_model"}
    assert set(found["mvp-mask"].hooks) == {"configure_model"}


# --------------------------------------------------------------------------- selection


def test_frequency_penalty_picks_the_less_used_of_two_equally_close_keys():
    # Prepare: q = (1, 1)/sqrt2 is at distance 1 - 1/sqrt2 from both keys.
    q = torch.tensor([[R2, R2]])
    d = key_distances(q, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(d, torch.full((1, 2), 1.0 - R2))

    # Execute / Assert: the key used less often wins, whichever it is.
    assert select_keys(d, torch.tensor([3.0, 0.0])).item() == 1
    assert select_keys(d, torch.tensor([0.0, 3.0])).item() == 0


def test_frequency_penalty_can_override_closeness():
    # d = (0.1, 0.3): scores 0.1 * (5 + 1) = 0.6 against 0.3 * (0 + 1) = 0.3.
    d = torch.tensor([[0.1, 0.3]])
    assert select_keys(d, torch.tensor([5.0, 0.0])).item() == 1
    assert select_keys(d, None).item() == 0
    assert select_keys(d, torch.tensor([1.0, 0.0])).item() == 0  # 0.2 < 0.3


def test_pool_records_selection_counts_in_training_only_and_builds_prompts():
    # Prepare: q0 sits on key 0; q1 = (0.6, 0.8) is closest to key 1 (d = 0.2) and key 0 (d = 0.4).
    pool = _pool([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [0.0, 0.0, 0.0])
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])

    # Execute
    pool.eval()
    pool(q)
    counts_after_eval = pool.counts.clone()
    pool.train()
    prompts = pool(q)

    # Assert
    assert pool.selected.tolist() == [0, 1, 1]
    assert torch.equal(counts_after_eval, torch.zeros(3))
    assert pool.counts.tolist() == [1.0, 2.0, 0.0]
    assert pool.mass.tolist() == [1.0, 1.0, 1.0]  # the mass before this batch's counts
    assert set(prompts) == {0, 1}
    assert torch.equal(prompts[0], pool.g_prompt[0].expand(3, -1, -1))
    assert torch.equal(prompts[1], pool.e_prompts[pool.selected, 0])
    # Next batch: key 1 was used twice, so q = (1, 1)/sqrt2 (equally close to keys 0 and 1) takes 0.
    pool(torch.tensor([[R2, R2]]))
    assert pool.selected.tolist() == [0]
    assert pool.mass.tolist() == [2.0, 3.0, 1.0]


def test_overlapping_g_and_e_layers_concatenate():
    pool = PromptPool(2, 3, (0, 1), 5, (1,), 7, True, torch.Generator().manual_seed(0))
    prompts = pool(torch.randn(4, 2))
    assert {k: tuple(v.shape) for k, v in prompts.items()} == {0: (4, 5, 2), 1: (4, 12, 2)}


# --------------------------------------------------------------------------- L_CVPT


def test_cvpt_loss_equals_the_hand_worked_formula():
    # Prepare: keys K0 = (1, 0), K1 = (0, 1), K2 = (-1, 0); D row 0 = (0, 1, 2), row 1 = (1, 0, 1).
    # counts (1, 0, 0): q0 = (1, 0) has d = (0, 1, 2), scores (0, 1, 2) -> k* = 0, mu = 2;
    # q1 = (0.6, 0.8) has d = (0.4, 0.2, 1.6), scores (0.8, 0.2, 1.6) -> k* = 1, mu = 1.
    pool = _pool([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], [1.0, 0.0, 0.0])
    pool.train()
    pool(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    assert pool.selected.tolist() == [0, 1]
    pos = (math.exp(0.0 / 2) + math.exp(0.2 / 1)) / 2
    neg = ((math.exp(1 / 2) + math.exp(2 / 2)) / 2 + (math.exp(1 / 1) + math.exp(1 / 1)) / 2) / 2
    expected = -math.log(neg / (pos + neg) + 1e-6)

    # Execute: through the plugin hook (one client-round's instance), with its weight.
    hooks = client_hooks({"name": "mvp-prompts", "lambda_cvpt": 0.5})
    loss = hooks.client_extra_losses(model=SimpleNamespace(prompter=pool))
    pull = cvpt_loss(pool.query, pool.keys, pool.selected, pool.mass, contrastive=False)

    # Assert
    assert loss.item() == pytest.approx(0.5 * expected, rel=1e-5)
    assert pull.item() == pytest.approx((0.0 + 0.2) / 2, abs=1e-6)
    loss.backward()
    assert pool.keys.grad is not None and pool.keys.grad.abs().sum() > 0
    assert pool.query.grad_fn is None  # the query is a constant


def test_cvpt_loss_pulls_queries_and_pushes_keys():
    # Moving the selected key toward its query, or away from the other keys, lowers L_CVPT.
    q = torch.tensor([[0.6, 0.8]])
    k, mass = torch.tensor([1]), torch.ones(3)
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    closer = base.clone()
    closer[1] = torch.tensor([0.5, 0.9])
    loss = cvpt_loss(q, base, k, mass, True)
    assert cvpt_loss(q, closer, k, mass, True) < loss
    apart = base.clone()
    apart[0] = torch.tensor([0.9, -0.4])  # farther from key 1
    assert cvpt_loss(q, apart, k, mass, True) < loss


def test_lambda_zero_adds_no_loss_and_contrastive_needs_two_keys():
    assert client_hooks({"name": "mvp-prompts", "lambda_cvpt": 0.0}).client_extra_losses(model=None) is None
    with pytest.raises(fedlt.ScenarioError, match="pool_size >= 2"):
        _plugins({"name": "mvp-prompts", "pool_size": 1})
    _plugins({"name": "mvp-prompts", "pool_size": 1, "contrastive": False})  # the pull is fine
    with pytest.raises(fedlt.ScenarioError, match="block indices"):
        _plugins({"name": "mvp-prompts", "e_layers": [-1]})


# --------------------------------------------------------------------------- mask


def test_masked_head_scales_logits_by_the_selected_keys_class_mask():
    # Prepare: z = W h + b with hand weights; P = 2 keys, C = 3 classes.
    pool = _pool([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    masked = MaskedHead(head, pool)
    with torch.no_grad():
        masked.class_mask.copy_(torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]))
    pool(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # selects key 1, then key 0
    h = torch.tensor([[1.0, 2.0], [3.0, -1.0]])  # z = [[1, 3, 2], [3, 0, 1]]

    # Execute
    z = masked(h)

    # Assert: 2 sigma(2) = 1.7616, 2 sigma(0) = 1, 2 sigma(1) = 1.4621, 2 sigma(-1) = 0.5379.
    s = lambda v: 2.0 / (1.0 + math.exp(-v))  # noqa: E731
    expected = torch.tensor([[1 * s(2), 3 * s(0), 2 * s(0)], [3 * s(0), 0 * s(1), 1 * s(-1)]])
    torch.testing.assert_close(z, expected)
    assert masked.weight is head.weight and masked.bias is head.bias
    assert set(masked.state_dict()) == {"weight", "bias", "class_mask"}
    with pytest.raises(RuntimeError, match="batch"):
        masked(torch.randn(5, 2))


def test_configured_model_masks_in_training_and_evaluation():
    # Prepare
    torch.manual_seed(0)
    model = build_model("vit", (64,), 4, dim=16, depth=2, heads=2)
    prompts, mask = _plugins(
        {"name": "mvp-prompts", "pool_size": 3, "freeze_backbone": False}, {"name": "mvp-mask"}
    )
    ctx = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # Execute
    prompts.configure_model(model=model, ctx=ctx)
    mask.configure_model(model=model)
    x = torch.randn(5, 64)
    outputs = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        h = model.features(x)
        outputs[mode] = (model.head(h), h, model.prompter.selected)

    # Assert: the mask starts at -1 (factor 2 sigma(-1) ~ 0.54) and acts in both modes.
    assert isinstance(model.head, MaskedHead) and torch.equal(model.head.class_mask, torch.full((3, 4), -1.0))
    for z, h, _ in outputs.values():
        torch.testing.assert_close(
            z, (h @ model.head.weight.T + model.head.bias) * (2 * torch.sigmoid(torch.tensor(-1.0)))
        )
    assert set(before) <= set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing redrawn
    assert {"head.class_mask", "prompter.keys", "prompter.counts"} <= set(model.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert model.prompter.counts.sum().item() == 5  # the training pass only
    # deepcopy (as personalised evaluation does) keeps the head tied to the copy's own pool.
    twin = copy.deepcopy(model)
    assert twin.head.pool is twin.prompter


def test_freeze_backbone_freezes_everything_but_the_head():
    torch.manual_seed(0)
    model = build_model("vit", (64,), 4, dim=16, depth=2, heads=2)
    (prompts,) = _plugins({"name": "mvp-prompts"})
    prompts.configure_model(model=model, ctx=_setup())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "head.weight",
        "head.bias",
        "prompter.keys",
        "prompter.g_prompt",
        "prompter.e_prompts",
    }


def test_wrong_model_or_order_is_refused_before_anything_is_built(tiny):
    from fedlt.prepare import preflight

    # mvp-prompts needs a ViT's prompt slot; mvp-mask a head and mvp-prompts listed before it.
    tiny["plugins"] = [{"name": "mvp-prompts"}]
    (problem,) = preflight(fedlt.load_scenario(tiny))
    assert problem.key == "plugins[0].name" and "prompt slot" in str(problem) and "vit" in str(problem)
    tiny["model"] = VIT
    tiny["plugins"] = [{"name": "mvp-mask"}, {"name": "mvp-prompts"}]
    (problem,) = preflight(fedlt.load_scenario(tiny))
    assert problem.key == "plugins[0].name" and "listed after 'mvp-prompts'" in str(problem)
    tiny["plugins"] = [{"name": "mvp-prompts"}, {"name": "mvp-mask"}]
    assert preflight(fedlt.load_scenario(tiny)) == []


def test_mask_listed_before_prompts_fails_before_training(tiny, tmp_path):
    tiny["model"] = VIT
    tiny["plugins"] = [{"name": "mvp-mask"}, {"name": "mvp-prompts", "freeze_backbone": False}]
    with pytest.raises(fedlt.FedltError, match="mvp-prompts"):
        fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 1})


# --------------------------------------------------------------------------- end to end


def _finite(final: dict) -> None:
    for key in ("accuracy", "balanced_accuracy", "train_loss", "personalized_accuracy"):
        assert final[key] is not None and math.isfinite(final[key]), key


def test_mvp_on_digits_end_to_end(tiny, tmp_path):
    # Prepare: the tiny ViT, trained end to end (no pretrained weights), prompts + mask.
    tiny["model"] = {"name": "vit", "dim": 32, "depth": 2, "heads": 2}
    tiny["train"] = {"local_epochs": 1, "batch_size": 32, "optimizer": "adam", "lr": 3e-3}
    tiny["plugins"] = [
        {"name": "mvp-prompts", "freeze_backbone": False, "pool_size": 4, "e_layers": [1]},
        {"name": "mvp-mask"},
    ]

    # Execute
    summary = fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 2})

    # Assert: finite metrics; keys were selected and everything trainable moved.
    _finite(summary["final"])
    assert summary["plugins"] == ["mvp-prompts", "mvp-mask"]
    final = load_checkpoint(tmp_path / "r")["global"]
    assert final["prompter.counts"].sum() > 0
    assert not torch.equal(final["head.class_mask"], torch.full_like(final["head.class_mask"], -1.0))


def test_frozen_pretrained_backbone_is_bit_identical_after_a_round(tiny, tmp_path):
    # Prepare: "pretrained" weights in a local file (a ViT from another seed).
    torch.manual_seed(123)
    weights = build_model("vit", (64,), 10, dim=16, depth=2, heads=2).state_dict()
    path = tmp_path / "vit16.pt"
    torch.save(weights, path)
    tiny["model"] = {**VIT, "pretrained": str(path)}
    tiny["plugins"] = [{"name": "mvp-prompts", "pool_size": 3, "e_layers": [1]}, {"name": "mvp-mask"}]

    # Execute
    fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 1})

    # Assert: backbone unchanged bit for bit; head, keys, prompts and mask trained.
    final = load_checkpoint(tmp_path / "r")["global"]
    for key, value in weights.items():
        if key.startswith("head."):
            assert not torch.equal(final[key], value), key
        else:
            assert torch.equal(final[key], value), key
    # The initial pool: mvp-prompts draws first from the configure-model generator.
    initial = PromptPool(16, 3, (0, 1), 5, (1,), 20, True, torch_generator(tiny["seed"], "configure-model"))
    for name, value in initial.state_dict().items():
        if name != "counts":
            assert final[f"prompter.{name}"].shape == value.shape
            assert not torch.equal(final[f"prompter.{name}"], value), name
    assert final["prompter.counts"].sum() > 0
    assert not torch.equal(final["head.class_mask"], torch.full_like(final["head.class_mask"], -1.0))


def test_mvp_recipe_on_a_si_blurry_stream(tiny, tmp_path):
    # The whole MVP recipe: prompts + mask + seen-class mask + gsf + afs, online on a stream.
    tiny["model"] = VIT
    tiny["train"] = {"local_epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 3e-3}
    tiny["stream"] = {"kind": "si-blurry", "n_tasks": 2, "samples_per_round": 32, "online_iter": 2}
    tiny["plugins"] = [
        {"name": "mvp-prompts", "freeze_backbone": False, "pool_size": 3, "e_layers": [1]},
        {"name": "mvp-mask"},
        {"name": "seen-class-mask"},
        {"name": "gsf"},
        {"name": "afs"},
    ]
    summary = fedlt.run(tiny, out=tmp_path / "r", **{"federation.rounds": 2})
    _finite(summary["final"])
    assert math.isfinite(summary["final"]["a_auc"])
    assert load_checkpoint(tmp_path / "r")["global"]["prompter.counts"].sum() > 0
