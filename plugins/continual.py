"""Remedies for online, blurry, class-imbalanced streams (Si-Blurry / MVP, GLFC).

- ``seen-class-mask``: logits of classes the client has not seen yet are masked out.
- ``gsf``: MVP's gradient-similarity focal loss, per sample.
- ``afs``: MVP's adaptive feature scaling, a per-sample temperature from head alignment.
- ``glfc-compensation``: GLFC's class-aware gradient compensation (old vs new classes).

Every formula works on one batch of per-batch hook arguments; the pure helpers
(:func:`head_row_gradients`, :func:`gsf_weights`, :func:`afs_scale`, :func:`glfc_weights`,
:func:`multilabel_bce`) hold the maths and the plugin classes only wire them to hooks. All of
them work offline too, where "seen" means "present in the client's data".
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import ClientContext, Forward, Plugin, hookimpl

__all__ = [
    "AFS",
    "GSF",
    "GLFCCompensation",
    "SeenClassMask",
    "afs_scale",
    "glfc_weights",
    "gsf_weights",
    "head_row_gradients",
    "multilabel_bce",
]

#: Floor on the product of norms in a cosine, so a zero vector gives cos = 0 instead of NaN.
COSINE_EPS = 1e-12


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two ``(B, d)`` tensors; 0 where either row is zero."""
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(COSINE_EPS)


# =========================================================================== seen-class mask


class SeenClassMaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mask_value: float = Field(
        float("-inf"),
        lt=0,
        description="Value written into the logits of unseen classes: -inf (exact, as Si-Blurry) or a "
        "large finite negative number such as -1e4.",
    )


class SeenClassMask(Plugin):
    """Training logits of classes the client has not seen yet are set to ``mask_value``.

    Si-Blurry (Moon et al., ICCV 2023) trains with a logit mask over the classes exposed so far:
    ``z'_c = z_c`` if class c was seen, else ``-inf``. Unseen classes then get no gradient, so
    the head rows of classes still to come are not pushed down before their first sample; CE
    stays finite because every target class has been seen (a replayed sample was seen earlier).
    In a stream, "seen" is ``ctx.local_class_counts > 0`` and is updated when each stream batch
    arrives, before training on it (``client_stream_batch``), as the official code updates its
    exposed classes per incoming batch: a class first met in the third batch of a round's slice
    stays masked during the first two. Offline it is the client's local classes, so this is a
    local-class mask. Evaluation logits are not touched.
    """

    Params = SeenClassMaskParams
    vectorized = True

    def _update(self, ctx: ClientContext) -> None:
        self.unseen = torch.as_tensor(np.asarray(ctx.local_class_counts) == 0, device=ctx.device)

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        self._update(ctx)

    @hookimpl
    def client_stream_batch(self, ctx: ClientContext) -> None:
        self._update(ctx)

    @hookimpl
    def client_transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(self.unseen, self.params.mask_value)


# =========================================================================== gsf


def head_row_gradients(
    logits: torch.Tensor, features: torch.Tensor, y: torch.Tensor, factors: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample and batch-mean CE gradients w.r.t. each sample's own class row of a linear head.

    For ``z = W h + b`` and ``l_i = CE(z_i, y_i)``, ``dl_i/dW_c = (p_ic - 1[y_i = c]) h_i``, so no
    autograd is needed. Masking or additive logit transforms (constant in W) leave this exact,
    with ``p`` the softmax of the transformed logits. A head whose logits are scaled per sample
    and class, ``z_ic = m_ic (W h_i + b)_c`` (MVP's instance-wise mask, ``factors = m``), has
    ``dl_i/dW_c = (p_ic - 1[y_i = c]) m_ic h_i``.

    Parameters
    ----------
    logits : (B, C) tensor
        The logits the loss sees.
    features : (B, d) tensor
        The head's input for the same samples.
    y : (B,) long tensor
        Labels.

    Returns
    -------
    g : (B, d) tensor
        ``g_i = dl_i / dW_{y_i} = (p_{i,y_i} - 1) h_i``.
    g_bar : (B, d) tensor
        ``g_bar_{y_i} = d((1/B) sum_j l_j) / dW_{y_i} = (1/B) sum_j (p_{j,y_i} - 1[y_j = y_i]) h_j``.
    """
    logits, h = logits.detach(), features.detach().to(logits.dtype)
    coef = torch.softmax(logits, dim=1)
    coef[torch.arange(len(y), device=y.device), y] -= 1.0  # p - onehot
    if factors is not None:
        coef = coef * factors.detach().to(coef.dtype)
    g = coef.gather(1, y[:, None]) * h
    g_bar = (coef.T @ h / len(y))[y]
    return g, g_bar


def gsf_weights(
    logits: torch.Tensor,
    features: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    gamma: float,
    factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample GSF weights ``w_i = (1 - alpha) + alpha s_i^gamma``, ``s_i = 1 - cos(g_i, g_bar_{y_i})``.

    ``s`` is clamped at 0 so rounding (cos slightly above 1) cannot give NaN for fractional gamma.
    ``factors`` are per-sample logit scales of the head (see :func:`head_row_gradients`).
    """
    g, g_bar = head_row_gradients(logits, features, y, factors)
    s = 1.0 - _cosine(g, g_bar)
    return (1.0 - alpha) + alpha * s.clamp_min(0.0) ** gamma


class GSFParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        0.5, ge=0, le=1, description="Share of the focal term: L = (1-alpha) CE + alpha s^gamma CE."
    )
    gamma: float = Field(2.0, ge=0, description="Exponent on the dissimilarity s_i (in [0, 2]).")


class GSF(Plugin):
    """Gradient-similarity focal loss of MVP (Moon et al., "Online Class Incremental Learning on
    Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023).

    ``s_i = 1 - cos(g_i, g_bar_{y_i})`` with ``g_i = dl_i/dW_{y_i}`` (the sample's own CE gradient
    on its class row of the head) and ``g_bar_{y_i}`` the same row's gradient of the batch-mean CE;
    ``L_i = (1 - alpha) CE_i + alpha s_i^gamma CE_i``. Samples whose gradient disagrees with their
    class's batch gradient (typically minor classes, swamped by major-class samples that share
    the batch) get up to ``(1 - alpha) + alpha 2^gamma`` times the weight.

    Implemented as ``client_sample_weights`` returning ``w_i = (1 - alpha) + alpha s_i^gamma``
    (detached), so it multiplies whatever per-sample loss is active (CE by default). The weights
    are truly **per sample**: the official MVP code multiplies the factor by an
    ``F.nll_loss(..., reduction='mean')`` scalar, which collapses it to one batch-level factor
    ``(1 - alpha) + alpha mean(s^gamma)``; this plugin follows the formula instead.

    The gradients are computed in closed form, ``dl_i/dW_c = (p_ic - 1[y_i = c]) h_i``, from the
    logits and the head's input the hook receives (no autograd, no copy of the head). This holds
    for the linear head's output up to transforms that are constant in W (additive shifts, masks
    such as ``seen-class-mask``), with p the softmax of the transformed logits. The head's input
    is ``head_input`` (``h / r`` with ``afs``; the official code uses the unscaled h there). A head
    that scales its logits per sample (``mvp-mask``'s ``z * 2 sigmoid(M[k*])``) exposes the factors
    as ``head.logit_factors()``, and the gradient goes through them, as in the official code:
    ``(p - onehot) * m * h``.
    """

    Params = GSFParams
    vectorized = True
    requires = frozenset({"head"})

    @hookimpl
    def client_sample_weights(
        self, logits: torch.Tensor, y: torch.Tensor, head_input: torch.Tensor, model: nn.Module
    ) -> torch.Tensor:
        factors_fn = getattr(model.head, "logit_factors", None)
        factors = factors_fn() if callable(factors_fn) else None
        return gsf_weights(logits, head_input, y, self.params.alpha, self.params.gamma, factors)


# =========================================================================== afs


def afs_scale(head_rows: torch.Tensor, features: torch.Tensor, margin: float) -> torch.Tensor:
    """``r_i = 1 - cos(W_{y_i}, h_i) + margin`` for the rows ``head_rows = W[y]`` (detached)."""
    return 1.0 - _cosine(head_rows.detach(), features.detach()) + margin


class AFSParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    margin: float = Field(
        0.5, gt=0, description="Added to 1 - cos(W_y, h), so the scale r lies in [margin, 2 + margin]."
    )


class AFS(Plugin):
    """Adaptive feature scaling of MVP (Moon et al., ICCV 2023).

    ``r_i = 1 - cos(W_{y_i}, h_i) + margin`` and the training logits are ``z_i = head(h_i / r_i)``:
    a per-sample temperature. Samples aligned with their class row (r near ``margin``) get
    sharper logits and a smaller loss; misaligned ones, typically from minor classes (r up to
    ``2 + margin``), get flatter logits and larger gradients. Training only (labels are
    needed); evaluation uses the plain ``head(h)``.

    ``r`` is **detached**: it is a constant per sample, not a path for gradients. The official
    MVP code does the same (it computes the score from ``feature.detach()`` and a detached copy
    of the head row), and it keeps AFS a pure temperature: a gradient through r would add an
    extra, unstated term pulling ``h`` toward ``W_y``. The returned features are the unscaled
    ``h = model.features(x)`` and the head's input ``h / r`` is returned as ``head_input`` for
    plugins that need it (``gsf``).
    """

    Params = AFSParams
    vectorized = True
    requires = frozenset({"head"})

    @hookimpl
    def client_forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Forward:
        h = model.features(x)
        r = afs_scale(model.head.weight[y], h, self.params.margin)
        scaled = h / r[:, None]
        return Forward(h, model.head(scaled), scaled)


# =========================================================================== glfc compensation


def glfc_weights(logits: torch.Tensor, y: torch.Tensor, is_old: torch.Tensor) -> torch.Tensor:
    """GLFC's compensation weights ``w_i = g_i / mean(g over i's group)``, ``g_i = |sigma(z_{i,y_i}) - 1|``.

    Groups: samples of old classes (``is_old[y]``) and of new classes. A group whose gradients
    are all zero keeps weight 1 (nothing to rescale).
    """
    z_y = logits.detach().gather(1, y[:, None]).squeeze(1)
    g = (torch.sigmoid(z_y) - 1.0).abs()
    group = is_old[y].long()
    # index_add (not bincount or in-place index_add_) so the weights also batch under vmap.
    sums = torch.zeros(2, dtype=g.dtype, device=g.device).index_add(0, group, g)
    counts = torch.zeros(2, dtype=g.dtype, device=g.device).index_add(0, group, torch.ones_like(g))
    means = sums / counts.clamp_min(1)
    mean = means[group]
    return torch.where(mean > 0, g / mean.clamp_min(torch.finfo(g.dtype).tiny), torch.ones_like(g))


def multilabel_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum_c BCE(sigma(z_c), onehot_c)``; masked ``-inf`` logits contribute 0, not NaN."""
    onehot = F.one_hot(y, logits.shape[1]).bool()
    # softplus(-z) = -log sigma(z) for the target, softplus(z) = -log(1 - sigma(z)) otherwise; the
    # usual max(z,0) - z t + log(1 + e^-|z|) form gives -inf * 0 = NaN on masked logits.
    return torch.where(onehot, F.softplus(-logits), F.softplus(logits)).sum(1)


class GLFCCompensationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: Literal["ce", "bce"] = Field(
        "ce",
        description="ce: weights multiply the active per-sample loss (cross-entropy unless another plugin "
        "sets one); bce: also use GLFC's per-sample sum over classes of binary cross-entropy.",
    )


class GLFCCompensation(Plugin):
    """Class-aware gradient compensation of GLFC (Dong et al., "Federated Class-Incremental
    Learning", CVPR 2022).

    ``g_i = |sigma(z_{i,y_i}) - 1|`` is the gradient magnitude of the sigmoid/BCE loss at the true
    class, and ``w_i = g_i / mean(g_j : j in group(i))``, with OLD classes (seen before this
    round's stream slice) and NEW classes (first seen in it) normalised separately, so each
    group's weights average 1 within the batch: old classes' few, hard samples are not drowned
    by the new classes' many, and vice versa. Weights are detached (``client_sample_weights``).

    Old classes are those the client had seen before this round's slice (``ctx.local_class_counts
    > 0`` when the round starts); offline (no stream) every class is new, so the weights are
    ``g_i / mean(g)`` over the batch. ``loss = "bce"`` also makes ``client_loss`` return GLFC's per-sample
    ``sum_c BCE(sigma(z_c), onehot_c)``; GLFC's code averages over the N x C entries instead,
    which is the same loss divided by C (a learning-rate factor). The official code also sets
    ``w = 1`` while no class is old; here the new group is normalised as the formula says.
    """

    Params = GLFCCompensationParams
    vectorized = True

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        if ctx.online_iter is None:
            is_old = np.zeros(ctx.num_classes, dtype=bool)
        else:
            is_old = np.asarray(ctx.local_class_counts) > 0  # counts before this round's slice
        self.is_old = torch.as_tensor(is_old, device=ctx.device)

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        return multilabel_bce(logits, y) if self.params.loss == "bce" else None

    @hookimpl
    def client_sample_weights(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return glfc_weights(logits, y, self.is_old)
