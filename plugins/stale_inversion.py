"""Refreshing stale updates by gradient inversion (Wang & Gao, "Tackling Intertwined Data and Device
Heterogeneities in Federated Learning with Unlimited Staleness").

When the clients holding rare data are also the slow ones, their updates arrive stale: weighting
them down throws their information away, mixing them in as they are injects gradients of an old
model. The server instead estimates, from a stale update ``delta = w_client - w_base``, a small
synthetic dataset ``D = (X, softmax(L))`` whose local training from the stale base reproduces it,

    min_{X, L}  sum_j m_j | sim(w_base, D)_j - delta_j |        (L1, as the authors' code)

over the largest-magnitude coordinates only (``m``: the top ``match_fraction`` of ``|delta|``,
the paper's sparsification), and sends the current model through the same training on ``D``:
the refreshed update is ``w_now + sim(w_now, D)``, aggregated as a fresh one. ``sim`` is
``steps`` full-batch gradient steps of soft-label cross-entropy, the authors' simulated local
training, with a learning rate that gives it the client's step mass (``lr * n_steps / steps``).
The inputs take sign-Adam steps and are kept in ``[-input_bound, input_bound]``, as the authors'
code does; an estimate is warm-started from the client's previous one when its data does not
change (offline scenarios).

Switching back: late in training the inversion's own error outgrows what staleness costs. The
authors' code decides this with the client's true data (an oracle a server does not have); here
the server compares what it can compute: the inversion error ``e_inv = |sim(w_base, D) - delta|_1 /
|delta|_1`` and the staleness effect on the estimate, ``e_stale = |sim(w_now, D) - sim(w_base, D)|_1 /
|delta|_1``. An update is refreshed when ``e_inv < e_stale``; after ``patience`` updates in a row
where it is not, past the first ``warmup`` share of the run (early updates are noisy: the model has
hardly moved), the plugin switches to plain aggregation for the rest of the run (``switch =
"auto"``), as the paper does late in training. ``stop_after`` ends it after that many server updates
(the authors' ``switch_max``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from fedlt import Arrival, Plugin, RoundContext, SetupContext, hookimpl

__all__ = ["StaleInversion", "invert", "simulate", "top_mask"]


def simulate(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    soft_labels: torch.Tensor,
    steps: int,
    lr: float,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """The update ``steps`` full-batch gradient steps of soft-label cross-entropy make from ``params``
    (differentiable in ``x`` and ``soft_labels`` with ``create_graph``)."""
    theta = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    for _ in range(steps):
        logits = functional_call(model, {**theta, **buffers}, (x,))
        loss = -(soft_labels * F.log_softmax(logits, dim=1)).sum(1).mean()
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph)
        theta = {k: v - lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}
    return {k: theta[k] - params[k] if create_graph else (theta[k] - params[k]).detach() for k in params}


def top_mask(delta: Mapping[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """1.0 on the ``fraction`` of coordinates (over all tensors) with the largest ``|delta|``."""
    flat = torch.cat([d.detach().abs().flatten() for d in delta.values()])
    keep = max(1, round(fraction * flat.numel()))
    threshold = torch.topk(flat, keep).values.min()
    return {k: (d.detach().abs() >= threshold).to(d.dtype) for k, d in delta.items()}


def invert(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    *,
    samples: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    steps: int,
    lr: float,
    iterations: int,
    inversion_lr: float,
    match_fraction: float,
    input_bound: float | None,
    generator: torch.Generator,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic inputs ``X`` and label logits ``L`` whose simulated training from ``params``
    reproduces ``delta`` on its largest coordinates; returns ``(X, L)``."""
    device = next(iter(params.values())).device
    if init is None:
        x0 = torch.randn(samples, *input_shape, generator=generator)
        l0 = torch.randn(samples, num_classes, generator=generator)
    else:
        x0, l0 = init
    x = x0.to(device).clone().requires_grad_(True)
    labels = l0.to(device).clone().requires_grad_(True)
    mask = top_mask(delta, match_fraction)
    opt = torch.optim.Adam([x, labels], lr=inversion_lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]  # the authors' step decay
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        syn = simulate(model, params, buffers, x, labels.softmax(1), steps, lr, create_graph=True)
        loss = sum(((syn[k] - delta[k]) * mask[k]).abs().sum() for k in delta)
        loss.backward()
        x.grad.sign_()
        opt.step()
        sched.step()
        if input_bound is not None:
            with torch.no_grad():
                x.clamp_(-input_bound, input_bound)
    return x.detach(), labels.detach()


def _l1(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum((a[k] - b[k]).abs().sum() for k in a))


class StaleInversionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(
        32, ge=1, description="Synthetic samples estimated per stale update (authors: 128-256)."
    )
    steps: int = Field(5, ge=1, description="Full-batch steps of the simulated local training (authors: 5).")
    lr: float | None = Field(
        None, gt=0, description="Simulated learning rate (unset: train.lr x the client's steps / steps)."
    )
    iterations: int = Field(200, ge=1, description="Inversion iterations (authors: 10,000-40,000 on a GPU).")
    inversion_lr: float = Field(0.1, gt=0, description="Adam's learning rate on the inputs and label logits.")
    match_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Sparsification: the share of largest-|delta| coordinates matched (docs/async.md: "
        "1.0 matched digits updates twice as closely as 0.1).",
    )
    input_bound: float | None = Field(3.0, gt=0, description="Keep synthetic inputs in [-bound, bound].")
    warm_start: bool = Field(
        True,
        description="Start from the client's previous estimate (set false in a stream: its data changes).",
    )
    min_staleness: int = Field(1, ge=1, description="Refresh updates at least this stale.")
    switch: Literal["auto", "never"] = Field(
        "auto", description="auto: switch to plain aggregation after `patience` updates the estimate loses."
    )
    patience: int = Field(10, ge=1, description="Consecutive lost updates before switching back for good.")
    warmup: float = Field(
        0.1, ge=0, le=1, description="Share of the run's server updates before switching back may happen."
    )
    stop_after: int | None = Field(None, ge=1, description="No refreshing after this server update.")


class StaleInversion(Plugin):
    """Refresh stale updates by gradient inversion onto the current model (Wang & Gao)."""

    Params = StaleInversionParams
    requires = frozenset({"async"})
    contract = "0.3"

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self.model: nn.Module | None = None
        self.setup: SetupContext | None = None
        self.estimates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lost_in_a_row = 0
        self.switched_at: int | None = None
        self.counts = {"refreshed": 0, "kept": 0}
        self.errors: list[tuple[float, float]] = []

    @hookimpl
    def server_setup(self, model: nn.Module, ctx: SetupContext) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.setup = ctx

    @hookimpl
    def server_refresh_update(
        self,
        weights: Mapping[str, torch.Tensor],
        arrival: Arrival,
        global_weights: Mapping[str, torch.Tensor],
        n_steps: int,
        ctx: RoundContext,
    ) -> dict[str, torch.Tensor] | None:
        p = self.params
        if (
            self.switched_at is not None
            or arrival.staleness < p.min_staleness
            or (p.stop_after is not None and ctx.round > p.stop_after)
            or n_steps == 0
        ):
            return None
        assert self.model is not None and self.setup is not None
        names = [n for n, _ in self.model.named_parameters() if n in weights]
        base = {n: arrival.base_weights[n].detach() for n in names}
        now = {n: global_weights[n].detach() for n in names}
        buffers = {n: b for n, b in self.model.named_buffers()}
        buffers.update({n: arrival.base_weights[n] for n in buffers if n in arrival.base_weights})
        delta = {n: weights[n].detach() - base[n] for n in names}
        size = _l1(delta, {n: torch.zeros_like(d) for n, d in delta.items()})
        if size == 0:
            return None
        lr = p.lr if p.lr is not None else self.setup.recipe.lr * n_steps / p.steps
        client = arrival.client_id
        init = self.estimates.get(client) if p.warm_start else None
        with torch.enable_grad():
            x, labels = invert(
                self.model, base, buffers, delta,
                samples=p.samples, num_classes=self.setup.num_classes,
                input_shape=tuple(self.setup.input_shape),
                steps=p.steps, lr=lr, iterations=p.iterations, inversion_lr=p.inversion_lr,
                match_fraction=p.match_fraction, input_bound=p.input_bound,
                generator=ctx.generator(f"stale-inversion:{client}"), init=init,
            )  # fmt: skip
        if p.warm_start:
            self.estimates[client] = (x.cpu(), labels.cpu())
        soft = labels.softmax(1)
        with torch.enable_grad():
            at_base = simulate(self.model, base, buffers, x, soft, p.steps, lr)
            now_buffers = {**buffers, **{n: global_weights[n] for n in buffers if n in global_weights}}
            at_now = simulate(self.model, now, now_buffers, x, soft, p.steps, lr)
        e_inv, e_stale = _l1(at_base, delta) / size, _l1(at_now, at_base) / size
        self.errors.append((e_inv, e_stale))
        if e_inv >= e_stale and p.switch == "auto":
            self.counts["kept"] += 1
            self.lost_in_a_row += 1
            if self.lost_in_a_row >= p.patience and ctx.round > p.warmup * ctx.n_rounds:
                self.switched_at = ctx.round
            return None
        self.lost_in_a_row = 0
        self.counts["refreshed"] += 1
        out = {}
        for key, value in weights.items():
            if key in at_now:
                out[key] = (global_weights[key] + at_now[key]).to(value.dtype)
            elif value.is_floating_point():  # buffers (running statistics): the stale change, rebased
                out[key] = global_weights[key] + (value - arrival.base_weights[key])
            else:
                out[key] = global_weights[key].clone()
        return out

    @hookimpl
    def eval_metrics(self, ctx: Any) -> dict[str, Any] | None:
        if ctx.client_id is not None:
            return None
        recent = self.errors[-20:]
        return {
            "refreshed": self.counts["refreshed"],
            "kept_stale": self.counts["kept"],
            "inversion_error": sum(e for e, _ in recent) / len(recent) if recent else None,
            "staleness_error": sum(s for _, s in recent) / len(recent) if recent else None,
            "switched_at": self.switched_at,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "estimates": {c: list(v) for c, v in self.estimates.items()},
            "lost_in_a_row": self.lost_in_a_row,
            "switched_at": self.switched_at,
            "counts": dict(self.counts),
            "errors": [list(e) for e in self.errors],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.estimates = {int(c): (v[0], v[1]) for c, v in state.get("estimates", {}).items()}
        self.lost_in_a_row = int(state.get("lost_in_a_row", 0))
        self.switched_at = state.get("switched_at")
        self.counts = dict(state.get("counts", {"refreshed": 0, "kept": 0}))
        self.errors = [(float(a), float(b)) for a, b in state.get("errors", [])]
