"""Models fedlt trains, all split into a feature extractor and a linear head.

Every model exposes ``features(x) -> (B, feature_dim)`` and ``head = nn.Linear(feature_dim,
num_classes)``, and ``forward(x) == head(features(x))``. Head-level remedies (frozen ETF heads,
auxiliary heads trained on detached features, norm realignment) work on any model only because
this split and the ``head.weight`` / ``head.bias`` state-dict keys are the same everywhere.
:func:`use_cosine_head` swaps the head for a :class:`CosineLinear` (still an ``nn.Linear`` with
``weight`` of shape ``(num_classes, feature_dim)``, but without a bias), as LDAM-DRW does.

Models draw their initial weights from torch's global RNG only, in a fixed order, so seeding it
(``fedlt.base.seeding.seed_torch``) fixes the initial model.

The registry :data:`MODELS` (declared once, at the bottom of this module, with each model's typed
parameters; the scenario's ``[model]`` section is derived from it):

- ``mlp`` (``hidden``), ``cnn`` (``widths``): small baselines; ``cnn`` is the Flower benchmark net.
- ``resnet8``, ``resnet20``, ``resnet32`` (``width``, default 16): the *CIFAR* ResNets of He et al.
  (2016, Sec. 4.2), three stages of 16/32/64 channels, 0.27M parameters for ResNet-20 and
  ``feature_dim = 4 * width = 64``. They are much smaller than ResNet-18 and not a stand-in for it.
- ``resnet18``, ``resnet34`` (``width``, default 64): the ImageNet ResNet-18/34 basic-block
  networks of He et al. with the CIFAR stem (3x3 conv, stride 1, no max-pool), four stages of
  64/128/256/512 channels, about 11.17M and 21.28M parameters for 10 classes and
  ``feature_dim = 8 * width = 512``. These are the networks FedLoGe's authors train on
  CIFAR-10-LT (ResNet-18) and CIFAR-100-LT (ResNet-34).
- ``vit`` (``patch_size``, ``dim``, ``depth``, ``heads``, ``pretrained``): a small ViT with a
  prompt slot.

Errors are plain: a bad argument is a ``ValueError``; a parameter that does not fit the data (an image
model on flat samples, more conv blocks than the image has pixels, a patch size that does not divide
it, a pretrained file that does not match) is a :class:`~fedlt.base.registry.ParameterError` naming the
parameter. :func:`check_model` finds the latter without allocating a weight, so the scenario boundary
reports them before any work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from fedlt.base.registry import Entry, ParameterError, Params, Registry

__all__ = [
    "CNN",
    "MLP",
    "MODELS",
    "MODEL_GROUP",
    "MODEL_NAMES",
    "BasicBlock",
    "CosineLinear",
    "FedModel",
    "FourStageResNet",
    "ResNet",
    "ViT",
    "build_model",
    "check_model",
    "model_params",
    "use_cosine_head",
]


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


def _int_tuple(param: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    """Validate a list of layer sizes (TOML gives lists, code tuples)."""
    allowed = "a list of positive integers" + ("" if allow_empty else " with at least one entry")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ParameterError(param, value, allowed)
    items = tuple(value)
    if not all(_positive_int(v) for v in items) or (not items and not allow_empty):
        raise ParameterError(param, value, allowed)
    return items


def _check_num_classes(num_classes: Any) -> int:
    # Comes from the dataset, not from the user, so a wrong value is a bug: ValueError.
    if not _positive_int(num_classes):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_input_shape(input_shape: Any, image: bool) -> tuple[int, ...]:
    """Validate the dataset's per-sample shape; image models need ``(channels, height, width)``.

    ``build_model`` reports an image model on flat data as a ``name`` :class:`ParameterError`
    first; here a bad shape can only come from code.
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
        self.hidden = _int_tuple("hidden", hidden, allow_empty=True)
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
        self.widths = _int_tuple("widths", widths, allow_empty=False)
        convs = []
        for out_channels in self.widths:
            convs.append(nn.Conv2d(channels, out_channels, 3, padding=1))
            channels = out_channels
            height, width = height // 2, width // 2
        if height == 0 or width == 0:
            max_blocks = int(math.log2(min(input_shape[1], input_shape[2])))
            raise ParameterError(
                "widths",
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
    then global average pooling; ``feature_dim = 4 * width`` (64 at the paper's width 16).
    Convolutions use He (Kaiming) normal initialisation, as in the paper, drawn from torch's
    global RNG. These are the small CIFAR networks (ResNet-20: 0.27M parameters), not ResNet-18:
    for that, four stages ending at 512 channels, see :class:`FourStageResNet`.

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
            raise ParameterError("depth", depth, "6n + 2 for an integer n >= 1 (8, 20, 32, ...)")
        if not _positive_int(width):
            raise ParameterError("width", width, "a positive integer")
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


class FourStageResNet(FedModel):
    """ResNet-18/34 (He et al. 2016, Table 1) with the CIFAR stem: what FL papers call "ResNet-18".

    He et al.'s ImageNet networks open with a 7x7 stride-2 conv and a max-pool, which would shrink
    a 32x32 image to 8x8 before the first block; the CIFAR variant (the one FedLoGe's authors
    train) replaces them by one 3x3 stride-1 conv + BN + ReLU. Then four stages of
    ``blocks[i]`` basic blocks with ``width``, ``2 * width``, ``4 * width`` and ``8 * width``
    channels (stride 2 at the first block of stages 2 to 4, a 1x1 conv + BN projection shortcut
    wherever the shape changes), then global average pooling: ``feature_dim = 8 * width`` (512 at
    the default width 64). ``blocks = (2, 2, 2, 2)`` is ResNet-18, ``(3, 4, 6, 3)`` ResNet-34.

    Convolutions use He (Kaiming) normal initialisation (fan-out), as :class:`ResNet` does, drawn
    from torch's global RNG in module order; BatchNorm starts at weight 1, bias 0.

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, height, width)``; any spatial size works (padding keeps every map at least
        1x1 and the global pool removes the size), though the stride schedule is meant for 32x32.
    num_classes : int
        Number of output classes.
    blocks : sequence of int
        Basic blocks per stage; four positive entries.
    width : int
        Channels of the first stage (64 in the paper); later stages double it.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        blocks: Sequence[int] = (2, 2, 2, 2),
        width: int = 64,
    ) -> None:
        super().__init__()
        channels = _check_input_shape(input_shape, image=True)[0]
        self.num_classes = _check_num_classes(num_classes)
        self.blocks = _int_tuple("blocks", blocks, allow_empty=False)
        if len(self.blocks) != 4:
            raise ParameterError("blocks", blocks, "four positive integers, one per stage")
        if not _positive_int(width):
            raise ParameterError("width", width, "a positive integer")
        self.width = width
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages = []
        in_channels = width
        for stage, n_blocks in enumerate(self.blocks):
            out_channels = width * 2**stage
            layers = []
            for i in range(n_blocks):
                layers.append(BasicBlock(in_channels, out_channels, 2 if stage > 0 and i == 0 else 1))
                in_channels = out_channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = in_channels
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled output of the last stage."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class CosineLinear(nn.Linear):
    """Cosine classifier: logit ``z_c = <h / |h|, w_c / |w_c|>``, in ``[-1, 1]``, no bias.

    The LDAM-DRW reference code (Cao et al., NeurIPS 2019) trains its CIFAR models with such a
    normed head: LDAM subtracts a margin ``Delta_c`` from the true-class logit and multiplies by a
    scale ``s = 30``, which only works as intended when logits are bounded cosines, so the loss,
    not this layer, carries the scale. Normalising the class rows also means no class can win
    by a larger weight norm, which plain linear heads tend to grow for head classes.

    It subclasses ``nn.Linear`` and keeps ``weight`` as ``(out_features, in_features)`` (one row
    per class), so code that reads ``model.head.weight``, ``in_features`` or ``out_features``
    works unchanged; ``bias`` is ``None`` and the state dict has ``head.weight`` only. (The
    reference code stores the transpose, ``(in, out)``, and normalises its columns: the same map.)

    Initialisation, as in the reference code: entries uniform in ``[-1, 1]``, then each class row
    scaled to unit norm (the forward ignores row norms, but they set the gradients' size). It is
    drawn from ``generator`` when one is given, otherwise from torch's global RNG; the parent's
    default initialisation is skipped, so building the layer draws nothing else.

    Parameters
    ----------
    in_features : int
        Feature dimension ``d``.
    out_features : int
        Number of classes ``C``.
    generator : torch.Generator, optional
        CPU generator for the initial weight.
    device, dtype : optional
        Where the weight lives and its type (it is drawn on the CPU, then moved).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # Built on the meta device so nn.Linear's own initialisation draws nothing from the global RNG.
        super().__init__(in_features, out_features, bias=False, device="meta")
        weight = torch.empty(out_features, in_features).uniform_(-1.0, 1.0, generator=generator)
        weight = F.normalize(weight, dim=1)
        self.weight = nn.Parameter(weight.to(device=device, dtype=dtype or torch.get_default_dtype()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine logits ``normalize(x) @ normalize(weight, per row).T``, shape ``(B, out_features)``."""
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


def use_cosine_head(model: FedModel, generator: torch.Generator | None = None) -> CosineLinear:
    """Replace ``model.head`` by a :class:`CosineLinear` with the same shape; return the new head.

    The new head lives on the old head's device with its dtype, and its weight is drawn from
    ``generator`` (torch's global RNG when ``None``), so a seeded generator gives the same head on
    every client and engine. The old head's weights are discarded: a cosine head is a different
    classifier, not a reparametrisation of the linear one. Call it before training and before
    anything (an optimizer, a plugin) keeps a reference to the old head.
    """
    old = model.head
    head = CosineLinear(
        old.in_features, old.out_features, generator, device=old.weight.device, dtype=old.weight.dtype
    )
    model.head = head
    return head


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
        A missing, unreadable or incompatible file raises ``ParameterError("pretrained")``.
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
                raise ParameterError(key, value, "a positive integer")
        channels, height, width = shape
        if height % patch_size or width % patch_size:
            raise ParameterError(
                "patch_size",
                patch_size,
                f"a divisor of the image height {height} and width {width}",
                hint="The ViT cuts images into non-overlapping patch_size x patch_size patches.",
            )
        if dim % heads:
            raise ParameterError("heads", heads, f"a divisor of dim = {dim}")
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

        On the meta device (:func:`check_model`) the file is read and checked but nothing is copied.

        Raises
        ------
        ParameterError
            Parameter ``pretrained``: the file is missing, unreadable, not a state dict, or its
            backbone entries do not match this model (missing, unexpected or mis-shaped keys).
        """
        file = Path(path).expanduser()
        if not file.is_file():
            raise ParameterError("pretrained", path, "an existing local file", hint="No file at that path.")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ParameterError(
                "pretrained",
                path,
                "a file written by torch.save(model.state_dict(), path)",
                hint=f"Loading it failed: {type(exc).__name__}: {exc}",
            ) from None
        if isinstance(state, Mapping):
            for wrapper in ("state_dict", "model"):
                if set(state) == {wrapper} and isinstance(state[wrapper], Mapping):
                    state = state[wrapper]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ParameterError("pretrained", path, "a file holding a state dict (names -> tensors)")
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
            raise ParameterError(
                "pretrained",
                path,
                f"weights of a ViT with patch_size={self.patch_size}, dim={self.dim}, depth={self.depth}, "
                f"heads={self.heads} and {self.n_patches} patches",
                hint="The file does not fit: " + ", ".join(problems) + ".",
            )
        if self.cls_token.is_meta:
            return  # a dry build (check_model): the file fits, and there is nothing to copy into
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


# --------------------------------------------------------------------------- registry


class MLPParams(Params):
    """``mlp``: fully connected layers on the flattened sample."""

    hidden: list[PositiveInt] = Field(
        [128, 64], description="Hidden layer widths (positive ints), in order; [] is logistic regression."
    )


class CNNParams(Params):
    """``cnn``: 3x3 conv + ReLU + 2x2 max-pool blocks."""

    widths: Annotated[list[PositiveInt], Field(min_length=1)] = Field(
        [16, 32],
        description="Channels (positive ints) of each conv block; each block halves the height and width.",
    )


class CifarResNetParams(Params):
    """``resnet8``/``resnet20``/``resnet32``: He et al.'s three-stage CIFAR ResNets."""

    width: PositiveInt = Field(16, description="Channels of the first stage (later stages double it).")


class FourStageResNetParams(Params):
    """``resnet18``/``resnet34``: the four-stage ResNets with the CIFAR stem."""

    width: PositiveInt = Field(64, description="Channels of the first stage (later stages double it).")


class ViTParams(Params):
    """``vit``: a small pre-norm Vision Transformer with a prompt slot."""

    patch_size: PositiveInt = Field(
        4, description="Patch side in pixels; must divide the image height and width."
    )
    dim: PositiveInt = Field(64, description="Token width (the feature dimension).")
    depth: PositiveInt = Field(4, description="Transformer blocks.")
    heads: PositiveInt = Field(4, description="Attention heads; must divide dim.")
    pretrained: str | None = Field(
        None,
        description="A local file with pretrained weights (a state dict) to start from; relative paths are "
        "relative to the scenario file.",
    )

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> ViTParams:
        if self.dim % self.heads:
            raise ParameterError("heads", self.heads, f"a divisor of dim = {self.dim}")
        return self


def _cifar_resnet(depth: int) -> Any:
    def build(input_shape: Sequence[int], num_classes: int, width: int) -> ResNet:
        return ResNet(input_shape, num_classes, depth=depth, width=width)

    return build


def _four_stage(blocks: tuple[int, int, int, int]) -> Any:
    def build(input_shape: Sequence[int], num_classes: int, width: int) -> FourStageResNet:
        return FourStageResNet(input_shape, num_classes, blocks=blocks, width=width)

    return build


#: What every model offers plugins: ``features(x)`` and a linear ``head``.
_HEAD = frozenset({"head"})

#: The entry-point group where other packages register models (docs/extending.md).
MODEL_GROUP = "fedlt.models"

#: Every model a scenario can name; ``build(input_shape, num_classes, **params) -> FedModel``. Other
#: installed packages add theirs in :data:`MODEL_GROUP` (:meth:`~fedlt.base.registry.Registry.outside`).
MODELS = Registry(
    "model",
    [
        Entry("mlp", MLPParams, "Fully connected network; any sample shape.", MLP, _HEAD),
        Entry("cnn", CNNParams, "Small CNN (the Flower benchmark net at widths [16, 32]).", CNN, _HEAD),
        Entry("resnet8", CifarResNetParams, "CIFAR ResNet-8 (He et al. 2016).", _cifar_resnet(8), _HEAD),
        Entry(
            "resnet20", CifarResNetParams, "CIFAR ResNet-20, 0.27M parameters.", _cifar_resnet(20), _HEAD
        ),
        Entry("resnet32", CifarResNetParams, "CIFAR ResNet-32.", _cifar_resnet(32), _HEAD),
        Entry(
            "resnet18",
            FourStageResNetParams,
            "ResNet-18 with the CIFAR stem (FedLoGe's CIFAR-10-LT network), 11.17M parameters.",
            _four_stage((2, 2, 2, 2)),
            _HEAD,
        ),
        Entry(
            "resnet34",
            FourStageResNetParams,
            "ResNet-34 with the CIFAR stem (FedLoGe's CIFAR-100-LT network), 21.28M parameters.",
            _four_stage((3, 4, 6, 3)),
            _HEAD,
        ),
        Entry(
            "vit",
            ViTParams,
            "Small Vision Transformer with a prompt slot (MVP, L2P).",
            ViT,
            frozenset({"head", "prompts"}),
        ),
    ],
    group=MODEL_GROUP,
)

#: The registry's names, in registration order (derived from :data:`MODELS`).
MODEL_NAMES: tuple[str, ...] = MODELS.names


def model_params(name: str) -> dict[str, object]:
    """The parameters model ``name`` accepts, with their defaults (a fresh copy).

    Raises
    ------
    ValueError
        If ``name`` is not in :data:`MODELS`.
    """
    return MODELS[name].defaults()


def _check_sample_shape(name: str, input_shape: Any) -> None:
    """Image models need ``(C, H, W)`` samples (the ViT also takes flat square ones); an outside
    model's builder checks its own."""
    if not MODELS.is_builtin(name):
        return
    flat_square = name == "vit" and _square_side(input_shape) is not None
    if name != "mlp" and isinstance(input_shape, Sequence) and len(input_shape) != 3 and not flat_square:
        needs = "image-shaped (channels, height, width) samples"
        if name == "vit":
            needs += " or flat samples whose length is a perfect square"
        raise ParameterError(
            "name",
            name,
            f"'mlp' for data whose samples have shape {tuple(input_shape)}",
            hint=f"The {name!r} model needs {needs}.",
        )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **params: Any) -> FedModel:
    """Build model ``name`` for samples of ``input_shape`` and ``num_classes`` classes.

    Parameters
    ----------
    name : str
        One of :data:`MODELS`, built in or registered by an installed package.
    input_shape : tuple of int
        Shape of one sample, e.g. ``(3, 32, 32)``.
    num_classes : int
        Number of classes (the head's output size).
    **params
        The model's parameters (its entry's parameter model); the rest keep their defaults.

    Raises
    ------
    ValueError
        An unknown name, or a parameter the model does not take or out of its range (a
        ``pydantic.ValidationError``).
    ParameterError
        A parameter that does not fit the data (``name`` for an image model on flat samples,
        ``widths``, ``patch_size``, ``pretrained``); ``name`` for an outside builder that returns no
        :class:`FedModel`.
    OutsideEntryError
        ``name`` is an outside model that cannot be used (its package fails to import, ...).
    """
    entry = MODELS[name]
    checked = entry.params.model_validate(params)
    _check_sample_shape(name, input_shape)
    model = entry.build(input_shape, num_classes, **dict(checked))
    what = "a model whose builder returns a fedlt.models.FedModel (features(x) and a linear head)"
    return MODELS.check_built(name, model, FedModel, "name", what)


def check_model(name: str, input_shape: tuple[int, ...], num_classes: int, **params: Any) -> None:
    """Raise what :func:`build_model` would, without allocating weights or drawing random numbers.

    The model is built on PyTorch's meta device (shapes only), so every check that depends on the
    data's sample shape, and a pretrained file's fit, runs in milliseconds even for ResNet-34.
    """
    with torch.device("meta"):
        build_model(name, input_shape, num_classes, **params)
