"""Sharpness-aware local steps: SAM / FedSAM (``sam``) and FedSpeed (``fedspeed``), as their authors' code.

The formulas are those of Sun et al.'s FL-Simulator (github.com/woodenchild95/FL-Simulator at
502bec6); docs/plugins.md, "Sharpness-aware local steps", cites file and lines, and the departures.

Both act through ``client_step_gradients``, the hook around the local optimizer step: the gradient
``g`` of the step's batch at the current weights ``x`` arrives, the plugin returns the gradient that
fedlt then clips (``train.max_grad_norm``) and the optimizer steps with (weight decay added there,
after clipping, as ``torch.optim.SGD`` does in their code).

- ``sam`` (FedSAM's client, Qu et al., ICML 2022; SAM, Foret et al., ICLR 2021): the ascent
  ``e = rho * g / (||g|| + 1e-7)`` with ``||g||`` the 2-norm over every trained parameter together
  (one global norm, not per layer), and the step uses ``grad L(x + e)`` (same batch) from ``x``.
  ``rho = 0.1`` (their ``--rho`` default). Server: fedlt's aggregation (theirs is the uniform mean).
- ``fedspeed`` (Sun et al., ICLR 2023). Client ``i`` in round ``t`` starts from the global ``w^t``
  with ``h_i`` (the sum of its past updates ``x_K - w^s``, zero before its first round, kept in the
  plugin's per-client state). Each local step::

      g2    = grad f_i(x + rho * g / (||g|| + 1e-7)),  g = grad f_i(x)     (SAM's gradient only)
      d     = clip(g2 + lamb * (h_i - w^t), max_grad_norm)
      x    <- x - lr * (d + (weight_decay + lamb) * x)

  so the prox term ``lamb (x - w^t)`` is split: ``lamb x`` through the optimizer's weight decay
  (after clipping), ``- lamb w^t`` with the correction ``lamb h_i`` inside the clipped gradient.
  After the last step the client uploads ``x_K`` and keeps ``h_i <- h_i + (x_K - w^t)``. The
  server's new model is the uniform mean of the uploads plus the mean of ``h`` over **all**
  ``N`` clients: ``w^{t+1} = mean_{i in S} x_K,i + (1/N) sum_j h_j``. Defaults: ``rho = 0.1``,
  ``lamb = 0.1`` (their ``--rho`` and ``--lamb``).

Only the model's trained parameters take part in the perturbation, ``h`` and the correction;
buffers (BatchNorm statistics) are averaged as the uploads are. Both plugins make their clients
train one by one on every engine: the hook evaluates a second gradient per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import LocalTraining, Plugin, RoundContext, ScenarioError, SetupContext, hookimpl

__all__ = ["SAM", "FedSpeed", "FedSpeedAggregator", "ascent"]

Tensors = Mapping[str, torch.Tensor]

#: Added to the gradient norm of the ascent step (their ESAM's ``1e-7``).
EPS = 1e-7


def ascent(grads: Tensors, rho: float) -> dict[str, torch.Tensor]:
    """The ascent step ``rho * g / (||g|| + 1e-7)``, one 2-norm over every tensor together."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    scale = rho / (norm + EPS)
    return {n: g * scale for n, g in grads.items()}


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trained parameters by name, detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class SAMParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rho: float = Field(0.1, gt=0, description="Radius of the ascent step rho * g / ||g|| (||g|| global).")


class FedSpeedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rho: float = Field(0.1, gt=0, description="Radius of the ascent step rho * g / ||g|| (||g|| global).")
    lamb: float = Field(
        0.1,
        gt=0,
        description="Prox coefficient: adds lamb to the weight decay and lamb * (h_i - w^t) to the gradient.",
    )
    average: Literal["uniform", "samples"] = Field(
        "uniform",
        description="Mean of the uploads: uniform over the round's clients (the authors'), or by samples.",
    )


class SAM(Plugin):
    """SAM as the local step (FedSAM's client): step with the gradient taken at
    ``x + rho * g / (||g|| + 1e-7)``."""

    Params = SAMParams

    @hookimpl
    def client_step_gradients(
        self, grads: Tensors, regrad: Callable[[Tensors], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        return regrad(ascent(grads, self.params.rho))


class FedSpeedAggregator:
    """``w^{t+1} = mean_i x_K,i + H / N``: the mean of the uploads (uniform or by samples) plus the
    mean over all ``N`` clients of their summed updates, ``H = sum_j h_j`` (the plugin's ``h_sum``,
    which ``add`` advances by each update ``x_K,i - w^t`` before ``result`` reads it)."""

    def __init__(
        self, like: Tensors, h_sum: dict[str, torch.Tensor], n_clients: int, by_samples: bool
    ) -> None:
        self._like = {k: v for k, v in like.items() if v.is_floating_point()}
        self._sums = {k: torch.zeros_like(v) for k, v in self._like.items()}
        self._h_sum = {k: h for k, h in h_sum.items() if k in self._like}
        self._n, self._by_samples, self._total = n_clients, by_samples, 0.0

    def add(self, weights: Tensors, n_samples: int, client_id: int) -> None:
        a = float(n_samples) if self._by_samples else 1.0
        if a <= 0:
            return
        for k, acc in self._sums.items():
            acc.add_(weights[k].to(acc.dtype), alpha=a)
        self._total += a
        for k, h in self._h_sum.items():
            h.add_(weights[k].to(h.device, h.dtype) - self._like[k].to(h.device, h.dtype))

    def result(self) -> dict[str, torch.Tensor] | None:
        if self._total == 0:
            return None
        out = {k: acc / self._total for k, acc in self._sums.items()}
        for k, h in self._h_sum.items():
            out[k] = out[k] + (h / self._n).to(out[k].device, out[k].dtype)
        return out


class FedSpeed(Plugin):
    """FedSpeed as the authors' code runs it: SAM's gradient plus the correction ``lamb (h_i - w^t)``,
    ``lamb`` added to the weight decay, and the server adding the mean of every client's summed
    updates to the mean of the uploads (module docstring)."""

    Params = FedSpeedParams
    contract = "0.3"

    # ------------------------------------------------------------------ server side

    @hookimpl
    def server_setup(self, model: nn.Module, ctx: SetupContext) -> None:
        self.n_clients = ctx.n_clients
        self.h_sum = {n: torch.zeros_like(p) for n, p in trained(model).items()}

    @hookimpl
    def server_configure_round(self, ctx: RoundContext) -> None:
        """Refuse a mode whose aggregation is not a round of fresh updates, before any training."""
        if ctx.mode != "sync":
            raise ScenarioError(
                "federation.mode",
                ctx.mode,
                f"'sync' for plugin {self.name!r} (its server step averages a round's fresh updates and "
                "adds every client's summed updates)",
            )

    @hookimpl
    def server_make_aggregator(self, global_weights: Tensors, ctx: RoundContext) -> FedSpeedAggregator:
        by_samples = self.params.average == "samples"
        return FedSpeedAggregator(global_weights, self.h_sum, self.n_clients, by_samples)

    def state_dict(self) -> dict[str, Any]:
        return {"h_sum": {n: h.cpu() for n, h in self.h_sum.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["h_sum"]
        self.h_sum = {n: saved[n].to(h.device, h.dtype) for n, h in self.h_sum.items()}

    # ------------------------------------------------------------------ client side

    @hookimpl
    def client_start(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.start = trained(model)
        saved = state.get("h", {})
        self.h = {
            n: saved[n].to(w.device, w.dtype) if n in saved else torch.zeros_like(w)
            for n, w in self.start.items()
        }
        lamb = self.params.lamb
        #: the constant part of the step's gradient: lamb * (h_i - w^t)
        self.shift = {n: lamb * (self.h[n] - w) for n, w in self.start.items()}

    @hookimpl
    def client_configure_training(self, recipe: LocalTraining) -> LocalTraining:
        return recipe.replace(weight_decay=recipe.weight_decay + self.params.lamb)

    @hookimpl
    def client_step_gradients(
        self, grads: Tensors, regrad: Callable[[Tensors], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        g2 = regrad(ascent(grads, self.params.rho))
        return {n: g + self.shift[n].to(g.dtype) if n in self.shift else g for n, g in g2.items()}

    @hookimpl
    def client_end(self, model: nn.Module, state: dict[str, Any]) -> None:
        with torch.no_grad():
            state["h"] = {
                n: (self.h[n] + p.detach() - self.start[n]).cpu()
                for n, p in model.named_parameters()
                if n in self.start
            }
