"""Models fedlt trains, all split into a feature extractor and a linear head.

Every model exposes ``features(x) -> (B, feature_dim)`` and ``head = nn.Linear(feature_dim,
num_classes)``, and ``forward(x) == head(features(x))``. Head-level remedies (frozen ETF heads,
auxiliary heads trained on detached features, norm realignment) work on any model only because
this split and the ``head.weight`` / ``head.bias`` state-dict keys are the same everywhere.

Models draw their initial weights from torch's global RNG only, in a fixed order, so seeding it
(``fedlt.seeding.seed_torch``) fixes the initial model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedlt.errors import ScenarioError

__all__ = [
    "CNN",
    "MLP",
    "MODEL_NAMES",
    "BasicBlock",
    "FedModel",
    "ResNet",
    "build_model",
    "model_params",
]

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "resnet8", "resnet20", "resnet32")


class FedModel(nn.Module):
    """Base class: a feature extractor ``features`` followed by the linear classifier ``head``.

    Subclasses set ``feature_dim``, ``num_classes`` and ``head`` and implement ``features``;
    ``forward`` is fixed here so no model can bypass the head that remedies replace or rescale.
    """

    feature_dim: int
    num_classes: int
    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch to its ``(B, feature_dim)`` representation (the head's input)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``head(features(x))`` of shape ``(B, num_classes)``."""
        return self.head(self.features(x))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _int_tuple(key: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    """Validate a list of layer sizes given in a scenario (TOML gives lists, code tuples)."""
    allowed = "a list of positive integers" + ("" if allow_empty else " with at least one entry")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ScenarioError(key, value, allowed)
    items = tuple(value)
    if not all(_positive_int(v) for v in items) or (not items and not allow_empty):
        raise ScenarioError(key, value, allowed)
    return items


def _check_num_classes(num_classes: Any) -> int:
    # Comes from the dataset, not from the user, so a wrong value is a bug: ValueError.
    if not _positive_int(num_classes):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_input_shape(input_shape: Any, image: bool) -> tuple[int, ...]:
    """Validate the dataset's per-sample shape; image models need ``(channels, height, width)``.

    ``build_model`` reports an image model on flat data as a ``model.name`` error first; here a
    bad shape can only come from code, so it is a ``ValueError``.
    """
    is_seq = isinstance(input_shape, Sequence) and not isinstance(input_shape, (str, bytes))
    shape = tuple(input_shape) if is_seq else ()
    if not shape or not all(_positive_int(s) for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    if image and len(shape) != 3:
        raise ValueError(f"image models need input_shape (channels, height, width), got {input_shape!r}")
    return shape


class MLP(FedModel):
    """Fully connected network: flatten, then ``Linear + ReLU`` per hidden width, then the head.

    The features are the last hidden activation (after ReLU). ``hidden=()`` gives multinomial
    logistic regression on the flattened input.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one sample; it is flattened.
    num_classes : int
        Number of output classes.
    hidden : sequence of int
        Hidden layer widths, in order.
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64)
    ) -> None:
        super().__init__()
        shape = _check_input_shape(input_shape, image=False)
        self.num_classes = _check_num_classes(num_classes)
        self.hidden = _int_tuple("model.hidden", hidden, allow_empty=True)
        in_dim = math.prod(shape)
        layers: list[nn.Module] = []
        for width in self.hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        self.body = nn.Sequential(*layers)
        self.feature_dim = in_dim
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden activation of the flattened batch."""
        return self.body(x.flatten(1))


class CNN(FedModel):
    """Small CNN: per width a 3x3 conv (padding 1), ReLU and 2x2 max-pool; features = flatten.

    With input ``(3, 32, 32)`` and ``widths=(16, 32)`` this is layer for layer the benchmark's
    Flower ``Net`` (same parameters, same operations, same initialisation order), so wall-time
    comparisons against Flower train the same network.

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, height, width)``.
    num_classes : int
        Number of output classes.
    widths : sequence of int
        Output channels of each conv block; each block halves height and width (floor).
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (16, 32)
    ) -> None:
        super().__init__()
        channels, height, width = _check_input_shape(input_shape, image=True)
        self.num_classes = _check_num_classes(num_classes)
        self.widths = _int_tuple("model.widths", widths, allow_empty=False)
        convs = []
        for out_channels in self.widths:
            convs.append(nn.Conv2d(channels, out_channels, 3, padding=1))
            channels = out_channels
            height, width = height // 2, width // 2
        if height == 0 or width == 0:
            max_blocks = int(math.log2(min(input_shape[1], input_shape[2])))
            raise ScenarioError(
                "model.widths",
                widths,
                f"a list of at most {max_blocks} widths for {input_shape[1]}x{input_shape[2]} inputs",
                hint="Each conv block halves the height and width.",
            )
        self.convs = nn.ModuleList(convs)
        self.feature_dim = channels * height * width
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened output of the last conv block."""
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return x.flatten(1)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, with a 1x1 conv + BN shortcut on shape change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # Option B of He et al. (2016): a projection only where the shape changes.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(FedModel):
    """CIFAR-style ResNet (He et al. 2016, Sec. 4.2) with option-B shortcuts.

    A 3x3 conv stem, then three stages of ``(depth - 2) / 6`` basic blocks with ``width``,
    ``2 * width`` and ``4 * width`` channels (stride 2 at the first block of stages 2 and 3),
    then global average pooling; ``feature_dim = 4 * width``. Convolutions use He (Kaiming)
    normal initialisation, as in the paper, drawn from torch's global RNG.

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, height, width)``; any spatial size works thanks to the global pool.
    num_classes : int
        Number of output classes.
    depth : int
        ``6n + 2`` for ``n >= 1``: 8, 20, 32, 44, 56, 110, ...
    width : int
        Channels of the first stage (16 in the paper).
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, depth: int = 20, width: int = 16
    ) -> None:
        super().__init__()
        channels = _check_input_shape(input_shape, image=True)[0]
        self.num_classes = _check_num_classes(num_classes)
        if not _positive_int(depth) or depth < 8 or (depth - 2) % 6 != 0:
            raise ScenarioError("model.depth", depth, "6n + 2 for an integer n >= 1 (8, 20, 32, ...)")
        if not _positive_int(width):
            raise ScenarioError("model.width", width, "a positive integer")
        self.depth = depth
        self.width = width
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages = []
        in_channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = 4 * width
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled output of the last stage."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))


# name -> (constructor, the parameters a scenario may set with their defaults)
_REGISTRY: dict[str, tuple[Callable[..., FedModel], dict[str, object]]] = {
    "mlp": (MLP, {"hidden": (128, 64)}),
    "cnn": (CNN, {"widths": (16, 32)}),
    "resnet8": (lambda shape, c, **p: ResNet(shape, c, depth=8, **p), {"width": 16}),
    "resnet20": (lambda shape, c, **p: ResNet(shape, c, depth=20, **p), {"width": 16}),
    "resnet32": (lambda shape, c, **p: ResNet(shape, c, depth=32, **p), {"width": 16}),
}


def _lookup(name: str) -> tuple[Callable[..., FedModel], dict[str, object]]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ScenarioError("model.name", name, f"one of {MODEL_NAMES}")
    return _REGISTRY[name]


def model_params(name: str) -> dict[str, object]:
    """The parameters model ``name`` accepts, with their defaults (for docs and validation).

    Raises
    ------
    ScenarioError
        If ``name`` is not in ``MODEL_NAMES``.
    """
    return dict(_lookup(name)[1])


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **params: Any) -> FedModel:
    """Build model ``name`` for samples of ``input_shape`` and ``num_classes`` classes.

    Parameters
    ----------
    name : str
        One of ``MODEL_NAMES``.
    input_shape : tuple of int
        Shape of one sample, e.g. ``(3, 32, 32)``.
    num_classes : int
        Number of classes (the head's output size).
    **params
        Model parameters from ``model_params(name)``; the rest keep their defaults.

    Raises
    ------
    ScenarioError
        For an unknown name (key ``model.name``), a parameter the model does not take, or a
        parameter value that is not allowed (key ``model.<param>``).
    """
    constructor, defaults = _lookup(name)
    if name != "mlp" and isinstance(input_shape, Sequence) and len(input_shape) != 3:
        raise ScenarioError(
            "model.name",
            name,
            f"'mlp' for data whose samples have shape {tuple(input_shape)}",
            hint=f"The {name!r} model needs image-shaped (channels, height, width) samples.",
        )
    for key, value in params.items():
        if key not in defaults:
            takes = ", ".join(repr(k) for k in defaults)
            raise ScenarioError(f"model.{key}", value, f"absent: the {name!r} model only takes {takes}")
    return constructor(input_shape, num_classes, **{**defaults, **params})
