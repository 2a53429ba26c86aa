"""The ViT: features/head split on images and on digits-shaped flat input, pretrained loading,
shape errors, and the prompt slot (un-prompted query, per-block prompt tokens)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.base.registry import ParameterError
from fedlt.errors import ScenarioError
from fedlt.models import MODEL_NAMES, FedModel, ViT, build_model, check_model, model_params
from fedlt.scenario.config import scenario_from_dict

TINY = {"dim": 16, "depth": 2, "heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("shape", "params", "n_tokens"),
    [
        ((3, 32, 32), {}, 1 + 64),  # defaults: patch 4 -> 8 x 8 patches
        ((64,), TINY, 1 + 4),  # digits: viewed as 1 x 8 x 8, patch 4 -> 2 x 2 patches
        ((64,), {**TINY, "patch_size": 2}, 1 + 16),
        ((1, 12, 8), {**TINY, "patch_size": 4}, 1 + 6),  # non-square images work too
    ],
)
def test_features_head_split(shape: tuple[int, ...], params: dict, n_tokens: int) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model("vit", shape, 7, **params).eval()
    x = torch.randn(3, *shape)
    dim = params.get("dim", 64)

    # Execute
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)

    # Assert
    assert isinstance(model, FedModel) and isinstance(model, ViT)
    assert model.feature_dim == dim and feats.shape == (3, dim)
    assert logits.shape == (3, 7)
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (dim, 7)
    assert torch.equal(logits, model.head(feats))
    assert model.pos_embed.shape == (1, n_tokens, dim)
    assert {"head.weight", "head.bias", "cls_token", "blocks.0.attn.qkv.weight"} <= set(model.state_dict())


def test_registry_and_defaults() -> None:
    assert "vit" in MODEL_NAMES
    assert model_params("vit") == {"patch_size": 4, "dim": 64, "depth": 4, "heads": 4, "pretrained": None}
    model = build_model("vit", (3, 16, 16), 5)
    assert (model.patch_size, model.dim, model.depth, model.heads) == (4, 64, 4, 4)
    assert len(model.blocks) == 4 and model.prompter is None


def test_flat_digits_input_equals_the_image_view() -> None:
    # A (64,) sample is the (1, 8, 8) image: same weights give the same features either way.
    torch.manual_seed(0)
    flat = build_model("vit", (64,), 3, **TINY)
    image = build_model("vit", (1, 8, 8), 3, **TINY)
    image.load_state_dict(flat.state_dict())
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(flat.features(x), image.features(x.view(4, 1, 8, 8)))


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = build_model("vit", (64,), 4, **TINY)
    loss = F.cross_entropy(model(torch.randn(6, 64)), torch.randint(0, 4, (6,)))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_attention_matches_a_reference_computation() -> None:
    # One block, one head: softmax(q k^T / sqrt(d)) v through qkv/proj, by hand.
    torch.manual_seed(0)
    model = ViT((1, 4, 4), 2, patch_size=2, dim=8, depth=1, heads=1)
    block = model.blocks[0]
    t = torch.randn(2, 5, 8)
    h = block.norm1(t)
    q, k, v = block.attn.qkv(h).chunk(3, dim=-1)
    att = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1) @ v
    x = t + block.attn.proj(att)
    expected = x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))
    torch.testing.assert_close(block(t), expected)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("shape", "params", "param"),
    [
        ((3, 32, 32), {"patch_size": 5}, "patch_size"),  # 5 does not divide 32
        ((64,), {"patch_size": 3}, "patch_size"),  # digits are 8 x 8
        ((60,), {}, "name"),  # flat, but 60 is not a square
        ((2, 8), {}, "name"),
    ],
)
def test_shapes_the_data_decides_are_parameter_errors(
    shape: tuple[int, ...], params: dict, param: str
) -> None:
    for check in (build_model, check_model):
        with pytest.raises(ParameterError) as info:
            check("vit", shape, 10, **params)
        assert info.value.param == param


@pytest.mark.parametrize(
    ("params", "key", "fragment"),
    [
        ({"dim": 30, "heads": 4}, "model.heads", "a divisor of dim = 30"),
        ({"depth": 0}, "model.depth", "greater than 0"),
        ({"dim": True}, "model.dim", "an integer"),
        ({"width": 16}, "model.width", "unset for model 'vit'"),
    ],
)
def test_scenario_alone_decides_these_when_it_loads(params: dict, key: str, fragment: str) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"model": {"name": "vit", **params}})
    assert info.value.key == key
    assert fragment in str(info.value)
    with pytest.raises(ValueError):  # the library says so too, as a plain error
        build_model("vit", (3, 32, 32), 10, **params)


# --------------------------------------------------------------------------- pretrained


def test_pretrained_round_trip(tmp_path) -> None:
    # Prepare: weights of one model, saved; a second model drawn from another seed.
    torch.manual_seed(0)
    source = build_model("vit", (64,), 5, **TINY)
    path = tmp_path / "vit.pt"
    torch.save(source.state_dict(), path)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": source.state_dict()}, wrapped)

    # Execute
    torch.manual_seed(1)
    loaded = build_model("vit", (64,), 5, pretrained=str(path), **TINY)
    torch.manual_seed(1)
    other_classes = build_model("vit", (64,), 3, pretrained=str(wrapped), **TINY)
    torch.manual_seed(1)
    fresh = build_model("vit", (64,), 3, **TINY)

    # Assert: everything loaded; with another class count the head stays freshly initialised.
    want = source.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    for k, v in other_classes.state_dict().items():
        expected = fresh.state_dict()[k] if k.startswith("head.") else want[k]
        assert torch.equal(v, expected), k
    assert not torch.equal(fresh.state_dict()["cls_token"], want["cls_token"])  # the load did something


def test_pretrained_errors(tmp_path) -> None:
    torch.manual_seed(0)
    wrong_size = tmp_path / "wide.pt"
    torch.save(build_model("vit", (64,), 5, dim=32, depth=2, heads=2).state_dict(), wrong_size)
    too_deep = tmp_path / "deep.pt"
    torch.save(build_model("vit", (64,), 5, dim=16, depth=3, heads=2).state_dict(), too_deep)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)

    cases = {
        str(tmp_path / "missing.pt"): "existing",
        str(wrong_size): "shape mismatch",
        str(too_deep): "unexpected",
        str(garbage): "Loading it failed",
        str(not_a_state_dict): "state dict",
    }
    for path, message in cases.items():
        for check in (build_model, check_model):
            with pytest.raises(ParameterError, match=message) as info:
                check("vit", (64,), 5, pretrained=path, **TINY)
            assert (info.value.param, info.value.value) == ("pretrained", path)
    check_model("vit", (64,), 5, pretrained=str(too_deep), dim=16, depth=3, heads=2)  # a fitting file


# --------------------------------------------------------------------------- prompt slot


class Recorder(nn.Module):
    """A prompter that records its query and returns fixed prompt tokens for block 1."""

    def __init__(self, prompt: torch.Tensor) -> None:
        super().__init__()
        self.prompt = nn.Parameter(prompt)
        self.queries: list[torch.Tensor] = []

    def forward(self, query: torch.Tensor) -> dict[int, torch.Tensor]:
        self.queries.append(query)
        return {1: self.prompt.expand(query.shape[0], -1, -1)}


def test_prompt_slot_uses_the_unprompted_query_and_per_block_prompts() -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model("vit", (64,), 4, **TINY)
    x = torch.randn(3, 64)
    with torch.no_grad():
        plain = model.features(x)
    model.prompter = Recorder(torch.randn(1, 2, 16))

    # Execute
    prompted = model.features(x)

    # Assert: the query is the un-prompted feature, computed without a graph.
    (query,) = model.prompter.queries
    assert torch.equal(query, plain) and query.grad_fn is None
    # The prompt tokens join block 1 only and are dropped after it: block(cat(x, P))[:, :N].
    with torch.no_grad():
        t = model._tokens(x)
        t = model.blocks[0](t)
        n = t.shape[1]
        t = model.blocks[1](torch.cat((t, model.prompter.prompt.expand(3, -1, -1)), dim=1))[:, :n]
        expected = model.norm(t[:, 0])
    torch.testing.assert_close(prompted, expected)
    assert not torch.allclose(prompted, plain)
    # Gradients reach the prompts; forward == head(features) still holds. The features end in a
    # LayerNorm with unit weight, whose outputs sum to zero whatever the prompts: a plain .sum()
    # has a gradient that is zero by mathematics, so weigh the features by a fixed random vector.
    weights = torch.randn(prompted.shape[1], generator=torch.Generator().manual_seed(1))
    (prompted @ weights).sum().backward()
    assert model.prompter.prompt.grad.abs().sum() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(model.features(x)))


def test_empty_prompts_change_nothing() -> None:
    torch.manual_seed(0)
    model = build_model("vit", (64,), 4, **TINY)
    x = torch.randn(3, 64)
    with torch.no_grad():
        plain = model.features(x)

    class Nothing(nn.Module):
        def forward(self, query: torch.Tensor) -> dict[int, torch.Tensor]:
            return {}

    model.prompter = Nothing()
    with torch.no_grad():
        assert torch.equal(model.features(x), plain)
    assert "prompter" not in dict(model.named_parameters()) and "prompter" in dict(model.named_children())
