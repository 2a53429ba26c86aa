"""RCAL (Zhang et al., ICCV 2023, "When Noisy Labels Meet Long Tail Dilemmas: A Representation
Calibration Method"), in federated form.

Checked against the paper's text, arXiv 2211.10955v3 (the ICCV 2023 version): Sec. 3.3-3.4,
Eq. 2, Algorithm 1, Sec. 4.2 (docs/noise.md, "RCAL", says where it was read). The authors' code
was not found.

Distributional representation calibration (Sec. 3.3). Class ``c``'s features are assumed Gaussian.
Each client computes the features of the global model it received (eval mode) on its own, noisily
labelled data, drops per class the samples a robust rule marks as outliers (``robust = "lof"``: the
Local Outlier Factor, as the paper; ``"centre"``: keep the ``keep`` fraction closest to the client's
class mean; ``"none"``), and uploads per class the labelled count ``n_c``, the kept count, the kept
sum ``s_c`` and sum of outer products ``G_c`` (float64; no sample leaves the client). The server
sums them: the statistics of the pooled kept samples, ``mu_c = s_c / m_c``, ``Sigma_c = (G_c - m_c
mu_c mu_c^T) / (m_c - 1)`` (``m_c`` kept). Head classes are the most populous classes that together
hold at least ``head_share`` of the labelled samples (Sec. 4.2: 50%); every other (tail) class
``k`` borrows from its ``q`` nearest head classes ``C_k`` (Euclidean distance of the means), with
``d_c = ||mu_c - mu_k||``::

    w_c      = n_c d_c^2 / sum_{j in C_k} n_j d_j^2
    mu'_k    = gamma sum_{c in C_k} w_c mu_c    + (1 - gamma) mu_k
    Sigma'_k = gamma sum_{c in C_k} w_c Sigma_c + (1 - gamma) Sigma_k + alpha 1

(``1`` the all-ones matrix, as the paper writes; head classes keep ``mu_c, Sigma_c``). From round
``start_round`` each client draws ``n_samples`` features per present class from ``N(mu'_c,
Sigma'_c)`` (stream ``(seed, "rcal-samples", round, client)``), shuffles them (``(seed,
"rcal-order", round, client)``) and adds ``weight * CE(head(z), c)`` on the next batch-sized slice
of them to every local batch.

Individual representation calibration (Sec. 3.4): ``lam * mean_i ||f(x_i) - z0_i||^2`` and mixup
of the real batch. The paper's ``z0`` are the features of a contrastively (MoCo) pre-trained
encoder; fedlt has no contrastive stage, so ``z0`` are the round's global model's features of the
same (mixed) inputs (``lam = 0``: off). From ``start_round`` each batch is mixed, ``x~ = l x + (1 -
l) x[p]`` with ``l ~ Beta(mixup, mixup)`` and a permutation ``p`` (stream ``(seed, "rcal-mixup",
round, client)``), and the per-sample loss is ``l CE(f(x~), y) + (1 - l) CE(f(x~), y[p])``
(``mixup = 0``: off). The maths is in pure helpers (:func:`lof_scores`, :func:`robust_keep`,
:func:`class_statistics`, :func:`class_gaussians`, :func:`head_classes`, :func:`borrow_weights`,
:func:`calibrate`, :func:`sample_features`, :func:`mix_batch`, :func:`mixup_loss`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from fedlt_plugins.ood import combine_statistics, training_features  # the same pooled sums as mahalanobis-ood
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from torch import nn

from fedlt import ClientContext, Forward, Plugin, RoundContext, hookimpl

__all__ = [
    "RCAL",
    "RCALParams",
    "borrow_weights",
    "calibrate",
    "class_gaussians",
    "class_statistics",
    "combine_statistics",
    "head_classes",
    "lof_scores",
    "mix_batch",
    "mixup_loss",
    "robust_keep",
    "sample_features",
]

MEAN_KEY = "rcal.mean"
COV_KEY = "rcal.cov"
PRESENT_KEY = "rcal.present"

#: Parameters that were replaced, and by what (a scenario naming one gets an error saying so).
REPLACED = {
    "fraction_head": "left out: replaced by head_share, the share of the labelled samples the head classes "
    "hold (the paper's rule), not a share of the classes",
}


class RCALParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_round: int = Field(
        2,
        ge=2,
        description="First round whose local training adds the sampled features, the regulariser and mixup "
        "(warm-up before it; the statistics come from the previous round's clients, so at least 2).",
    )
    robust: Literal["lof", "centre", "none"] = Field(
        "lof",
        description="Per client and class, which samples enter the statistics: lof drops the Local Outlier "
        "Factor outliers (the paper's rule), centre keeps the `keep` fraction closest to the class mean, "
        "none keeps all.",
    )
    keep: float = Field(
        0.8, gt=0, le=1, description="robust = centre: fraction of each class's samples kept (closest first)."
    )
    n_neighbors: int = Field(
        20, ge=1, description="robust = lof: neighbours of the LOF (min(n_neighbors, n - 1) for n samples)."
    )
    lof_threshold: float = Field(
        1.5,
        gt=1,
        description="robust = lof: samples whose LOF exceeds it are outliers (scikit-learn's auto).",
    )
    head_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Head classes: the most populous classes that together hold at least this share of the "
        "labelled samples (the paper: 0.5); the others are tail classes.",
    )
    q: int = Field(
        3, ge=1, description="Head classes each tail class borrows from (nearest means; paper: 3)."
    )
    gamma: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Confidence in the head classes' statistics: mu' = gamma sum w mu_head + (1 - gamma) mu "
        "(0: no calibration).",
    )
    alpha: float = Field(
        0.1, ge=0, description="Added to every entry of a calibrated tail covariance (alpha times all-ones)."
    )
    n_samples: int = Field(20, ge=1, description="Features sampled per present class each round.")
    weight: float = Field(1.0, ge=0, description="Weight of the cross-entropy on the sampled features.")
    lam: float = Field(
        0.1, ge=0, description="Weight of ||f(x) - f_global(x)||^2, the individual calibration (0: off)."
    )
    mixup: float = Field(1.0, ge=0, description="mixup of the real batch: l ~ Beta(mixup, mixup) (0: off).")

    @model_validator(mode="before")
    @classmethod
    def _no_replaced_keys(cls, data: Any) -> Any:
        """A replaced parameter is refused with its replacement named (not a bare 'extra field')."""
        if isinstance(data, Mapping):
            for key, allowed in REPLACED.items():
                if key in data:
                    detail = InitErrorDetails(
                        type=PydanticCustomError("value_error", allowed), loc=(key,), input=data[key]
                    )
                    raise ValidationError.from_exception_data(cls.__name__, [detail])
        return data


# ---------------------------------------------------------------------- robust selection


def lof_scores(x: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """Local Outlier Factor of every row of ``x`` (Breunig et al. 2000) among the others, with
    ``k = min(n_neighbors, n - 1)``: ``lof(p) = mean_{o in N_k(p)} lrd(o) / lrd(p)``, ``lrd(p) = 1 /
    mean_{o in N_k(p)} max(k-dist(o), d(p, o))``. ~1 inside a cluster, > 1 for outliers."""
    x = x.to(torch.float64)
    n = x.shape[0]
    k = min(n_neighbors, n - 1)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    knn_d, knn = d.topk(k, largest=False)
    k_dist = knn_d[:, -1]
    reach = torch.maximum(k_dist[knn], knn_d)
    lrd = 1.0 / (reach.mean(1) + 1e-10)
    return lrd[knn].mean(1) / lrd


def robust_keep(features: torch.Tensor, labels: torch.Tensor, params: RCALParams) -> torch.Tensor:
    """Boolean mask of the samples that enter the statistics, decided per class (see RCALParams)."""
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    if params.robust == "none":
        return keep
    f = features.detach().to(torch.float64).cpu()
    y = labels.cpu()
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).squeeze(1)
        if rows.numel() < 3:
            continue
        fc = f[rows]
        if params.robust == "lof":
            keep[rows] = lof_scores(fc, params.n_neighbors) <= params.lof_threshold
        else:
            n_keep = max(1, math.ceil(params.keep * rows.numel()))
            dist = (fc - fc.mean(0)).norm(dim=1)
            order = torch.sort(dist, stable=True).indices
            keep[rows[order[n_keep:]]] = False
    return keep


# ---------------------------------------------------------------------- statistics


def class_statistics(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """Per-class sufficient statistics (float64, CPU): ``count (C,)``, ``sum (C, d)``, ``outer (C, d, d)``."""
    f = features.detach().to(torch.float64).cpu()
    y = labels.cpu()
    d = f.shape[1]
    count = torch.bincount(y, minlength=num_classes).to(torch.float64)
    total = torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, f)
    outer = torch.zeros(num_classes, d, d, dtype=torch.float64).index_add_(
        0, y, f.unsqueeze(2) * f.unsqueeze(1)
    )
    return {"count": count, "sum": total, "outer": outer}


def class_gaussians(
    stats: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(means (C, d), covs (C, d, d), present (C,))``: per class the mean and the unbiased
    covariance ``(G_c - n_c mu_c mu_c^T) / (n_c - 1)`` (zero for one sample)."""
    count, total, outer = stats["count"], stats["sum"], stats["outer"]
    present = count > 0
    n = count.clamp(min=1)
    means = total / n.unsqueeze(1)
    scatter = outer - n[:, None, None] * means.unsqueeze(2) * means.unsqueeze(1)
    covs = scatter / (count - 1).clamp(min=1)[:, None, None]
    covs = (covs + covs.transpose(1, 2)) / 2
    covs[count <= 1] = 0
    return means, covs, present


# ---------------------------------------------------------------------- tail calibration


def head_classes(labelled: torch.Tensor, present: torch.Tensor, head_share: float) -> torch.Tensor:
    """Boolean ``(C,)``: the most populous present classes (by labelled count, ties: lower id), as few
    as together hold at least ``head_share`` of the present classes' labelled samples (Sec. 4.2)."""
    ids = torch.nonzero(present).squeeze(1).tolist()
    order = sorted(ids, key=lambda c: (-float(labelled[c]), c))
    total = sum(float(labelled[c]) for c in ids)
    head = torch.zeros(labelled.shape[0], dtype=torch.bool)
    held = 0.0
    for c in order:
        if held >= head_share * total * (1 - 1e-12):
            break
        head[c] = True
        held += float(labelled[c])
    return head


def borrow_weights(near_means: torch.Tensor, mean: torch.Tensor, near_labelled: torch.Tensor) -> torch.Tensor:
    """The paper's ``w_c = n_c ||mu_c - mu_k||^2 / sum_j n_j ||mu_j - mu_k||^2`` over the borrowed head
    classes (uniform if every distance is zero)."""
    raw = near_labelled.to(near_means.dtype) * (near_means - mean).pow(2).sum(1)
    total = raw.sum()
    if float(total) <= 0:
        return torch.full_like(raw, 1.0 / raw.numel())
    return raw / total


def calibrate(
    means: torch.Tensor,
    covs: torch.Tensor,
    labelled: torch.Tensor,
    present: torch.Tensor,
    params: RCALParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail classes borrow from their ``q`` nearest head classes (module docstring); head and
    absent classes are returned as given."""
    head = head_classes(labelled, present, params.head_share)
    head_ids = torch.nonzero(head).squeeze(1)
    cal_means, cal_covs = means.clone(), covs.clone()
    ones = torch.ones(means.shape[1], means.shape[1], dtype=means.dtype)
    g = params.gamma
    for k in torch.nonzero(present & ~head).squeeze(1).tolist():
        dist = (means[head_ids] - means[k]).norm(dim=1)
        near = head_ids[torch.sort(dist, stable=True).indices[: min(params.q, head_ids.numel())]]
        w = borrow_weights(means[near], means[k], labelled[near])
        cal_means[k] = g * (w[:, None] * means[near]).sum(0) + (1 - g) * means[k]
        cal_covs[k] = g * (w[:, None, None] * covs[near]).sum(0) + (1 - g) * covs[k] + params.alpha * ones
    return cal_means, cal_covs


def sample_features(
    means: torch.Tensor,
    covs: torch.Tensor,
    present: torch.Tensor,
    n_samples: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z (P * n, d) float32, y (P * n,))``: ``n_samples`` draws ``mu_c + V sqrt(L) e`` per present
    class, ``Sigma_c = V L V^T`` (eigen-decomposition, so a singular covariance samples too)."""
    zs, ys = [], []
    for c in torch.nonzero(present).squeeze(1).tolist():
        evals, evecs = torch.linalg.eigh(covs[c].to(torch.float64))
        root = evecs * evals.clamp(min=0).sqrt()
        e = torch.randn(n_samples, means.shape[1], generator=generator, dtype=torch.float64)
        zs.append(means[c].to(torch.float64) + e @ root.T)
        ys.append(torch.full((n_samples,), c, dtype=torch.long))
    return torch.cat(zs).to(torch.float32), torch.cat(ys)


# ---------------------------------------------------------------------- mixup


def mix_batch(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """mixup's inputs ``lam x + (1 - lam) x[perm]``."""
    return lam * x + (1 - lam) * x[perm]


def mixup_loss(logits: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """mixup's per-sample loss ``lam CE(logits, y) + (1 - lam) CE(logits, y[perm])`` (``(B,)``)."""
    return lam * F.cross_entropy(logits, y, reduction="none") + (1 - lam) * F.cross_entropy(
        logits, y[perm], reduction="none"
    )


class RCAL(Plugin):
    """Representation calibration (see the module docstring): clients upload robust per-class
    feature statistics, the server calibrates tail classes with their nearest head classes, and
    local training adds a cross-entropy on features sampled from the calibrated Gaussians, a
    feature-distance regulariser and mixup. Trains clients one at a time (not vectorized)."""

    Params = RCALParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._mix_rng: np.random.Generator | None = None
        self._mix: tuple[float, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ server

    @hookimpl
    def server_configure_round(self, ctx: RoundContext) -> dict[str, torch.Tensor] | None:
        if self._fit is None or ctx.round < self.params.start_round:
            return None
        means, covs, present = self._fit
        return {MEAN_KEY: means.clone(), COV_KEY: covs.clone(), PRESENT_KEY: present.clone()}

    @hookimpl
    def server_after_aggregate(self, ctx: RoundContext, payloads: Mapping[int, Any]) -> None:
        if not payloads:
            return
        parts = [payloads[k] for k in sorted(payloads)]
        stats = combine_statistics(parts)
        labelled = torch.stack([p["labelled"] for p in parts]).sum(0)
        means, covs, present = class_gaussians(stats)
        cal_means, cal_covs = calibrate(means, covs, labelled, present, self.params)
        self._fit = (cal_means, cal_covs, present)

    # ------------------------------------------------------------------ client

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        p = self.params
        self._collect = ctx.round + 1 >= p.start_round
        if self._collect:
            feats = training_features(model, ctx)
            labels = ctx.labels.to(feats.device)
            mask = robust_keep(feats, ctx.labels, p).to(feats.device)
            self.stats = class_statistics(feats[mask], labels[mask], ctx.num_classes)
            self.stats["labelled"] = torch.bincount(ctx.labels.cpu(), minlength=ctx.num_classes).to(
                torch.float64
            )
        self._z = None
        if MEAN_KEY in ctx.config:
            z, y = sample_features(
                ctx.config[MEAN_KEY],
                ctx.config[COV_KEY],
                ctx.config[PRESENT_KEY],
                p.n_samples,
                ctx.generator_for("rcal-samples"),
            )
            order = torch.randperm(y.numel(), generator=ctx.generator_for("rcal-order"))
            self._z, self._y = z[order].to(ctx.device), y[order].to(ctx.device)
            self._next = 0
        calibrating = ctx.round >= p.start_round
        self._anchor = None
        if p.lam > 0 and calibrating:
            self._anchor = copy.deepcopy(model).eval().requires_grad_(False)
        self._mix_rng = None
        if p.mixup > 0 and calibrating:
            seed = int(torch.randint(0, 2**62, (1,), generator=ctx.generator_for("rcal-mixup")))
            self._mix_rng = np.random.default_rng(seed)

    def _sampled_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``size`` sampled features, cycling through the shuffled draws."""
        idx = (torch.arange(size) + self._next) % self._y.numel()
        self._next = int((self._next + size) % self._y.numel())
        idx = idx.to(self._y.device)
        return self._z[idx], self._y[idx]

    @hookimpl
    def client_forward(self, model: nn.Module, x: torch.Tensor) -> Forward | None:
        self._mix = None
        if self._mix_rng is None:
            return None
        lam = float(self._mix_rng.beta(self.params.mixup, self.params.mixup))
        perm = torch.as_tensor(self._mix_rng.permutation(x.shape[0]), device=x.device)
        mixed = mix_batch(x, lam, perm)
        self._mix = (lam, perm, mixed)
        h = model.features(mixed)
        return Forward(h, model.head(h), h)

    @hookimpl
    def client_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if self._mix is None:
            return None
        lam, perm, _ = self._mix
        return mixup_loss(logits, y, lam, perm)

    @hookimpl
    def client_extra_losses(
        self, model: nn.Module, x: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor | None:
        loss = None
        if self._z is not None and self.params.weight > 0:
            z, y = self._sampled_batch(x.shape[0])
            loss = self.params.weight * F.cross_entropy(model.head(z.to(features.dtype)), y)
        if self._anchor is not None:
            inputs = x if self._mix is None else self._mix[2]
            with torch.no_grad():
                target = self._anchor.features(inputs)
            dist = self.params.lam * (features - target).pow(2).sum(1).mean()
            loss = dist if loss is None else loss + dist
        return loss

    @hookimpl
    def client_end(self) -> dict[str, torch.Tensor] | None:
        self._mix = None
        return self.stats if self._collect else None

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        if self._fit is None:
            return {}
        return dict(zip(("means", "covs", "present"), (t.clone() for t in self._fit), strict=True))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self._fit = (state["means"].clone(), state["covs"].clone(), state["present"].clone())
