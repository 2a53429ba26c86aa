"""Fixed simplex-ETF classifiers: the dense ETF and FedLoGe's static sparse ETF (SSE-C).

A simplex equiangular tight frame (ETF) gives C class vectors of equal norm whose pairwise
cosines all equal -1/(C-1), the most separated arrangement possible. Installing it as a frozen
head removes the classifier's bias towards head classes: the backbone learns to map each class
onto its fixed direction, and no client can tilt the head towards its own majority classes.

Both plugins build the head in ``configure_model`` from the run's seed, freeze it
(``requires_grad=False``), and so never train or aggregate it: every process builds the same
head, bit for bit, and it never travels. Randomness: the U(0, 1) matrix of the ETF and the
pruning mask come from ``SetupContext.generator`` (stream ``"configure-model"``); the SSE-C
re-fit is deterministic and single-threaded.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedlt import Plugin, ScenarioError, SetupContext, hookimpl

__all__ = [
    "ETF",
    "SSEC",
    "freeze_head",
    "refit_sparse_etf",
    "simplex_etf",
    "sparse_etf_loss",
    "sparsify",
]

BiasMode = Literal["zero", "random"]

BIAS_DOC = (
    "Head bias, frozen like the weight: 'zero' sets it to 0; 'random' keeps the model's random "
    "initial bias (FedLoGe's code leaves the nn.Linear bias of SSE-C at its random init)."
)

#: Cosines are clamped to [-1 + COS_EPS, 1 - COS_EPS] so arccos and its gradient stay finite.
COS_EPS = 1e-7

# Adam's moment decay rates and epsilon (PyTorch's defaults, as FedLoGe uses torch.optim.Adam).
_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8


# --------------------------------------------------------------------------- pure helpers


def simplex_etf(feature_dim: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A ``(d, C)`` simplex ETF with unit-norm columns, in float64.

    M = sqrt(C/(C-1)) * P (I_C - 1 1^T / C), with P the orthonormal (d, C) Q factor of a
    U(0, 1) random matrix drawn from ``generator``. Needs ``d >= C`` (C orthonormal columns).
    """
    d, c = feature_dim, num_classes
    if d < c:
        raise ValueError(f"a simplex ETF needs feature_dim >= num_classes, got {d} < {c}")
    if c < 2:
        raise ValueError(f"a simplex ETF needs at least 2 classes, got {c}")
    a = torch.rand(d, c, generator=generator, dtype=torch.float64)
    p, _ = torch.linalg.qr(a, mode="reduced")
    center = torch.eye(c, dtype=torch.float64) - torch.full((c, c), 1.0 / c, dtype=torch.float64)
    return math.sqrt(c / (c - 1)) * (p @ center)


def sparsify(m: torch.Tensor, beta: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero ``floor(beta * m.numel())`` entries of ``m`` chosen uniformly at random (unstructured).

    Returns the pruned matrix and the 0/1 mask of surviving entries (same dtype as ``m``).
    """
    n_zero = math.floor(beta * m.numel())
    mask = torch.ones(m.numel(), dtype=m.dtype)
    mask[torch.randperm(m.numel(), generator=generator)[:n_zero]] = 0.0
    mask = mask.view_as(m)
    return m * mask, mask


def sparse_etf_loss(weight: torch.Tensor, norm: float) -> torch.Tensor:
    """FedLoGe's re-fit loss on a head weight (C, d) whose rows are the class vectors m_c.

    L = sum_c (||m_c|| - norm)^2 - (1/C) sum_c arccos(max_{c' != c} cos(m_c, m_c')): the first
    term pulls every class-vector norm to ``norm``; the second maximises, for each class, the
    angle to its nearest other class. Written with autograd-friendly ops as the reference; the
    re-fit uses a hand-derived gradient of the same loss (see :func:`refit_sparse_etf`).
    """
    n = weight.norm(dim=1)
    cos = (weight @ weight.t()) / torch.outer(n, n)
    cos = cos - 3.0 * torch.eye(weight.shape[0], dtype=weight.dtype)  # exclude c' = c from the max
    s = cos.max(dim=1).values.clamp(-1 + COS_EPS, 1 - COS_EPS)
    return ((n - norm) ** 2).sum() - torch.arccos(s).mean()


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run in one intra-op thread: the result must not depend on the process's thread count
    (Ray workers set their own), and these small ops are faster without thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def refit_sparse_etf(
    weight: torch.Tensor,
    mask: torch.Tensor,
    norm: float,
    lr: float,
    n_steps: int,
    record_loss: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-fit the surviving entries of a sparse ETF with Adam on :func:`sparse_etf_loss`.

    The gradient is multiplied by ``mask`` so pruned entries stay exactly zero (their Adam
    moments stay zero, so their update is 0 / (0 + eps) = 0).

    Why it is fast: no autograd graph and no (C, C) x (C, d) product. With rows m_c,
    n_c = ||m_c||, j(c) the nearest other class, s_c = cos(m_c, m_j(c)) and
    a_c = -(d/ds) arccos(s_c) / C = 1 / (C sqrt(1 - s_c^2)), the gradient row of class c is

        g_c = m_c [2 (n_c - norm) / n_c - (a_c s_c + sum_{c': j(c')=c} a_c' s_c') / n_c^2]
              + m_j(c) a_c / (n_c n_j(c)) + sum_{c': j(c')=c} m_c' a_c' / (n_c' n_c),

    so a step is the (C, C) Gram matrix plus O(C d) element-wise work. The step is a chain of
    ~40 tiny operations, so dispatch cost dominates: element-wise work runs in NumPy (about a
    fifth of PyTorch's per-call overhead on small arrays) on buffers shared with torch, and
    torch does the Gram product and the row scatter-add (NumPy's BLAS path oversubscribes
    threads). Adam is torch.optim.Adam's update (betas 0.9, 0.999, eps 1e-8), with the
    (1 - beta) factors folded into the bias corrections. One intra-op thread throughout, so
    the result does not depend on the process's thread count.

    Parameters
    ----------
    weight, mask : Tensor of shape (C, d)
        CPU start point (already pruned; rows are class vectors) and its 0/1 mask of surviving
        entries, same floating dtype.
    norm : float
        Target norm of every class vector.
    lr : float
        Adam learning rate.
    n_steps : int
        Number of Adam steps.
    record_loss : bool, default=False
        Also return the loss before each step (a float64 ``(n_steps,)`` tensor).

    Returns
    -------
    (Tensor, Tensor or None)
        The re-fitted ``(C, d)`` weight (zeros where ``mask`` is 0) and the loss history.
    """
    keep = mask.detach().cpu().numpy()
    w = weight.detach().cpu().numpy() * keep  # a fresh array: the caller's tensor is untouched
    dtype, c = w.dtype, w.shape[0]
    g, tmp = np.empty_like(w), np.empty_like(w)
    exp_avg, exp_avg_sq = np.zeros_like(w), np.zeros_like(w)  # Adam moments / (1 - beta)
    w_t, g_t, tmp_t = torch.from_numpy(w), torch.from_numpy(g), torch.from_numpy(tmp)
    gram_t = torch.empty(c, c, dtype=w_t.dtype)
    gram = gram_t.numpy()
    rows = np.arange(c)
    losses = np.empty(n_steps) if record_loss else None
    with _single_thread():
        for t in range(1, n_steps + 1):
            # cosines between class vectors; the diagonal is excluded from the nearest-class max
            torch.mm(w_t, w_t.t(), out=gram_t)
            n2 = gram.diagonal().copy()
            n = np.sqrt(n2)
            gram /= n[:, None]
            gram /= n
            np.fill_diagonal(gram, -2.0)
            j = gram.argmax(axis=1)
            s = np.clip(gram[rows, j], -1 + COS_EPS, 1 - COS_EPS)
            dn = n - norm
            if losses is not None:
                losses[t - 1] = dn @ dn - np.arccos(s).mean()
            # gradient (see docstring): own-row scale, then the two cross terms of each pair
            a = 1.0 / (c * np.sqrt(1.0 - s * s))
            cross = (a / (n * n[j]))[:, None]
            q = a * s
            scale = 2.0 * dn / n - (q + np.bincount(j, q, minlength=c).astype(dtype)) / n2
            np.multiply(w, scale[:, None], out=g)
            np.multiply(w[j], cross, out=tmp)
            g += tmp
            np.multiply(w, cross, out=tmp)
            g_t.index_add_(0, torch.from_numpy(j), tmp_t)
            g *= keep
            # Adam: m' = b1 m' + g, v' = b2 v' + g^2 (m = (1-b1) m', v = (1-b2) v')
            exp_avg *= _BETA1
            exp_avg += g
            exp_avg_sq *= _BETA2
            np.multiply(g, g, out=tmp)
            exp_avg_sq += tmp
            np.sqrt(exp_avg_sq, out=tmp)
            tmp *= math.sqrt((1.0 - _BETA2) / (1.0 - _BETA2**t))
            tmp += _ADAM_EPS
            np.divide(exp_avg, tmp, out=tmp)
            tmp *= -lr * (1.0 - _BETA1) / (1.0 - _BETA1**t)
            w += tmp
    history = None if losses is None else torch.from_numpy(losses)
    return torch.from_numpy(w).to(weight.dtype), history


def freeze_head(model: nn.Module, weight: torch.Tensor, bias: BiasMode) -> None:
    """Copy ``weight`` (C, d) into ``model.head``, set the bias per ``bias``, freeze both."""
    head = model.head
    with torch.no_grad():
        head.weight.copy_(weight.to(dtype=head.weight.dtype))
        if head.bias is not None:
            if bias == "zero":
                head.bias.zero_()
            head.bias.requires_grad_(False)
    head.weight.requires_grad_(False)


def _check_dims(model: nn.Module, ctx: SetupContext, plugin: str) -> tuple[int, int]:
    d, c = int(model.head.in_features), int(ctx.num_classes)
    if d < c:
        raise ScenarioError(
            "model",
            f"{type(model).__name__} with feature_dim {d}",
            f"a model whose feature_dim is at least the number of classes ({c}) for plugin {plugin!r}",
            hint=(
                "A simplex ETF needs one orthonormal feature direction per class; widen the model's "
                "last feature layer (model.hidden for 'mlp', model.width for the ResNets)."
            ),
        )
    if c < 2:
        raise ScenarioError("data", f"{c} class", f"at least 2 classes for plugin {plugin!r}")
    return d, c


#: dtype of the SSE-C re-fit: float32, like the head it becomes (twice as fast as float64 at
#: d=512, C=100; single-threaded, so bit-identical in every process).
REFIT_DTYPE = torch.float32


@functools.lru_cache(maxsize=8)
def _sse_c_cached(
    d: int, c: int, beta: float, norm: float, lr: float, n_steps: int, gen_state: bytes
) -> tuple[torch.Tensor, bytes]:
    """The SSE-C matrix (C, d) for a generator state, and the generator state after the draws.

    Cached per process: the server and a serial engine's worker both build the model, and both
    get the identical head without paying for the re-fit twice.
    """
    g = torch.Generator()
    g.set_state(torch.frombuffer(bytearray(gen_state), dtype=torch.uint8))
    dense = simplex_etf(d, c, g).t().to(REFIT_DTYPE).contiguous()
    pruned, mask = sparsify(dense, beta, g)
    fitted, _ = refit_sparse_etf(pruned, mask, norm, lr, n_steps)
    return fitted, bytes(g.get_state().numpy().tobytes())


# --------------------------------------------------------------------------- plugins


class ETFParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    norm: float = Field(1.0, gt=0, description="Norm of every class vector (row of the head).")
    bias: BiasMode = Field("zero", description=BIAS_DOC)


class ETF(Plugin):
    """Frozen dense simplex-ETF classifier (as in FedETF, Li et al., ICCV 2023; FedLoGe's dense
    variant, Xiao et al., ICLR 2024).

    head.weight = norm * M^T with M = sqrt(C/(C-1)) P (I_C - 1 1^T / C), P (d, C) orthonormal
    (Q of a U(0,1) matrix from the run's seed): unit columns, pairwise cosine exactly -1/(C-1).
    The head is frozen, so it is never trained nor aggregated. Needs feature_dim >= C.
    """

    Params = ETFParams
    requires = frozenset({"head"})

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: SetupContext) -> None:
        d, c = _check_dims(model, ctx, self.name)
        m = simplex_etf(d, c, ctx.generator) * self.params.norm
        freeze_head(model, m.t(), self.params.bias)


class SSECParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    beta: float = Field(
        0.6,
        ge=0,
        lt=1,
        description="Sparsity: the fraction of the d*C ETF entries set to zero (floor(beta*d*C)).",
    )
    norm: float = Field(0.1, gt=0, description="Column-norm target of the re-fit (FedLoGe's code uses 0.1).")
    refit_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the re-fit.")
    n_refit_steps: int = Field(10_000, ge=0, description="Adam steps of the re-fit (0 keeps the pruned ETF).")
    bias: BiasMode = Field("zero", description=BIAS_DOC)


class SSEC(Plugin):
    """FedLoGe's static sparse ETF classifier, SSE-C (Xiao et al., ICLR 2024, arXiv 2401.08977).

    Start from the dense simplex ETF M (d, C, unit columns), zero floor(beta*d*C) entries chosen
    uniformly at random, then re-fit the surviving entries with Adam (gradient masked, so zeros
    stay zero) on L = sum_c (||m_c|| - norm)^2 - (1/C) sum_c arccos(max_{c'!=c} cos(m_c, m_c')),
    and install head.weight = M^T, frozen (never trained, never aggregated).
    """

    Params = SSECParams
    requires = frozenset({"head"})

    @hookimpl
    def configure_model(self, model: nn.Module, ctx: SetupContext) -> None:
        d, c = _check_dims(model, ctx, self.name)
        p = self.params
        state = bytes(ctx.generator.get_state().numpy().tobytes())
        weight, after = _sse_c_cached(d, c, p.beta, p.norm, p.refit_lr, p.n_refit_steps, state)
        # Leave the generator exactly where drawing would have left it, cached or not.
        ctx.generator.set_state(torch.frombuffer(bytearray(after), dtype=torch.uint8))
        freeze_head(model, weight, p.bias)
