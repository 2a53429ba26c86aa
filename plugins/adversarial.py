"""Adversarial training on each client: PGD-AT and TRADES (``adv-train``), and SRAT (``srat``).

Federated form: every client trains its local steps on adversarial examples of its own batches,
made against its current local model; the server aggregates as usual (FedAvg unless another
plugin says). Formulas (docs/robustness.md, "Adversarial training"):

- PGD-AT (Madry et al., ICLR 2018): ``min_theta E max_{||delta|| <= eps} CE(f(x + delta), y)``; the
  inner max is :func:`fedlt.pgd` (random start, ``steps`` steps of ``step_size``, projection on
  the ``norm`` ball), the batch loss cross-entropy at the PGD examples.
- TRADES (Zhang et al., ICML 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` the
  PGD maximiser of ``KL(softmax f(x) || softmax f(x'))`` (clean softmax held fixed during the
  attack), KL summed over classes and averaged over the batch (the authors' ``(1 / B) *
  KLDivLoss(sum)``), gradients through both ``f(x)`` and ``f(x')``; ``beta = 6``.
- ``adv-train``'s ``attack`` swaps PGD for a single-step attack (fast adversarial training): FGSM,
  FGSM-RS (Wong et al. 2020) or N-FGSM (de Jorge et al. 2022), and ``grad_align`` adds GradAlign's
  regulariser (Andriushchenko & Flammarion 2020); see :mod:`fedlt_plugins.fast_adversarial`.
- SRAT (Wang et al., ICDM 2022, "Imbalanced Adversarial Training with Reweighting"):
  ``sum_i w_{y_i} CE(f(x'_i), y_i) / sum_i w_{y_i} + lam * L_sep(h(x'))`` with ``x'`` the PGD
  examples, class weights ``w_c = n_c^(-power)`` from the client's (or the global) class counts,
  and the separability term a supervised-contrastive loss on the L2-normalised features ``h`` of
  the adversarial batch (see :func:`separability_loss`). fedlt's reference file names the two
  terms but not their exact form; the form and the defaults (``power = 1``, ``lam = 1``,
  ``temperature = 0.1``, weights from round 1) are fedlt's choices, recorded in docs/plugins.md.

The attack is white-box on the client's model (``model.head(model.features(x))``), run in eval
mode (BatchNorm statistics and dropout untouched, as the TRADES code does) and restored after.
Random starts draw from ``ctx.generator_for(<plugin name>)``: the stream ``(seed, name, round,
client)``, separate from the sample order. A PGD attack needs input gradients inside the loss, so
neither plugin declares ``vectorized``: their clients train one by one (the reason is recorded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from fedlt_plugins.fast_adversarial import grad_align_loss, single_step
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError
from torch import nn

from fedlt import ClientContext, Forward, Plugin, hookimpl, pgd

__all__ = [
    "SRAT",
    "AdvTrain",
    "kl_objective",
    "separability_loss",
    "srat_class_weights",
    "trades_kl",
]


def _score(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The attacked function: the client's plain classifier."""
    return lambda x: model.head(model.features(x))


def kl_objective(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_i KL(target_i || softmax(logits_i))``: what TRADES' attack ascends (``target`` the
    clean softmax, held fixed)."""
    return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum")


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """TRADES' robust term ``(1 / B) sum_i KL(softmax f(x_i) || softmax f(x'_i))``, differentiable
    in both arguments."""
    b = clean_logits.shape[0]
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(clean_logits, dim=1), reduction="sum") / b


def srat_class_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """SRAT's class weights ``w_c = n_c^(-power)`` (absent classes get the weight of a class of
    one sample; they never occur in the client's batches). Their scale is irrelevant: the batch
    loss is normalised by the weights' sum."""
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return n ** (-power)


def separability_loss(features: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """The supervised-contrastive separability term on a batch's features.

    With ``z_i = h_i / ||h_i||``, ``s_ij = z_i . z_j / temperature``, ``P(i)`` the other samples of
    ``i``'s class and ``A(i)`` all samples but ``i``::

        L_sep = mean over anchors with P(i) non-empty of
                - (1 / |P(i)|) sum_{p in P(i)} (s_ip - log sum_{a in A(i)} exp(s_ia))

    It pulls same-class features together and pushes other classes apart. A batch without two
    samples of one class gives 0 (no positive pair).
    """
    z = F.normalize(features.flatten(1), dim=1)
    s = z @ z.T / temperature
    eye = torch.eye(len(y), dtype=torch.bool, device=z.device)
    log_den = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1)
    pos = (y[:, None] == y[None, :]) & ~eye
    n_pos = pos.sum(1)
    anchors = n_pos > 0
    if not bool(anchors.any()):
        return features.sum() * 0.0
    per_anchor = -((s - log_den[:, None]) * pos).sum(1)[anchors] / n_pos[anchors]
    return per_anchor.mean()


class AttackParams(BaseModel):
    """The training-time attack (the same meaning as ``[eval.attack]``, in the normalised space)."""

    model_config = ConfigDict(extra="forbid")

    norm: Literal["linf", "l2"] = Field("linf", description="The perturbation budget's norm.")
    eps: float = Field(0.3, gt=0, description="Radius of the ball, in the model's normalised input space.")
    steps: int = Field(10, ge=1, le=1000, description="PGD ascent steps per batch.")
    step_size: float | None = Field(
        None, gt=0, description="PGD step length; unset: 2.5 * eps / steps (Madry et al.)."
    )
    random_start: bool = Field(True, description="Start from a uniform point of the ball (seeded).")


#: ``adv-train``'s PGD steps when ``steps`` is unset (the attack's other keys are AttackParams').
PGD_STEPS = 10


class AdvTrainParams(AttackParams):
    steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="pgd: ascent steps per batch; unset: 10. Unset with a single-step attack.",
    )
    random_start: bool | None = Field(
        None,
        description="pgd: start from a uniform point of the ball (seeded); unset: true. Unset with a "
        "single-step attack (each has its own start).",
    )
    step_size: float | None = Field(
        None,
        gt=0,
        description="Step length; unset: pgd 2.5 * eps / steps (Madry et al.), fgsm eps, fgsm-rs 1.25 eps "
        "(Wong et al.), n-fgsm eps (de Jorge et al.).",
    )
    method: Literal["pgd-at", "trades"] = Field(
        "pgd-at", description="pgd-at: CE at the PGD examples; trades: CE(clean) + beta KL(clean || adv)."
    )
    beta: float = Field(6.0, ge=0, description="TRADES' weight of the KL term (method = 'trades' only).")
    attack: Literal["pgd", "fgsm", "fgsm-rs", "n-fgsm"] = Field(
        "pgd",
        description="The training attack: pgd (steps steps, random_start); single-step (one step, no "
        "steps / random_start keys): fgsm from x, fgsm-rs from a uniform point of the eps-ball then "
        "projected, n-fgsm from x + U(-2 eps, 2 eps) noise, not projected (fedlt_plugins.fast_adversarial).",
    )
    grad_align: float = Field(
        0.0,
        ge=0,
        description="GradAlign's weight lambda (Andriushchenko & Flammarion 2020): adds lambda (1 - mean "
        "cos(grad_x CE(x), grad_x CE(x + eta))), eta uniform in the eps-ball; 0: off.",
    )

    @model_validator(mode="after")
    def _keys_fit_attack(self) -> AdvTrainParams:
        if self.attack == "pgd":
            return self
        for key in ("steps", "random_start"):
            if getattr(self, key) is not None:
                _param_error(
                    key, getattr(self, key), f"unset with attack {self.attack!r} (one step; PGD's key)"
                )
        if self.attack == "fgsm" and self.method == "trades":
            _param_error(
                "attack",
                self.attack,
                "pgd, fgsm-rs or n-fgsm with method 'trades' (TRADES' KL has zero "
                "gradient at the clean input, where fgsm starts)",
            )
        return self


class SRATParams(AttackParams):
    power: float = Field(1.0, ge=0, description="Class weights w_c = n_c^(-power); 0: no reweighting.")
    prior: Literal["local", "global"] = Field("local", description="Class counts: the client's or the run's.")
    lam: float = Field(1.0, ge=0, description="Weight of the feature separability term.")
    temperature: float = Field(0.1, gt=0, description="Temperature of the separability term.")
    reweight_from_round: int = Field(
        1, ge=1, description="First round with class weights (before it, weights 1: deferred re-weighting)."
    )


#: The attacked function (inputs to logits) and what an attack ascends (None: cross-entropy).
_ScoreFn = Callable[[torch.Tensor], torch.Tensor]
_Obj = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def _param_error(key: str, value: object, allowed: str) -> None:
    """Raise a validation error located at parameter ``key`` (so the scenario error names it)."""
    detail = InitErrorDetails(type=PydanticCustomError("value_error", allowed), loc=(key,), input=value)
    raise ValidationError.from_exception_data("AdvTrainParams", [detail])


class _Adversarial(Plugin):
    """What both plugins share: the seeded attack of a client's batch (PGD unless a plugin's
    :meth:`_perturb` says otherwise)."""

    #: The purpose of the attack's random stream: ``(seed, purpose, round, client)``.
    purpose: ClassVar[str] = ""

    def _attack(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return self._perturb(_score(model), x, y, objective)
        finally:
            model.train(was_training)

    def _perturb(self, score: _ScoreFn, x: torch.Tensor, y: torch.Tensor, objective: _Obj) -> torch.Tensor:
        """The attack proper, the model already in eval mode: PGD with the plugin's parameters."""
        p = self.params
        gen = self._gen if p.random_start else None
        return pgd(score, x, y, p.eps, p.norm, p.steps, p.step_size, gen, objective)

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        self._gen = ctx.generator_for(self.purpose)


class AdvTrain(_Adversarial):
    """Adversarial training (PGD-AT or TRADES) of every client's local steps, with PGD or a
    single-step attack (``attack``: fgsm, fgsm-rs, n-fgsm)."""

    Params = AdvTrainParams
    purpose = "adv-train"

    def _perturb(self, score: _ScoreFn, x: torch.Tensor, y: torch.Tensor, objective: _Obj) -> torch.Tensor:
        p = self.params
        if p.attack == "pgd":
            steps = PGD_STEPS if p.steps is None else p.steps
            gen = None if p.random_start is False else self._gen
            return pgd(score, x, y, p.eps, p.norm, steps, p.step_size, gen, objective)
        return single_step(score, x, y, p.attack, p.eps, p.norm, p.step_size, self._gen, objective)

    @hookimpl
    def client_forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Forward | None:
        if self.params.method != "pgd-at":
            return None
        h = model.features(self._attack(model, x, y))
        return Forward(h, model.head(h), h)

    @hookimpl
    def client_extra_losses(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor | None:
        p, terms = self.params, []
        if p.method == "trades":
            target = F.softmax(logits.detach().float(), dim=1)
            x_adv = self._attack(model, x, target, kl_objective)
            terms.append(p.beta * trades_kl(logits, model.head(model.features(x_adv))))
        if p.grad_align > 0:
            # In training mode, as the authors' code; the noise draws after the attack's.
            terms.append(p.grad_align * grad_align_loss(_score(model), x, y, p.eps, p.norm, self._gen))
        return sum(terms[1:], terms[0]) if terms else None


class SRAT(_Adversarial):
    """Separable reweighted adversarial training: class-weighted CE at the PGD examples plus a
    separability term on their features."""

    Params = SRATParams
    purpose = "srat"

    @hookimpl
    def client_start(self, ctx: ClientContext) -> None:
        super().client_start(ctx)
        w = srat_class_weights(ctx.class_counts(self.params.prior), self.params.power)
        self._weights = None if ctx.round < self.params.reweight_from_round else w

    @hookimpl
    def client_forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Forward:
        h = model.features(self._attack(model, x, y))
        return Forward(h, model.head(h), h)

    @hookimpl
    def client_class_weights(self, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        if self._weights is None:
            return None
        return torch.as_tensor(self._weights, dtype=logits.dtype, device=logits.device)[y]

    @hookimpl
    def client_extra_losses(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if self.params.lam == 0:
            return None
        return self.params.lam * separability_loss(features, y, self.params.temperature)
