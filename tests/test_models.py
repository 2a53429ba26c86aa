"""Tests for fedlt.models: the features/head split, the benchmark CNN, ResNets and the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlt.errors import ScenarioError
from fedlt.models import CNN, MLP, MODEL_NAMES, FedModel, ResNet, build_model, model_params


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
    with pytest.raises(ScenarioError) as info:
        ResNet((3, 32, 32), 10, depth=10)
    assert info.value.key == "model.depth"


def test_models_are_deterministic_given_the_global_seed() -> None:
    for name in MODEL_NAMES:
        torch.manual_seed(123)
        first = build_model(name, (3, 16, 16), 5).state_dict()
        torch.manual_seed(123)
        second = build_model(name, (3, 16, 16), 5).state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first), name


def test_resnet_backpropagates_to_every_parameter() -> None:
    # Prepare
    torch.manual_seed(0)
    model = build_model("resnet8", (3, 16, 16), 4, width=4)
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
    assert model_params("mlp") == {"hidden": (128, 64)}
    assert model_params("cnn") == {"widths": (16, 32)}
    for name in ("resnet8", "resnet20", "resnet32"):
        assert model_params(name) == {"width": 16}
    params = model_params("mlp")
    params["hidden"] = (1,)
    assert model_params("mlp") == {"hidden": (128, 64)}  # a copy, not the registry itself


def test_unknown_model_names_the_key() -> None:
    with pytest.raises(ScenarioError) as info:
        build_model("resnet18", (3, 32, 32), 10)
    assert info.value.key == "model.name"
    assert "resnet18" in str(info.value)
    assert "resnet20" in str(info.value)
    with pytest.raises(ScenarioError) as info:
        model_params("vgg")
    assert info.value.key == "model.name"


def test_unknown_param_names_the_key() -> None:
    with pytest.raises(ScenarioError) as info:
        build_model("resnet20", (3, 32, 32), 10, depth=56)
    assert info.value.key == "model.depth"
    assert "width" in str(info.value)
    with pytest.raises(ScenarioError) as info:
        build_model("mlp", (10,), 2, widths=[4])
    assert info.value.key == "model.widths"
    assert "hidden" in str(info.value)


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("mlp", {"hidden": [64, 0]}, "model.hidden"),
        ("mlp", {"hidden": "64"}, "model.hidden"),
        ("cnn", {"widths": []}, "model.widths"),
        ("cnn", {"widths": [16, 2.5]}, "model.widths"),
        ("cnn", {"widths": [4] * 6}, "model.widths"),  # 32 -> 16 -> 8 -> 4 -> 2 -> 1 -> 0
        ("resnet8", {"width": 0}, "model.width"),
        ("resnet8", {"width": True}, "model.width"),
    ],
)
def test_bad_param_values_name_the_key(name: str, params: dict, key: str) -> None:
    with pytest.raises(ScenarioError) as info:
        build_model(name, (3, 32, 32), 10, **params)
    assert info.value.key == key


def test_image_model_on_flat_data_is_a_model_name_error() -> None:
    with pytest.raises(ScenarioError) as info:
        build_model("cnn", (784,), 10)
    assert info.value.key == "model.name"
    assert "mlp" in str(info.value)
    assert build_model("mlp", (784,), 10).feature_dim == 64
    with pytest.raises(ValueError):
        MLP((0,), 10)
    with pytest.raises(ValueError):
        CNN((3, 32, 32), 0)
