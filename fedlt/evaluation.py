"""Evaluation of the global model (balanced test set) and personalised models (local views)."""

from __future__ import annotations

import copy
from typing import Any

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


@torch.no_grad()
def _forward(model: nn.Module, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, logits = [], []
    for i in range(0, x.shape[0], batch_size):
        h = model.features(x[i : i + batch_size])
        feats.append(h)
        logits.append(model.head(h))
    return torch.cat(feats), torch.cat(logits)


class Evaluator:
    """Measures a model; personalised evaluation reuses the global forward pass when it can."""

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
        self, model: nn.Module, round: int, client_states: dict[int, dict[str, dict]]
    ) -> dict[str, Any]:
        """All metrics for ``model`` after ``round``; plain JSON-ready values."""
        d, ev = self.data, self.scenario.eval
        was_training = model.training
        model.eval()
        feats, raw = _forward(model, d.x_test, ev.batch_size)
        if not bool(torch.isfinite(raw).all()):
            raise NonFiniteLossError(round, None, self.hooks.names, float(raw[~torch.isfinite(raw)][0]))
        logits = self._adjust(raw, feats, model, round, None, {})
        out = classification_metrics(
            logits, d.y_test, d.num_classes, d.train_class_counts, ev.shot_rule, ev.shot_thresholds
        )
        if ev.personalized:
            correct, total = self._personalized(model, feats, raw, round, client_states)
            out["personalized_accuracy"] = personalized_accuracy(correct, total)
            out["personalized_client_accuracy"] = [
                c / t if t else None for c, t in zip(correct, total, strict=True)
            ]
        else:
            out["personalized_accuracy"] = None
        model.train(was_training)
        return out

    def _personalized(self, model, feats, raw, round, client_states) -> tuple[list[int], list[int]]:
        d = self.data
        personalize = self.hooks.client_personalize
        correct, total = [], []
        for k, view in enumerate(d.test_views):
            if len(view) == 0:
                correct.append(0)
                total.append(0)
                continue
            idx = torch.as_tensor(view, device=d.y_test.device)
            # Plugins may read but not change a client's state during evaluation.
            states = {p: dict(s) for p, s in client_states.get(k, {}).items()}
            if personalize:
                local = self._personal_model(model, k, round, states)
                h, z = _forward(local, d.x_test[idx], self.scenario.eval.batch_size)
                z = self._adjust(z, h, local, round, k, states)
            else:
                h, z = feats[idx], raw[idx]
                z = self._adjust(z, h, model, round, k, states)
            correct.append(int((z.argmax(1) == d.y_test[idx]).sum()))
            total.append(len(view))
        return correct, total

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
