"""FedBABU (Oh, Kim and Yun, ICLR 2022): federate the body, keep the head at its random init,
personalise by fine-tuning.

During federated training the head is frozen at its random initialisation (so it is neither
trained nor aggregated, and identical everywhere); only the body learns, which the paper shows
gives a better shared representation under label heterogeneity. For personalised evaluation each
client fine-tunes a copy of the global model on its own training data.

Randomness: the fine-tuning sample order comes from the stream
``ctx.generator_for("fedbabu-finetune")`` (seed, purpose, round, client), so personalised metrics are the
same however often and wherever the evaluation runs.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import ClientContext, Plugin, SetupContext, hookimpl

__all__ = ["FedBABU", "finetune"]


def finetune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    part: Literal["head", "full"],
    n_epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Fine-tune ``model`` in place with SGD and cross-entropy on ``(x, y)``.

    ``part="full"`` updates every parameter (the model in train mode); ``part="head"`` only
    ``model.head``, on features computed once in eval mode, so the body (BatchNorm statistics
    included) is untouched. Parameters frozen for federation are unfrozen for the fine-tuning and
    their ``requires_grad`` flags restored afterwards. Sample order: one permutation per epoch
    drawn from ``generator``.
    """
    n = int(y.numel())
    if n == 0 or n_epochs == 0:
        return
    params = list(model.head.parameters()) if part == "head" else list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(True)
        if part == "head":
            model.eval()
            with torch.no_grad():
                inputs = torch.cat([model.features(x[i : i + batch_size]) for i in range(0, n, batch_size)])
            forward = model.head
        else:
            model.train()
            inputs, forward = x, model
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
        for _ in range(n_epochs):
            order = torch.randperm(n, generator=generator).to(y.device)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(forward(inputs[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


class FedBABUParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    finetune: Literal["head", "full"] = Field(
        "full",
        description="What personalisation fine-tunes: 'full' = the whole model (FedBABU), 'head' = the head.",
    )
    n_finetune_epochs: int = Field(
        5, ge=0, description="Fine-tuning epochs over the client's training data (paper: 5)."
    )
    finetune_lr: float = Field(0.01, gt=0, description="SGD learning rate of the fine-tuning.")
    finetune_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the fine-tuning.")


class FedBABU(Plugin):
    """FedBABU (Oh, Kim and Yun, ICLR 2022, arXiv 2106.06042): body aggregation, body update.

    Federated training: head frozen at its random initialisation (requires_grad=False, so only
    the body is trained and FedAvg-aggregated). Personalisation: each client fine-tunes a copy of
    the global model on its own training data (SGD, cross-entropy, ``n_finetune_epochs`` epochs,
    batch size of the scenario), the whole model or only its head.
    """

    Params = FedBABUParams
    requires = frozenset({"head"})

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: SetupContext) -> None:
        for p in model.head.parameters():
            p.requires_grad_(False)

    @hookimpl
    def client_personalize(self, model: nn.Module, ctx: ClientContext, state: dict[str, Any]) -> None:
        p = self.params
        finetune(
            model,
            ctx.x_train[ctx.indices],
            ctx.labels,
            part=p.finetune,
            n_epochs=p.n_finetune_epochs,
            lr=p.finetune_lr,
            momentum=p.finetune_momentum,
            batch_size=ctx.batch_size,
            generator=ctx.generator_for("fedbabu-finetune"),
        )
