"""Client selection strategies (``server_select_clients``): tail-aware and Oort (docs/async.md).

``tail-aware-select`` draws the clients to start without replacement with probability
proportional to ``1 + boost * t_c``, ``t_c`` the share of a client's samples in tail classes: in
a federation where the tail holders are slow or rarely online, it starts them more often. It reads
each client's class counts (``ctx.system.tail_share``), privileged as FedLoGe's global prior is:
a real server would need clients to report them.

``oort-select`` follows Oort (Lai et al., OSDI 2021): a client's utility is its statistical
utility ``|B_i| sqrt(mean of its squared training losses)`` (reported after each round), plus
Oort's staleness bonus ``sqrt(0.1 log R / L_i)`` (``R`` rounds so far, ``L_i`` the round it last
trained), times the system penalty ``(T / t_i)^alpha`` when its expected duration ``t_i``
exceeds the preferred ``T``. Each selection explores an ``epsilon`` share among clients never
tried (the fastest first) and exploits the rest, drawn by utility among those within 95 % of the
cut-off utility; ``epsilon`` decays by ``decay`` per selection down to ``min_epsilon``. Not
simulated: Oort's pacer (which moves ``T``) and its blacklist.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedlt import ClientContext, Plugin, RoundContext, SetupContext, hookimpl

__all__ = ["OortSelect", "TailAwareSelect"]


def _weighted_without_replacement(
    rng: np.random.Generator, items: Sequence[int], weights: np.ndarray, k: int
) -> list[int]:
    w = np.asarray(weights, dtype=np.float64)
    return [
        int(items[i]) for i in rng.choice(len(items), size=min(k, len(items)), replace=False, p=w / w.sum())
    ]


class TailAwareParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    boost: float = Field(4.0, ge=0, description="Selection weight 1 + boost * (the client's tail share).")


class TailAwareSelect(Plugin):
    """Start clients with probability growing with their share of tail-class samples."""

    Params = TailAwareParams
    contract = "0.3"

    @hookimpl
    def server_select_clients(self, candidates: Sequence[int], k: int, ctx: RoundContext) -> list[int]:
        weights = 1.0 + self.params.boost * np.asarray(ctx.system.tail_share)[list(candidates)]
        return _weighted_without_replacement(ctx.rng("tail-aware-select"), candidates, weights, k)


class OortParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(2.0, ge=0, description="System penalty exponent (Oort: 2).")
    preferred_duration: float | None = Field(
        None, gt=0, description="T, virtual seconds (unset: the median client's expected round)."
    )
    epsilon: float = Field(0.9, ge=0, le=1, description="Initial exploration share (Oort: 0.9).")
    decay: float = Field(0.98, gt=0, le=1, description="Exploration decay per selection (Oort: 0.98).")
    min_epsilon: float = Field(0.2, ge=0, le=1, description="Exploration floor (Oort: 0.2).")


class OortSelect(Plugin):
    """Oort: guided participant selection by statistical and system utility (Lai et al. 2021)."""

    Params = OortParams
    contract = "0.3"

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self.utility: dict[int, float] = {}
        self.last: dict[int, int] = {}
        self.epsilon = self.params.epsilon
        self.samples: np.ndarray | None = None

    # ------------------------------------------------------------------ client side

    @hookimpl
    def client_start(self) -> None:
        self.sum_sq, self.count = 0.0, 0

    @hookimpl
    def client_extra_losses(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            self.sum_sq += float(F.cross_entropy(logits, y, reduction="none").pow(2).sum())
            self.count += int(y.numel())

    @hookimpl
    def client_end(self, ctx: ClientContext) -> dict[str, float] | None:
        if self.count == 0:
            return None
        return {"utility": ctx.n_samples * math.sqrt(self.sum_sq / self.count)}

    # ------------------------------------------------------------------ server side

    @hookimpl
    def server_setup(self, ctx: SetupContext) -> None:
        self.recipe = ctx.recipe  # how much a client trains, for its expected duration

    @hookimpl
    def server_after_aggregate(self, ctx: RoundContext, payloads: Mapping[int, Any]) -> None:
        for client, payload in payloads.items():
            self.utility[int(client)] = float(payload["utility"])
            self.last[int(client)] = ctx.round

    def _durations(self, ctx: RoundContext) -> np.ndarray:
        """Each client's expected round (privileged sample counts, the scenario's recipe)."""
        recipe = self.recipe
        n = np.asarray(ctx.client_class_counts).sum(axis=1)
        if recipe is not None and recipe.local_steps is not None:
            work = np.full(len(n), recipe.local_steps * recipe.batch_size)
        else:
            work = n * (recipe.local_epochs if recipe is not None else 1)
        return np.asarray(ctx.system.expected_durations(work))

    @hookimpl
    def server_select_clients(self, candidates: Sequence[int], k: int, ctx: RoundContext) -> list[int]:
        p, rng = self.params, ctx.rng("oort-select")
        durations = self._durations(ctx)
        preferred = p.preferred_duration or float(np.median(durations))
        tried = [c for c in candidates if c in self.utility]
        fresh = [c for c in candidates if c not in self.utility]
        explore = min(len(fresh), max(0, round(self.epsilon * k)) if tried else k)
        self.epsilon = max(p.min_epsilon, self.epsilon * p.decay)
        chosen = sorted(fresh, key=lambda c: (durations[c], c))[:explore]  # fastest untried first
        rest = k - len(chosen)
        if rest > 0 and tried:
            rounds = max(ctx.round, 2)
            scores = np.array(
                [
                    (self.utility[c] + math.sqrt(0.1 * math.log(rounds) / max(self.last[c], 1)))
                    * ((preferred / durations[c]) ** p.alpha if durations[c] > preferred else 1.0)
                    for c in tried
                ]
            )
            cutoff = 0.95 * np.sort(scores)[::-1][min(rest, len(scores)) - 1]
            pool = [c for c, s in zip(tried, scores, strict=True) if s >= cutoff]
            weights = np.array([scores[tried.index(c)] for c in pool]) + 1e-12
            chosen += _weighted_without_replacement(rng, pool, weights, rest)
        if len(chosen) < k:  # not enough tried clients yet: more untried ones
            chosen += [c for c in sorted(fresh, key=lambda c: (durations[c], c)) if c not in chosen][
                : k - len(chosen)
            ]
        return chosen[:k] or [int(candidates[0])]

    def state_dict(self) -> dict[str, Any]:
        return {"utility": dict(self.utility), "last": dict(self.last), "epsilon": self.epsilon}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.utility = {int(c): float(u) for c, u in state.get("utility", {}).items()}
        self.last = {int(c): int(r) for c, r in state.get("last", {}).items()}
        self.epsilon = float(state.get("epsilon", self.params.epsilon))
