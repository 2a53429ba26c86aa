"""Local SGD and Adam with torch.optim's numerics, without torch.optim's start-up cost.

Why: the first ``torch.optim`` optimizer built in a process imports ``torch._dynamo`` (2.4-3.1 s
measured on a shared 2-core machine): ``Optimizer.__init__`` calls ``add_param_group``, wrapped in
``torch._disable_dynamo``, and that wrapper imports ``torch._dynamo`` on its first call
(``Optimizer.step`` does the same through ``_use_grad_for_differentiable``). fedlt builds a fresh
optimizer per client-round and never compiles, so it pays that import for nothing. The updates
here are written with ``torch._foreach_*`` ops (one dispatch per op for the whole parameter list,
and no dynamo import) in the same order as torch.optim's foreach implementation, so results
are bit for bit torch.optim's: on CPU, where torch.optim defaults to its per-tensor loop and
foreach ops fall back to the same per-tensor kernels (tests/test_optim.py), and on CUDA, where
torch.optim defaults to this very sequence of foreach ops.

Two layers:

- :func:`sgd_update` and :func:`adam_update` are pure updates on lists of tensors of any shape,
  with all state in the lists passed in, so they also apply to parameters stacked over clients
  (a leading client dimension) and inside ``torch.func`` transforms (under ``vmap``, where
  foreach ops have no batching rule, they switch to per-tensor ops by themselves).
- :class:`LocalSGD` and :class:`LocalAdam` (built by :func:`make_local_optimizer`) are what the
  training loop uses like a torch.optim optimizer: ``step()`` and ``zero_grad()``, state created
  lazily per parameter, parameters whose ``.grad`` is None skipped. There is no ``state_dict``:
  fedlt builds a fresh optimizer per client-round, so there is nothing to save.

``torch.nn.utils.clip_grad_norm_`` does not import ``torch._dynamo`` (checked with torch 2.14), so
callers keep using it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["LocalAdam", "LocalOptimizer", "LocalSGD", "adam_update", "make_local_optimizer", "sgd_update"]

# Grad-mode switch without the ~3 us of ``with torch.no_grad():`` per call (step runs per batch).
_set_grad_enabled = torch._C._set_grad_enabled
_functorch_active = torch._C._are_functorch_transforms_active


def _use_foreach(foreach: bool | None) -> bool:
    """Foreach ops unless a torch.func transform is active (vmap has no foreach batching rule)."""
    return not _functorch_active() if foreach is None else foreach


def sgd_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    first_step: bool = False,
    foreach: bool | None = None,
) -> None:
    """One SGD step in place: ``torch.optim.SGD(params, lr, momentum, weight_decay)``'s update.

    With ``d = grad + weight_decay * p``: ``buf = d`` at the first step, else
    ``buf = momentum * buf + d``; then ``p -= lr * buf`` (``p -= lr * d`` when momentum is 0).
    Dampening 0, no Nesterov. Call it under ``torch.no_grad()`` when ``params`` are leaves
    that require grad.

    Parameters
    ----------
    params, grads : sequence of Tensor
        Parameters (updated in place) and their gradients, any shapes, pairwise equal; a
        leading client dimension updates every client at once, as K separate updates would.
    bufs : sequence of Tensor
        Momentum buffers, one per parameter, updated in place (overwritten at the first step,
        so they may start uninitialised); ignored, and may be empty, when momentum is 0.
    lr, momentum, weight_decay : float
        As in torch.optim.SGD.
    first_step : bool, default=False
        Whether this is the buffers' first update (torch.optim starts a buffer as the gradient).
    foreach : bool or None, default=None
        Use ``torch._foreach_*`` ops (one dispatch per op for the whole list). None: yes, unless
        a torch.func transform is active; then per-tensor ops, as torch.optim's ``foreach=False``.
    """
    if not params:
        return
    if momentum != 0 and len(bufs) != len(params):
        raise ValueError(f"sgd_update: {len(bufs)} momentum buffers for {len(params)} parameters")
    if _use_foreach(foreach):
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum != 0:
            if first_step:
                torch._foreach_copy_(bufs, grads)
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
            grads = bufs
        torch._foreach_add_(params, grads, alpha=-lr)
        return
    for i, p in enumerate(params):
        d = grads[i]
        if weight_decay != 0:
            d = d.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = bufs[i]
            if first_step:
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d)
            d = buf
        p.add_(d, alpha=-lr)


def adam_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    step: int | Sequence[int],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    foreach: bool | None = None,
) -> None:
    """One Adam step in place: ``torch.optim.Adam(params, lr, betas, eps, weight_decay)``'s update.

    L2 weight decay is added to the gradient (not AdamW's decoupled decay), amsgrad off. The
    arithmetic follows torch.optim's foreach Adam operation by operation, bias corrections in
    Python floats. Call it under ``torch.no_grad()`` when ``params`` are leaves that require grad.

    Parameters
    ----------
    params, grads : sequence of Tensor
        Real floating parameters (updated in place) and their gradients, any shapes; a leading
        client dimension updates every client at once, as K separate updates would.
    exp_avgs, exp_avg_sqs : sequence of Tensor
        First and second moment estimates, one per parameter, zeros before the first step,
        updated in place.
    step : int or sequence of int
        The number of this update, 1 at the first (torch.optim's ``state["step"]`` after its
        increment); one per tensor when the tensors have taken different numbers of steps.
    lr, betas, eps, weight_decay : float
        As in torch.optim.Adam.
    foreach : bool or None, default=None
        Use ``torch._foreach_*`` ops. None: yes, unless a torch.func transform is active; then
        per-tensor ops, as torch.optim's ``foreach=False``.
    """
    n = len(params)
    if not n:
        return
    beta1, beta2 = betas
    if isinstance(step, int):
        bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        step_sizes = [(lr / bias_correction1) * -1] * n
        bias_correction2_sqrts = [bias_correction2**0.5] * n
    else:
        if len(step) != n:
            raise ValueError(f"adam_update: {len(step)} step counts for {n} parameters")
        step_sizes = [(lr / (1 - beta1**s)) * -1 for s in step]
        bias_correction2_sqrts = [(1 - beta2**s) ** 0.5 for s in step]
    if _use_foreach(foreach):
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrts)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
        return
    for i, p in enumerate(params):
        g = grads[i]
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        # Out of place, then copied in: vmap has batching rules for lerp, addcmul and addcdiv
        # but not for their in-place forms; the kernels, hence the results, are the same.
        exp_avgs[i].copy_(torch.lerp(exp_avgs[i], g, 1 - beta1))
        exp_avg_sqs[i].copy_(torch.addcmul(exp_avg_sqs[i] * beta2, g, g, value=1 - beta2))
        denom = (exp_avg_sqs[i].sqrt() / bias_correction2_sqrts[i]).add_(eps)
        p.copy_(torch.addcdiv(p, exp_avgs[i], denom, value=step_sizes[i]))


def _present(grads: list[Tensor | None]) -> bool:
    """Whether every gradient is set: runs per batch, so a plain loop.

    ``all(g is not None for g in grads)`` takes ~3x as long (generator), and ``None in grads``
    ~2000x (it calls ``Tensor.__eq__(None)`` on every element).
    """
    for g in grads:  # noqa: SIM110
        if g is None:
            return False
    return True


class LocalOptimizer(ABC):
    """A fresh-per-client-round optimizer: ``step()`` and ``zero_grad()``, nothing to save.

    Parameters are grouped by (device, dtype) once, as torch.optim's foreach path groups them,
    so each foreach call sees one device and dtype and takes the fused kernels.
    """

    __slots__ = ("_groups", "_params")

    def __init__(self, params: Iterable[Tensor]) -> None:
        self._params: list[Tensor] = list(params)
        if len({id(p) for p in self._params}) != len(self._params):
            raise ValueError("optimizer given the same parameter more than once")
        by_key: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self._params:
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
            if not p.is_floating_point():
                raise ValueError(f"optimizer parameters must be real floating point, got {p.dtype}")
            by_key.setdefault((p.device, p.dtype), []).append(p)
        self._groups: list[list[Tensor]] = list(by_key.values())

    @abstractmethod
    def _step_group(self, index: int, params: list[Tensor], grads: list[Tensor | None]) -> None:
        """Update group ``index`` (``grads`` read from ``.grad`` just now, None where unset)."""

    def step(self) -> None:
        """Update every parameter that has a gradient; the others, and their state, stay as they are."""
        prev = torch.is_grad_enabled()
        _set_grad_enabled(False)
        try:
            for i, params in enumerate(self._groups):
                self._step_group(i, params, [p.grad for p in params])
        finally:
            _set_grad_enabled(prev)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (default), or zero them in place as torch.optim does."""
        if set_to_none:
            for p in self._params:
                p.grad = None
            return
        grads = []
        for p in self._params:
            g = p.grad
            if g is not None:
                if g.grad_fn is not None:
                    g.detach_()
                else:
                    g.requires_grad_(False)
                grads.append(g)
        if grads:
            torch._foreach_zero_(grads)


class LocalSGD(LocalOptimizer):
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` (dampening 0, no Nesterov).

    Parameters
    ----------
    params : iterable of Tensor
        Leaf tensors to optimise.
    lr : float
        Learning rate.
    momentum : float, default=0.0
        Heavy-ball momentum; 0 is plain SGD and keeps no buffers.
    weight_decay : float, default=0.0
        L2 penalty added to the gradient.
    """

    __slots__ = ("_bufs", "_ready", "lr", "momentum", "weight_decay")

    def __init__(
        self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        if lr < 0.0 or momentum < 0.0 or weight_decay < 0.0:
            raise ValueError(
                f"invalid SGD settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # Per group: momentum buffers (None until the parameter's first gradient), and whether
        # all of them exist (then a step with every gradient set is a single sgd_update).
        self._bufs: list[list[Tensor | None]] = [[None] * len(g) for g in self._groups]
        self._ready = [False] * len(self._groups)

    def _step_group(self, index: int, params: list[Tensor], grads: list[Tensor | None]) -> None:
        kw = {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay, "foreach": True}
        if self.momentum == 0:
            if not _present(grads):
                params = [p for p, g in zip(params, grads, strict=True) if g is not None]
                grads = [g for g in grads if g is not None]
            sgd_update(params, grads, (), **kw)
            return
        bufs = self._bufs[index]
        if self._ready[index] and _present(grads):
            sgd_update(params, grads, bufs, first_step=False, **kw)
            return
        # Some gradient unset or some buffer missing: a buffer starts as its parameter's first
        # gradient. Splitting the step in two changes nothing numerically (every op is
        # element-wise), and torch.optim too updates a mix of new and old buffers tensor by tensor.
        old: list[tuple[Tensor, Tensor, Tensor]] = []
        new: list[tuple[Tensor, Tensor, Tensor]] = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is None:
                continue
            b = bufs[i]
            if b is None:
                b = bufs[i] = torch.empty_like(g)
                new.append((p, g, b))
            else:
                old.append((p, g, b))
        for triples, first in ((old, False), (new, True)):
            if triples:
                ps, gs, bs = zip(*triples, strict=True)
                sgd_update(list(ps), list(gs), list(bs), first_step=first, **kw)
        self._ready[index] = _present(bufs)


class LocalAdam(LocalOptimizer):
    """``torch.optim.Adam(params, lr, betas, eps, weight_decay)`` (L2 decay in the gradient, no amsgrad).

    Parameters
    ----------
    params : iterable of Tensor
        Leaf tensors to optimise.
    lr : float
        Learning rate.
    betas : (float, float), default=(0.9, 0.999)
        Decay rates of the first and second moment estimates.
    eps : float, default=1e-8
        Added to the denominator.
    weight_decay : float, default=0.0
        L2 penalty added to the gradient.
    """

    __slots__ = ("_exp_avg_sqs", "_exp_avgs", "_step", "_steps", "betas", "eps", "lr", "weight_decay")

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"invalid Adam settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, (betas[0], betas[1]), eps, weight_decay
        # Per group: moments (None until the parameter's first gradient) and step counts. While
        # every parameter of a group has stepped together, one int counts for all (_step); once
        # they diverge, a count per parameter (_steps) takes over for good.
        self._exp_avgs: list[list[Tensor | None]] = [[None] * len(g) for g in self._groups]
        self._exp_avg_sqs: list[list[Tensor | None]] = [[None] * len(g) for g in self._groups]
        self._step: list[int | None] = [0] * len(self._groups)
        self._steps: list[list[int] | None] = [None] * len(self._groups)

    def _step_group(self, index: int, params: list[Tensor], grads: list[Tensor | None]) -> None:
        kw = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}
        exp_avgs, exp_avg_sqs = self._exp_avgs[index], self._exp_avg_sqs[index]
        uniform = self._step[index]
        if uniform is not None and _present(grads):
            if uniform == 0:
                for i, p in enumerate(params):
                    exp_avgs[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    exp_avg_sqs[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._step[index] = uniform + 1
            adam_update(params, grads, exp_avgs, exp_avg_sqs, uniform + 1, foreach=True, **kw)
            return
        steps = self._steps[index]
        if steps is None:
            steps = self._steps[index] = [uniform or 0] * len(params)
            self._step[index] = None
        keep = [i for i, g in enumerate(grads) if g is not None]
        for i in keep:
            if exp_avgs[i] is None:
                exp_avgs[i] = torch.zeros_like(params[i], memory_format=torch.preserve_format)
                exp_avg_sqs[i] = torch.zeros_like(params[i], memory_format=torch.preserve_format)
            steps[i] += 1
        adam_update(
            [params[i] for i in keep],
            [grads[i] for i in keep],
            [exp_avgs[i] for i in keep],
            [exp_avg_sqs[i] for i in keep],
            [steps[i] for i in keep],
            foreach=True,
            **kw,
        )


def make_local_optimizer(
    name: str, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> LocalOptimizer:
    """The scenario's ``[train] optimizer``: ``"sgd"`` (with momentum) or ``"adam"`` (momentum unused).

    Parameters
    ----------
    name : {"sgd", "adam"}
        Which update.
    params : iterable of Tensor
        Leaf tensors to optimise.
    lr, momentum, weight_decay : float
        As in torch.optim; Adam keeps its default betas (0.9, 0.999) and eps 1e-8.

    Returns
    -------
    LocalOptimizer
        A fresh optimizer with empty state.
    """
    if name == "sgd":
        return LocalSGD(params, lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return LocalAdam(params, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown local optimizer {name!r}: expected 'sgd' or 'adam'")
