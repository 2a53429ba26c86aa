"""Mahalanobis out-of-distribution detector (Lee et al., NeurIPS 2018), fitted federatedly.

Class-conditional Gaussians with a tied covariance on the model's features: class means ``mu_c``
and covariance ``Sigma`` of the training features, and the score
``M(x) = max_c -(f(x) - mu_c)^T Sigma^+ (f(x) - mu_c)`` (higher: in-distribution). ``Sigma^+`` is
the pseudo-inverse, as the reference code's ``EmpiricalCovariance`` (``pinvh``), so dead feature
units do not make it singular. Optional input pre-processing (the paper's): ``x' = x - eps *
sign(grad_x d(x))`` with ``d`` the Mahalanobis distance to the closest class, then ``M(x')``.

Federated fit: no sample leaves a client. Each selected client computes, with the global model it
received (``client_start``, eval mode), the sufficient statistics of its training features: per
class the count ``n_c`` and the sum ``s_c``, and the sum of outer products ``G = sum_i f_i f_i^T``
(float64). The server sums them (``server_after_aggregate``): ``mu_c = s_c / n_c`` and
``Sigma = (G - sum_c n_c mu_c mu_c^T) / N``, exactly the pooled maximum-likelihood estimate. The
statistics of a round describe the global model its clients started from: one round older than the
model evaluated after it. ``pool = "latest"`` (default) keeps every client's latest statistics and
pools them all (all the data, from older global models for clients not selected lately);
``pool = "round"`` fits on that round's clients only (one model; classes none of them holds are left
out of the max). On the long-tailed digits "latest" detects better (docs/ood.md). The maths is in
pure helpers (:func:`feature_statistics`, :func:`combine_statistics`, :func:`fit_gaussians`,
:func:`mahalanobis_score`, :func:`preprocess`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import ClientContext, EvalContext, Plugin, RoundContext, hookimpl

__all__ = [
    "MahalanobisOOD",
    "combine_statistics",
    "feature_statistics",
    "fit_gaussians",
    "mahalanobis_distances",
    "mahalanobis_score",
    "preprocess",
    "training_features",
]

#: Rows fed through ``model.features`` at once.
CHUNK = 1024


class MahalanobisParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eps: float = Field(
        0.0,
        ge=0,
        description="Input pre-processing step (in the model's normalised input units): x - eps * "
        "sign(grad of the distance to the closest class). 0: off.",
    )
    pool: Literal["round", "latest"] = Field(
        "latest",
        description="round: fit on the statistics of the last round's clients only (one global model); "
        "latest: pool every client's latest statistics (all the data, from the global models of the rounds "
        "each client last trained in).",
    )


def feature_statistics(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """One client's sufficient statistics (float64): ``count (C,)``, ``sum (C, d)``, ``outer (d, d)``."""
    f = features.detach().to(torch.float64)
    y = labels.to(f.device)
    count = torch.bincount(y, minlength=num_classes).to(torch.float64)
    total = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, device=f.device).index_add_(0, y, f)
    return {"count": count.cpu(), "sum": total.cpu(), "outer": (f.T @ f).cpu()}


def training_features(model: nn.Module, ctx: ClientContext) -> torch.Tensor:
    """The client's training features under ``model`` (the global model it received), in eval
    mode and in chunks of ``CHUNK`` samples; the model's mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        rows = ctx.indices
        feats = torch.cat(
            [model.features(ctx.x_train[rows[i : i + CHUNK]]) for i in range(0, rows.numel(), CHUNK)]
        )
    model.train(was_training)
    return feats


def combine_statistics(parts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise sum of clients' statistics: the statistics of their pooled data."""
    return {key: torch.stack([p[key] for p in parts]).sum(0) for key in ("count", "sum", "outer")}


def fit_gaussians(stats: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(means (C, d), precision (d, d), present (C,) bool)`` from pooled statistics: the class
    means, the pseudo-inverse of the tied MLE covariance ``(G - sum_c n_c mu_c mu_c^T) / N``."""
    count, total, outer = stats["count"], stats["sum"], stats["outer"]
    present = count > 0
    means = total / count.clamp(min=1).unsqueeze(1)
    between = (means * count.unsqueeze(1)).T @ means
    cov = (outer - between) / count.sum()
    cov = (cov + cov.T) / 2
    return means, torch.linalg.pinv(cov, hermitian=True), present


def mahalanobis_distances(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor
) -> torch.Tensor:
    """``(N, C)``: ``(f_i - mu_c)^T P (f_i - mu_c)`` for every sample and class."""
    diff = features.unsqueeze(1) - means.unsqueeze(0)  # (N, C, d)
    return torch.einsum("ncd,de,nce->nc", diff, precision, diff)


def mahalanobis_score(
    features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """``M(x) = max_c -d_c(x)`` over the classes with statistics (higher: in-distribution)."""
    d = mahalanobis_distances(features.to(means.dtype), means, precision)
    return (-d).masked_fill(~present.to(d.device), float("-inf")).max(dim=1).values


def preprocess(
    model: nn.Module, x: torch.Tensor, eps: float, means: torch.Tensor, precision: torch.Tensor, present
) -> torch.Tensor:
    """Lee et al.'s input pre-processing: ``x - eps * sign(grad_x min_c d_c(f(x)))``, per sample."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        d = mahalanobis_distances(model.features(x).to(means.dtype), means, precision)
        closest = d.masked_fill(~present.to(d.device), float("inf")).min(dim=1).values
        (grad,) = torch.autograd.grad(closest.sum(), x)
    return (x - eps * grad.sign()).detach()


class MahalanobisOOD(Plugin):
    """Mahalanobis-distance OOD score (Lee et al. 2018) with a tied covariance, fitted from the
    clients' feature statistics (see the module docstring); gives ``eval_ood_score``.

    Until the first aggregation has statistics it returns ``None`` (the evaluator's default, MSP,
    and the record says so in ``ood_score``).
    """

    Params = MahalanobisParams

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._stats: dict[str, torch.Tensor] | None = None
        #: ``pool = "latest"``: each client's latest statistics, by client id.
        self._latest: dict[int, dict[str, torch.Tensor]] = {}
        self._fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ client

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        self.stats = feature_statistics(training_features(model, ctx), ctx.labels, ctx.num_classes)

    @hookimpl
    def client_end(self) -> dict[str, torch.Tensor]:
        return self.stats

    # ------------------------------------------------------------------ server

    @hookimpl
    def server_after_aggregate(self, ctx: RoundContext, payloads: Mapping[int, Any]) -> None:
        if not payloads:
            return
        if self.params.pool == "latest":
            self._latest.update({int(k): v for k, v in payloads.items()})
            parts = [self._latest[k] for k in sorted(self._latest)]
        else:
            parts = [payloads[k] for k in sorted(payloads)]
        self._stats = combine_statistics(parts)
        self._fit = fit_gaussians(self._stats)

    # ------------------------------------------------------------------ evaluation

    @hookimpl
    def eval_ood_score(
        self, model: nn.Module, features: torch.Tensor, inputs: torch.Tensor, ctx: EvalContext
    ) -> torch.Tensor | None:
        if self._fit is None:
            return None
        means, precision, present = (t.to(features.device) for t in self._fit)
        if self.params.eps == 0:
            return mahalanobis_score(features, means, precision, present)
        scores = []
        for i in range(0, inputs.shape[0], CHUNK):
            x = preprocess(model, inputs[i : i + CHUNK], self.params.eps, means, precision, present)
            with torch.no_grad():
                scores.append(mahalanobis_score(model.features(x), means, precision, present))
        return torch.cat(scores)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        if self._stats is None:
            return {}
        latest = {str(k): {n: t.clone() for n, t in v.items()} for k, v in self._latest.items()}
        return {**{k: v.clone() for k, v in self._stats.items()}, "latest": latest}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            self._stats = {k: state[k].clone() for k in ("count", "sum", "outer")}
            self._latest = {int(k): dict(v) for k, v in state.get("latest", {}).items()}
            self._fit = fit_gaussians(self._stats)
