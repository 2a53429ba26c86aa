"""FedLoGe's global and local adaptive feature realignment, GLA-FR (Xiao et al., ICLR 2024).

Two heads ride on the backbone's features, both trained on *detached* features so they never
train the backbone (with ``sse-c`` the frozen sparse ETF alone drives it):

- an auxiliary global head ``gla_aux`` (a submodule added to the model, so trained locally and
  FedAvg-aggregated like the rest of the model);
- a per-client local head that lives in the client's plugin ``state``: trained by the local
  optimizer, checkpointed with the client, never sent to the server.

Neither is used as trained; evaluation realigns them without further training:

- global (generic model): w_c <- gamma * w_c^aux / ||w_c^aux||, logits = W h + b^aux. Equal row
  norms remove the head-class bias that FedAvg leaves in the norms of the aux head's rows.
- personalised (client k): w_{k,c} <- w_c^aux * ||l_{k,c}|| (norm transfer from the local head),
  logits = l_k(h) + W_k h + b^aux. The personalised mask (classes the client never saw, by
  default) is asked of the evaluator (``eval_personalized_mask``), which applies and records it.

Randomness: the aux head's initial weights come from ``SetupContext.generator`` (stream
``"configure-model"``); each client's local head is initialised at its first round from its own
stream ``ctx.generator_for("gla-fr-local-head", per_round=False)``, so the client's sample order
(``ctx.generator``) is the same as in a run without gla-fr.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import ClientContext, EvalContext, Plugin, SetupContext, hookimpl

__all__ = [
    "AUX_NAME",
    "GLAFR",
    "LOCAL_HEAD_STREAM",
    "MASKS",
    "MASK_VALUE",
    "global_realign",
    "initial_local_head",
    "local_realign",
    "mask_absent_classes",
]

#: Name of the auxiliary global head added to the model (its state-dict keys start with it).
AUX_NAME = "gla_aux"

#: Logit given to classes a client has no training samples of (finite, so metrics stay finite).
MASK_VALUE = -1e9

#: GLA-FR's ``mask`` parameter as the evaluator's personalised mask (``eval.personalized_mask``).
MASKS = {"train": "train-classes", "test": "test-classes", "none": "none"}

#: The stream of a client's initial local head (``ClientContext.generator_for(..., per_round=False)``).
LOCAL_HEAD_STREAM = "gla-fr-local-head"


# --------------------------------------------------------------------------- pure helpers


def linear_init(
    out_features: int, in_features: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's default initialisation, drawn from ``generator``: U(-1/sqrt(d), 1/sqrt(d)) for
    weight (kaiming_uniform with a=sqrt(5)) and bias."""
    bound = 1.0 / math.sqrt(in_features)
    weight = (torch.rand(out_features, in_features, generator=generator) * 2.0 - 1.0) * bound
    bias = (torch.rand(out_features, generator=generator) * 2.0 - 1.0) * bound
    return weight, bias


def initial_local_head(ctx: EvalContext, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``ctx.client_id``'s local head before its first round: what ``client_start`` draws
    from the client's stream ``(seed, "gla-fr-local-head", client)``."""
    return linear_init(ctx.num_classes, in_features, ctx.generator_for(LOCAL_HEAD_STREAM, per_round=False))


def global_realign(aux_weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """Rows rescaled to the same norm: w_c <- gamma * w_c / ||w_c|| (a zero row stays zero)."""
    norms = aux_weight.norm(dim=1, keepdim=True).clamp_min(torch.finfo(aux_weight.dtype).tiny)
    return gamma * aux_weight / norms


def local_realign(aux_weight: torch.Tensor, local_weight: torch.Tensor) -> torch.Tensor:
    """Norm transfer: w_{k,c} <- w_c^aux * ||l_{k,c}|| (raw aux rows, as in FedLoGe's code)."""
    return aux_weight * local_weight.norm(dim=1, keepdim=True)


def mask_absent_classes(logits: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    """Logits with every class of zero count set to :data:`MASK_VALUE`."""
    absent = torch.as_tensor(np.asarray(counts) == 0, device=logits.device)
    return logits.masked_fill(absent, MASK_VALUE)


def head_metrics(pred: torch.Tensor, labels: torch.Tensor, ctx: EvalContext) -> dict[str, float | None]:
    """Accuracy, balanced accuracy and head/medium/tail accuracy (the run's split, from
    ``ctx.shot_groups``) of predictions: mean per-class recall over the classes present."""
    correct = (pred == labels).double()
    recall = {}
    for c in range(ctx.num_classes):
        mask = labels == c
        if bool(mask.any()):
            recall[c] = float(correct[mask].mean())

    def mean(classes: Any) -> float | None:
        values = [recall[c] for c in classes if c in recall]
        return float(np.mean(values)) if values else None

    out = {"accuracy": float(correct.mean()) if len(labels) else None, "balanced_accuracy": mean(recall)}
    for group in ("head", "medium", "tail"):
        out[f"{group}_accuracy"] = mean(ctx.shot_groups.get(group, ()))
    return out


# --------------------------------------------------------------------------- plugin


class GLAFRParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gamma: float = Field(1.7, gt=0, description="Row norm of the globally realigned aux head (FedLoGe: 1.7).")
    global_head: Literal["realigned", "sse-c", "both"] = Field(
        "both",
        description="Which head the global evaluation reports: 'realigned' (the auxiliary head with rows "
        "rescaled to gamma, the paper's generic model), 'sse-c' (the model's own head, e.g. the frozen "
        "SSE-C; what the authors' logs measure), or 'both' (realigned as the main metrics, the model "
        "head's as gla-fr.sse_c_*).",
    )
    personal_head: Literal["norm-transfer", "local+aux"] = Field(
        "norm-transfer",
        description="Personalised logits: 'norm-transfer' = l_k(h) + W_k h + b_aux with w_{k,c} = "
        "w_c^aux ||l_{k,c}|| (the paper's GLA-FR), 'local+aux' = l_k(h) + aux(h) (the authors' code "
        "for their logged local accuracy).",
    )
    mask: Literal["train", "test", "none"] = Field(
        "train",
        description="The personalised mask GLA-FR asks the evaluator for (eval.personalized_mask = "
        "'auto'): logit -1e9 for the classes the client has no training samples of ('train'), or that "
        "are absent from its local test view ('test', the authors' code), or no mask. An explicit "
        "eval.personalized_mask overrides it; every record states the mask used.",
    )


class GLAFR(Plugin):
    """GLA-FR, the realignment half of FedLoGe (Xiao et al., ICLR 2024, arXiv 2401.08977).

    Training adds CE(gla_aux(h.detach()), y) + CE(l_k(h.detach()), y): an aggregated auxiliary
    head and a per-client local head l_k (kept in the client's state, never sent). Evaluation:
    generic logits = W^G h + b^aux with w_c^G = gamma * w_c^aux / ||w_c^aux||; client k's logits =
    l_k(h) + W_k h + b^aux with w_{k,c} = w_c^aux * ||l_{k,c}|| (or the authors' l_k(h) + aux(h)),
    absent classes masked (by the evaluator, which asks GLA-FR for its ``mask``). Both *replace*
    the model head's logits. FedLoGe = ``sse-c`` + ``gla-fr``.

    A client that has never trained has no local head yet: with ``personal_head = "local+aux"``
    (the authors' code) its logits are those of its randomly initialised local head (the head it
    would get at its first round) plus the raw auxiliary head; with ``"norm-transfer"`` the
    generic (realigned) model.

    The authors' logged global accuracy is that of the frozen SSE-C head (the model's own head),
    not of the realigned one: with ``global_head = "both"`` every evaluation reports the realigned
    head as the main metrics and the model head's as ``gla-fr.sse_c_accuracy``,
    ``gla-fr.sse_c_balanced_accuracy`` and ``gla-fr.sse_c_{head,medium,tail}_accuracy``.
    """

    Params = GLAFRParams
    vectorized = True
    requires = frozenset({"head"})

    # ------------------------------------------------------------------ model

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: SetupContext) -> None:
        if hasattr(model, AUX_NAME):
            raise ValueError(f"the model already has a {AUX_NAME!r} module; another plugin added one")
        d, c = int(model.head.in_features), int(ctx.num_classes)
        aux = torch.nn.utils.skip_init(nn.Linear, d, c, device=model.head.weight.device)
        weight, bias = linear_init(c, d, ctx.generator)
        with torch.no_grad():
            aux.weight.copy_(weight)
            aux.bias.copy_(bias)
        model.add_module(AUX_NAME, aux)

    # ------------------------------------------------------------------ client round

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
        if "local_weight" not in state:
            # The client's first round. A stream of its own (not ctx.generator) leaves the
            # client's sample order exactly as in a run without gla-fr.
            g = ctx.generator_for(LOCAL_HEAD_STREAM, per_round=False)
            state["local_weight"], state["local_bias"] = linear_init(
                int(ctx.num_classes), int(model.head.in_features), g
            )
        # Fresh leaves on the training device; the optimizer updates them in place.
        weight = state["local_weight"].detach().to(ctx.device, copy=True).requires_grad_(True)
        bias = state["local_bias"].detach().to(ctx.device, copy=True).requires_grad_(True)
        self.local_head = (weight, bias)

    @hookimpl
    def client_trainable_parameters(self) -> list[torch.Tensor]:
        return list(self.local_head)

    @hookimpl
    def client_extra_losses(self, model: nn.Module, y: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = features.detach()  # these heads must not train the backbone
        weight, bias = self.local_head
        aux = getattr(model, AUX_NAME)
        return F.cross_entropy(aux(h), y) + F.cross_entropy(F.linear(h, weight, bias), y)

    @hookimpl
    def client_end(self, state: dict[str, Any]) -> None:
        weight, bias = self.local_head
        state["local_weight"], state["local_bias"] = weight.detach(), bias.detach()
        # Nothing for the server: the local head never leaves the client.
        return None

    # ------------------------------------------------------------------ evaluation

    @hookimpl
    def eval_logits(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        model: nn.Module,
        ctx: EvalContext,
        state: dict[str, Any],
    ) -> torch.Tensor:
        p = self.params
        aux = getattr(model, AUX_NAME)
        h = features.to(aux.weight.dtype)
        if ctx.client_id is None:
            if p.global_head == "sse-c":
                return logits
            return F.linear(h, global_realign(aux.weight, p.gamma), aux.bias)
        if p.personal_head == "local+aux":
            # The authors' code: local head + raw aux head; a client that never trained keeps
            # its random initial local head (the one its first round would start from).
            if "local_weight" in state:
                local_w, local_b = state["local_weight"], state["local_bias"]
            else:
                local_w, local_b = initial_local_head(ctx, h.shape[1])
            local_w, local_b = local_w.to(h.device, h.dtype), local_b.to(h.device, h.dtype)
            return F.linear(h, local_w, local_b) + aux(h)
        if "local_weight" in state:
            local_w = state["local_weight"].to(h.device)
            local_b = state["local_bias"].to(h.device)
            return F.linear(h, local_w, local_b) + F.linear(h, local_realign(aux.weight, local_w), aux.bias)
        # Never trained, so no local head yet: fall back to the generic (realigned) model.
        return F.linear(h, global_realign(aux.weight, p.gamma), aux.bias)

    @hookimpl
    def eval_personalized_mask(self) -> str:
        """GLA-FR's personalised mask, applied and recorded by the evaluator."""
        return MASKS[self.params.mask]

    @hookimpl
    def eval_metrics(
        self, model: nn.Module, features: torch.Tensor, labels: torch.Tensor, ctx: EvalContext
    ) -> dict[str, Any] | None:
        """The other global head's metrics when ``global_head = "both"``: the model's own head
        (SSE-C in FedLoGe), as the authors log it."""
        if ctx.client_id is not None or self.params.global_head != "both":
            return None
        with torch.no_grad():
            pred = model.head(features).argmax(1)
        return {f"sse_c_{k}": v for k, v in head_metrics(pred, labels, ctx).items()}
