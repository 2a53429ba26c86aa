"""Evaluation of the global model (balanced test set), personalised models (local views), and
anytime evaluation of continual runs (test samples of the classes exposed so far).

One forward pass over the test set serves every measurement of a round; personalised evaluation
reuses it unless a plugin personalises the model itself (``client_personalize``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlt.client import ClientTask
from fedlt.context import EvalContext
from fedlt.data.federated import FederatedData
from fedlt.errors import NonFiniteLossError
from fedlt.metrics import classification_metrics, personalized_accuracy
from fedlt.pluginmanager import HookSet
from fedlt.worker import client_context

__all__ = ["Evaluator"]

#: Logit given to classes a continual evaluation masks out (not yet exposed / not seen).
MASKED = float("-inf")


@torch.no_grad()
def _forward(model: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for i in range(0, x.shape[0], batch_size):
        h = model.features(x[i : i + batch_size])
        feats.append(h)
        logits.append(model.head(h))
    return torch.cat(feats), torch.cat(logits)


def _masked_accuracy(logits: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> tuple[int, int]:
    """Correct/total over samples whose class is allowed, with the other classes' logits masked."""
    keep = allowed[y]
    if not bool(keep.any()):
        return 0, 0
    z = logits[keep].masked_fill(~allowed, MASKED)
    return int((z.argmax(1) == y[keep]).sum()), int(keep.sum())


class Evaluator:
    """Measures a model after a round."""

    def __init__(self, scenario: Any, data: FederatedData, hooks: HookSet) -> None:
        self.scenario = scenario
        self.data = data
        self.hooks = hooks
        self._scratch: nn.Module | None = None

    def _ctx(self, round: int, client_id: int | None) -> EvalContext:
        d = self.data
        return EvalContext(
            round=round,
            num_classes=d.num_classes,
            client_id=client_id,
            local_class_counts=None if client_id is None else d.client_counts[client_id],
            global_class_counts=d.train_class_counts,
        )

    def _adjust(self, logits, features, model, round, client_id, states) -> torch.Tensor:
        if not self.hooks.eval_logits:
            return logits
        return self.hooks.eval_logits.chain(
            "logits",
            logits=logits,
            features=features,
            model=model,
            ctx=self._ctx(round, client_id),
            states=states,
        )

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        round: int,
        client_states: dict[int, dict[str, dict]],
        full: bool = True,
        exposed: np.ndarray | None = None,
        client_seen: list[np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Metrics for ``model`` after ``round`` as plain JSON-ready values.

        ``full``: the imbalance metrics on the whole test set (and personalised accuracy).
        ``exposed`` (continual runs): also the anytime accuracy on test samples of the exposed
        classes, logits of unexposed classes masked; ``client_seen`` gives each client's seen
        classes for the personalised anytime accuracy.
        """
        d, ev = self.data, self.scenario.eval
        was_training = model.training
        model.eval()
        feats, raw = _forward(model, d.x_test, ev.batch_size)
        if not bool(torch.isfinite(raw).all()):
            raise NonFiniteLossError(round, None, self.hooks.names, float(raw[~torch.isfinite(raw)][0]))
        logits = self._adjust(raw, feats, model, round, None, {})
        out: dict[str, Any] = {}
        if full:
            out.update(
                classification_metrics(
                    logits, d.y_test, d.num_classes, d.train_class_counts, ev.shot_rule, ev.shot_thresholds
                )
            )
        personal = self._personal_logits(model, feats, raw, round, client_states) if ev.personalized else None
        if full:
            out["personalized_accuracy"] = None
            if personal is not None:
                correct, total = zip(*(self._client_correct(z, k, None) for k, z in personal), strict=True)
                out["personalized_accuracy"] = personalized_accuracy(correct, total)
                out["personalized_client_accuracy"] = [
                    c / t if t else None for c, t in zip(correct, total, strict=True)
                ]
        if exposed is not None:
            out.update(self._anytime(logits, exposed))
            if personal is not None and client_seen is not None:
                pairs = [self._client_correct(z, k, client_seen[k]) for k, z in personal]
                out["anytime_personalized_accuracy"] = personalized_accuracy(*zip(*pairs, strict=True))
        model.train(was_training)
        return out

    def _anytime(self, logits: torch.Tensor, exposed: np.ndarray) -> dict[str, Any]:
        d = self.data
        allowed = torch.as_tensor(exposed, device=logits.device)
        correct, total = _masked_accuracy(logits, d.y_test, allowed)
        per_class: list[float | None] = []
        z = logits.masked_fill(~allowed, MASKED)
        pred = z.argmax(1)
        for c in range(d.num_classes):
            mask = d.y_test == c
            per_class.append(
                float((pred[mask] == c).float().mean()) if exposed[c] and bool(mask.any()) else None
            )
        return {
            "anytime_accuracy": correct / total if total else None,
            "anytime_per_class_accuracy": per_class,
            "exposed_classes": [int(c) for c in np.flatnonzero(exposed)],
        }

    # ------------------------------------------------------------------ personalised

    def _client_correct(self, logits: torch.Tensor, k: int, seen: np.ndarray | None) -> tuple[int, int]:
        view = self.data.test_views[k]
        if len(view) == 0:
            return 0, 0
        y = self.data.y_test[torch.as_tensor(view, device=self.data.y_test.device)]
        if seen is None:
            return int((logits.argmax(1) == y).sum()), len(view)
        return _masked_accuracy(logits, y, torch.as_tensor(seen, device=logits.device))

    def _personal_logits(self, model, feats, raw, round, client_states) -> list[tuple[int, torch.Tensor]]:
        """(client, logits on its local view) for every client with a non-empty view."""
        d = self.data
        personalize = self.hooks.client_personalize
        out = []
        for k, view in enumerate(d.test_views):
            if len(view) == 0:
                continue
            idx = torch.as_tensor(view, device=d.y_test.device)
            # Plugins may read but not change a client's state during evaluation.
            states = copy.deepcopy(client_states.get(k, {}))
            if personalize:
                local = self._personal_model(model, k, round, states)
                h, z = _forward(local, d.x_test[idx], self.scenario.eval.batch_size)
                z = self._adjust(z, h, local, round, k, states)
            else:
                z = self._adjust(raw[idx], feats[idx], model, round, k, states)
            out.append((k, z))
        return out

    def _personal_model(self, model: nn.Module, client_id: int, round: int, states) -> nn.Module:
        if self._scratch is None:
            self._scratch = copy.deepcopy(model)
        scratch = self._scratch
        scratch.load_state_dict(model.state_dict())
        ctx = client_context(
            self.scenario, self.data, ClientTask(client_id, round, {}), self.data.x_train.device
        )
        with torch.enable_grad():
            self.hooks.client_personalize.all(model=scratch, ctx=ctx, states=states)
        scratch.eval()
        return scratch
