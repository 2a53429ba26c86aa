"""Long-tail training losses that use class counts: class-balanced weights, LDAM, logit adjustment.

Each plugin reads its counts through :mod:`fedlt_plugins.priors` (``prior = "local" | "global" |
"estimated"``) once per client-round in ``client_start`` and keeps the per-class tensors on its
client instance, so the per-batch hooks only index them.

Classes with a zero count are treated as having one sample (as FedETF and
:func:`~fedlt_plugins.priors.log_prior_tensor` do), so every formula stays finite.

Class weights: ``class-balanced`` by default normalises as Cui et al.'s official code does (weights
summing to the number of classes, batch loss ``sum_i w_{y_i} l_i / B``, through
``client_sample_weights``); with ``normalize = "weighted-mean"`` (and LDAM's DRW, as the LDAM-DRW
code) they come from ``client_class_weights``: the batch loss is ``sum_i w_{y_i} l_i / sum_i
w_{y_i}``, as weighted cross-entropy (``F.cross_entropy(weight=)``) defines it, so re-weighting
changes the balance between classes but not the effective learning rate, and the weights' scale
does not matter.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from fedlt_plugins.priors import PRIOR_DOC, Prior, prior_counts
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from fedlt import ClientContext, CosineLinear, Plugin, SetupContext, hookimpl

__all__ = [
    "LDAM",
    "ClassBalanced",
    "LogitAdjust",
    "ScaledCosineLinear",
    "class_balanced_weights",
    "drw_start",
    "ldam_margins",
    "log_class_prior",
]

#: DRW starts after this share of the rounds (LDAM-DRW: epoch 160 of 200).
DRW_FRACTION = 0.8

# --------------------------------------------------------------------------- pure helpers


def class_balanced_weights(counts: np.ndarray, beta: float, present_only: bool = False) -> np.ndarray:
    """Cui et al.'s weights ``w_c = (1 - beta) / (1 - beta^{n_c})``, normalised to mean 1.

    ``1 / w_c`` is the effective number of samples ``E_n = (1 - beta^n) / (1 - beta)``: the
    expected volume covered by ``n`` samples when each new one overlaps the previous ones with
    probability ``beta``. Counts below 1 (absent classes) are treated as 1.

    The weights sum to the number of classes normalised over: all ``C`` classes, or with
    ``present_only`` only the classes with ``n_c > 0`` (a client's own classes), which then sum
    to their number; absent classes keep the raw weight of a one-sample class on that scale.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = np.maximum(counts, 1.0)
    raw = (1.0 - beta) / (1.0 - np.power(beta, n))
    over = counts > 0 if present_only and (counts > 0).any() else np.ones(len(n), dtype=bool)
    return raw * (int(over.sum()) / raw[over].sum())


def drw_start(start_round: int | None, n_rounds: int) -> int:
    """The first DRW round: ``start_round``, or by default the first round of the last 20%
    (``floor(0.8 R) + 1``; LDAM-DRW re-weights from epoch 160 of 200)."""
    return start_round if start_round is not None else math.floor(DRW_FRACTION * n_rounds) + 1


def ldam_margins(counts: np.ndarray, max_margin: float) -> np.ndarray:
    """Cao et al.'s margins ``Delta_c = K / n_c^{1/4}`` with ``K`` such that ``max_c Delta_c = max_margin``.

    The largest margin belongs to the rarest class, so ``Delta_c = max_margin * (n_min / n_c)^{1/4}``.
    Counts below 1 (absent classes) are treated as 1, which makes ``n_min = 1`` when any class is
    absent.
    """
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    inv = n**-0.25
    return inv * (max_margin / inv.max())


def log_class_prior(counts: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``log pi_c`` with ``pi_c = n_c / sum_j n_j`` as float32; counts below 1 are treated as 1."""
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return torch.as_tensor(np.log(n / n.sum()), dtype=torch.float32, device=device)


def _weights_tensor(
    counts: np.ndarray, beta: float, device: torch.device | str, present_only: bool
) -> torch.Tensor:
    weights = class_balanced_weights(counts, beta, present_only)
    return torch.as_tensor(weights, dtype=torch.float32, device=device)


def _counts(prior: Prior, model: nn.Module | None, ctx: ClientContext) -> np.ndarray:
    return prior_counts(prior, ctx.local_class_counts, ctx.global_class_counts, model)


# --------------------------------------------------------------------------- class-balanced


class ClassBalancedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prior: Prior = Field("local", description=PRIOR_DOC)
    beta: float = Field(
        0.9999,
        gt=0,
        lt=1,
        description="Overlap probability of the effective number E_n = (1 - beta^n) / (1 - beta); "
        "beta -> 1 approaches inverse-frequency weights, beta -> 0 uniform weights.",
    )
    drw_start_round: int | None = Field(
        None,
        ge=1,
        description="Deferred re-weighting (DRW): weights are 1 before this round and class-balanced "
        "from it on; unset = class-balanced from the first round.",
    )
    normalize: Literal["cui", "weighted-mean"] = Field(
        "cui",
        description="How the weighted loss is normalised. 'cui' (Cui et al.'s official code): weights "
        "rescaled to sum to the number of classes (the client's own classes with prior 'local', all C "
        "otherwise), batch loss sum_i w_{y_i} l_i / B, so the weights also scale the step; "
        "'weighted-mean': batch loss sum_i w_{y_i} l_i / sum_i w_{y_i} (F.cross_entropy(weight=)), "
        "where the weights' scale cancels.",
    )


class ClassBalanced(Plugin):
    """Class-balanced re-weighting (Cui et al., CVPR 2019), optionally deferred (DRW, Cao et al. 2019).

    Each sample's loss is weighted by its class weight ``w_y`` with
    ``w_c = (1 - beta) / (1 - beta^{n_c})``, rescaled to sum to the number of classes. With
    ``normalize = "cui"`` (default, Cui et al.'s official code) the batch loss is
    ``sum_i w_{y_i} l_i / B`` (the weights are sample weights, ``client_sample_weights``); with
    ``"weighted-mean"`` it is ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (weighted cross-entropy,
    ``client_class_weights``), where the weights' scale cancels. The weights multiply whatever
    ``client_loss`` is active: alone they weight cross-entropy, together with ``focal`` they give
    class-balanced focal loss.

    With ``drw_start_round`` the weights are all 1 before that round (plain training learns the
    features) and class-balanced from it on, the DRW schedule of LDAM-DRW.

    Normalisation: with ``prior = "local"`` the weights are normalised over the classes the
    client holds (they average 1 over them); with ``global`` or ``estimated`` over all C classes.
    Classes with ``n_c = 0`` are weighted as if ``n_c = 1``.
    """

    Params = ClassBalancedParams
    vectorized = True

    def _active(self, round: int) -> bool:
        start = self.params.drw_start_round
        return start is None or round >= start

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        self.weights = None
        if self._active(ctx.round):
            p = self.params
            counts = _counts(p.prior, model, ctx)
            self.weights = _weights_tensor(counts, p.beta, ctx.device, present_only=p.prior == "local")

    # In a stream the local counts grow as batches arrive: refresh the weights with them.
    client_stream_batch = hookimpl(client_start)

    @hookimpl
    def client_class_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        if self.weights is None or self.params.normalize != "weighted-mean":
            return None
        return self.weights[y]

    @hookimpl
    def client_sample_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        """Cui's normalisation: the weights scale each sample's loss and the batch mean divides by B."""
        if self.weights is None or self.params.normalize != "cui":
            return None
        return self.weights[y]


# --------------------------------------------------------------------------- LDAM


class ScaledCosineLinear(CosineLinear):
    """LDAM's cosine classifier with its logit scale: ``z_c = s <h / |h|, w_c / |w_c|>``.

    The scale belongs to the head, not to the loss, so the logits every evaluation reads (accuracy,
    calibration, post-hoc adjustment, diagnostics) are the ones training optimised: with cosines in
    [-1, 1] a softmax is nearly uniform and its calibration meaningless. Same parameters, state-dict
    keys and random draws as :class:`~fedlt.models.CosineLinear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scale: float,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, generator, device=device, dtype=dtype)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s`` times the cosine logits, shape ``(B, out_features)``."""
        return self.scale * super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


class LDAMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prior: Prior = Field("local", description=PRIOR_DOC)
    max_margin: float = Field(
        0.5, gt=0, description="Margin of the rarest class (the constant K is set by it)."
    )
    head: Literal["cosine", "linear"] = Field(
        "cosine",
        description="The classifier LDAM trains: 'cosine' replaces the model's head by a cosine-normalised "
        "one times the scale s (logits s cos in [-s, s], no bias: the logits the loss trains are the "
        "ones evaluation sees), as the official LDAM-DRW code does; 'linear' keeps the model's linear "
        "head (margins on unbounded logits, which do little).",
    )
    scale: float | None = Field(
        None,
        gt=0,
        validate_default=True,
        description="Logit scale s of the loss CE(s (z - Delta_y onehot)); unset = 30 with the cosine head "
        "(the paper's value) and 1 with the linear head.",
    )
    drw: bool = Field(
        False, description="Deferred re-weighting: class-balanced class weights from drw_start_round on."
    )
    drw_start_round: int | None = Field(
        None,
        ge=1,
        validate_default=True,
        description="First round of deferred re-weighting; unset = floor(0.8 x rounds) + 1 (the paper "
        "re-weights from epoch 160 of 200). Only with drw = true.",
    )
    drw_beta: float = Field(0.9999, gt=0, lt=1, description="beta of the class-balanced weights used by DRW.")

    @field_validator("scale")
    @classmethod
    def _default_scale(cls, value: float | None, info: ValidationInfo) -> float:
        if value is not None:
            return value
        return 30.0 if info.data.get("head", "cosine") == "cosine" else 1.0

    @field_validator("drw_start_round")
    @classmethod
    def _start_needs_drw(cls, value: int | None, info: ValidationInfo) -> int | None:
        if not info.data.get("drw", False) and value is not None:
            raise ValueError("unset when drw is false (set drw = true to use deferred re-weighting)")
        return value


class LDAM(Plugin):
    """Label-distribution-aware margin loss (Cao et al., NeurIPS 2019), with optional DRW.

    ``L = CE(s * (z - Delta_y * onehot(y)), y)`` with ``Delta_c = K / n_c^{1/4}`` and ``K`` chosen so
    that ``max_c Delta_c = max_margin``: the true class must win by a margin that grows as its
    class gets rarer. As in the official code, ``z`` are the cosines of a cosine-normalised
    classifier (``head = "cosine"``) and ``s = 30``; margins of 0.5 on bounded cosines are large,
    while on raw linear logits of size 10-30 they barely matter (``head = "linear"`` keeps that
    variant, with ``s = 1``). Classes with ``n_c = 0`` are treated as ``n_c = 1``.

    Evaluation sees the logits the model was trained with, ``s z`` without the margin: with the
    cosine head ``configure_model`` installs :class:`ScaledCosineLinear`, whose forward is
    ``s cos`` (so the loss is ``CE(z' - s Delta_y onehot(y))`` on its logits ``z' = s cos``), and
    calibration, post-hoc adjustment and diagnostics all read ``s cos``; with the linear head and
    ``s != 1``, ``eval_logits`` multiplies the evaluation logits by ``s`` (list ``ldam`` before
    plugins that adjust logits after it, such as ``posthoc-adjust``).

    With ``drw = true`` (deferred re-weighting, the LDAM-DRW schedule), from ``drw_start_round``
    (default: the first round of the last 20%) each sample is weighted by the class-balanced
    weight of its class (``beta = drw_beta``) and the batch loss is the weighted mean
    ``sum w_y l / sum w_y``, as ``F.cross_entropy(weight=...)`` computes it.
    """

    Params = LDAMParams
    vectorized = True
    requires = frozenset({"head"})

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: SetupContext) -> None:
        if self.params.head == "cosine":
            old = model.head
            model.head = ScaledCosineLinear(
                old.in_features,
                old.out_features,
                self.params.scale,
                ctx.generator,
                device=old.weight.device,
                dtype=old.weight.dtype,
            )

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        p = self.params
        counts = _counts(p.prior, model, ctx)
        self.margins = torch.as_tensor(
            ldam_margins(counts, p.max_margin), dtype=torch.float32, device=ctx.device
        )
        self.weights = None
        if p.drw and ctx.round >= drw_start(p.drw_start_round, ctx.n_rounds):
            self.weights = _weights_tensor(counts, p.drw_beta, ctx.device, present_only=p.prior == "local")

    # In a stream the local counts grow as batches arrive: refresh margins and weights with them.
    client_stream_batch = hookimpl(client_start)

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.params.scale
        margin = self.margins.to(logits.dtype)[y]
        onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        if self.params.head == "cosine":
            # The head already gives s cos: CE(s cos - s Delta_y e_y) = CE(s (cos - Delta_y e_y)).
            return F.cross_entropy(logits - s * onehot * margin[:, None], y, reduction="none")
        return F.cross_entropy(s * (logits - onehot * margin[:, None]), y, reduction="none")

    @hookimpl
    def client_class_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        return None if self.weights is None else self.weights[y]

    @hookimpl
    def eval_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The linear head's trained logits are ``s z``; the cosine head already gives ``s cos``."""
        s = self.params.scale
        return logits * s if self.params.head == "linear" and s != 1.0 else logits


# --------------------------------------------------------------------------- logit adjustment


class LogitAdjustParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prior: Prior = Field("local", description=PRIOR_DOC)
    tau: float = Field(1.0, ge=0, description="Strength of the adjustment; 0 gives plain cross-entropy.")


class LogitAdjust(Plugin):
    """Logit-adjusted loss (Menon et al., ICLR 2021), applied during training.

    ``L = -log( e^{z_y + tau log pi_y} / sum_j e^{z_j + tau log pi_j} ) = CE(z + tau log pi, y)``
    with ``pi_c = n_c / sum_j n_j``. Training against the prior lets the plain logits ``z``
    estimate the balanced posterior, so evaluation uses ``z`` unchanged. ``tau = 1`` is
    balanced softmax. Classes with ``n_c = 0`` are treated as ``n_c = 1``.
    """

    Params = LogitAdjustParams
    vectorized = True

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        log_pi = log_class_prior(_counts(self.params.prior, model, ctx), ctx.device)
        self.shift = self.params.tau * log_pi

    # In a stream the local counts grow as batches arrive: refresh the prior with them.
    client_stream_batch = hookimpl(client_start)

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.shift.to(logits.dtype), y, reduction="none")
