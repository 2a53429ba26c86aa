"""Evaluation of the global model (balanced test set), personalised models (local views), and
anytime evaluation of continual runs (test samples of the classes exposed so far).

One forward pass over the test set serves every measurement of a round; personalised evaluation
reuses it unless a plugin personalises the model itself (``client_personalize``). Plugins add
their own metrics through ``eval_metrics``, which also sees the evaluated inputs and the
evaluated classifier as a function of them (to attack or re-score them). With ``[eval.attack]``
the evaluator attacks the global model (and optionally each personalised one) itself and reports
``robust_*`` metrics (:mod:`fedlt.evaluation.attacks`). With ``[eval.ood]`` it scores the test set
and the out-of-distribution set (``eval_ood_score``, else MSP) and reports ``ood_*`` metrics
(:mod:`fedlt.evaluation.ood`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from fedlt.data.federated import FederatedData
from fedlt.data.views import ClientViews
from fedlt.errors import NonFiniteLossError, PluginError
from fedlt.evaluation.attacks import AttackSpec, Score, attack, robust_metrics, score_batched
from fedlt.evaluation.ood import DEFAULT_SCORE, check_scores, msp_score
from fedlt.hooks.context import EvalContext, frozen_config
from fedlt.hooks.dispatch import HookSet
from fedlt.hooks.recipe import LocalTraining
from fedlt.metrics.classification import (
    classification_metrics,
    personalized_accuracy,
    personalized_shot_accuracy,
    shot_groups,
)
from fedlt.metrics.noise import memorisation_metrics
from fedlt.metrics.ood import ood_group_metrics, ood_metrics
from fedlt.training.context import client_context
from fedlt.training.round import ClientTask

__all__ = ["PERSONALIZED_MASKS", "Configs", "Evaluator", "personal_mask"]


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

#: The personalised masks (``eval.personalized_mask`` other than "auto").
PERSONALIZED_MASKS = ("none", "test-classes", "train-classes")

#: Logit given to the classes a personalised mask hides: finite (FedLoGe's code uses -1e10), so
#: probabilities and calibration stay finite.
PERSONAL_MASKED = -1e9


def personal_mask(logits: torch.Tensor, mask: str, ctx: EvalContext) -> torch.Tensor:
    """``logits`` of a client's local view with the classes ``mask`` hides set to
    :data:`PERSONAL_MASKED`: ``"test-classes"`` those absent from the view
    (``ctx.test_class_counts == 0``), ``"train-classes"`` those the client has no training sample
    of (``ctx.local_class_counts == 0``), ``"none"`` none."""
    if mask == "none":
        return logits
    counts = ctx.test_class_counts if mask == "test-classes" else ctx.local_class_counts
    if counts is None:
        return logits
    hidden = torch.as_tensor(np.asarray(counts) == 0, device=logits.device)
    return logits.masked_fill(hidden, PERSONAL_MASKED)


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
        #: Which classifier the evaluation scores with (and diagnostics describe): the model's head,
        #: then each plugin's ``eval_logits`` in order.
        self.evaluated_head = " -> ".join(["model.head", *hooks.eval_logits.plugin_names])
        #: The personalised mask and who chose it ("eval.personalized_mask", a plugin, "default").
        self.personalized_mask, self.personalized_mask_source = self._resolve_mask(ev.personalized_mask)
        #: The attack of ``[eval.attack]``, or None.
        self.attack = AttackSpec.from_config(ev.attack)

    def _resolve_mask(self, setting: str) -> tuple[str, str]:
        """The personalised mask: the scenario's, or with ``"auto"`` the one a plugin's
        ``eval_personalized_mask`` asks for (checked here, before any round), else ``"none"``."""
        if setting != "auto":
            return setting, "eval.personalized_mask"
        hook = self.hooks.eval_personalized_mask
        if not hook:
            return "none", "default"
        mask = hook()
        if mask is None:
            return "none", "default"
        if mask not in PERSONALIZED_MASKS:
            raise PluginError(
                str(hook.winner),
                "eval_personalized_mask",
                f"returned {mask!r}; must be one of {', '.join(map(repr, PERSONALIZED_MASKS))} or None",
            )
        return mask, str(hook.winner)

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

    def _scorer(self, model: nn.Module, ctx: EvalContext, states, mask: bool = False) -> Score:
        """The evaluated classifier as a function of inputs: features, head, every ``eval_logits``
        (then the personalised mask when ``mask``), differentiable in the inputs."""

        def score(x: torch.Tensor) -> torch.Tensor:
            h = model.features(x)
            z = self._adjust(model.head(h), h, model, ctx, states)
            return personal_mask(z, self.personalized_mask, ctx) if mask else z

        return score

    def _robust(
        self, model, x, labels, ctx: EvalContext, states, mask: bool = False, spec: AttackSpec | None = None
    ) -> dict[str, Any]:
        """Classification metrics of the evaluated logits of ``x`` attacked by ``spec`` (default
        ``self.attack``; random start from ``(seed, "attack", round[, client])``)."""
        ev = self.scenario.eval
        x_adv = self._attacked(model, x, labels, ctx, states, mask, spec)
        return self._classification(
            score_batched(self._scorer(model, ctx, states, mask), x_adv, ev.batch_size), labels
        )

    def _classification(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        d, ev = self.data, self.scenario.eval
        return classification_metrics(
            logits, labels, d.num_classes, d.train_class_counts, ev.shot_rule, ev.shot_thresholds
        )

    def _attacked(
        self, model, x, labels, ctx: EvalContext, states, mask: bool = False, spec: AttackSpec | None = None
    ) -> torch.Tensor:
        """``x`` attacked by ``spec`` (default ``self.attack``) through the evaluated classifier."""
        spec = self.attack if spec is None else spec
        score = self._scorer(model, ctx, states, mask)
        return attack(score, x, labels, spec, ctx.generator_for("attack"), self.scenario.eval.batch_size)

    def _evaluated_head(self, model, features, ctx: EvalContext, states) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (C, d), bias (C,))`` of the affine map from features to the evaluated logits
        (``model.head`` then every ``eval_logits``): the chain evaluated at ``h = 0`` (the bias) and
        at each unit vector ``e_j`` (``b + W e_j``). Exact when the chain is affine in ``h``."""
        d = features.shape[1]
        probe = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(features.device, features.dtype)
        z = self._adjust(model.head(probe), probe, model, ctx, states)
        bias = z[0]
        return (z[1:] - bias).t().contiguous(), bias

    def _plugin_metrics(
        self, model, features, logits, labels, ctx: EvalContext, states, inputs: torch.Tensor
    ) -> dict[str, Any]:
        if not self.hooks.eval_metrics:
            return {}
        head = self._evaluated_head(model, features, ctx, states)
        found = self.hooks.eval_metrics(
            model=model,
            features=features,
            logits=logits,
            labels=labels,
            ctx=ctx,
            state=states,
            head=head,
            inputs=inputs,
            score=self._scorer(model, ctx, states),
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
            out.update(self._plugin_metrics(model, feats, logits, d.y_test, gctx, {}, d.x_test))
            out["evaluated_head"] = self.evaluated_head
            if self.attack is not None:
                out["attack"] = self.attack.describe()
                x_adv = self._attacked(model, d.x_test, d.y_test, gctx, {})
                adv_logits = score_batched(self._scorer(model, gctx, {}), x_adv, ev.batch_size)
                out.update(robust_metrics(self._classification(adv_logits, d.y_test)))
                if self.attack.detect != "none":
                    out.update(self._adv_detection(model, (feats, logits), (x_adv, adv_logits), gctx))
                if self.attack.also_fgsm:
                    out.update(self._fgsm_too(model, gctx, out["robust_accuracy"]))
            out.update(memorisation_metrics(model, d, ev.batch_size))  # [noise] only
            if d.x_ood is not None:
                out.update(self._ood(model, feats, logits, gctx))
        configs = configs if configs is not None else Configs({"round": round}, {})
        # Each client's accuracy under attack, filled by _personal when the attack covers them.
        robust_personal: list[float] | None = (
            [] if full and self.attack is not None and self.attack.personalized else None
        )
        personal = (
            self._personal(model, feats, raw, round, client_states, full, configs, robust_personal)
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
                out["personalized_mask"] = self.personalized_mask
                out["personalized_mask_source"] = self.personalized_mask_source
                out["personalized_client_accuracy"] = [
                    c / t if t else None for c, t in zip(correct, total, strict=True)
                ]
                cumulative = ev.shot_thresholds if ev.shot_rule == "cumulative" else None
                # Each client split by its own view's counts, as FedLoGe's code does.
                out.update(personalized_shot_accuracy(preds, labels, d.num_classes, cumulative))
                out.update(self._client_metric_summary(personal))
                if robust_personal is not None:
                    # Unweighted mean over clients, as personalized_accuracy.
                    out["robust_personalized_accuracy"] = (
                        float(np.mean(robust_personal)) if robust_personal else None
                    )
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

    def _fgsm_too(self, model, gctx: EvalContext, pgd_accuracy: float) -> dict[str, Any]:
        """``fgsm_robust_*`` of the global model and ``fgsm_pgd_gap``: FGSM-robust minus
        PGD-robust accuracy, near 0 for a robust model and large under catastrophic overfitting
        (the model masks FGSM's one gradient step while PGD still breaks it)."""
        d = self.data
        found = robust_metrics(
            self._robust(model, d.x_test, d.y_test, gctx, {}, spec=self.attack.fgsm()), "fgsm_robust_"
        )
        return {**found, "fgsm_pgd_gap": found["fgsm_robust_accuracy"] - pgd_accuracy}

    def _adv_detection(self, model, clean, attacked, gctx: EvalContext) -> dict[str, Any]:
        """``adv_detection_*``: the run's OOD score separating clean test samples (positive) from
        their attacked copies, over the pairs ``eval.attack.detect`` keeps (docs/robustness.md).
        ``clean``: the test set's (features, evaluated logits); ``attacked``: (inputs, logits)."""
        d = self.data
        (feats, logits), (x_adv, adv_logits) = clean, attacked
        adv_feats, _ = _forward(model, x_adv, self.scenario.eval.batch_size)
        s_clean, s_adv, name = self._paired_scores(
            model,
            ("the clean test set", feats, logits, d.x_test, gctx),
            ("its attacked copy", adv_feats, adv_logits, x_adv, gctx),
        )
        keep = torch.ones_like(d.y_test, dtype=torch.bool)
        if self.attack.detect == "successful":  # correct on the clean sample, fooled on its copy
            keep = (logits.argmax(1) == d.y_test) & (adv_logits.argmax(1) != d.y_test)
        keep = keep.cpu()
        found = ood_metrics(s_clean[keep].numpy(), s_adv[keep].numpy())
        out = {f"adv_detection_{k.removeprefix('ood_')}": v for k, v in found.items()}
        return {**out, "adv_detection_n": int(keep.sum()), "adv_detection_score": name}

    def _paired_scores(self, model, first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Two sets' OOD scores and the score's name; each set is ``(what, features, logits, inputs,
        ctx)``. Both must come from the same score: two different scores cannot be compared."""
        s_first, name = self._ood_scores(model, *first[1:])
        s_second, second_name = self._ood_scores(model, *second[1:])
        if second_name != name:
            raise PluginError(
                name if name != DEFAULT_SCORE else second_name,
                "eval_ood_score",
                f"scored {first[0]} with {name!r} but {second[0]} with {second_name!r}; "
                "return a score (or None) for both",
            )
        return s_first, s_second, name

    def _ood_scores(self, model, features, logits, inputs, ctx: EvalContext) -> tuple[torch.Tensor, str]:
        """The OOD score of each sample (higher: in-distribution) and its name: the first
        ``eval_ood_score``, else MSP."""
        hook = self.hooks.eval_ood_score
        if hook:
            found = hook(
                model=model,
                features=features,
                logits=logits,
                inputs=inputs,
                score=self._scorer(model, ctx, {}),
                ctx=ctx,
            )
            if found is not None:
                return check_scores(found, inputs.shape[0], str(hook.winner)), str(hook.winner)
        return msp_score(logits).cpu(), DEFAULT_SCORE

    def _ood(self, model, feats, logits, gctx: EvalContext) -> dict[str, Any]:
        """``ood_*`` metrics of the global model: the in-distribution test set against ``x_ood``,
        overall and per shot group (``ood_head_auroc``...; docs/ood.md)."""
        d = self.data
        o_feats, o_raw = _forward(model, d.x_ood, self.scenario.eval.batch_size)
        octx = dataclasses.replace(gctx, test_class_counts=np.zeros(d.num_classes, dtype=np.int64))
        o_logits = self._adjust(o_raw, o_feats, model, octx, {})
        s_in, s_out, name = self._paired_scores(
            model,
            ("the in-distribution set", feats, logits, d.x_test, gctx),
            ("the OOD set", o_feats, o_logits, d.x_ood, octx),
        )
        by_group = ood_group_metrics(s_in.numpy(), d.y_test.cpu().numpy(), s_out.numpy(), self.shot_groups)
        return {
            **ood_metrics(s_in.numpy(), s_out.numpy()),
            **by_group,
            "ood_score": name,
            "ood_kind": d.ood["kind"],
        }

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
        self,
        model,
        feats,
        raw,
        round,
        client_states,
        full: bool,
        configs: Configs,
        robust: list[float] | None = None,
    ) -> list[tuple[int, torch.Tensor, dict[str, Any]]]:
        """(client, logits on its local view, its plugin metrics) for every client with a view.

        ``robust``: when a list, each client's accuracy on its view under ``self.attack`` (its
        personalised model, masked logits) is appended to it."""
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
            needs_x = personalize or robust is not None or (full and bool(self.hooks.eval_metrics))
            x = d.x_test.index_select(0, idx) if needs_x else None
            if personalize:
                local = self._personal_model(model, k, round, states, configs.of(k))
                h, z = _forward(local, x, self.scenario.eval.batch_size)
            else:
                local, h, z = model, feats.index_select(0, idx), raw.index_select(0, idx)
            z = personal_mask(self._adjust(z, h, local, ctx, states), self.personalized_mask, ctx)
            metrics = self._plugin_metrics(local, h, z, labels, ctx, states, x) if full else {}
            if robust is not None:
                robust.append(self._robust(local, x, labels, ctx, states, mask=True)["accuracy"])
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
