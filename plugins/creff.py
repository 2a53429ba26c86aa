"""CReFF (Shang et al., IJCAI 2022): re-train the classifier on federated features.

Clients train and FedAvg aggregates as usual. Each client also uploads, per class it holds, the
gradient of the cross-entropy of its real features w.r.t. the server's re-trained classifier;
the server learns per-class "federated features" whose gradients match the clients' and
re-trains a fresh, class-balanced linear classifier on them. The maths is in pure helpers
(:func:`ce_gradients`, :func:`match_distance`, :func:`match_objective`, :func:`match_features`,
:func:`retrain_classifier`, :func:`client_class_gradients`); the plugin only moves tensors
between the hooks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import ClientContext, EvalContext, Plugin, RoundContext, SetupContext, hookimpl

__all__ = [
    "CReFF",
    "CReFFParams",
    "ce_gradients",
    "client_class_gradients",
    "match_distance",
    "match_features",
    "match_objective",
    "retrain_classifier",
]

#: Added to the product of norms in the cosine, as the reference does (keeps zero rows finite).
COS_EPS = 1e-6

#: Rows fed through ``model.features`` at once when computing client features.
FEATURE_CHUNK = 1024

WEIGHT_KEY = "creff.weight"
BIAS_KEY = "creff.bias"
GRADS_KEY = "creff.grads"


class CReFFParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_features: int = Field(
        100,
        ge=1,
        description="Federated features learnt per class (100 as in the official code; server cost is "
        "linear in it).",
    )
    n_match_steps: int = Field(
        100, ge=0, description="SGD steps per round matching the features' gradients to the clients'."
    )
    match_lr: float = Field(0.1, gt=0, description="Learning rate of the feature-matching SGD.")
    n_retrain_epochs: int = Field(
        300, ge=1, description="Epochs of re-training the fresh classifier on the federated features."
    )
    retrain_lr: float = Field(0.01, gt=0, description="Learning rate of classifier re-training (SGD).")
    retrain_batch_size: int = Field(
        32,
        ge=1,
        description="Mini-batch size of classifier re-training (the reference's 32); a value of at least "
        "classes x n_features takes full-batch steps, which under-train at the default lr.",
    )
    batch_size_grad: int = Field(
        32, ge=1, description="Real samples of one class per gradient batch on a client."
    )
    n_grad_batches: int = Field(
        10, ge=1, description="Gradient batches per class on a client, averaged into its upload."
    )
    client_features: Literal["global", "local"] = Field(
        "global",
        description="Model whose features give the client gradients: 'global' = the round's global "
        "model before local training (the reference), 'local' = the locally trained model.",
    )
    personalized: bool = Field(
        True, description="Also use the re-trained classifier for the personalised evaluation."
    )


# --------------------------------------------------------------------------- maths


def ce_gradients(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the mean cross-entropy of a linear classifier, per group of samples.

    For a group of n features h_i, all of class c, the loss is
    ``L = (1/n) sum_i CE(W h_i + b, c)``, whose gradient is, with ``p_i = softmax(W h_i + b)`` and
    ``e_c`` the one-hot vector, ``dL/dW = (1/n) sum_i (p_i - e_c) h_i^T`` and
    ``dL/db = (1/n) sum_i (p_i - e_c)``: what clients upload, and the definition the server's
    :func:`match_objective` differentiates by hand.

    Parameters
    ----------
    features : Tensor, shape (G, n, d)
        G groups of n features.
    labels : Tensor, shape (G,)
        The class of each group.
    weight, bias : Tensor, shapes (C, d) and (C,)
        The classifier.

    Returns
    -------
    gW : Tensor, shape (G, C, d)
    gb : Tensor, shape (G, C)
    """
    probs = torch.softmax(features @ weight.T + bias, dim=-1)
    onehot = nn.functional.one_hot(labels, weight.shape[0]).to(probs.dtype)
    err = probs - onehot[:, None, :]
    n = features.shape[1]
    return err.transpose(1, 2) @ features / n, err.mean(dim=1)


def match_distance(
    syn: tuple[torch.Tensor, torch.Tensor], real: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Gradient-matching distance D per class: sum over gradient rows of (1 - cosine).

    ``D(g, g') = sum_{j=1..C} (1 - cos(gW_j, gW'_j)) + (1 - cos(gb, gb'))``: each of the C rows of
    the weight gradient and the bias gradient taken as one row, with
    ``cos(u, v) = <u, v> / (|u| |v| + 1e-6)``. So D is 0 for identical gradients and 2 per row
    (2(C+1) in all) for opposite ones; it ignores gradient magnitudes.

    Parameters
    ----------
    syn, real : (gW, gb) pairs, shapes (G, C, d) and (G, C)

    Returns
    -------
    Tensor, shape (G,)
        D for each group (class).
    """

    def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 1.0 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + COS_EPS)

    return one_minus_cos(syn[0], real[0]).sum(-1) + one_minus_cos(syn[1], real[1])


def _one_minus_cos(
    a: torch.Tensor, b: torch.Tensor, b_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - cos(a, b)`` per row (the cosine of :func:`match_distance`) and its gradient in a.

    With ``s = <a, b>``, ``r = |a|``, ``q = |b|`` and ``m = r q + eps``:
    ``d(1 - s/m)/da = -b/m + (s q / (r m^2)) a`` (the second term is 0 where a = 0).
    """
    s = torch.linalg.vecdot(a, b)
    r = torch.linalg.vector_norm(a, dim=-1)
    m = r * b_norm + COS_EPS
    k = torch.where(r > 0, s * b_norm / (r.clamp_min(torch.finfo(r.dtype).tiny) * m * m), 0.0)
    grad = (a * k[..., None]).addcmul_(b, (-1.0 / m)[..., None])
    return 1.0 - s / m, grad


def match_objective(
    features: torch.Tensor,
    labels: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``D(ce_gradients(F), targets)`` per class and its gradient in F, both in closed form.

    The same value as ``match_distance(ce_gradients(features, labels, weight, bias), targets)``,
    with the backward pass written out (err = (softmax - onehot)/n, gW = err^T F, gb = sum err).
    Autograd through the cosines spends most of its time on (G, C, d) temporaries; this makes
    about half as many passes over them.

    Returns
    -------
    distance : Tensor, shape (G,)
    grad : Tensor, shape (G, n, d)
        d(sum of distance)/d features.
    """
    n = features.shape[1]
    probs = torch.softmax(features @ weight.T + bias, dim=-1)  # (G, n, C)
    err = (probs - nn.functional.one_hot(labels, weight.shape[0]).to(probs.dtype)[:, None, :]) / n
    gw = err.transpose(1, 2) @ features  # (G, C, d)
    gb = err.sum(1)  # (G, C)
    tw, tb = targets
    dist_w, grad_gw = _one_minus_cos(gw, tw, torch.linalg.vector_norm(tw, dim=-1))
    dist_b, grad_gb = _one_minus_cos(gb, tb, torch.linalg.vector_norm(tb, dim=-1))
    # Back through gW = err^T F and gb = sum_i err_i, then through err = (softmax(F W^T + b) - Y)/n.
    grad_err = torch.baddbmm(grad_gb[:, None, :], features, grad_gw.transpose(1, 2)) / n
    grad_logits = probs * (grad_err - (grad_err * probs).sum(-1, keepdim=True))
    grad = torch.baddbmm(grad_logits @ weight, err, grad_gw)
    return dist_w.sum(-1) + dist_b, grad


@torch.no_grad()
def match_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    n_steps: int,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move federated features so their classifier gradients match the targets (plain SGD).

    Minimises ``sum_c D(grad_{W,b} CE(W F_c + b, c), target_c)`` over the features F_c by
    ``n_steps`` steps ``F -= lr * grad`` (the objective of :func:`match_objective`).

    Parameters
    ----------
    features : Tensor, shape (G, n, d)
        The features of the G classes in ``labels``.
    targets : (gW, gb), shapes (G, C, d) and (G, C)
        The clients' averaged gradients for these classes.

    Returns
    -------
    features : Tensor, shape (G, n, d)
        The matched features (a new tensor).
    before, after : Tensor, shape (G,)
        D per class before the first and after the last step.
    """
    f = features.clone()
    before = None
    for _ in range(n_steps):
        dist, grad = match_objective(f, labels, targets, weight, bias)
        before = dist if before is None else before
        f.sub_(grad, alpha=lr)
    after, _ = match_objective(f, labels, targets, weight, bias)
    return f, (after if before is None else before), after


def init_linear(in_dim: int, out_dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh linear layer as ``nn.Linear`` initialises it: W, b ~ U(-1/sqrt(d), 1/sqrt(d))."""
    bound = 1.0 / math.sqrt(in_dim)
    weight = (torch.rand(out_dim, in_dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(out_dim, generator=generator) * 2 - 1) * bound
    return weight, bias


@torch.no_grad()
def retrain_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    n_epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train a fresh linear classifier on (x, y) with plain SGD on the mean cross-entropy.

    Each epoch visits the samples in a new order drawn from ``generator`` in mini-batches of
    ``batch_size`` (the last one smaller), or takes one full-batch step when ``batch_size`` is at
    least the number of samples. The ~10^4 steps are tiny, so their cost is per-op overhead: the
    bias is folded into the weight as a column against a constant-1 feature, each epoch's batches
    are gathered at once, and a step is four ops (logits, softmax, minus one-hot, closed-form update
    ``W -= lr/B (softmax - onehot)^T x``) with no autograd.

    Returns
    -------
    weight, bias : Tensor, shapes (num_classes, d) and (num_classes,), on ``x.device``
    """
    n, d = x.shape
    weight, bias = init_linear(d, num_classes, generator)
    wb = torch.cat([weight, bias[:, None]], dim=1).to(x.device)  # (C, d + 1)
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)
    onehot = nn.functional.one_hot(y, num_classes).to(x.dtype)
    full = batch_size >= n
    for _ in range(n_epochs):
        if full:
            batches = ((xa, onehot),)
        else:
            order = torch.randperm(n, generator=generator).to(x.device)
            batches = zip(xa[order].split(batch_size), onehot[order].split(batch_size), strict=True)
        for xb, yb in batches:
            err = torch.softmax(xb @ wb.T, dim=1).sub_(yb)
            wb.addmm_(err.T, xb, alpha=-lr / len(xb))
    return wb[:, :d].contiguous(), wb[:, d].contiguous()


@torch.no_grad()
def client_class_gradients(
    model: nn.Module,
    ctx: ClientContext,
    weight: torch.Tensor,
    bias: torch.Tensor,
    batch_size: int,
    n_batches: int,
    generator: torch.Generator,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per class c the client holds: ``grad_{W,b} CE(W phi(x) + b, c)`` averaged over batches.

    Each of ``n_batches`` batches is ``min(batch_size, n_c)`` distinct samples of class c drawn
    from ``generator`` (one batch when the class fits in one: every draw would be the same set).
    Features come from ``model.features`` in eval mode, so BatchNorm uses its running statistics
    and nothing in the model (running statistics included) changes. Each needed sample is fed
    through the model once.

    Returns
    -------
    dict of int to (gW, gb)
        On CPU, shapes (C, d) and (C,).
    """
    labels = ctx.labels.cpu()
    draws: list[tuple[int, torch.Tensor]] = []  # (class, (n_batches, b) local positions)
    for c in torch.unique(labels).tolist():
        pos = torch.nonzero(labels == c).squeeze(1)
        if len(pos) <= batch_size:
            draws.append((c, pos[None]))
        else:
            picks = torch.stack(
                [torch.randperm(len(pos), generator=generator)[:batch_size] for _ in range(n_batches)]
            )
            draws.append((c, pos[picks]))
    if not draws:
        return {}
    needed = torch.unique(torch.cat([p.reshape(-1) for _, p in draws]))
    row_of = torch.full((len(labels),), -1, dtype=torch.long)
    row_of[needed] = torch.arange(len(needed))
    was_training = model.training
    model.eval()
    try:
        rows = ctx.indices[needed.to(ctx.indices.device)]
        feats = torch.cat(
            [
                model.features(ctx.x_train[rows[i : i + FEATURE_CHUNK]])
                for i in range(0, len(rows), FEATURE_CHUNK)
            ]
        )
    finally:
        model.train(was_training)
    weight, bias = weight.to(feats), bias.to(feats)
    out = {}
    for c, pos in draws:
        h = feats[row_of[pos].to(feats.device)]  # (batches, b, d)
        gw, gb = ce_gradients(h, torch.full((len(h),), c, device=feats.device), weight, bias)
        out[c] = (gw.mean(0).cpu(), gb.mean(0).cpu())
    return out


# --------------------------------------------------------------------------- plugin


class CReFF(Plugin):
    """CReFF: classifier re-training with federated features (Shang et al., IJCAI 2022).

    Client k uploads, per class c it holds, ``g_c^k = grad_{W,b} CE(W phi(x_c) + b, c)`` averaged
    over ``n_grad_batches`` batches of ``batch_size_grad`` real samples of class c, where (W, b)
    is the server's current re-trained classifier (sent in the round config) and phi the model's
    ``features`` (eval mode). The server averages ``g_c = mean_{k holds c} g_c^k`` (unweighted,
    as the reference), then moves the federated features F_c (``n_features`` x d per class, drawn
    once from N(0, 1), kept across rounds) by ``n_match_steps`` SGD steps of lr ``match_lr`` on
    ``sum_c D(grad_{W,b} CE(W F_c + b, c), g_c)`` with ``D`` = sum over the C rows of the weight
    gradient and the bias row of ``1 - cos`` (:func:`match_distance`), and trains a fresh linear
    classifier (W_re, b_re) on {(F_c, c)} for ``n_retrain_epochs`` epochs of SGD, lr
    ``retrain_lr``, mini-batches of ``retrain_batch_size``. Evaluation uses the logits
    ``W_re h + b_re``, and clients compute the next round's gradients against (W_re, b_re).

    As in the reference, the global model keeps the FedAvg head: the re-trained classifier never
    enters the model, so training (and the global weights) are those of plain FedAvg. The
    clients' draws come from their own (seed, round, client) stream, not ``ctx.generator``, so
    that this stays true bit for bit.

    ``client_features = "global"`` (default) takes phi from the global model the client receives,
    before local training, as the reference does (``compute_gradient`` runs before
    ``local_train`` in its main.py): every client's g_c^k is then a gradient of the same
    function, so their mean is the gradient of the federation's class-c data under one model,
    and F_c live in one feature space. ``"local"`` uses the locally trained model (features that
    differ per client by their drift).

    Round config: ``{"creff.weight": W, "creff.bias": b}`` (CPU tensors). Client payload:
    ``{class: (gW, gb)}`` on CPU, shapes (C, d) and (C,).

    Classes no client uploaded this round keep their features; those uploaded at least once are
    all used for re-training. Classes never uploaded are left out of re-training (the reference
    would train on their random initial features). Before the first re-training the evaluation
    logits are left unchanged.
    """

    Params = CReFFParams
    requires = frozenset({"head"})

    def __init__(self, params: BaseModel | None = None) -> None:
        super().__init__(params)
        self._device = torch.device("cpu")
        self._seed = 0
        self._features: torch.Tensor | None = None  # (C, n_features, d)
        self._seen: torch.Tensor | None = None  # (C,) bool: uploaded at least once
        self._weight: torch.Tensor | None = None  # (C, d): sent to clients, used by evaluation
        self._bias: torch.Tensor | None = None
        self._retrained = False

    # ------------------------------------------------------------------ server

    @hookimpl
    def server_setup(self, model: nn.Module, ctx: SetupContext) -> None:
        p, d, c = self.params, model.feature_dim, ctx.num_classes
        self._device = next(model.parameters()).device
        self._seed = ctx.seed
        gen = ctx.generator_for("creff-features")
        self._features = torch.randn(c, p.n_features, d, generator=gen).to(self._device)
        self._seen = torch.zeros(c, dtype=torch.bool)
        # Round 1's gradients are taken w.r.t. a fresh random classifier, as in the reference.
        w, b = init_linear(d, c, ctx.generator_for("creff-classifier"))
        self._weight, self._bias = w.to(self._device), b.to(self._device)
        self._retrained = False

    @hookimpl
    def server_configure_round(self) -> dict[str, torch.Tensor]:
        return {WEIGHT_KEY: self._weight.to("cpu", copy=True), BIAS_KEY: self._bias.to("cpu", copy=True)}

    @hookimpl
    def server_after_aggregate(self, ctx: RoundContext, payloads: Mapping[int, Any]) -> None:
        p = self.params
        by_class: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for client in sorted(payloads):
            for c, grads in payloads[client].items():
                by_class.setdefault(int(c), []).append(grads)
        if by_class:
            classes = sorted(by_class)
            # g_c = unweighted mean over the clients holding c, as the reference.
            targets = tuple(
                torch.stack([torch.stack([g[i] for g in by_class[c]]).mean(0) for c in classes]).to(
                    self._device
                )
                for i in (0, 1)
            )
            idx = torch.tensor(classes, device=self._device)
            matched, _, _ = match_features(
                self._features[idx], idx, targets, self._weight, self._bias, p.n_match_steps, p.match_lr
            )
            self._features[idx] = matched
            self._seen[classes] = True
        if not bool(self._seen.any()):
            return
        seen = torch.nonzero(self._seen).squeeze(1).to(self._device)
        x = self._features[seen].reshape(-1, self._features.shape[-1])
        y = seen.repeat_interleave(p.n_features)
        self._weight, self._bias = retrain_classifier(
            x,
            y,
            len(self._seen),
            p.n_retrain_epochs,
            p.retrain_lr,
            p.retrain_batch_size,
            ctx.generator_for("creff-retrain"),
        )
        self._retrained = True

    # ------------------------------------------------------------------ client

    def _upload(self, model: nn.Module, ctx: ClientContext) -> None:
        p = self.params
        self.grads = client_class_gradients(
            model,
            ctx,
            ctx.config[WEIGHT_KEY],
            ctx.config[BIAS_KEY],
            p.batch_size_grad,
            p.n_grad_batches,
            # A stream of its own, so local training draws exactly what it draws without CReFF.
            ctx.generator_for("creff-client"),
        )

    @hookimpl
    def client_start(self, model: nn.Module, ctx: ClientContext) -> None:
        if self.params.client_features == "global":
            self._upload(model, ctx)

    @hookimpl
    def client_end(
        self, model: nn.Module, ctx: ClientContext
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        if self.params.client_features == "local":
            self._upload(model, ctx)
        return self.grads

    # ------------------------------------------------------------------ evaluation

    @hookimpl
    def eval_logits(self, logits: torch.Tensor, features: torch.Tensor, ctx: EvalContext) -> torch.Tensor:
        if not self._retrained or (ctx.client_id is not None and not self.params.personalized):
            return logits
        w, b = self._weight.to(features), self._bias.to(features)
        return torch.addmm(b, features, w.T)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        if self._features is None:
            return {}
        return {
            "features": self._features.to("cpu", copy=True),
            "seen": self._seen.clone(),
            "weight": self._weight.to("cpu", copy=True),
            "bias": self._bias.to("cpu", copy=True),
            "retrained": self._retrained,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self._features = state["features"].to(self._device)
        self._seen = state["seen"].clone()
        self._weight = state["weight"].to(self._device)
        self._bias = state["bias"].to(self._device)
        self._retrained = bool(state["retrained"])
