"""RCAL (Zhang et al., ICCV 2023, "When Noisy Labels Meet Long Tail Dilemmas: A Representation
Calibration Method"), in federated form.

The authors' code was not found (docs/noise.md, "rcal"); every formula and default below is our
reading of the paper and is **unverified** against a reference implementation.

Distributional representation calibration. Class ``c``'s features are assumed Gaussian. Each
client computes the features of the global model it received (eval mode) on its own, noisily
labelled data, drops per class the samples a robust rule marks as outliers (``robust = "lof"``:
the Local Outlier Factor, as the paper; ``"centre"``: keep the ``keep`` fraction closest to the
client's class mean; ``"none"``), and uploads per class the count ``n_c``, the sum ``s_c`` and the
sum of outer products ``G_c`` (float64; no sample leaves the client). The server sums them: the
statistics of the pooled kept samples, ``mu_c = s_c / n_c``, ``Sigma_c = (G_c - n_c mu_c mu_c^T) /
(n_c - 1)``. The ``ceil(fraction_head * P)`` most populous of the ``P`` present classes are head
classes; every other (tail) class ``k`` borrows from its ``q`` nearest head classes ``N_k``
(Euclidean distance of the means):

    mu'_k    = (sum_{i in N_k} mu_i + mu_k) / (q + 1)
    Sigma'_k = (sum_{i in N_k} Sigma_i + Sigma_k) / (q + 1) + alpha I

(head classes keep ``mu_c, Sigma_c``). From round ``start_round`` each client draws ``n_samples``
features per present class from ``N(mu'_c, Sigma'_c)`` (stream ``(seed, "rcal-samples", round,
client)``), shuffles them (``(seed, "rcal-order", round, client)``) and adds ``weight * CE(head(z),
c)`` on the next batch-sized slice of them to every local batch.

Individual representation calibration: the paper keeps the learned features close to the
contrastive ones; fedlt has no contrastive stage, so the anchor is the global model's features at
the start of the round: ``lam * mean_i ||f(x_i) - f_global(x_i)||^2`` (``lam = 0``: off).
The maths is in pure helpers (:func:`lof_scores`, :func:`robust_keep`, :func:`class_statistics`,
:func:`combine_statistics`, :func:`class_gaussians`, :func:`calibrate`, :func:`sample_features`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from fedlt_plugins.ood import combine_statistics, training_features  # the same pooled sums as mahalanobis-ood
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import ClientContext, Plugin, RoundContext, hookimpl

__all__ = [
    "RCAL",
    "RCALParams",
    "calibrate",
    "class_gaussians",
    "class_statistics",
    "combine_statistics",
    "lof_scores",
    "robust_keep",
    "sample_features",
]

#: Rows fed through ``model.features`` at once.

MEAN_KEY = "rcal.mean"
COV_KEY = "rcal.cov"
PRESENT_KEY = "rcal.present"


class RCALParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_round: int = Field(
        2,
        ge=2,
        description="First round whose local training adds the sampled features (warm-up before it; the "
        "statistics come from the previous round's clients, so at least 2).",
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
    fraction_head: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Fraction of the present classes, most populous first, that are head classes.",
    )
    q: int = Field(2, ge=1, description="Head classes each tail class borrows from (nearest means).")
    alpha: float = Field(
        0.1, ge=0, description="Added to the diagonal of a tail class's calibrated covariance."
    )
    n_samples: int = Field(20, ge=1, description="Features sampled per present class each round.")
    weight: float = Field(1.0, ge=0, description="Weight of the cross-entropy on the sampled features.")
    lam: float = Field(
        0.1, ge=0, description="Weight of ||f(x) - f_global(x)||^2, the individual calibration (0: off)."
    )


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


def head_classes(count: torch.Tensor, fraction_head: float) -> torch.Tensor:
    """Boolean ``(C,)``: the ``ceil(fraction_head * P)`` most populous present classes (ties: lower id)."""
    present = torch.nonzero(count > 0).squeeze(1)
    n_head = math.ceil(fraction_head * present.numel())
    order = sorted(present.tolist(), key=lambda c: (-float(count[c]), c))
    head = torch.zeros(count.shape[0], dtype=torch.bool)
    head[order[:n_head]] = True
    return head


def calibrate(
    means: torch.Tensor,
    covs: torch.Tensor,
    count: torch.Tensor,
    fraction_head: float,
    q: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail classes borrow from their ``q`` nearest head classes (module docstring); head and
    absent classes are returned as given."""
    head = head_classes(count, fraction_head)
    head_ids = torch.nonzero(head).squeeze(1)
    cal_means, cal_covs = means.clone(), covs.clone()
    eye = torch.eye(means.shape[1], dtype=means.dtype)
    for k in torch.nonzero((count > 0) & ~head).squeeze(1).tolist():
        dist = (means[head_ids] - means[k]).norm(dim=1)
        k_q = min(q, head_ids.numel())
        near = head_ids[torch.sort(dist, stable=True).indices[:k_q]]
        cal_means[k] = (means[near].sum(0) + means[k]) / (k_q + 1)
        cal_covs[k] = (covs[near].sum(0) + covs[k]) / (k_q + 1) + alpha * eye
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


class RCAL(Plugin):
    """Representation calibration (see the module docstring): clients upload robust per-class
    feature statistics, the server calibrates tail classes with their nearest head classes, and
    local training adds a cross-entropy on features sampled from the calibrated Gaussians plus a
    feature-distance regulariser. Trains clients one at a time (not vectorized)."""

    Params = RCALParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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
        stats = combine_statistics([payloads[k] for k in sorted(payloads)])
        means, covs, present = class_gaussians(stats)
        p = self.params
        cal_means, cal_covs = calibrate(means, covs, stats["count"], p.fraction_head, p.q, p.alpha)
        self._fit = (cal_means, cal_covs, present)

    # ------------------------------------------------------------------ client

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        p = self.params
        self._collect = ctx.round + 1 >= p.start_round
        if self._collect:
            feats = training_features(model, ctx)
            mask = robust_keep(feats, ctx.labels, p).to(feats.device)
            self.stats = class_statistics(feats[mask], ctx.labels.to(feats.device)[mask], ctx.num_classes)
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
        self._anchor = None
        if p.lam > 0 and ctx.round >= p.start_round:
            self._anchor = copy.deepcopy(model).eval().requires_grad_(False)

    def _sampled_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``size`` sampled features, cycling through the shuffled draws."""
        idx = (torch.arange(size) + self._next) % self._y.numel()
        self._next = int((self._next + size) % self._y.numel())
        idx = idx.to(self._y.device)
        return self._z[idx], self._y[idx]

    @hookimpl
    def client_extra_losses(
        self, model: nn.Module, x: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor | None:
        loss = None
        if self._z is not None and self.params.weight > 0:
            z, y = self._sampled_batch(x.shape[0])
            loss = self.params.weight * F.cross_entropy(model.head(z.to(features.dtype)), y)
        if self._anchor is not None:
            with torch.no_grad():
                target = self._anchor.features(x)
            dist = self.params.lam * (features - target).pow(2).sum(1).mean()
            loss = dist if loss is None else loss + dist
        return loss

    @hookimpl
    def client_end(self) -> dict[str, torch.Tensor] | None:
        return self.stats if self._collect else None

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        if self._fit is None:
            return {}
        return dict(zip(("means", "covs", "present"), (t.clone() for t in self._fit), strict=True))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self._fit = (state["means"].clone(), state["covs"].clone(), state["present"].clone())
