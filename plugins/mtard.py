"""Multi-teacher adversarial distillation (MTARD, Zhao et al., ECCV 2022) on each client.

Zhao et al., ECCV 2022, "Enhanced Accuracy and Robustness via Multi-Teacher Adversarial
Distillation"; rules taken from the authors' code (github.com/zhaoshiji123/MTARD at commit
6480a1b, ``mtard/mtard_resnet18_cifar10.py`` and ``mtard/mtard_loss.py``; line numbers in
docs/plugins.md). The student is the client's local model; two fixed teachers are the final
global models of two finished fedlt runs (``clean_teacher``: e.g. a FedAvg run; ``robust_teacher``:
e.g. an ``adv-train`` run), loaded once per process with :func:`fedlt.load_model`.

Per batch ``(x, y)`` of B samples and C classes:

- ``x'``: PGD on the student's cross-entropy from ``x + start_noise * N(0, I)`` (the noise drawn
  from ``ctx.generator_for("mt-adv-distill")``), ``steps`` signed steps of ``step_size`` (default
  ``eps / 4``, the authors' 2/255 for 8/255), each projected onto the ``norm`` ball of ``eps``
  around ``x``; the student in eval mode during the attack.
- ``KL(t || s) = (1 / (B C)) sum_{i,c} t_ic (log(t_ic + 1e-5) - log s_ic)``, ``t`` a teacher's
  softmax (no temperature), ``s`` the student's: the authors' ``torch.mean`` over the batch and the
  classes. ``L_adv = KL(robust(x') || student(x'))``, ``L_nat = KL(clean(x) || student(x))``;
  the loss is ``w_adv L_adv + w_nat L_nat`` (no cross-entropy on the labels).
- "Normalization Loss Balance", once per optimizer step before the loss: with ``L^0`` the losses of
  the first batch, ``r = (L / L^0)^power``, ``w_nat <- w_nat - weight_lr (w_nat - r_nat / (r_nat +
  r_adv))`` and ``w_adv = 1 - w_nat``; ``w_nat`` starts at 0.5.

Federated form: the weights and the first-batch losses live in the client's own ``state`` (its
batches' losses are only seen there, and the authors update per batch); the server aggregates the
students as usual. Like ``adv-train``, the attack needs input gradients inside the batch loss, so
the plugin does not declare ``vectorized``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import (
    ClientContext,
    FedltError,
    Forward,
    Plugin,
    ScenarioError,
    SetupContext,
    hookimpl,
    load_model,
    pgd,
)
from fedlt import state as rules

__all__ = ["MTARD", "balance_weight", "mtard_kl"]

#: The stream of the attack's random start: ``(seed, purpose, round, client)``.
PURPOSE = "mt-adv-distill"
#: The authors' guard inside the teacher's log: ``log(t + 1e-5)``.
KL_EPS = 1e-5


def mtard_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(1 / C) sum_c t_c (log(t_c + 1e-5) - log s_c)``; its batch mean is the authors'
    ``torch.mean`` of the element-wise KL over ``(B, C)``. Gradient flows through the student only."""
    t = F.softmax(teacher_logits.detach().float(), dim=1)
    log_s = F.log_softmax(student_logits.float(), dim=1)
    return (t * (torch.log(t + KL_EPS) - log_s)).mean(dim=1)


def balance_weight(
    w_nat: float, loss_nat: float, loss_adv: float, init_nat: float, init_adv: float, lr: float, power: float
) -> float:
    """One "Normalization Loss Balance" step: ``w_nat`` moves by ``lr`` toward the share of the
    clean loss's relative progress ``r_nat / (r_nat + r_adv)``, ``r = (L / L^0)^power``.

    The term that has fallen least (relative to its first value) gets more weight. A zero first
    loss counts as no progress (``r = 1``); two zero ratios leave the weight unchanged.
    """
    r_nat = (loss_nat / init_nat) ** power if init_nat > 0 else 1.0
    r_adv = (loss_adv / init_adv) ** power if init_adv > 0 else 1.0
    if r_nat + r_adv <= 0:
        return w_nat
    return w_nat - lr * (w_nat - r_nat / (r_nat + r_adv))


@lru_cache(maxsize=8)
def _cached_teacher(folder: str, device: str, stamp: int) -> nn.Module:
    """One frozen teacher per (folder, device, checkpoint time) and process."""
    model = load_model(folder, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher(folder: str, device: torch.device | str) -> nn.Module:
    """The final global model of run folder ``folder``, frozen, in eval mode, loaded once."""
    path = Path(folder).resolve()
    ckpt = path / "checkpoint.pt"
    stamp = ckpt.stat().st_mtime_ns if ckpt.is_file() else 0
    return _cached_teacher(str(path), str(torch.device(device)), stamp)


class MTARDParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clean_teacher: str = Field(
        ..., description="Run folder of the clean teacher (e.g. a FedAvg run); it sees the clean batch."
    )
    robust_teacher: str = Field(
        ...,
        description="Run folder of the robust teacher (e.g. an adv-train run); it sees the student's "
        "adversarial examples.",
    )
    norm: Literal["linf", "l2"] = Field("linf", description="The training attack's norm.")
    eps: float = Field(0.3, gt=0, description="Radius of the attack's ball, in the normalised input space.")
    steps: int = Field(10, ge=1, le=1000, description="PGD steps on the student's cross-entropy.")
    step_size: float | None = Field(
        None, gt=0, description="PGD step length; unset: eps / 4 (the authors' 2/255 for eps 8/255)."
    )
    start_noise: float = Field(
        0.001, ge=0, description="Std of the Gaussian random start x + start_noise N(0, I) (seeded)."
    )
    weight_lr: float = Field(
        0.025, ge=0, le=1, description="Learning rate of the Normalization Loss Balance weight update."
    )
    power: float = Field(1.0, ge=0, description="Exponent of the relative losses (L / L^0)^power.")
    init_nat_weight: float = Field(0.5, ge=0, le=1, description="Starting weight w_nat (w_adv = 1 - w_nat).")
    kl_scale: float = Field(
        1.0, gt=0, description="Factor on both KL terms (the authors' CIFAR-100 script uses 10)."
    )


class MTARD(Plugin):
    """Multi-teacher adversarial distillation: each client's model learns from a clean and a
    robust teacher, weighted by Normalization Loss Balance."""

    Params = MTARDParams
    client_state: ClassVar[dict[str, rules.Rule]] = {
        "w_nat": rules.Float(low=0.0, high=1.0),
        "init_nat": rules.Float(low=0.0),
        "init_adv": rules.Float(low=0.0),
    }

    @hookimpl
    def server_setup(self, model: nn.Module, ctx: SetupContext) -> None:
        """Load both teachers once, before training, and refuse a folder that is not a finished run
        or whose model does not fit the run (checked here, as a dataset's folder is: when the run is
        built, not by ``fedlt validate``)."""
        device = next(model.parameters()).device
        probe = torch.zeros(2, *ctx.input_shape, device=device)
        for key in ("clean_teacher", "robust_teacher"):
            folder = getattr(self.params, key)
            allowed = (
                f"a finished run whose model takes inputs of shape {tuple(ctx.input_shape)} and "
                f"gives {ctx.num_classes} class scores"
            )
            try:
                with torch.no_grad():
                    out = teacher(folder, device)(probe)
            except (FedltError, RuntimeError, ValueError) as exc:
                raise ScenarioError(f"plugins.{self.name}.{key}", folder, allowed, hint=str(exc)) from None
            if tuple(out.shape) != (2, ctx.num_classes):
                hint = f"Its model gives {tuple(out.shape)[1:]} scores per sample."
                raise ScenarioError(f"plugins.{self.name}.{key}", folder, allowed, hint=hint)

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
        p = self.params
        self._gen = ctx.generator_for(PURPOSE)
        device = next(model.parameters()).device
        self._clean = teacher(p.clean_teacher, device)
        self._robust = teacher(p.robust_teacher, device)
        self._step_size = p.eps / 4 if p.step_size is None else p.step_size
        state.setdefault("w_nat", p.init_nat_weight)
        self._state = state  # the client's weights, updated in place per step and kept by fedlt
        self._updated_at: int | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The student's PGD examples, in eval mode (restored after), as the authors' code."""
        p = self.params
        start = p.start_noise * torch.randn(x.shape, generator=self._gen).to(x.device, x.dtype)
        was_training = model.training
        model.eval()
        try:
            score = lambda v: model.head(model.features(v))  # noqa: E731
            return pgd(score, x, y, p.eps, p.norm, p.steps, self._step_size, start=start)
        finally:
            model.train(was_training)

    @hookimpl
    def client_forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Forward:
        """The clean forward (what other hooks see); the adversarial and teacher logits are kept
        for :meth:`client_loss` of the same batch. Order as the authors': attack, student(x'),
        then student(x) (BatchNorm statistics updated in that order)."""
        x_adv = self._attack(model, x, y)
        adv_logits = model.head(model.features(x_adv))
        with torch.no_grad():
            robust_logits = self._robust(x_adv)
            clean_logits = self._clean(x)
        h = model.features(x)
        self._batch = (adv_logits, robust_logits, clean_logits)
        return Forward(h, model.head(h), h)

    def _weight(self, loss_nat: torch.Tensor, loss_adv: torch.Tensor, step: int) -> float:
        """``w_nat`` for this step: updated once per optimizer step (a re-evaluated loss of the same
        step, as ``client_step_gradients``' ``regrad`` makes, reuses it)."""
        s = self._state
        if self._updated_at == step:
            return s["w_nat"]
        nat, adv = float(loss_nat), float(loss_adv)  # host sync, once per step (the authors' .item())
        s.setdefault("init_nat", nat)
        s.setdefault("init_adv", adv)
        p = self.params
        s["w_nat"] = balance_weight(s["w_nat"], nat, adv, s["init_nat"], s["init_adv"], p.weight_lr, p.power)
        self._updated_at = step
        return s["w_nat"]

    @hookimpl
    def client_loss(self, logits: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        """Per-sample ``w_adv KL_adv_i + w_nat KL_nat_i``; the batch mean is the authors' total."""
        if self._batch is None:
            raise RuntimeError(
                "its client_forward did not run for this batch: another plugin's client_forward is "
                "listed before 'mt-adv-distill' in [[plugins]]; list 'mt-adv-distill' first"
            )
        adv_logits, robust_logits, clean_logits = self._batch
        self._batch = None  # never reused by a later batch
        scale = self.params.kl_scale
        kl_adv = scale * mtard_kl(adv_logits, robust_logits)
        kl_nat = scale * mtard_kl(logits, clean_logits)
        w_nat = self._weight(kl_nat.detach().mean(), kl_adv.detach().mean(), ctx.step)
        return ((1.0 - w_nat) * kl_adv + w_nat * kl_nat).to(logits.dtype)
