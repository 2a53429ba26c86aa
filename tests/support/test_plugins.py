"""Plugins used only by tests, loadable in worker processes via $FEDLT_EXTRA_PLUGINS."""

from __future__ import annotations

import torch
from pydantic import BaseModel

from fedlt import Plugin, hookimpl


class AlwaysFails(Plugin):
    """Raises in client_loss on every call: exercises retries and error attribution."""

    @hookimpl
    def client_loss(self, logits, y):
        raise RuntimeError("deliberate failure")


class LocalCounter(Plugin):
    """Keeps a per-client counter and a per-client tensor in state, so engines must ship state."""

    @hookimpl
    def client_start(self, ctx, state):
        state["rounds"] = state.get("rounds", 0) + 1
        state["bias"] = state.get("bias", torch.zeros(ctx.num_classes)) + torch.as_tensor(
            ctx.local_class_counts, dtype=torch.float32
        )

    @hookimpl
    def client_transform_logits(self, logits, ctx, state):
        # Depends on the state, so a lost or stale state changes the numbers.
        return logits + 1e-3 * state["bias"].to(logits.device) * state["rounds"]


class Pause(Plugin):
    """Sleeps after each aggregation, so a test can kill a run between its checkpoints."""

    class Params(BaseModel):
        model_config = {"extra": "forbid"}
        seconds: float = 0.2

    @hookimpl
    def server_after_aggregate(self):
        import time

        time.sleep(self.params.seconds)
