"""Single-step attacks for fast adversarial training (``adv-train`` with ``attack`` other than pgd).

One gradient step per batch instead of PGD's ``steps``, from a start that depends on the method
(``eps`` in the model's normalised input space, ``dir(g)`` the steepest-ascent direction of unit
norm: ``sign(g)`` for L-inf, ``g / ||g||_2`` for L2, ``g`` the loss gradient at the start):

- ``fgsm`` (Goodfellow et al., ICLR 2015; FGSM-AT): ``x + eps dir(g(x))``, from the clean input.
- ``fgsm-rs`` (Wong, Rice & Kolter, ICLR 2020, "Fast is better than free"): from ``x + delta0``,
  ``delta0`` uniform in the eps-ball, one step of ``alpha = 1.25 eps``, the perturbation then
  projected back onto the ball: ``x + P(delta0 + alpha dir(g(x + delta0)))``.
- ``n-fgsm`` (de Jorge et al., NeurIPS 2022, "Make some noise"): from ``x + eta``, ``eta``
  uniform in the ball of radius ``2 eps``, one step of ``alpha = eps``, *no* projection:
  ``x + eta + alpha dir(g(x + eta))``, so the perturbation may reach ``3 eps`` (L-inf).

``step_size`` replaces ``alpha``. FGSM-RS and plain FGSM are known to overfit catastrophically at
larger eps (robust accuracy against PGD collapses while accuracy against FGSM stays high; Wong et
al. 2020, Andriushchenko & Flammarion 2020); N-FGSM's noise and larger effective step are its
remedy. Like the evaluator's attacks, inputs are not clipped to an image box (fedlt attacks the
normalised tensors; the papers clip pixels to [0, 1]). The random start is drawn by
:func:`fedlt.evaluation.attacks.random_start` (uniform per coordinate for L-inf, uniform in the
ball's volume for L2) from the caller's generator.

GradAlign (Andriushchenko & Flammarion, NeurIPS 2020), :func:`grad_align_loss`, is the
regulariser they add to FGSM training against catastrophic overfitting: ``1 - mean_i cos(g_i(x),
g_i(x + eta))``, ``g_i`` the input gradient of sample ``i``'s cross-entropy and ``eta`` uniform in
the eps-ball, differentiated through the second gradient (double backpropagation) with the first
held fixed, as in the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedlt import fgsm, project_to_ball, random_ball_point

if TYPE_CHECKING:
    from fedlt.evaluation.attacks import Objective, Score

__all__ = ["SINGLE_STEP", "SingleStep", "grad_align_loss", "single_step"]


@dataclass(frozen=True)
class SingleStep:
    """One single-step method, as multiples of ``eps``."""

    #: Radius of the uniform random start (0: start at the clean input).
    start: float
    #: The default step ``alpha``.
    step: float
    #: Whether the perturbation is projected back onto the eps-ball after the step.
    projected: bool


#: The single-step methods of ``adv-train``'s ``attack`` key, with their papers' defaults.
SINGLE_STEP: dict[str, SingleStep] = {
    "fgsm": SingleStep(start=0.0, step=1.0, projected=True),
    "fgsm-rs": SingleStep(start=1.0, step=1.25, projected=True),
    "n-fgsm": SingleStep(start=2.0, step=1.0, projected=False),
}


def single_step(
    score: Score,
    x: torch.Tensor,
    y: torch.Tensor,
    method: str,
    eps: float,
    norm: str = "linf",
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    objective: Objective | None = None,
) -> torch.Tensor:
    """``x`` perturbed by one step of ``method`` (a key of :data:`SINGLE_STEP`).

    ``generator`` draws the random start (required when the method has one); ``objective``
    replaces cross-entropy as in :func:`fedlt.pgd` (TRADES' KL).
    """
    spec = SINGLE_STEP[method]
    alpha = spec.step * eps if step_size is None else step_size
    if spec.start > 0:
        if generator is None:
            raise ValueError(f"single-step attack {method!r} draws a random start: give a generator")
        start = x + random_ball_point(x, spec.start * eps, norm, generator)
    else:
        start = x
    delta = fgsm(score, start, y, alpha, norm, objective) - x
    if spec.projected:
        delta = project_to_ball(delta, eps, norm)
    return (x + delta).detach()


def _input_grad(score: Score, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Each sample's input gradient of its cross-entropy (summed over the batch, so each row is
    its own); with ``create_graph`` it stays differentiable in the model's parameters."""
    x = x.detach().requires_grad_(True)
    loss = F.cross_entropy(score(x).float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad


def grad_align_loss(
    score: Score, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, generator: torch.Generator
) -> torch.Tensor:
    """GradAlign's term ``1 - mean_i cos(g_i(x), g_i(x + eta_i))``, ``eta`` a uniform point of the
    eps-ball drawn from ``generator``. ``g(x)`` is held fixed and ``g(x + eta)`` differentiable in
    the parameters; samples with a zero gradient at either point are left out (the authors' rule),
    and a batch without any gives 0."""
    with torch.enable_grad():
        g_clean = _input_grad(score, x, y, create_graph=False).flatten(1)
        noisy = x + random_ball_point(x, eps, norm, generator)
        g_noisy = _input_grad(score, noisy, y, create_graph=True).flatten(1)
        keep = (g_clean.norm(dim=1) > 0) & (g_noisy.norm(dim=1) > 0)
        if not bool(keep.any()):
            return g_noisy.sum() * 0.0
        return 1.0 - F.cosine_similarity(g_clean[keep], g_noisy[keep], dim=1).mean()
