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


class Recorder(Plugin):
    """Records what each server update's aggregation sees (ctx.arrivals), leaving the default rule."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.seen: list[dict] = []

    @hookimpl
    def server_make_aggregator(self, ctx):
        self.seen.append(
            {
                "round": ctx.round,
                "mode": ctx.mode,
                "t": ctx.virtual_time,
                "arrivals": [(a.client_id, a.staleness, a.base_version, a.refreshed) for a in ctx.arrivals],
            }
        )


class PickLowest(Plugin):
    """Selects the lowest-numbered candidates; ``bad`` makes it break the hook's contract."""

    class Params(BaseModel):
        model_config = {"extra": "forbid"}
        bad: str = ""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.calls: list[tuple[list[int], int]] = []

    @hookimpl
    def server_select_clients(self, candidates, k, ctx):
        self.calls.append((list(candidates), k))
        bad = self.params.bad
        if bad == "stranger":
            return [max(candidates) + 100]
        if bad == "twice":
            return [candidates[0], candidates[0]]
        if bad == "many":
            return list(candidates)[: k + 1] if len(candidates) > k else [*candidates, 999]
        if bad == "empty":
            return []
        return list(candidates)[:k]


class RefreshToGlobal(Plugin):
    """Rewrites every stale update as 'no change' (the current global weights)."""

    @hookimpl
    def server_refresh_update(self, global_weights):
        return {k: v.clone() for k, v in global_weights.items()}


class HoldTwo(Plugin):
    """An aggregator that holds updates across server updates: applies the mean of every two."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.held: list[dict] = []

    @hookimpl
    def server_make_aggregator(self, global_weights):
        plugin = self

        class Hold:
            def add(self, weights, n_samples, client_id):
                plugin.held.append({k: v.detach().clone() for k, v in weights.items()})

            def result(self):
                if len(plugin.held) < 2:
                    return None
                keys = [k for k, v in global_weights.items() if v.is_floating_point()]
                mean = {k: sum(h[k] for h in plugin.held) / len(plugin.held) for k in keys}
                plugin.held = []
                return mean

        return Hold()

    def state_dict(self):
        return {"held": self.held}

    def load_state_dict(self, state):
        self.held = list(state.get("held", []))


class KeepUpdates(Plugin):
    """Keeps a copy of every update it is given and leaves the model as it is."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.updates: list[tuple[int, dict]] = []

    @hookimpl
    def server_make_aggregator(self):
        plugin = self

        class Keep:
            def add(self, weights, n_samples, client_id):
                plugin.updates.append((client_id, {k: v.detach().clone() for k, v in weights.items()}))

            def result(self):
                return None

        return Keep()
