"""Adversarial robustness of the evaluated model: FGSM and PGD under an L-inf or L2 budget.

An attack perturbs the *inputs the model sees* (the dataset's normalised tensors, ``(x - mean) /
std``), so ``eps`` is a radius in that space: a pixel-space budget ``e`` on a dataset with
per-channel std ``s`` is ``e / s`` here (digits, pixels scaled to [0, 1]: std about 0.37, so
8/255 in pixels is about 0.083 here; CIFAR-10, std about 0.25: about 0.13; see
docs/robustness.md). Perturbed inputs are not clipped to the image box: the budget alone bounds
them. The attacked function is the evaluated classifier, ``score(x)`` = the model's features, its
head, then every plugin's ``eval_logits`` (and, on a client's view, the personalised mask), so a
remedy that rewrites logits at evaluation is attacked as it is measured.

Losses are summed over a batch, so each sample's gradient is its own (no coupling through a
mean). A random start draws from the generator the evaluator gives, ``(seed, "attack", round)``
on the global test set and ``(seed, "attack", round, client)`` on a client's view
(:meth:`fedlt.hooks.context.EvalContext.generator_for`), on the CPU, so attacks repeat exactly
on every engine and after a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedlt.scenario.config import ATTACK_KINDS, ATTACK_NORMS

__all__ = [
    "ATTACK_KINDS",
    "ATTACK_NORMS",
    "ROBUST_KEYS",
    "AttackSpec",
    "Objective",
    "Score",
    "attack",
    "fgsm",
    "pgd",
    "project_to_ball",
    "random_ball_point",
    "robust_metrics",
    "score_batched",
]

#: PGD's default number of steps.
DEFAULT_STEPS = 10
#: PGD's default step size is this times ``eps / steps`` (Madry et al.'s 2.5 eps / steps).
STEP_FACTOR = 2.5

#: The attacked function: inputs ``(B, ...)`` to the evaluated logits ``(B, C)``, differentiable.
Score = Callable[[torch.Tensor], torch.Tensor]
#: What an attack ascends: ``(logits, target)`` to a 0-d loss summed over the batch (so each
#: sample's input gradient is its own). ``None``: cross-entropy against integer labels. A target
#: other than labels (TRADES: the clean softmax) is passed through as ``y``.
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_TINY = 1e-12


@dataclass(frozen=True)
class AttackSpec:
    """One attack, every setting resolved (``eval.attack`` with its defaults filled in)."""

    kind: str
    norm: str = "linf"
    eps: float = 0.0
    steps: int = 1
    step_size: float = 0.0
    random_start: bool = False
    personalized: bool = False
    #: PGD only: also attack with FGSM of the same norm and eps (``fgsm_robust_*``).
    also_fgsm: bool = False
    #: Adversarial-sample detection: ``"none"``, ``"successful"`` or ``"all"`` pairs (``adv_detection_*``).
    detect: str = "none"

    @classmethod
    def from_config(cls, cfg: Any) -> AttackSpec | None:
        """The attack ``eval.attack`` asks for (already validated), or ``None`` when it is off."""
        if cfg.kind == "none":
            return None
        if cfg.kind == "fgsm":
            return cls("fgsm", cfg.norm, cfg.eps, 1, cfg.eps, False, cfg.personalized, detect=cfg.detect)
        steps = cfg.steps if cfg.steps is not None else DEFAULT_STEPS
        step = cfg.step_size if cfg.step_size is not None else STEP_FACTOR * cfg.eps / steps
        start = True if cfg.random_start is None else cfg.random_start
        return cls("pgd", cfg.norm, cfg.eps, steps, step, start, cfg.personalized, cfg.also_fgsm, cfg.detect)

    def fgsm(self) -> AttackSpec:
        """FGSM of this attack's norm and eps, on the global test set only (``also_fgsm``)."""
        return AttackSpec("fgsm", self.norm, self.eps, 1, self.eps)

    def describe(self) -> str:
        """For the record: ``"pgd linf eps=0.3 steps=10 step_size=0.075 random_start"`` (then
        ``" + fgsm"`` with ``also_fgsm``)."""
        text = f"{self.kind} {self.norm} eps={self.eps:g}"
        if self.kind == "pgd":
            text += f" steps={self.steps} step_size={self.step_size:g}"
            text += " random_start" if self.random_start else ""
        return text + (" + fgsm" if self.also_fgsm else "")


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *([1] * (t.ndim - 1)))


def project_to_ball(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``delta`` projected onto the ``norm`` ball of radius ``eps`` (each sample apart)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)


def _ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm``: ``sign(g)`` (L-inf), ``g / ||g||_2`` (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample_norm(grad)


def random_ball_point(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A point drawn uniformly from the ``norm`` ball of radius ``eps`` around each sample (the
    offset only), drawn on the CPU from ``generator`` and moved to ``x``'s device.

    L-inf: each coordinate uniform in ``[-eps, eps]``. L2: a Gaussian direction scaled to radius
    ``eps * U^(1/d)`` (uniform in the ball's volume, ``d`` the input size).
    """
    shape = x.shape
    if norm == "linf":
        delta = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * eps
    else:
        d = int(x[0].numel())
        direction = torch.randn(shape, generator=generator, dtype=torch.float64)
        radius = torch.rand(shape[0], generator=generator, dtype=torch.float64) ** (1.0 / d) * eps
        delta = direction / _per_sample_norm(direction) * radius.view(-1, *([1] * (len(shape) - 1)))
    return delta.to(device=x.device, dtype=x.dtype)


def _gradient(
    score: Score, x: torch.Tensor, y: torch.Tensor, objective: Objective | None = None
) -> torch.Tensor:
    """Gradient of the summed cross-entropy (or ``objective``) of ``score(x)`` with respect to
    ``x`` (not to any parameter, so the model's ``.grad`` stay untouched)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = score(x).float()
        loss = F.cross_entropy(logits, y, reduction="sum") if objective is None else objective(logits, y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(
    score: Score,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    objective: Objective | None = None,
) -> torch.Tensor:
    """The fast gradient (sign) method: one step of length ``eps`` along the loss's steepest
    ascent, ``x + eps sign(grad)`` (L-inf, Goodfellow et al. 2015) or ``x + eps grad / ||grad||``
    (L2)."""
    return (x + eps * _ascent(_gradient(score, x, y, objective), norm)).detach()


def pgd(
    score: Score,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = DEFAULT_STEPS,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    objective: Objective | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient descent on the loss (Madry et al. 2018): from ``x`` (or a random point
    of the ball when ``generator`` is given, or ``x + start`` for a start of the caller's own, e.g.
    MTARD's small Gaussian noise), ``steps`` ascent steps of ``step_size`` (default
    ``2.5 eps / steps``), each projected back onto the ``norm`` ball of radius ``eps``.
    ``objective`` replaces cross-entropy (TRADES ascends a KL divergence; see :data:`Objective`)."""
    alpha = STEP_FACTOR * eps / steps if step_size is None else step_size
    if start is not None:
        delta = start
    else:
        delta = torch.zeros_like(x) if generator is None else random_ball_point(x, eps, norm, generator)
    for _ in range(steps):
        grad = _gradient(score, x + delta, y, objective)
        delta = project_to_ball(delta + alpha * _ascent(grad, norm), eps, norm)
    return (x + delta).detach()


def attack(
    score: Score,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AttackSpec,
    generator: torch.Generator,
    batch_size: int,
) -> torch.Tensor:
    """``x`` perturbed by ``spec``, batch by batch (batches of ``batch_size`` in order, so the
    random starts are the same draws whatever the device)."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        if spec.kind == "fgsm":
            out.append(fgsm(score, xb, yb, spec.eps, spec.norm))
        else:
            gen = generator if spec.random_start else None
            out.append(pgd(score, xb, yb, spec.eps, spec.norm, spec.steps, spec.step_size, gen))
    return torch.cat(out) if out else x.detach().clone()


@torch.no_grad()
def score_batched(score: Score, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``score(x)`` without gradients, batch by batch."""
    if x.shape[0] == 0:
        return score(x)
    return torch.cat([score(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


#: Keys of :func:`fedlt.metrics.classification.classification_metrics` reported under attack,
#: each as ``robust_<key>``.
ROBUST_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "per_class_accuracy",
    "head_accuracy",
    "medium_accuracy",
    "tail_accuracy",
    "accuracy_disparity",
    "per_class_accuracy_std",
)


def robust_metrics(clean_metrics: dict[str, Any], prefix: str = "robust_") -> dict[str, Any]:
    """``<prefix><key>`` for each of :data:`ROBUST_KEYS`, from the classification metrics of the
    attacked inputs' logits (``fgsm_robust_`` for the second attack of ``also_fgsm``)."""
    return {f"{prefix}{key}": clean_metrics[key] for key in ROBUST_KEYS}
