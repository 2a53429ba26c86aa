"""Experience replay for continual (stream) scenarios: a per-client memory of dataset indices.

Each client keeps a memory of at most ``memory_size`` = K dataset *indices* (never copies of
samples) in its per-client ``state``, so the memory is checkpointed and travels with the client's
task. After every stream batch the memory policy (:mod:`fedlt_plugins.memory`) is applied to the
batch's items in stream order; before every optimizer step a replay batch is drawn from memory
and appended to the stream rows (experience replay, ER; Si-Blurry's ER baseline appends 32 memory
samples to a 64-sample stream batch, ``replay_ratio = 0.5``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from fedlt_plugins.memory import ClassMemory, Policy, draw_replay, inverse_frequency_weights
from pydantic import BaseModel, ConfigDict, Field

from fedlt import ClientContext, Plugin, hookimpl
from fedlt import state as rules


class ReplayParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory_size: int = Field(500, ge=1, description="K: the most dataset indices a client's memory holds.")
    policy: Policy = Field(
        "reservoir",
        description="How the memory is filled: 'reservoir' (Vitter's Algorithm R), 'cbrs' (class-balancing "
        "reservoir, Chrysakis & Moens 2020), 'gdumb' (greedy class-balanced, Prabhu et al. 2020), "
        "'balanced' (fair-share admission plus per-class reservoir), 'evict-largest' (always store, evicting "
        "from the largest class counting the newcomer: the CLIB / Si-Blurry code's GDumb and RM memory).",
    )
    replay_ratio: float = Field(
        0.5,
        ge=0,
        le=16,
        description="Replayed rows per stream row: each step appends round(replay_ratio x stream batch "
        "length) memory samples (fewer while memory is smaller; 0.5 = Si-Blurry's ER, 32 per 64).",
    )
    sampling: Literal["uniform", "inverse-frequency"] = Field(
        "uniform",
        description="How replay rows are drawn from memory, without replacement: 'uniform', or "
        "'inverse-frequency' (p_i proportional to 1 / n^mem_{y_i}, i-Blurry's get_batch(use_weight=True)).",
    )
    reweight: Literal["none", "inverse-frequency"] = Field(
        "none",
        description="Loss weights of replayed rows: 'none' (all 1), or 'inverse-frequency' "
        "(w_i proportional to 1 / n^mem_{y_i}, normalised to mean 1 over the replayed rows; stream rows 1).",
    )


class Replay(Plugin):
    """Experience replay from a per-client index memory (reservoir, CBRS, GDumb, balanced or
    evict-largest).

    Memory policies (formulas in :mod:`fedlt_plugins.memory`): reservoir sampling (Vitter 1985,
    Algorithm R: item n stays with probability K/n), CBRS (Chrysakis & Moens, "Online continual
    learning from imbalanced data", ICML 2020: classes that are or were the largest in memory are
    "full" and use a per-class reservoir ``P(store) = |M_y| / n_y``; other classes always enter,
    evicting from a currently-largest class), GDumb's greedy class-balanced sampler (Prabhu et al.,
    ECCV 2020: once full, store iff ``|M_y| < K / |Y_seen|``, evicting from the largest class; its
    retraining from scratch on memory is *not* done here) and ``balanced`` (GDumb's admission
    plus a per-class reservoir for classes at or above their share, cf. Avalanche's
    ClassBalancedBuffer and mammoth's balancoir) and ``evict-largest`` (the online memory update of
    the CLIB / Si-Blurry code's GDumb and Rainbow-Memory baselines: always store, overwriting a
    random item of a class drawn among the largest once the newcomer is counted).

    Each optimizer step appends ``n_r = floor(replay_ratio * b + 1/2)`` memory samples to the
    ``b`` stream rows (``min(n_r, |M|)`` distinct slots), drawn uniformly or with
    ``p_i ∝ 1 / n^mem_{y_i}``. With ``reweight = "inverse-frequency"`` the replayed rows' losses
    are weighted ``w_i = (1 / n^mem_{y_i}) / mean_j (1 / n^mem_{y_j})`` (mean 1 over replayed
    rows), stream rows weight 1. The replayed rows are the *last* ``n_r`` rows of the batch the
    per-batch hooks see.

    It requires a stream (``requires = {"stream"}``): an offline scenario listing it is refused
    before anything runs, as there is nothing to remember.
    """

    Params = ReplayParams
    #: A memory of stream samples: offline there is no stream to remember.
    requires = frozenset({"stream"})
    #: What a client's memory may hold (checked on resume): the client's own samples, with their
    #: labels, at most memory_size of them, and the counters the policies keep.
    client_state: ClassVar[dict[str, rules.Rule]] = {
        "indices": rules.ListOf(rules.OwnSample(), max_len="memory_size"),
        "labels": rules.ListOf(rules.LabelOf("indices"), same_length_as="indices"),
        "n_seen": rules.Int(low=0),
        "class_seen": rules.MapOf(rules.Label(), rules.Int(low=0)),
        "full": rules.ListOf(rules.Label()),
    }

    def _memory(self, state: dict[str, Any]) -> ClassMemory:
        """The client's memory, wrapped once per client-round (class counts derived once)."""
        memory = getattr(self, "memory", None)
        if memory is None or memory.state is not state:
            memory = self.memory = ClassMemory(self.params.memory_size, self.params.policy, state)
            self.view = None
        return memory

    @hookimpl
    def client_replay_indices(
        self, batch: torch.Tensor, ctx: ClientContext, state: dict[str, Any]
    ) -> torch.Tensor | None:
        self.n_rows = 0
        if ctx.online_iter is None:
            return None
        memory = self._memory(state)
        n_r = min(math.floor(self.params.replay_ratio * batch.numel() + 0.5), len(memory))
        if n_r <= 0:
            return None
        # Tensors of the memory, rebuilt only after the memory changes (once per stream batch).
        if self.view is None:
            self.view = (
                torch.tensor(memory.indices, dtype=torch.long),
                torch.tensor(memory.labels, dtype=torch.long),
            )
        slots = draw_replay(memory.labels, n_r, self.params.sampling, ctx.generator)
        self.n_rows = n_r
        if self.params.reweight == "inverse-frequency":
            self.replay_weights = inverse_frequency_weights(self.view[1][slots].tolist(), memory.labels)
        return self.view[0][slots]

    @hookimpl
    def client_sample_weights(self, logits: torch.Tensor) -> torch.Tensor | None:
        n_r = getattr(self, "n_rows", 0)
        if self.params.reweight == "none" or not n_r:
            return None
        w = torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
        w[-n_r:] = self.replay_weights.to(device=logits.device, dtype=logits.dtype)
        return w

    @hookimpl
    def eval_client_memory(self, state: dict[str, Any], num_classes: int) -> dict[str, Any] | None:
        """The class make-up of the client's memory, recorded with every stream evaluation."""
        labels = state.get("labels")
        if not labels:
            return None
        counts = [0] * num_classes
        for label in labels:
            counts[int(label)] += 1
        return {"class_counts": counts}

    @hookimpl
    def client_update_memory(self, batch: torch.Tensor, ctx: ClientContext, state: dict[str, Any]) -> None:
        if ctx.online_iter is None or not batch.numel():
            return
        memory = self._memory(state)
        # One host sync per stream batch (not per step): the policy is sequential Python.
        indices, labels = torch.stack([batch, ctx.y_train[batch].to(batch.dtype)]).tolist()
        memory.extend(indices, labels, ctx.generator)
        self.view = None
