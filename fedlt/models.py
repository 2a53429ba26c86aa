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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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
    "ViT",
    "build_model",
    "model_params",
]

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "resnet8", "resnet20", "resnet32", "vit")


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


def _square_side(input_shape: Any) -> int | None:
    """``s`` when ``input_shape`` is ``(s * s,)`` (a flattened square image such as digits' 64)."""
    if isinstance(input_shape, Sequence) and len(input_shape) == 1 and _positive_int(input_shape[0]):
        side = math.isqrt(input_shape[0])
        return side if side * side == input_shape[0] else None
    return None


class Attention(nn.Module):
    """Multi-head self-attention whose keys and values may include extra (prompt) tokens.

    ``qkv`` is one ``Linear(dim, 3 * dim)`` as in timm, so its rows are the query, key and value
    projections in that order; the extra tokens go through the key and value rows only.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from the ``(B, N, dim)`` tokens ``x`` to ``x`` plus ``extra`` (``(B, L, dim)``)."""
        b, n, dim = x.shape
        if extra is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:dim], bias[:dim])
            k, v = F.linear(torch.cat((x, extra), dim=1), w[dim:], bias[dim:]).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, heads, T, dim / heads)
            return t.unflatten(-1, (self.heads, dim // self.heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (MLP ratio 4, GELU).

    ``prompt`` tokens (``(B, L, dim)``) are layer-normed with ``norm1`` and join the keys and
    values of this block's attention only; the block returns the ``N`` original tokens. This is
    exactly ``block(cat(x, prompt))[:, :N]`` (MVP's ``prompt_tuning``), minus the wasted compute
    on the prompt rows.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, prompt: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), None if prompt is None else self.norm1(prompt))
        return x + self.mlp(self.norm2(x))


class ViT(FedModel):
    """A small pre-norm Vision Transformer (Dosovitskiy et al., ICLR 2021) with a prompt slot.

    Patches of ``patch_size`` pixels are embedded by a conv with that stride, a learnable [CLS]
    token is prepended and learnable position embeddings are added; then ``depth`` pre-norm
    blocks (multi-head self-attention, MLP with ratio 4) and a final LayerNorm. The features are
    the normed [CLS] output (``feature_dim = dim``) and ``head = nn.Linear(dim, num_classes)``.
    Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
    ``pos_embed``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``,
    ``head``), so a timm checkpoint of the same size loads as it is.

    Inputs are ``(C, H, W)`` with ``H`` and ``W`` divisible by ``patch_size``. A flat input whose
    length is a perfect square ``s * s`` is viewed as ``(1, s, s)``: scikit-learn's digits
    (64 values) become 8x8 images, which the default ``patch_size = 4`` cuts into 2x2 = 4
    patches (plus [CLS]: 5 tokens); ``patch_size = 2`` gives 16 patches.

    Initialisation is drawn from torch's global RNG in a fixed order: truncated normal (std
    0.02) for ``cls_token``, ``pos_embed`` and every linear weight, zero linear biases, PyTorch's
    default for the patch conv. ``pretrained`` then overwrites the weights from a file.

    Prompt slot
    -----------
    ``prompter`` (``None`` by default) is where prompt-based continual-learning plugins
    (``mvp-prompts``) plug in. When it is set, :meth:`features` first computes the query
    ``q = features of the un-prompted model`` under ``torch.no_grad()`` (MVP and L2P use the
    frozen model's [CLS] as the query), then calls ``prompts = prompter(q)``, which must return
    ``{block_index: (B, L, dim) tensor}`` and may record its own per-sample selection for the
    current batch; then it runs the blocks again with those prompt tokens. The prompts are
    *per-block and not carried*: block ``i``'s prompt tokens are extra keys and values of block
    ``i``'s attention only (layer-normed by its ``norm1``, projected by its ``qkv``), and are
    dropped after it, as MVP's ``prompt_tuning`` does (``x = block(cat(x, P_i))[:, :N]``). The
    returned features are the prompted [CLS] output. Since evaluation also calls
    ``features`` then ``head`` per batch, prompts act in training and evaluation alike. The cost
    is two passes through the blocks per batch.

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, height, width)``, or ``(s * s,)`` for flattened square images.
    num_classes : int
        Number of output classes.
    patch_size : int, default=4
        Patch side in pixels; must divide the height and the width.
    dim : int, default=64
        Token width (``feature_dim``).
    depth : int, default=4
        Number of transformer blocks.
    heads : int, default=4
        Attention heads; must divide ``dim``.
    pretrained : str, optional
        A local file holding a state dict (``torch.save(model.state_dict(), path)``, or a dict
        with that state dict under ``"state_dict"`` or ``"model"``). Every backbone entry must be
        present with this model's shape; ``head.*`` entries are loaded when their shapes match
        this model's number of classes and are otherwise left at their fresh initialisation.
        A missing, unreadable or incompatible file raises ``ScenarioError("model.pretrained")``.
    """

    prompter: nn.Module | None

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        shape = _check_input_shape(input_shape, image=False)
        side = _square_side(shape)
        if side is not None:
            shape = (1, side, side)
        if len(shape) != 3:
            raise ValueError(
                f"vit needs input_shape (channels, height, width) or (s*s,), got {input_shape!r}"
            )
        self.num_classes = _check_num_classes(num_classes)
        for key, value in (("patch_size", patch_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            if not _positive_int(value):
                raise ScenarioError(f"model.{key}", value, "a positive integer")
        channels, height, width = shape
        if height % patch_size or width % patch_size:
            raise ScenarioError(
                "model.patch_size",
                patch_size,
                f"a divisor of the image height {height} and width {width}",
                hint="The ViT cuts images into non-overlapping patch_size x patch_size patches.",
            )
        if dim % heads:
            raise ScenarioError("model.heads", heads, f"a divisor of model.dim = {dim}")
        self.image_shape = shape
        self.patch_size, self.dim, self.depth, self.heads = patch_size, dim, depth, heads
        self.n_patches = (height // patch_size) * (width // patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_patches + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.feature_dim = dim
        self.head = nn.Linear(dim, self.num_classes)
        self.prompter = None
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def load_pretrained(self, path: str) -> None:
        """Load the backbone (and a matching head) from the state-dict file ``path``.

        Raises
        ------
        ScenarioError
            Key ``model.pretrained``: the file is missing, unreadable, not a state dict, or its
            backbone entries do not match this model (missing, unexpected or mis-shaped keys).
        """
        file = Path(path).expanduser()
        if not file.is_file():
            raise ScenarioError(
                "model.pretrained", path, "an existing local file", hint="No file at that path."
            )
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ScenarioError(
                "model.pretrained",
                path,
                "a file written by torch.save(model.state_dict(), path)",
                hint=f"Loading it failed: {type(exc).__name__}: {exc}",
            ) from None
        if isinstance(state, Mapping):
            for wrapper in ("state_dict", "model"):
                if set(state) == {wrapper} and isinstance(state[wrapper], Mapping):
                    state = state[wrapper]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ScenarioError("model.pretrained", path, "a file holding a state dict (names -> tensors)")
        own = self.state_dict()
        problems = []
        backbone = [k for k in own if not k.startswith("head.")]
        if missing := [k for k in backbone if k not in state]:
            problems.append(f"missing {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected := [k for k in state if k not in own]:
            problems.append(f"unexpected {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
        shapes = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            for k in backbone
            if k in state and state[k].shape != own[k].shape
        ]
        if shapes:
            problems.append("shape mismatch " + "; ".join(shapes[:3]))
        if problems:
            raise ScenarioError(
                "model.pretrained",
                path,
                f"weights of a ViT with patch_size={self.patch_size}, dim={self.dim}, depth={self.depth}, "
                f"heads={self.heads} and {self.n_patches} patches",
                hint="The file does not fit: " + ", ".join(problems) + ".",
            )
        load = {k: state[k] for k in backbone}
        load.update({k: v for k, v in state.items() if k.startswith("head.") and v.shape == own[k].shape})
        self.load_state_dict(load, strict=False)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with [CLS] prepended and position embeddings added: ``(B, 1 + n_patches, dim)``."""
        if x.dim() == 2:
            x = x.view(x.shape[0], *self.image_shape)
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        return torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1) + self.pos_embed

    def _encode(self, tokens: torch.Tensor, prompts: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The normed [CLS] output, with ``prompts[i]`` joining block ``i``'s keys and values."""
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, prompts.get(i))
        return self.norm(tokens[:, 0])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[CLS] features; prompted by ``self.prompter`` when it is set (see the class docstring)."""
        tokens = self._tokens(x)
        if self.prompter is None:
            return self._encode(tokens, {})
        with torch.no_grad():
            query = self._encode(tokens, {})
        return self._encode(tokens, self.prompter(query))


# name -> (constructor, the parameters a scenario may set with their defaults)
_REGISTRY: dict[str, tuple[Callable[..., FedModel], dict[str, object]]] = {
    "mlp": (MLP, {"hidden": (128, 64)}),
    "cnn": (CNN, {"widths": (16, 32)}),
    "resnet8": (lambda shape, c, **p: ResNet(shape, c, depth=8, **p), {"width": 16}),
    "resnet20": (lambda shape, c, **p: ResNet(shape, c, depth=20, **p), {"width": 16}),
    "resnet32": (lambda shape, c, **p: ResNet(shape, c, depth=32, **p), {"width": 16}),
    "vit": (ViT, {"patch_size": 4, "dim": 64, "depth": 4, "heads": 4, "pretrained": None}),
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
    flat_square = name == "vit" and _square_side(input_shape) is not None
    if name != "mlp" and isinstance(input_shape, Sequence) and len(input_shape) != 3 and not flat_square:
        needs = "image-shaped (channels, height, width) samples"
        if name == "vit":
            needs += " or flat samples whose length is a perfect square"
        raise ScenarioError(
            "model.name",
            name,
            f"'mlp' for data whose samples have shape {tuple(input_shape)}",
            hint=f"The {name!r} model needs {needs}.",
        )
    for key, value in params.items():
        if key not in defaults:
            takes = ", ".join(repr(k) for k in defaults)
            raise ScenarioError(f"model.{key}", value, f"absent: the {name!r} model only takes {takes}")
    return constructor(input_shape, num_classes, **{**defaults, **params})
