"""Tests for fedlt.models: features/head split, benchmark CNN, ResNets, cosine head and the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.base.registry import ParameterError
from fedlt.models import (
    CNN,
    MLP,
    MODEL_NAMES,
    MODELS,
    CosineLinear,
    FedModel,
    FourStageResNet,
    ResNet,
    build_model,
    check_model,
    model_params,
    use_cosine_head,
)


class Net(nn.Module):
    """Copy of the Flower benchmark's model (shared/bench/flower_fedavg.py), kept verbatim in effect."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CASES = [
    ("mlp", (3, 8, 8), {}, 64),
    ("mlp", (20,), {"hidden": [32]}, 32),
    ("mlp", (20,), {"hidden": []}, 20),
    ("cnn", (3, 32, 32), {}, 32 * 8 * 8),
    ("cnn", (1, 28, 28), {"widths": [8, 16, 24]}, 24 * 3 * 3),
    ("resnet8", (3, 32, 32), {}, 64),
    ("resnet20", (1, 16, 16), {"width": 8}, 32),
    ("resnet32", (3, 8, 8), {"width": 4}, 16),
    ("resnet18", (3, 32, 32), {"width": 8}, 64),
    ("resnet18", (1, 28, 28), {"width": 4}, 32),
    ("resnet34", (3, 5, 7), {"width": 4}, 32),
]


@pytest.mark.parametrize(("name", "shape", "params", "feature_dim"), CASES)
def test_features_head_split(name: str, shape: tuple[int, ...], params: dict, feature_dim: int) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model(name, shape, 7, **params).eval()
    x = torch.randn(3, *shape)

    # Execute
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)

    # Assert
    assert isinstance(model, FedModel)
    assert model.feature_dim == feature_dim
    assert model.num_classes == 7
    assert feats.shape == (3, feature_dim)
    assert logits.shape == (3, 7)
    assert isinstance(model.head, nn.Linear)
    assert (model.head.in_features, model.head.out_features) == (feature_dim, 7)
    assert torch.equal(logits, model.head(feats))
    assert {"head.weight", "head.bias"} <= set(model.state_dict())


def test_cnn_is_the_benchmark_net() -> None:
    # Prepare
    torch.manual_seed(0)
    net = Net()
    torch.manual_seed(0)
    cnn = CNN((3, 32, 32), 10)
    x = torch.randn(4, 3, 32, 32)

    # Execute: built from the same seed they already agree; copy across anyway to compare computation.
    same_init = all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), cnn.state_dict().values(), strict=True)
    )
    torch.manual_seed(1)
    net = Net()
    cnn.load_state_dict(dict(zip(cnn.state_dict(), net.state_dict().values(), strict=True)))

    # Assert
    assert _num_params(cnn) == _num_params(net) == 25_578
    assert [tuple(p.shape) for p in cnn.parameters()] == [tuple(p.shape) for p in net.parameters()]
    assert same_init
    with torch.no_grad():
        assert torch.equal(cnn(x), net(x))


def test_resnet_parameter_counts_are_plausible() -> None:
    # Prepare / Execute
    counts = {name: _num_params(build_model(name, (3, 32, 32), 10)) for name in ("resnet8", "resnet20")}

    # Assert: He et al. report 0.27M for ResNet-20; option-B shortcuts add 2,752 parameters.
    assert 0.26e6 < counts["resnet20"] < 0.28e6
    assert 0.07e6 < counts["resnet8"] < 0.09e6
    assert _num_params(build_model("resnet20", (3, 32, 32), 10, width=32)) > 3.5 * counts["resnet20"]


def test_resnet_structure() -> None:
    # Prepare
    model = ResNet((3, 32, 32), 10, depth=20)

    # Execute
    blocks = [block for stage in model.stages for block in stage]
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]

    # Assert: 3 stages x 3 blocks; 1x1-conv shortcuts only where stride or width changes.
    assert len(blocks) == 9
    assert len(projections) == 2
    assert [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.feature_dim == 64
    with pytest.raises(ParameterError) as info:
        ResNet((3, 32, 32), 10, depth=10)  # not 6n + 2
    assert info.value.param == "depth"


def test_models_are_deterministic_given_the_global_seed() -> None:
    for name in MODEL_NAMES:
        torch.manual_seed(123)
        first = build_model(name, (3, 16, 16), 5).state_dict()
        torch.manual_seed(123)
        second = build_model(name, (3, 16, 16), 5).state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first), name


@pytest.mark.parametrize("name", ["resnet8", "resnet18", "resnet34"])
def test_resnet_backpropagates_to_every_parameter(name: str) -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model(name, (3, 16, 16), 4, width=4)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))

    # Execute
    loss = F.cross_entropy(model(x), y)
    loss.backward()

    # Assert
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.head.weight.grad.abs().sum() > 0


def test_model_params_lists_defaults() -> None:
    assert model_params("mlp") == {"hidden": [128, 64]}
    assert model_params("cnn") == {"widths": [16, 32]}
    for name in ("resnet8", "resnet20", "resnet32"):
        assert model_params(name) == {"width": 16}
    for name in ("resnet18", "resnet34"):
        assert model_params(name) == {"width": 64}
    assert model_params("vit") == {"patch_size": 4, "dim": 64, "depth": 4, "heads": 4, "pretrained": None}
    params = model_params("mlp")
    params["hidden"].append(1)
    assert model_params("mlp") == {"hidden": [128, 64]}  # a copy, not the registry itself
    assert (
        MODEL_NAMES
        == MODELS.names
        == (
            "mlp",
            "cnn",
            "resnet8",
            "resnet20",
            "resnet32",
            "resnet18",
            "resnet34",
            "vit",
        )
    )


def test_unknown_model_is_a_value_error_listing_the_registry() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'vgg11'; known: mlp, cnn, resnet8") as info:
        build_model("vgg11", (3, 32, 32), 10)
    assert "resnet18" in str(info.value)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        model_params("vgg")


def test_unknown_param_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="depth"):
        build_model("resnet20", (3, 32, 32), 10, depth=56)
    with pytest.raises(ValueError, match="widths"):
        build_model("mlp", (10,), 2, widths=[4])


@pytest.mark.parametrize(
    ("name", "params", "param"),
    [
        ("mlp", {"hidden": [64, 0]}, "hidden"),
        ("mlp", {"hidden": "64"}, "hidden"),
        ("cnn", {"widths": []}, "widths"),
        ("cnn", {"widths": [16, 2.5]}, "widths"),
        ("resnet8", {"width": 0}, "width"),
        ("resnet8", {"width": True}, "width"),
        ("resnet18", {"width": 0}, "width"),
        ("resnet34", {"width": 2.0}, "width"),
    ],
)
def test_bad_param_values_are_value_errors_naming_the_param(name: str, params: dict, param: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(name, (3, 32, 32), 10, **params)
    assert param in str(info.value)


def test_too_many_conv_blocks_for_the_image_names_widths() -> None:
    # 32 -> 16 -> 8 -> 4 -> 2 -> 1 -> 0: six halvings leave nothing; log2(32) = 5 blocks fit.
    for check in (build_model, check_model):
        with pytest.raises(ParameterError, match="at most 5 widths for 32x32 inputs") as info:
            check("cnn", (3, 32, 32), 10, widths=[4] * 6)
        assert (info.value.param, info.value.value) == ("widths", [4] * 6)
    check_model("cnn", (3, 32, 32), 10, widths=[4] * 5)


def test_check_model_allocates_nothing_and_draws_nothing() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    check_model("resnet34", (3, 32, 32), 100)  # 21M parameters, on the meta device
    assert torch.equal(before, torch.get_rng_state())


def test_image_model_on_flat_data_is_a_name_error() -> None:
    for check in (build_model, check_model):
        with pytest.raises(ParameterError) as info:
            check("cnn", (784,), 10)
        assert info.value.param == "name"
        assert "'mlp' for data whose samples have shape (784,)" in str(info.value)
    assert build_model("mlp", (784,), 10).feature_dim == 64
    with pytest.raises(ValueError):
        MLP((0,), 10)
    with pytest.raises(ValueError):
        CNN((3, 32, 32), 0)


# --- ResNet-18 / ResNet-34 with the CIFAR stem ------------------------------------------------


def _hand_count(blocks: tuple[int, ...], width: int, in_channels: int, num_classes: int) -> int:
    """Parameters of a basic-block ResNet, summed from its layer shapes as He et al. describe it.

    Stem: one 3x3 conv (no bias) + BN. Stage i has ``blocks[i]`` basic blocks of ``width * 2**i``
    channels; a block is two 3x3 convs (no bias) each followed by BN, and the first block of
    stages 2-4 (stride 2, channels doubled) adds a 1x1 conv + BN projection shortcut. A BN layer
    over c channels holds 2c parameters (its running statistics are buffers, not parameters).
    Then a linear head with bias on the last stage's channels.
    """
    count = 3 * 3 * in_channels * width + 2 * width  # stem conv + BN
    c_in = width
    for stage, n in enumerate(blocks):
        c = width * 2**stage
        for i in range(n):
            count += 3 * 3 * c_in * c + 2 * c  # conv1 + bn1
            count += 3 * 3 * c * c + 2 * c  # conv2 + bn2
            if i == 0 and stage > 0:
                count += c_in * c + 2 * c  # 1x1 projection + BN
            c_in = c
    return count + c_in * num_classes + num_classes


@pytest.mark.parametrize(
    ("name", "blocks", "known"),
    [
        # The figures quoted for the CIFAR ResNet-18/34 with 10 classes (11.17M and 21.28M).
        ("resnet18", (2, 2, 2, 2), 11_173_962),
        ("resnet34", (3, 4, 6, 3), 21_282_122),
    ],
)
def test_four_stage_resnet_parameter_counts_match_the_hand_count(
    name: str, blocks: tuple[int, ...], known: int
) -> None:
    # Prepare / Execute
    model = build_model(name, (3, 32, 32), 10)
    narrow = build_model(name, (1, 28, 28), 100, width=16)

    # Assert
    assert _num_params(model) == _hand_count(blocks, 64, 3, 10) == known
    assert _num_params(narrow) == _hand_count(blocks, 16, 1, 100)
    assert model.feature_dim == 512 and narrow.feature_dim == 128


def test_resnet18_structure_is_the_cifar_variant() -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10).eval()
    x = torch.randn(2, 3, 32, 32)

    # Execute
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    blocks = [block for stage in model.stages for block in stage]
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    with torch.no_grad():
        last_map = model.stages(model.stem(x))
        feats = model.features(x)

    # Assert: 3x3 stride-1 stem and no max-pool, so 32x32 reaches the last stage as 4x4 (three halvings).
    assert isinstance(model, FourStageResNet) and model.blocks == (2, 2, 2, 2)
    assert (convs[0].kernel_size, convs[0].stride, convs[0].in_channels) == ((3, 3), (1, 1), 3)
    assert not [m for m in model.modules() if isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d))]
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    assert [stage[-1].conv2.out_channels for stage in model.stages] == [64, 128, 256, 512]
    assert len(projections) == 3 and all(b.conv1.stride == (2, 2) for b in projections)
    assert len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) == 1 + 2 * 8 + 3
    assert last_map.shape == (2, 512, 4, 4)
    torch.testing.assert_close(feats, last_map.mean(dim=(2, 3)))
    assert model(x).shape == (2, 10)
    assert [len(stage) for stage in build_model("resnet34", (3, 32, 32), 10).stages] == [3, 4, 6, 3]


def test_four_stage_resnet_init_follows_the_seed() -> None:
    # Prepare / Execute
    torch.manual_seed(7)
    first = build_model("resnet18", (3, 32, 32), 10, width=8).state_dict()
    torch.manual_seed(7)
    second = build_model("resnet18", (3, 32, 32), 10, width=8).state_dict()
    torch.manual_seed(8)
    other = build_model("resnet18", (3, 32, 32), 10, width=8).state_dict()

    # Assert
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["stem.0.weight"], other["stem.0.weight"])


def test_four_stage_resnet_rejects_a_wrong_stage_count() -> None:
    with pytest.raises(ParameterError) as info:
        FourStageResNet((3, 32, 32), 10, blocks=(2, 2, 2))
    assert info.value.param == "blocks"
    with pytest.raises(ValueError):
        FourStageResNet((32, 32), 10)


# --- cosine head ----------------------------------------------------------------------------


def test_cosine_linear_hand_worked_forward() -> None:
    # Prepare: h = (3, 4) has norm 5; class rows (1, 0), (0, 2), (-1, -1) have norms 1, 2, sqrt 2.
    head = CosineLinear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]]))
    h = torch.tensor([[3.0, 4.0], [0.0, -0.5]])

    # Execute
    z = head(h)

    # Assert: cos = (h . w_c) / (|h| |w_c|).
    expected = torch.tensor(
        [
            [3 / 5, 8 / (5 * 2), -7 / (5 * math.sqrt(2))],
            [0.0, -1.0, 0.5 / (0.5 * math.sqrt(2))],
        ]
    )
    torch.testing.assert_close(z, expected)


def test_cosine_linear_matches_the_formula_and_ignores_scale() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(0)
    head = CosineLinear(16, 5, gen)
    h = torch.randn(6, 16, generator=gen) * 10
    scale = torch.rand(6, 1, generator=gen) * 100 + 0.01

    # Execute
    z = head(h)
    w = head.weight.detach()
    formula = (h / h.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    with torch.no_grad():
        head.weight.mul_(torch.tensor([[3.0], [0.1], [1.0], [7.0], [0.5]]))
    z_rows_scaled = head(h)

    # Assert
    torch.testing.assert_close(z, formula)
    torch.testing.assert_close(head(h * scale), z)  # invariant to the feature norm, sample by sample
    torch.testing.assert_close(z_rows_scaled, z)  # and to each class row's norm
    assert bool((z.abs() <= 1 + 1e-6).all())
    assert head.bias is None and set(head.state_dict()) == {"weight"}
    assert isinstance(head, nn.Linear) and head.weight.shape == (5, 16)


def test_cosine_linear_init_is_deterministic_and_unit_norm() -> None:
    # Prepare
    rng_before = torch.get_rng_state()

    # Execute
    a = CosineLinear(8, 4, torch.Generator().manual_seed(3))
    b = CosineLinear(8, 4, torch.Generator().manual_seed(3))
    c = CosineLinear(8, 4, torch.Generator().manual_seed(4))

    # Assert: unit class rows, same generator seed -> same weight, and the global RNG untouched.
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    torch.testing.assert_close(a.weight.norm(dim=1), torch.ones(4))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.weight.requires_grad and a.weight.device.type == "cpu"


def test_use_cosine_head_replaces_the_head() -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 16, 16), 6, width=4).double()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 5])

    # Execute
    head = use_cosine_head(model, torch.Generator().manual_seed(1))
    twin = CosineLinear(32, 6, torch.Generator().manual_seed(1))
    logits = model(x)
    F.cross_entropy(30 * logits, y).backward()  # LDAM-style: the loss applies the scale s = 30

    # Assert
    assert model.head is head and isinstance(head, CosineLinear)
    assert (head.in_features, head.out_features) == (32, 6) and head.weight.dtype == torch.float64
    torch.testing.assert_close(head.weight.detach(), twin.weight.double())
    assert set(k for k in model.state_dict() if k.startswith("head.")) == {"head.weight"}
    torch.testing.assert_close(logits, head(model.features(x)))
    assert logits.shape == (4, 6) and bool((logits.abs() <= 1 + 1e-9).all())
    assert head.weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0
