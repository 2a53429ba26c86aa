"""Long-tail training losses that use class counts: class-balanced weights, LDAM, logit adjustment.

Each plugin reads its counts through :mod:`fedlt_plugins.priors` (``prior = "local" | "global" |
"estimated"``) once per client-round in ``client_start`` and keeps the per-class tensors in
``ctx.extra``, so the per-batch hooks only index them.

Classes with a zero count are treated as having one sample (as FedETF and
:func:`~fedlt_plugins.priors.log_prior_tensor` do), so every formula stays finite. With
``prior = "local"`` on a non-IID client those classes never occur as labels, but they still take
part in the normalisations below (class-balanced weights summing to C, the LDAM margin constant),
which is stated on each plugin.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from fedlt_plugins.priors import PRIOR_DOC, Prior, prior_counts
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from fedlt import ClientContext, Plugin, hookimpl

__all__ = [
    "LDAM",
    "ClassBalanced",
    "LogitAdjust",
    "class_balanced_weights",
    "ldam_margins",
    "log_class_prior",
]


# --------------------------------------------------------------------------- pure helpers


def class_balanced_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Cui et al.'s weights ``w_c = (1 - beta) / (1 - beta^{n_c})``, scaled so ``sum_c w_c = C``.

    ``1 / w_c`` is the effective number of samples ``E_n = (1 - beta^n) / (1 - beta)``: the
    expected volume covered by ``n`` samples when each new one overlaps the previous ones with
    probability ``beta``. Counts below 1 (absent classes) are treated as 1.
    """
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    raw = (1.0 - beta) / (1.0 - np.power(beta, n))
    return raw * (len(n) / raw.sum())


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


def _weights_tensor(counts: np.ndarray, beta: float, device: torch.device | str) -> torch.Tensor:
    return torch.as_tensor(class_balanced_weights(counts, beta), dtype=torch.float32, device=device)


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


class ClassBalanced(Plugin):
    """Class-balanced re-weighting (Cui et al., CVPR 2019), optionally deferred (DRW, Cao et al. 2019).

    Each sample's loss is multiplied by its class weight ``w_y`` with
    ``w_c = (1 - beta) / (1 - beta^{n_c})`` normalised so that ``sum_c w_c = C``. The weights are
    returned from ``client_sample_weights``, so they multiply whatever ``client_loss`` is active:
    alone they weight cross-entropy, together with ``focal`` they give class-balanced focal loss.

    With ``drw_start_round`` the weights are all 1 before that round (plain training learns the
    features) and class-balanced from it on, the DRW schedule of LDAM-DRW.

    Classes with ``n_c = 0`` are weighted as if ``n_c = 1``. They do take part in the
    normalisation: with ``prior = "local"``, every class a client lacks has the largest raw weight,
    so the weights of the classes it does hold are scaled down accordingly.
    """

    Params = ClassBalancedParams

    def _active(self, round: int) -> bool:
        start = self.params.drw_start_round
        return start is None or round >= start

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        if self._active(ctx.round):
            counts = _counts(self.params.prior, model, ctx)
            ctx.extra["class-balanced.weights"] = _weights_tensor(counts, self.params.beta, ctx.device)

    @hookimpl
    def client_sample_weights(self, y: torch.Tensor, ctx: ClientContext) -> torch.Tensor | None:
        w = ctx.extra.get("class-balanced.weights")
        return None if w is None else w[y]


# --------------------------------------------------------------------------- LDAM


class LDAMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prior: Prior = Field("local", description=PRIOR_DOC)
    max_margin: float = Field(
        0.5, gt=0, description="Margin of the rarest class (the constant K is set by it)."
    )
    scale: float = Field(
        1.0,
        gt=0,
        description="Logit scale s. The paper's s = 30 goes with its normalised (cosine) classifier; "
        "fedlt's heads are plain linear layers whose logits are already unnormalised, where s = 30 "
        "diverged in our tests, so the default is 1. Set 30 with a cosine head.",
    )
    drw: bool = Field(
        False, description="Deferred re-weighting: class-balanced sample weights from drw_start_round."
    )
    drw_start_round: int | None = Field(
        None,
        ge=1,
        validate_default=True,
        description="First round of deferred re-weighting (required when drw is true).",
    )
    drw_beta: float = Field(0.9999, gt=0, lt=1, description="beta of the class-balanced weights used by DRW.")

    @field_validator("drw_start_round")
    @classmethod
    def _start_matches_drw(cls, value: int | None, info: ValidationInfo) -> int | None:
        drw = info.data.get("drw", False)
        if drw and value is None:
            raise ValueError("a round >= 1 when drw is true (the plugin does not know the run's length)")
        if not drw and value is not None:
            raise ValueError("unset when drw is false (set drw = true to use deferred re-weighting)")
        return value


class LDAM(Plugin):
    """Label-distribution-aware margin loss (Cao et al., NeurIPS 2019), with optional DRW.

    ``L = CE(s * (z - Delta_y * onehot(y)), y)`` with ``Delta_c = K / n_c^{1/4}`` and ``K`` chosen so
    that ``max_c Delta_c = max_margin``: the true class must win by a margin that grows as its
    class gets rarer. Classes with ``n_c = 0`` are treated as ``n_c = 1``; with ``prior = "local"``
    a client lacking some class therefore has ``K = max_margin`` and smaller margins for the
    classes it holds than a client holding every class.

    With ``drw = true`` (deferred re-weighting, the LDAM-DRW schedule), from ``drw_start_round``
    on each sample's loss is also weighted by the class-balanced weight of its class
    (``beta = drw_beta``, see ``class-balanced``) through ``client_sample_weights``.
    """

    Params = LDAMParams

    def _drw_active(self, round: int) -> bool:
        p = self.params
        return p.drw and p.drw_start_round is not None and round >= p.drw_start_round

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        counts = _counts(self.params.prior, model, ctx)
        margins = ldam_margins(counts, self.params.max_margin)
        ctx.extra["ldam.margins"] = torch.as_tensor(margins, dtype=torch.float32, device=ctx.device)
        if self._drw_active(ctx.round):
            ctx.extra["ldam.weights"] = _weights_tensor(counts, self.params.drw_beta, ctx.device)

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        margin = ctx.extra["ldam.margins"].to(logits.dtype)[y]
        shifted = logits - F.one_hot(y, logits.shape[1]).to(logits.dtype) * margin[:, None]
        return F.cross_entropy(self.params.scale * shifted, y, reduction="none")

    @hookimpl
    def client_sample_weights(self, y: torch.Tensor, ctx: ClientContext) -> torch.Tensor | None:
        w = ctx.extra.get("ldam.weights")
        return None if w is None else w[y]


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

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        log_pi = log_class_prior(_counts(self.params.prior, model, ctx), ctx.device)
        ctx.extra["logit-adjust.shift"] = self.params.tau * log_pi

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        shift = ctx.extra["logit-adjust.shift"].to(logits.dtype)
        return F.cross_entropy(logits + shift, y, reduction="none")
