"""What a client trains on, phase by phase or with synthetic samples: two-phase training and SMOTE.

``two-phase`` (Buda et al., Neural Networks 2018) is a sampler (``client_select_indices``): a
class-balanced resample of the client's data in one phase, the data as it is in the other.
``smote`` (Chawla et al., JAIR 2002) adds synthetic minority samples to each client's data once,
where the run's data is built (``data_client_samples``), so every engine, sampler and hook then
trains on them as the client's own.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from fedlt_plugins.samplers import _class_positions, _labels_and_counts, _shuffled_epochs
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fedlt import ClientContext, Plugin, ScenarioError, SetupContext, hookimpl

__all__ = ["Smote", "TwoPhase", "smote_class", "smote_counts", "switch_round_of"]


# --------------------------------------------------------------------------- two-phase


class TwoPhaseParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order: Literal["balanced-first", "all-first"] = Field(
        "balanced-first",
        description="'balanced-first': a class-balanced resample before switch_round, all data from it "
        "(Buda et al.); 'all-first': the reverse.",
    )
    switch_round: int | None = Field(
        None,
        ge=2,
        description="First round of the second phase; unset = rounds // 2 + 1 (the first half of the "
        "rounds is phase 1). At most federation.rounds.",
    )
    balance: Literal["under", "over"] = Field(
        "under",
        description="How the balanced phase balances: 'under' keeps a random min(n_c, cap) samples of "
        "each class per round (cap = per_class, or the client's smallest present class); 'over' "
        "replicates random samples of each class up to the client's largest class.",
    )
    per_class: int | None = Field(
        None,
        ge=1,
        validate_default=True,
        description="balance = 'under': the cap on each class's samples (unset = the client's smallest "
        "present class, full balance). Not allowed with 'over'.",
    )

    @field_validator("per_class")
    @classmethod
    def _cap_needs_under(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("balance") == "over":
            raise ValueError("unset when balance = 'over' (over-sampling grows every class to the largest)")
        return value


def switch_round_of(switch_round: int | None, n_rounds: int) -> int:
    """The first round of phase 2: ``switch_round``, or ``n_rounds // 2 + 1`` when unset."""
    return n_rounds // 2 + 1 if switch_round is None else switch_round


class TwoPhase(Plugin):
    """Two-phase training (Buda et al., Neural Networks 2018): a balanced phase and an imbalanced one.

    With ``order = "balanced-first"`` (the paper's), rounds before ``switch_round`` train on a
    class-balanced resample of each client's data and later rounds on all of it as it is, so the
    model first learns the classes evenly, then fine-tunes on the true mix; ``"all-first"`` runs
    the phases the other way round. The whole network trains in both phases. Balanced phase:
    ``balance = "under"`` keeps a random ``min(n_c, cap)`` samples of each present class
    (``cap = per_class``, or the client's smallest present class count: full balance), drawn
    afresh each round from the client-round's generator (seed, round, client), so over the phase
    every sample of a large class gets used; ``"over"`` replicates random samples of each class up
    to the largest (as ``oversample``). One local epoch is a fresh shuffle of the resample. The
    other phase leaves the order to the default (a fresh permutation of all samples per epoch),
    or to a sampler listed after this one.
    """

    Params = TwoPhaseParams
    vectorized = True  # no per-batch hook: a group of clients trains the orders it chose

    def switch(self, n_rounds: int) -> int:
        """The first round of the second phase."""
        return switch_round_of(self.params.switch_round, n_rounds)

    def balanced_at(self, round: int, n_rounds: int) -> bool:
        """Whether ``round`` is in the balanced phase."""
        before = round < self.switch(n_rounds)
        return before if self.params.order == "balanced-first" else not before

    @hookimpl
    def server_setup(self, ctx: SetupContext) -> None:
        switch = self.switch(ctx.n_rounds)
        if switch > ctx.n_rounds:
            raise ScenarioError(
                f"plugins.{self.name}.switch_round",
                switch,
                f"2 to federation.rounds ({ctx.n_rounds})",
                hint="Later, the second phase never comes.",
            )

    @hookimpl
    def client_select_indices(self, ctx: ClientContext) -> torch.Tensor | None:
        if not self.balanced_at(ctx.round, ctx.n_rounds):
            return None
        labels, counts = _labels_and_counts(ctx)
        if labels.numel() == 0:
            return None
        if self.params.balance == "over":
            return _shuffled_epochs(ctx, _grown(_class_positions(labels, counts), int(counts.max()), ctx))
        cap = self.params.per_class or int(counts[counts > 0].min())
        parts = [
            pos[torch.randperm(pos.numel(), generator=ctx.generator)[:cap]]
            for pos in _class_positions(labels, counts)
        ]
        return _shuffled_epochs(ctx, torch.cat(parts))


def _grown(positions: list[torch.Tensor], target: int, ctx: ClientContext) -> torch.Tensor:
    """Each non-empty class's positions replicated to ``target``: all ``target // n`` times, a
    random ``target % n`` once more."""
    parts = []
    for pos in positions:
        n = pos.numel()
        if n:
            extra = pos[torch.randperm(n, generator=ctx.generator)[: target % n]]
            parts.extend([pos.repeat(target // n), extra])
    return torch.cat(parts)


# --------------------------------------------------------------------------- smote


class SmoteParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(
        5, ge=1, description="Nearest same-class neighbours to interpolate towards (Chawla et al.: 5)."
    )
    target: Literal["max"] | float = Field(
        "max",
        description="Count each class of a client is grown to: 'max' = the client's largest class; a "
        "ratio r in (0, 1] = floor(r * largest). Classes at or above it are left alone.",
    )

    @field_validator("target")
    @classmethod
    def _ratio_in_range(cls, value: str | float) -> str | float:
        if not isinstance(value, str) and not 0 < value <= 1:
            raise ValueError("'max' or a ratio in (0, 1]")
        return value


def smote_counts(counts: torch.Tensor, target: str | float) -> torch.Tensor:
    """Synthetic samples per class: ``max(0, t - n_c)`` for each present class, ``t`` the target
    count (``"max"``: the largest class; a ratio r: ``floor(r * n_max)``); absent classes get none."""
    n_max = int(counts.max()) if counts.numel() else 0
    t = n_max if target == "max" else math.floor(float(target) * n_max)
    return torch.where(counts > 0, (t - counts).clamp(min=0), torch.zeros_like(counts))


def smote_class(x: torch.Tensor, m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` SMOTE samples from one class's samples ``x`` (``(n, ...)``).

    Base samples are spread evenly: each is the base of ``m // n`` new samples, a random
    ``m % n`` of them of one more. Each new sample is ``x_i + u (x_nn - x_i)`` with ``u ~ U(0, 1)``
    and ``x_nn`` drawn uniformly from the ``min(k, n - 1)`` nearest other samples of the class
    (Euclidean distance on the flattened inputs, computed exactly in float64; ties broken by
    position). A class of one sample has no neighbour: its new samples are copies of it.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1).double()
    base = torch.arange(n).repeat(m // n)
    base = torch.cat([base, torch.randperm(n, generator=generator)[: m % n]])
    kk = min(k, n - 1)
    if kk == 0:
        return x[base].clone()
    d = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    neighbours = torch.sort(d, dim=1, stable=True).indices[:, :kk]
    pick = torch.randint(kk, (m,), generator=generator)
    u = torch.rand(m, 1, generator=generator, dtype=torch.float64)
    a = flat[base]
    new = a + u * (flat[neighbours[base, pick]] - a)
    if not x.dtype.is_floating_point:
        new = new.round()
    return new.to(x.dtype).reshape(m, *x.shape[1:])


class Smote(Plugin):
    """SMOTE in input space (Chawla et al., JAIR 2002), once per client.

    Where the run's data is built, each class of a client below the target count (``target =
    "max"``: the client's largest class; a ratio r: ``floor(r * largest)``) is grown to it exactly
    by synthetic samples ``x_new = x_i + u (x_nn - x_i)``, ``u ~ U(0, 1)``, ``x_nn`` one of the
    ``k`` nearest neighbours of ``x_i`` among the client's samples of the same class (Euclidean,
    flattened inputs); base samples are spread evenly over the class (:func:`smote_class`). A
    class of a single sample has no neighbour, so it is grown by copies (random over-sampling). A
    class a client lacks stays absent. Draws come from the hook's generator (seed, client): the
    same samples in every process and after a resume. The synthetic samples join the client's
    data for the whole run (``ctx.labels`` and its local counts include them; the global counts
    and shot groups stay the real ones). For images, interpolating pixels makes blends rather
    than plausible new images (the reference suggests feature space for images): this plugin is
    the input-space baseline. Offline scenarios only (a stream scenario is refused).
    """

    Params = SmoteParams
    vectorized = True  # no per-batch hook: the samples are data by the time any client trains

    @hookimpl
    def data_client_samples(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, ctx: SetupContext
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if y.numel() == 0:
            return None
        counts = torch.bincount(y, minlength=ctx.num_classes)
        extra = smote_counts(counts, self.params.target)
        xs, ys = [], []
        for c in torch.nonzero(extra).flatten().tolist():
            m = int(extra[c])
            xs.append(smote_class(x[y == c], m, self.params.k, generator))
            ys.append(torch.full((m,), c, dtype=torch.long))
        if not xs:
            return None
        return torch.cat(xs), torch.cat(ys)
