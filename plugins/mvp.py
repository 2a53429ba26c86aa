"""MVP's key-selected visual prompts and instance-wise logit mask for the ViT (Moon et al., ICCV 2023).

Paper: "Online Class Incremental Learning on Stochastic Blurry Task Boundary via Mask and Visual
Prompt Tuning", arXiv:2308.09303.

- ``mvp-prompts``: a key-selected prompt pool in the ViT's prompt slot (:class:`PromptPool`),
  selection with a frequency penalty, and the contrastive visual prompt tuning loss L_CVPT.
- ``mvp-mask``: logits scaled per sample by ``2 sigmoid(M[k*])``, the class mask of the key the
  prompt pool selected for that sample (:class:`MaskedHead`), in training and evaluation.

Both live in the model (the prompt pool is ``model.prompter``, the mask is ``model.head``), so
their parameters are trained and FedAvg-aggregated like the rest of the model, checkpointed with
it, and act wherever the engine calls ``model.features`` then ``model.head``. The pure helpers
:func:`key_distances`, :func:`select_keys` and :func:`cvpt_loss` hold the maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from fedlt import Plugin, SetupContext, hookimpl

__all__ = [
    "MVPMask",
    "MVPPrompts",
    "MaskedHead",
    "PromptPool",
    "cvpt_loss",
    "key_distances",
    "select_keys",
]

#: Added inside the log of L_CVPT, as in the official code, so the loss stays finite.
CVPT_EPS = 1e-6


def key_distances(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` distances ``d_bk = 1 - cos(q_b, K_k)`` of ``(B, dim)`` queries to ``(P, dim)`` keys."""
    return 1.0 - F.cosine_similarity(query[:, None, :], keys[None, :, :], dim=-1)


def select_keys(distances: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    """``k*_b = argmin_k d_bk (c_k + 1)``, or ``argmin_k d_bk`` when ``counts`` is ``None``: ``(B,)`` long.

    Multiplying by the usage mass ``c_k + 1`` makes a frequently chosen key look farther away, so
    keys that are rarely selected get trained too instead of one key taking every sample.
    """
    scores = distances if counts is None else distances * (counts + 1.0)
    return scores.argmin(dim=1)


def cvpt_loss(
    query: torch.Tensor, keys: torch.Tensor, selected: torch.Tensor, mass: torch.Tensor, contrastive: bool
) -> torch.Tensor:
    """MVP's contrastive visual prompt tuning loss (or L2P's pull) for one batch.

    With ``d_b = 1 - cos(q_b, K_{k*_b})`` (the distance of sample b to its selected key),
    ``D_ij = 1 - cos(K_i, K_j)`` and ``mu_b = mass[k*_b] = c_{k*_b} + 1``::

        pos = (1/B) sum_b exp(d_b / mu_b)
        neg = (1/B) sum_b (1/(P-1)) sum_{j != k*_b} exp(D_{k*_b, j} / mu_b)
        L_CVPT = -log( neg / (pos + neg) + 1e-6 )

    Minimising it pulls each query toward its selected key (smaller ``d``) and pushes the
    selected key away from the others (larger ``D``); the usage mass softens both for keys that
    are already heavily used. With ``contrastive=False`` the loss is L2P's ``(1/B) sum_b d_b``.
    Gradients flow to ``keys`` only (queries come from the frozen pass).

    Parameters
    ----------
    query : (B, dim) tensor
        The un-prompted [CLS] features.
    keys : (P, dim) tensor
        The prompt keys.
    selected : (B,) long tensor
        ``k*`` per sample.
    mass : (P,) tensor
        ``c + 1`` at selection time (before this batch's counts were added).
    contrastive : bool
        L_CVPT (needs ``P >= 2``) or the plain pull.
    """
    d = key_distances(query, keys).gather(1, selected[:, None]).squeeze(1)
    if not contrastive:
        return d.mean()
    mu = mass[selected].to(d.dtype)
    pairwise = 1.0 - F.cosine_similarity(keys[:, None, :], keys[None, :, :], dim=-1)
    others = ~F.one_hot(selected, keys.shape[0]).bool()
    neg_terms = torch.exp(pairwise[selected] / mu[:, None]) * others
    neg = (neg_terms.sum(1) / (keys.shape[0] - 1)).mean()
    pos = torch.exp(d / mu).mean()
    return -torch.log(neg / (pos + neg) + CVPT_EPS)


class PromptPool(nn.Module):
    """MVP's prompts for a ViT's prompt slot: keys, one g-prompt and a pool of e-prompts.

    ``forward(query)`` selects ``k*`` per sample (:func:`select_keys`), records the selection for
    the current batch (``query``, ``selected`` and ``mass``, all free of autograd graphs), adds
    the selections to ``counts`` in training mode, and returns ``{block: (B, L, dim)}``: the
    g-prompt (shared by all samples) at ``g_layers`` and the selected e-prompt at ``e_layers``
    (concatenated where the lists overlap).

    Attributes
    ----------
    keys : (P, dim) parameter
        Prompt keys, compared with the query by cosine.
    g_prompt : (len(g_layers), g_length, dim) parameter
        General prompt, one per g-layer.
    e_prompts : (P, len(e_layers), e_length, dim) parameter
        Expert prompts, one set per key.
    counts : (P,) float buffer
        How often each key was selected in training. A float buffer, so FedAvg averages it like
        the weights: each round's global counts become the previous global counts plus the
        sample-weighted mean of the selected clients' increments.
    """

    def __init__(
        self,
        dim: int,
        pool_size: int,
        g_layers: tuple[int, ...],
        g_length: int,
        e_layers: tuple[int, ...],
        e_length: int,
        frequency_penalty: bool,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.g_layers, self.e_layers = tuple(g_layers), tuple(e_layers)
        self.frequency_penalty = frequency_penalty

        def randn(*shape: int) -> nn.Parameter:
            # N(0, 1) as the official code; drawn on the CPU generator so every device agrees.
            return nn.Parameter(torch.randn(*shape, generator=generator).to(device))

        self.keys = randn(pool_size, dim)
        self.g_prompt = randn(len(self.g_layers), g_length, dim)
        self.e_prompts = randn(pool_size, len(self.e_layers), e_length, dim)
        self.register_buffer("counts", torch.zeros(pool_size, device=device))
        self.query: torch.Tensor | None = None
        self.selected: torch.Tensor | None = None
        self.mass: torch.Tensor | None = None

    def forward(self, query: torch.Tensor) -> dict[int, torch.Tensor]:
        query = query.detach()
        with torch.no_grad():
            distances = key_distances(query, self.keys)
            # A new tensor: the in-place count update below cannot change it.
            mass = self.counts + 1.0
            selected = select_keys(distances, self.counts if self.frequency_penalty else None)
            if self.training:
                self.counts.add_(torch.bincount(selected, minlength=self.pool_size).to(self.counts.dtype))
        self.query, self.selected, self.mass = query, selected, mass
        b = query.shape[0]
        prompts: dict[int, torch.Tensor] = {}
        for j, layer in enumerate(self.g_layers):
            prompts[layer] = self.g_prompt[j].expand(b, -1, -1)
        chosen = self.e_prompts[selected]  # (B, len(e_layers), e_length, dim)
        for j, layer in enumerate(self.e_layers):
            e = chosen[:, j]
            prompts[layer] = torch.cat((prompts[layer], e), dim=1) if layer in prompts else e
        return prompts


class MVPPromptsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool_size: int = Field(
        10, ge=1, description="P: number of keys, e-prompts and class-mask rows (MVP: 10)."
    )
    g_length: int = Field(5, ge=1, description="Tokens of the g-prompt at each g-layer.")
    g_layers: list[int] = Field(
        [0, 1], description="Blocks that get the g-prompt (indices >= the model's depth are dropped)."
    )
    e_length: int = Field(20, ge=1, description="Tokens of the selected e-prompt at each e-layer.")
    e_layers: list[int] = Field(
        [2, 3],
        description="Blocks that get the selected e-prompt (indices >= the model's depth are dropped).",
    )
    frequency_penalty: bool = Field(
        True, description="Select k* = argmin d_k (c_k + 1) with selection counts c; false: argmin d_k."
    )
    contrastive: bool = Field(True, description="Key loss: L_CVPT (true) or L2P's pull mean(d_k*) (false).")
    lambda_cvpt: float = Field(1.0, ge=0, description="Weight of the key loss; 0 trains no keys.")
    freeze_backbone: bool = Field(
        True,
        description="Freeze the ViT's own parameters except the head (MVP trains only prompts, keys, mask "
        "and head on a pretrained ViT). Set false without model.pretrained.",
    )

    @model_validator(mode="after")
    def _layers_and_pool(self) -> MVPPromptsParams:
        for name in ("g_layers", "e_layers"):
            if any(i < 0 for i in getattr(self, name)):
                raise ValueError(f"{name} must hold block indices >= 0, got {getattr(self, name)}")
        if self.contrastive and self.lambda_cvpt > 0 and self.pool_size < 2:
            raise ValueError(
                "contrastive L_CVPT needs pool_size >= 2 (it pushes the selected key from the others)"
            )
        return self


class MVPPrompts(Plugin):
    """MVP's key-selected visual prompts with frequency penalty and contrastive key loss.

    Moon et al., ICCV 2023 (arXiv:2308.09303). ``configure_model`` installs a
    :class:`PromptPool` as ``model.prompter`` of a ``vit`` model; the ViT then, per batch, takes
    the un-prompted [CLS] output as query ``q``, selects ``k* = argmin_k d_k (c_k + 1)`` with
    ``d_k = 1 - cos(q, K_k)`` and ``c_k`` the selection counts, and runs its blocks with the
    g-prompt at ``g_layers`` and e-prompt ``k*`` at ``e_layers`` (MVP: g at blocks 0-1 with 5
    tokens, e at blocks 2-4 with 20 tokens, P = 10, on ViT-B/16). ``client_extra_losses`` adds
    ``lambda_cvpt * L_CVPT`` (:func:`cvpt_loss`: ``-log(neg / (pos + neg) + 1e-6)``, pos the batch
    mean of ``exp(d_{k*}/mu)``, neg the batch mean of the mean over the other keys of
    ``exp(D_{k*,j}/mu)``, ``mu = c_{k*} + 1``), or L2P's ``mean(d_{k*})`` with
    ``contrastive = false``.

    The keys, prompts and counts are part of the model, so they are trained, FedAvg-aggregated
    (``counts`` as a float buffer) and checkpointed with it; counts grow in training mode only,
    while selection uses them in evaluation too. ``freeze_backbone`` (default, as MVP) sets
    ``requires_grad = False`` on every ViT parameter but the head, so the backbone is neither
    trained nor aggregated; a frozen *random* backbone learns little, so without
    ``model.pretrained`` set it to false. Differences from the official code: its broadcasting
    divides each sample's terms by every sample's mass and includes the selected key's zero
    self-distance in neg; here each sample uses its own ``mu`` and the other ``P - 1`` keys. Its
    ``use_contrastiv`` flag switches both the penalty and the loss; here they are
    ``frequency_penalty`` and ``contrastive``.
    """

    Params = MVPPromptsParams
    #: A ViT's prompt slot (checked before a run starts, from the scenario's model.name).
    requires = frozenset({"prompts"})

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: SetupContext) -> None:
        p = self.params
        if p.freeze_backbone:
            for name, param in model.named_parameters():
                if not name.startswith("head."):
                    param.requires_grad_(False)
        model.prompter = PromptPool(
            dim=model.dim,
            pool_size=p.pool_size,
            g_layers=tuple(i for i in p.g_layers if i < model.depth),
            g_length=p.g_length,
            e_layers=tuple(i for i in p.e_layers if i < model.depth),
            e_length=p.e_length,
            frequency_penalty=p.frequency_penalty,
            generator=ctx.generator,
            device=model.cls_token.device,
        )

    @hookimpl
    def client_extra_losses(self, model: nn.Module) -> torch.Tensor | None:
        if self.params.lambda_cvpt == 0:
            return None
        pool = model.prompter
        loss = cvpt_loss(pool.query, pool.keys, pool.selected, pool.mass, self.params.contrastive)
        return self.params.lambda_cvpt * loss


class MaskedHead(nn.Linear):
    """A linear head whose logits are scaled per sample by the selected key's class mask.

    ``z' = (W h + b) * 2 sigmoid(class_mask[k*])`` with ``k*`` the prompt pool's selection for the
    current batch. It keeps the wrapped head's ``weight`` and ``bias`` parameters (state-dict
    keys ``head.weight`` / ``head.bias`` unchanged) and adds ``head.class_mask`` of shape
    ``(P, C)``. The pool is held as a plain attribute, not a submodule, so its parameters are not
    listed twice.
    """

    def __init__(self, head: nn.Linear, pool: PromptPool, init: float = -1.0) -> None:
        # Built on the meta device so no initialisation is drawn, then given the old parameters.
        super().__init__(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        self.weight = head.weight
        self.bias = head.bias
        self.class_mask = nn.Parameter(
            torch.full((pool.pool_size, head.out_features), init, device=head.weight.device)
        )
        self.__dict__["pool"] = pool

    def logit_factors(self) -> torch.Tensor:
        """``(B, C)`` factors ``2 sigmoid(M[k*])`` the last forward multiplied the logits by
        (detached): per-sample, per-class scales of ``W h + b`` for closed-form head gradients."""
        selected = self.pool.selected
        if selected is None:
            raise RuntimeError("mvp-mask's head has not run a forward pass yet")
        return (2.0 * torch.sigmoid(self.class_mask[selected])).detach()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = F.linear(features, self.weight, self.bias)
        selected = self.pool.selected
        if selected is None or selected.shape[0] != logits.shape[0]:
            raise RuntimeError(
                "mvp-mask's head scales each sample's logits by the class mask of the prompt key selected "
                "for it, so it must be called on the features of the batch that model.features last "
                f"processed ({None if selected is None else selected.shape[0]} samples), got "
                f"{logits.shape[0]} rows."
            )
        return logits * (2.0 * torch.sigmoid(self.class_mask[selected]))


class MVPMask(Plugin):
    """MVP's instance-wise logit masking: ``z' = z * 2 sigmoid(M_{k*})``.

    Moon et al., ICCV 2023 (arXiv:2308.09303). A learnable class mask ``M`` in ``R^{P x C}``,
    initialised to -1 (so every factor starts at ``2 sigmoid(-1) = 0.54``), scales sample b's
    logits by row ``k*_b`` of ``M``, the key ``mvp-prompts`` selected for it: each key learns
    which classes its samples belong to and damps the rest, a soft, per-sample version of
    masking classes outside the current task. ``configure_model`` replaces ``model.head`` with a
    :class:`MaskedHead` (same weight and bias, plus ``head.class_mask``), so the mask acts in
    training and evaluation alike and is trained and aggregated with the model; it needs
    ``mvp-prompts`` listed before it. The official code adds the seen-class mask
    (``m_seen``) on top; use ``seen-class-mask`` for that. List plugins that replace the head
    (``etf``) before ``mvp-mask``, or the mask is lost.
    """

    #: A linear head to mask, and the prompt keys of mvp-prompts, whose configure_model (scenario
    #: order) must have installed them first: checked before a run starts.
    requires = frozenset({"head", "plugin:mvp-prompts"})

    @hookimpl
    def configure_model(self, model: nn.Module) -> None:
        model.head = MaskedHead(model.head, model.prompter)
