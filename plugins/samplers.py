"""Re-sampling remedies: which of its own samples a client trains on, and how often.

Every sampler implements ``client_select_indices`` and returns the client-round's whole sample
order: a 1-D long tensor of the client's own dataset indices (drawn from ``ctx.indices`` with
``ctx.generator``, on ``ctx.indices.device``), which the engine cuts into consecutive batches.
Its length is the round's sample budget: ``local_epochs`` x the size of one resampled epoch, or
``local_steps x batch_size`` when the scenario sets ``local_steps``.

``client_select_indices`` is a first-result hook, so one sampler acts per scenario: if two
sampler plugins are listed, the first one listed wins and the others are never consulted. The
hook is only called offline; in a continual scenario the stream fixes the order and samplers have
no effect.

Draws happen once per client-round on the CPU (one host transfer of the client's labels), never
per batch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fedlt import ClientContext, Plugin, RoundContext, hookimpl

__all__ = [
    "ClassAware",
    "Oversample",
    "Temperature",
    "Undersample",
    "cooldown_tau",
    "temperature_probs",
]


# --------------------------------------------------------------------------- pure helpers


def temperature_probs(counts: np.ndarray, tau: float) -> np.ndarray:
    """Class sampling probabilities ``p_c(tau) = n_c^{1/tau} / sum_j n_j^{1/tau}`` (absent classes: 0).

    Computed in log space, so very small ``tau`` (sharp) and very large ``tau`` (near uniform) stay
    finite.
    """
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    logits = np.full(n.shape, -np.inf)
    logits[present] = np.log(n[present]) / tau
    p = np.exp(logits - logits[present].max())
    return p / p.sum()


def cooldown_tau(round: int, tau: float, tau_end: float, start: int, length: int) -> float:
    """The scheduled temperature of ``round``: ``tau`` before ``start``, then linear to ``tau_end``.

    - ``round < start``: ``tau``;
    - ``start <= round < start + length``: ``tau + (tau_end - tau) * (round - start) / length``
      (so still ``tau`` at ``start``);
    - ``round >= start + length``: ``tau_end`` (with ``length == 0`` a step at ``start``).
    """
    if round < start:
        return tau
    if length == 0 or round >= start + length:
        return tau_end
    return tau + (tau_end - tau) * (round - start) / length


def _labels_and_counts(ctx: ClientContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's labels on the CPU (where ``ctx.generator`` lives) and their class counts."""
    labels = ctx.labels.cpu()
    return labels, torch.bincount(labels, minlength=ctx.num_classes)


def _budget(ctx: ClientContext, epoch_size: int) -> int:
    """Samples this client-round: local_epochs epochs, or local_steps batches."""
    if ctx.local_steps is not None:
        return ctx.local_steps * ctx.batch_size
    return ctx.local_epochs * epoch_size


def _class_positions(labels: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    """Positions into ``ctx.indices`` of each class's samples, in class order."""
    order = torch.argsort(labels, stable=True)
    return list(torch.split(order, counts.tolist()))


def _shuffled_epochs(ctx: ClientContext, positions: torch.Tensor) -> torch.Tensor:
    """The resampled multiset ``positions`` as a fresh shuffle per epoch, cut to the budget."""
    n = positions.numel()
    total = _budget(ctx, n)
    n_epochs = -(-total // n)
    epochs = [positions[torch.randperm(n, generator=ctx.generator)] for _ in range(n_epochs)]
    return ctx.indices[torch.cat(epochs)[:total].to(ctx.indices.device)]


def _weighted_draw(ctx: ClientContext, sample_weights: torch.Tensor) -> torch.Tensor:
    """``local_epochs`` x client size (or the step budget) draws with replacement, P(i) ∝ weight."""
    total = _budget(ctx, sample_weights.numel())
    positions = torch.multinomial(sample_weights, total, replacement=True, generator=ctx.generator)
    return ctx.indices[positions.to(ctx.indices.device)]


# --------------------------------------------------------------------------- oversample


class OversampleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fraction_balance: float = Field(
        1.0,
        gt=0,
        le=1,
        description="How much of the gap to the largest class to fill: class c gets "
        "n_c + floor(fraction_balance * (n_max - n_c)) samples; 1 = full balance.",
    )


class Oversample(Plugin):
    """Random over-sampling (Buda et al., Neural Networks 2018).

    Each client-round, every class ``c`` present on the client is grown to
    ``t_c = n_c + floor(fraction_balance * (n_max - n_c))`` samples (``n_max`` = the client's
    largest class) by replicating random samples of that class: every sample appears
    ``floor(t_c / n_c)`` times and a random ``t_c mod n_c`` of them once more, so the copies are
    spread as evenly as possible. One local epoch is a fresh shuffle of this multiset. Buda et al.
    find over-sampling best almost everywhere, applied until the imbalance is fully removed
    (the default).
    """

    Params = OversampleParams

    @hookimpl
    def client_select_indices(self, ctx: ClientContext) -> torch.Tensor | None:
        labels, counts = _labels_and_counts(ctx)
        if labels.numel() == 0:
            return None
        n_max = int(counts.max())
        parts = []
        for pos in _class_positions(labels, counts):
            n_c = pos.numel()
            if n_c == 0:
                continue
            target = n_c + math.floor(self.params.fraction_balance * (n_max - n_c))
            extra = pos[torch.randperm(n_c, generator=ctx.generator)[: target % n_c]]
            parts.extend([pos.repeat(target // n_c), extra])
        return _shuffled_epochs(ctx, torch.cat(parts))


# --------------------------------------------------------------------------- undersample


class UndersampleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(
        1.0,
        ge=1,
        description="Each class keeps at most floor(ratio * n_min) samples (n_min = the client's "
        "smallest present class); 1 = fully balanced.",
    )


class Undersample(Plugin):
    """Random under-sampling (Buda et al., Neural Networks 2018).

    Each client-round, every class keeps a random ``min(n_c, floor(ratio * n_min))`` of its
    samples (without replacement; ``n_min`` is the client's smallest present class), so classes
    already at or below the cap keep everything. One local epoch is a fresh shuffle of the kept
    set, and a new subset is drawn each round. Buda et al. find the best ratio depends on how
    strong the imbalance is.
    """

    Params = UndersampleParams

    @hookimpl
    def client_select_indices(self, ctx: ClientContext) -> torch.Tensor | None:
        labels, counts = _labels_and_counts(ctx)
        if labels.numel() == 0:
            return None
        cap = math.floor(self.params.ratio * int(counts[counts > 0].min()))
        parts = []
        for pos in _class_positions(labels, counts):
            keep = min(pos.numel(), cap)
            parts.append(pos[torch.randperm(pos.numel(), generator=ctx.generator)[:keep]])
        return _shuffled_epochs(ctx, torch.cat(parts))


# --------------------------------------------------------------------------- class-aware


class ClassAwareParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weighting: Literal["inverse", "effective"] = Field(
        "inverse",
        description="'inverse': P(i) ∝ 1/n_{y_i} (every present class equally likely); "
        "'effective': P(i) ∝ (1 - beta) / (1 - beta^{n_{y_i}}) (class-balanced).",
    )
    beta: float = Field(0.9999, gt=0, lt=1, description="beta of the 'effective' weighting.")


class ClassAware(Plugin):
    """Class-aware sampling, as LDAM-DRW's imbalanced sampler (Cao et al., NeurIPS 2019).

    Draws with replacement with ``P(pick i) ∝ 1 / n_{y_i}`` (``weighting = "inverse"``: each class
    present on the client is equally likely, then a uniform sample of it) or
    ``∝ (1 - beta) / (1 - beta^{n_{y_i}})`` (``"effective"``: Cui et al.'s class-balanced
    weights, so class c is drawn with probability ∝ n_c / E_{n_c}). One local epoch is as many
    draws as the client has samples.
    """

    Params = ClassAwareParams

    @hookimpl
    def client_select_indices(self, ctx: ClientContext) -> torch.Tensor | None:
        labels, counts = _labels_and_counts(ctx)
        if labels.numel() == 0:
            return None
        n = counts.double().clamp(min=1.0)
        if self.params.weighting == "inverse":
            per_class = 1.0 / n
        else:
            beta = self.params.beta
            per_class = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
        return _weighted_draw(ctx, per_class[labels])


# --------------------------------------------------------------------------- temperature


class TemperatureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tau: float = Field(
        1.0,
        gt=0,
        description="Sampling temperature (the starting one under a cooldown): p_c ∝ n_c^{1/tau}; "
        "1 = proportional to counts, large = uniform over the client's classes.",
    )
    tau_end: float | None = Field(
        None, gt=0, description="Temperature the cooldown ends at; unset = tau (no cooldown)."
    )
    cooldown_start_round: int | None = Field(
        None,
        ge=1,
        validate_default=True,
        description="Round at which tau starts moving to tau_end (required when tau_end differs from tau).",
    )
    cooldown_rounds: int = Field(
        0, ge=0, description="Rounds of linear interpolation from tau to tau_end; 0 = a step."
    )

    @field_validator("cooldown_start_round")
    @classmethod
    def _start_matches_tau_end(cls, value: int | None, info: ValidationInfo) -> int | None:
        tau, tau_end = info.data.get("tau"), info.data.get("tau_end")
        cools = tau_end is not None and tau_end != tau
        if cools and value is None:
            raise ValueError("a round >= 1 when tau_end differs from tau (when the cooldown starts)")
        if value is not None and tau_end is None:
            raise ValueError("unset when tau_end is unset (set tau_end to schedule a cooldown)")
        return value


class Temperature(Plugin):
    """Temperature sampling with an optional Cooldown (Li et al., NAACL 2025, "Upsample or Upweight?").

    Classes are drawn with ``p_c(tau) = n_c^{1/tau} / sum_j n_j^{1/tau}`` over the classes present
    on the client (``tau = 1``: proportional to counts; ``tau -> inf``: uniform), then a uniform
    sample of the drawn class, all with replacement (one draw per sample, P(i) = p_{y_i} / n_{y_i}).
    One local epoch is as many draws as the client has samples.

    Cooldown: the paper starts with a high ``tau`` (heavy upsampling of rare classes: lower
    gradient variance, faster convergence) and lowers it later so rare classes are not overfit.
    Its exact schedule was not verified, so this plugin uses the linear form of
    :func:`cooldown_tau`: ``tau`` until ``cooldown_start_round``, then linear to ``tau_end`` over
    ``cooldown_rounds`` rounds, then ``tau_end``. Linear is the simplest schedule with both
    phases the paper describes and needs no extra shape parameter. The server computes each
    round's value in ``server_configure_round`` and sends it as ``"temperature.tau"`` in the round
    config, so every client of a round samples with the same ``tau``.
    """

    Params = TemperatureParams

    def tau_at(self, round: int) -> float:
        """The scheduled temperature of ``round``."""
        p = self.params
        if p.tau_end is None or p.cooldown_start_round is None:
            return p.tau
        return cooldown_tau(round, p.tau, p.tau_end, p.cooldown_start_round, p.cooldown_rounds)

    @property
    def _config_key(self) -> str:
        return f"{self.name or 'temperature'}.tau"

    @hookimpl
    def server_configure_round(self, ctx: RoundContext) -> dict[str, Any]:
        return {self._config_key: self.tau_at(ctx.round)}

    @hookimpl
    def client_select_indices(self, ctx: ClientContext) -> torch.Tensor | None:
        labels, counts = _labels_and_counts(ctx)
        if labels.numel() == 0:
            return None
        tau = float(ctx.config.get(self._config_key, self.tau_at(ctx.round)))
        p = torch.as_tensor(temperature_probs(counts.numpy(), tau))
        per_class = p / counts.double().clamp(min=1.0)
        return _weighted_draw(ctx, per_class[labels])
