"""Post-hoc logit adjustment (Menon et al., ICLR 2021), i.e. thresholding by priors (Buda et al. 2018):
evaluation logits z - tau log pi; training is untouched.
"""

from __future__ import annotations

from typing import Literal

import torch
from fedlt_plugins.losses import log_class_prior
from fedlt_plugins.priors import PRIOR_DOC, Prior, prior_counts
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from fedlt import EvalContext, Plugin, hookimpl

__all__ = ["PosthocAdjust"]


class PosthocAdjustParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prior: Prior = Field(
        "global",
        description=PRIOR_DOC
        + " 'local' needs apply_to = 'personalized': the global evaluation has no client.",
    )
    tau: float = Field(
        1.0, ge=0, description="Strength of the adjustment; 1 = thresholding by priors, 0 = no change."
    )
    apply_to: Literal["global", "personalized", "both"] = Field(
        "global",
        validate_default=True,
        description="Which evaluations are adjusted: the global model on the balanced test set "
        "(default: the correction targets a balanced test distribution), each client's local view "
        "(imbalanced like its training data, where the correction lowers accuracy), or both.",
    )

    @field_validator("apply_to")
    @classmethod
    def _local_prior_needs_a_client(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("prior") == "local" and value != "personalized":
            raise ValueError(
                "'personalized' when prior is 'local' (the global evaluation runs on the server, "
                "where no client's counts exist; use prior 'global' (privileged) or 'estimated' "
                "to adjust it)"
            )
        return value


class PosthocAdjust(Plugin):
    """Post-hoc logit adjustment (Menon et al., ICLR 2021) / thresholding by priors (Buda et al. 2018).

    Evaluation logits become ``z - tau * log pi`` with ``pi_c = n_c / sum_j n_j`` (counts below 1
    treated as 1), so the prediction is ``argmax_c z_c - tau log pi_c``. With ``tau = 1`` this is
    ``argmax_c p(c|x) / pi_c``: the model's posterior divided by the training prior, which
    estimates the class-balanced posterior. Training is untouched.

    Which counts: ``global`` and ``estimated`` work for every evaluation (``estimated`` reads the
    head of the model being evaluated, the personalised one where a plugin personalises).
    ``local`` uses the evaluated client's own counts and is only allowed with
    ``apply_to = "personalized"``: the global model is evaluated on the server, where "a client's
    own counts" do not exist. Substituting the sum of all clients' counts there would silently
    be the privileged global prior under a name that promises private, local information, so
    the scenario is rejected instead and the user picks ``global`` (privileged) or ``estimated``.
    """

    Params = PosthocAdjustParams

    @hookimpl
    def eval_logits(self, logits: torch.Tensor, model: nn.Module, ctx: EvalContext) -> torch.Tensor:
        is_global = ctx.client_id is None
        if self.params.apply_to == ("personalized" if is_global else "global"):
            return logits
        counts = prior_counts(self.params.prior, ctx.local_class_counts, ctx.global_class_counts, model)
        log_pi = log_class_prior(counts, logits.device).to(logits.dtype)
        return logits - self.params.tau * log_pi
