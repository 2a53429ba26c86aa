"""Evaluation of the global model (balanced test set), personalised models (local views), and
anytime evaluation of continual runs (test samples of the classes exposed so far).

One forward pass over the test set serves every measurement of a round; personalised evaluation
reuses it unless a plugin personalises the model itself (``client_personalize``). Plugins add
their own metrics through ``eval_metrics``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from fedlt.data.federated import FederatedData
from fedlt.data.views import ClientViews
from fedlt.errors import NonFiniteLossError
from fedlt.hooks.context import EvalContext, frozen_config
from fedlt.hooks.dispatch import HookSet
from fedlt.hooks.recipe import LocalTraining
from fedlt.metrics.classification import (
    classification_metrics,
    personalized_accuracy,
    personalized_shot_accuracy,
    shot_groups,
)
from fedlt.training.context import client_context
from fedlt.training.round import ClientTask

__all__ = ["Configs", "Evaluator"]


class Configs(NamedTuple):
    """The configs the server gave clients in the evaluated round: the round's config (what every
    client gets) and each selected client's own (the round's merged with its per-client config)."""

    round: Mapping[str, Any]
    clients: Mapping[int, Mapping[str, Any]]

    def of(self, client: int) -> Mapping[str, Any]:
        """The config ``client`` got this round, or would have got: the round's config."""
        return self.clients.get(client, self.round)


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

    def __init__(self, scenario: Any, data: FederatedData, hooks: HookSet, views: ClientViews) -> None:
        self.scenario = scenario
        self.data = data
        self.hooks = hooks
        self.views = views
        self.recipe = LocalTraining.from_scenario(scenario)
        self._scratch: nn.Module | None = None
        ev = scenario.eval
        self.shot_groups = shot_groups(data.train_class_counts, ev.shot_rule, ev.shot_thresholds)

    def _ctx(self, round: int, client_id: int | None, labels: torch.Tensor) -> EvalContext:
        d = self.data
        return EvalContext(
            round=round,
            n_rounds=self.scenario.federation.rounds,
            num_classes=d.num_classes,
            client_id=client_id,
            local_class_counts=None if client_id is None else self.views.seen_counts(client_id),
            global_class_counts=d.train_class_counts,
            test_class_counts=np.bincount(labels.cpu().numpy(), minlength=d.num_classes),
            shot_groups=self.shot_groups,
            seed=self.scenario.seed,
        )

    def _adjust(self, logits, features, model, ctx: EvalContext, states) -> torch.Tensor:
        if not self.hooks.eval_logits:
            return logits
        return self.hooks.eval_logits(logits=logits, features=features, model=model, ctx=ctx, state=states)

    def _plugin_metrics(self, model, features, logits, labels, ctx: EvalContext, states) -> dict[str, Any]:
        if not self.hooks.eval_metrics:
            return {}
        found = self.hooks.eval_metrics(
            model=model, features=features, logits=logits, labels=labels, ctx=ctx, state=states
        )
        return {
            f"{plugin}.{name}": value for plugin, values in found.items() for name, value in values.items()
        }

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        round: int,
        client_states: dict[int, dict[str, dict]],
        full: bool = True,
        anytime: bool = False,
        per_client_classes: bool = False,
        configs: Configs | None = None,
    ) -> dict[str, Any]:
        """Metrics for ``model`` after ``round`` as plain JSON-ready values.

        ``full``: the imbalance metrics on the whole test set (and personalised accuracy).
        ``anytime`` (continual runs): the accuracy on test samples of the classes exposed so far
        (logits of unexposed classes masked), and the personalised anytime accuracy on each
        client's view restricted to the classes it has read; with ``per_client_classes`` also
        each client's per-class accuracy there (``anytime_client_per_class``, for per-client
        forgetting). ``configs``: the round's client configs, which ``client_personalize`` sees in
        ``ctx.config`` (the round's config for a client not selected).
        """
        d, ev = self.data, self.scenario.eval
        was_training = model.training
        model.eval()
        feats, raw = _forward(model, d.x_test, ev.batch_size)
        if not bool(torch.isfinite(raw).all()):
            raise NonFiniteLossError(round, None, self.hooks.names, float(raw[~torch.isfinite(raw)][0]))
        gctx = self._ctx(round, None, d.y_test)
        logits = self._adjust(raw, feats, model, gctx, {})
        out: dict[str, Any] = {}
        if full:
            out.update(
                classification_metrics(
                    logits, d.y_test, d.num_classes, d.train_class_counts, ev.shot_rule, ev.shot_thresholds
                )
            )
            out.update(self._plugin_metrics(model, feats, logits, d.y_test, gctx, {}))
        configs = configs if configs is not None else Configs({"round": round}, {})
        personal = (
            self._personal(model, feats, raw, round, client_states, full, configs)
            if ev.personalized
            else None
        )
        if full:
            out["personalized_accuracy"] = None
            if personal is not None:
                # Each client's predictions and labels on its view, once, for every metric below.
                preds = [z.argmax(1).cpu().numpy() for _, z, _ in personal]
                labels = [self._view_labels(k).cpu().numpy() for k, _, _ in personal]
                correct = [int((p == y).sum()) for p, y in zip(preds, labels, strict=True)]
                total = [y.size for y in labels]
                out["personalized_accuracy"] = personalized_accuracy(correct, total)
                out["personalized_client_accuracy"] = [
                    c / t if t else None for c, t in zip(correct, total, strict=True)
                ]
                cumulative = ev.shot_thresholds if ev.shot_rule == "cumulative" else None
                # Each client split by its own view's counts, as FedLoGe's code does.
                out.update(personalized_shot_accuracy(preds, labels, d.num_classes, cumulative))
                out.update(self._client_metric_summary(personal))
        if anytime:
            exposed = self.views.exposed_classes()
            out.update(self._anytime(logits, exposed))
            if personal is not None:
                seen = {k: self.views.seen_counts(k) > 0 for k, _, _ in personal}
                pairs = [self._client_correct(z, k, seen[k]) for k, z, _ in personal]
                out["anytime_personalized_accuracy"] = personalized_accuracy(*zip(*pairs, strict=True))
                if per_client_classes:
                    out["anytime_client_per_class"] = {
                        str(k): self._client_per_class(z, k, seen[k]) for k, z, _ in personal
                    }
        model.train(was_training)
        return out

    def _anytime(self, logits: torch.Tensor, exposed: np.ndarray) -> dict[str, Any]:
        d = self.data
        allowed = torch.as_tensor(exposed, device=logits.device)
        correct, total = _masked_accuracy(logits, d.y_test, allowed)
        per_class: list[float | None] = []
        pred = logits.masked_fill(~allowed, MASKED).argmax(1)
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

    def _view_labels(self, k: int) -> torch.Tensor:
        view = self.data.test_views[k]
        return self.data.y_test[torch.as_tensor(view, device=self.data.y_test.device)]

    def _client_correct(self, logits: torch.Tensor, k: int, seen: np.ndarray | None) -> tuple[int, int]:
        y = self._view_labels(k)
        if y.numel() == 0:
            return 0, 0
        if seen is None:
            return int((logits.argmax(1) == y).sum()), int(y.numel())
        return _masked_accuracy(logits, y, torch.as_tensor(seen, device=logits.device))

    def _client_per_class(self, logits: torch.Tensor, k: int, seen: np.ndarray) -> list[float | None]:
        """Per-class accuracy on client ``k``'s view, unseen classes masked (``None``: class not in
        the view or not yet seen)."""
        y = self._view_labels(k)
        allowed = torch.as_tensor(seen, device=logits.device)
        pred = logits.masked_fill(~allowed, MASKED).argmax(1)
        out: list[float | None] = []
        for c in range(self.data.num_classes):
            mask = y == c
            out.append(float((pred[mask] == c).float().mean()) if seen[c] and bool(mask.any()) else None)
        return out

    def _personal(
        self, model, feats, raw, round, client_states, full: bool, configs: Configs
    ) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """(client, logits on its local view, its plugin metrics) for every client with a view."""
        d = self.data
        personalize = self.hooks.implements("client_personalize")
        out = []
        for k, view in enumerate(d.test_views):
            if len(view) == 0:
                continue
            idx = torch.as_tensor(view, device=d.y_test.device)
            labels = d.y_test.index_select(0, idx)
            ctx = self._ctx(round, k, labels)
            # Plugins may read but not change a client's state during evaluation.
            states = copy.deepcopy(client_states.get(k, {}))
            if personalize:
                local = self._personal_model(model, k, round, states, configs.of(k))
                h, z = _forward(local, d.x_test.index_select(0, idx), self.scenario.eval.batch_size)
            else:
                local, h, z = model, feats.index_select(0, idx), raw.index_select(0, idx)
            z = self._adjust(z, h, local, ctx, states)
            metrics = self._plugin_metrics(local, h, z, labels, ctx, states) if full else {}
            out.append((k, z, metrics))
        return out

    def _personal_model(
        self, model: nn.Module, client_id: int, round: int, states, config: Mapping[str, Any]
    ) -> nn.Module:
        """A scratch copy of ``model`` personalised by the plugins for ``client_id``, on the data
        the client has read so far.

        The context is the client's as training builds it, with the config the server gave it
        this round, and a generator of its own purpose (``"personalize"``), so personalising never
        replays the draws of the client's training in the same round.
        """
        if self._scratch is None:
            self._scratch = copy.deepcopy(model)
        scratch = self._scratch
        scratch.load_state_dict(model.state_dict())
        task = ClientTask(
            client_id,
            round,
            frozen_config(config),
            indices=self.views.seen_indices(client_id),
            seen_counts=self.views.seen_counts(client_id),
        )
        ctx = client_context(
            self.scenario,
            self.data,
            task,
            self.data.x_train.device,
            self.recipe,
            streaming=False,
            purpose="personalize",
        )
        hooks = self.hooks.for_client(client_id, round, states, streaming=False)
        with torch.enable_grad():
            hooks.client_personalize(model=scratch, ctx=ctx)
        scratch.eval()
        return scratch

    @staticmethod
    def _client_metric_summary(personal: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
        """Plugin metrics of the client views: lists by client, and the mean of numeric ones."""
        names = sorted({name for _, _, m in personal for name in m})
        if not names:
            return {}
        by_client = {name: [m.get(name) for _, _, m in personal] for name in names}
        out: dict[str, Any] = {"client_metrics": {"clients": [k for k, _, _ in personal], **by_client}}
        for name, values in by_client.items():
            numeric = [v for v in values if isinstance(v, Real) and not isinstance(v, bool)]
            if numeric:
                out[f"personalized.{name}"] = float(np.mean(numeric))
        return out
