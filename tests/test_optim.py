"""fedlt.training.optim against torch.optim itself and against the update formulas written out here.

Equality is bit for bit (torch.equal) throughout, not a tolerance: fedlt.training.optim runs the same
element-wise operations in the same order as torch.optim's foreach implementation, and on CPU
the foreach ops fall back to the very per-tensor kernels of torch.optim's default loop. Only the
formula tests use a tolerance, because a hand-written ``a - lr * b`` may round differently from
the fused multiply-add inside ``Tensor.add_(b, alpha=-lr)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlt.training.optim import (
    LocalAdam,
    LocalOptimizer,
    LocalSGD,
    adam_update,
    make_local_optimizer,
    sgd_update,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
STEPS = 20
LATE = 7
# Steps at which Net.late enters the loss (so has a gradient, with zero_grad(set_to_none=True)),
# and whether the optimizer also gets the two parameters that never have one.
GRADS = {
    "some-none": (range(LATE, STEPS), True),  # the optimizer's general path at every step
    "late-start": (range(LATE, STEPS), False),  # late's state starts at step LATE, then the fast path
    "drop-out": (range(LATE), False),  # the fast path, then late's step count falls behind
    "all": (range(STEPS), False),  # the fast path at every step
}


class Net(nn.Module):
    """Two Linear layers plus the parameters an optimizer must skip or start late.

    ``fc1.bias`` is frozen (requires_grad False) and ``unused`` never enters the loss: both keep
    ``.grad`` None. ``late`` enters the loss only at the steps ``late_steps``, so its optimizer
    state may start late and its step count differ from the others' (Adam's bias correction is
    per tensor).
    """

    def __init__(self, late_steps: range) -> None:
        super().__init__()
        self.late_steps = late_steps
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 4)
        self.late = nn.Parameter(torch.full((4,), 0.1))
        self.unused = nn.Parameter(torch.ones(3))
        self.fc1.bias.requires_grad_(False)

    def forward(self, x: Tensor, step: int) -> Tensor:
        z = self.fc2(torch.relu(self.fc1(x)))
        return z * self.late if step in self.late_steps else z


def train(
    make_opt: Callable[[list[Tensor]], object],
    device: str,
    set_to_none: bool,
    clip: float | None,
    grads: str,
) -> tuple[list[Tensor], list[Tensor]]:
    """The initial and final parameters of STEPS steps from a fixed start on fixed batches."""
    late_steps, with_gradless = GRADS[grads]
    torch.manual_seed(0)
    net = Net(late_steps).to(device)
    start = [p.detach().cpu().clone() for p in net.parameters()]
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(STEPS)
    ]
    params = list(net.parameters())
    if not with_gradless:
        params = [p for p in params if p.requires_grad and p is not net.unused]
    opt = make_opt(params)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(net(x.to(device), step), y.to(device)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    return start, [p.detach().cpu() for p in net.parameters()]


LOOPS = [
    pytest.param(True, None, id="set_to_none"),
    pytest.param(False, 0.5, id="zeroed-grads-clipped"),
]
OPTIMIZERS = [
    pytest.param("sgd", {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}, id="sgd"),
    pytest.param("sgd", {"lr": 0.1, "momentum": 0.0, "weight_decay": 5e-4}, id="sgd-wd"),
    pytest.param("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}, id="sgd-momentum"),
    pytest.param("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}, id="sgd-momentum-wd"),
    pytest.param("adam", {"lr": 1e-2, "weight_decay": 0.0}, id="adam"),
    pytest.param("adam", {"lr": 1e-2, "weight_decay": 1e-3}, id="adam-wd"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("torch_foreach", [None, True], ids=["torch-default", "torch-foreach"])
@pytest.mark.parametrize("grads", list(GRADS))
@pytest.mark.parametrize(("set_to_none", "clip"), LOOPS)
@pytest.mark.parametrize(("name", "kw"), OPTIMIZERS)
def test_training_matches_torch_optim_bit_for_bit(
    name: str,
    kw: dict[str, float],
    set_to_none: bool,
    clip: float | None,
    grads: str,
    torch_foreach: bool | None,
    device: str,
) -> None:
    def reference(params: list[Tensor]) -> torch.optim.Optimizer:
        if name == "adam":
            return torch.optim.Adam(params, foreach=torch_foreach, **kw)
        return torch.optim.SGD(params, foreach=torch_foreach, **kw)

    start, want = train(reference, device, set_to_none, clip, grads)
    _, got = train(lambda ps: make_local_optimizer(name, ps, **kw), device, set_to_none, clip, grads)
    names = [n for n, _ in Net(range(0)).named_parameters()]
    for n, s, w, g in zip(names, start, want, got, strict=True):
        assert torch.equal(g, w), f"{n}: max |diff| {(g - w).abs().max().item():.3g}"
        # not vacuous: trained parameters moved, the skipped ones (grad None) did not
        assert torch.equal(w, s) == (n in ("fc1.bias", "unused")), n


@pytest.mark.parametrize(("name", "kw"), [OPTIMIZERS[3], OPTIMIZERS[5]])
def test_mixed_dtypes_match_torch_optim(name: str, kw: dict[str, float]) -> None:
    """Parameters of two dtypes: grouped by (device, dtype), as torch.optim's foreach path groups them."""
    gen = torch.Generator().manual_seed(5)
    init = [
        torch.randn(4, 3, generator=gen, dtype=dt) for dt in (torch.float32, torch.float64, torch.float32)
    ]
    grads = [[torch.randn(4, 3, generator=gen, dtype=t.dtype) for t in init] for _ in range(6)]
    reference = torch.optim.Adam if name == "adam" else torch.optim.SGD
    finals = []
    for make in (lambda ps: reference(ps, **kw), lambda ps: make_local_optimizer(name, ps, **kw)):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        finals.append(params)
    for want, got in zip(*finals, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_factory_builds_the_named_update() -> None:
    p = nn.Parameter(torch.zeros(2))
    assert isinstance(make_local_optimizer("sgd", [p], 0.1, momentum=0.9), LocalSGD)
    assert isinstance(make_local_optimizer("adam", [p], 0.1), LocalAdam)
    assert isinstance(make_local_optimizer("adam", [p], 0.1), LocalOptimizer)
    with pytest.raises(ValueError, match="unknown local optimizer"):
        make_local_optimizer("rmsprop", [p], 0.1)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_rejects_what_torch_optim_rejects(name: str) -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="non-leaf"):
        make_local_optimizer(name, [p * 2], 0.1)
    with pytest.raises(ValueError, match="more than once"):
        make_local_optimizer(name, [p, p], 0.1)
    with pytest.raises(ValueError, match="invalid"):
        make_local_optimizer(name, [p], -0.1)


def test_zero_grad_keeps_or_drops_the_gradient_tensor() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = make_local_optimizer("sgd", [p], 0.1)
    (p * 2).sum().backward()
    g = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is g and torch.equal(g, torch.zeros(3))
    opt.zero_grad()
    assert p.grad is None


# -------------------------------------------------------------------- the update formulas


def test_sgd_update_is_the_momentum_formula() -> None:
    gen = torch.Generator().manual_seed(2)
    p0, g0, g1 = (torch.randn(5, 3, dtype=torch.float64, generator=gen) for _ in range(3))
    lr, m, wd = 0.1, 0.9, 5e-4
    # buf = grad + wd p at the first step, then buf = m buf + grad + wd p; p -= lr buf
    buf1 = g0 + wd * p0
    p1 = p0 - lr * buf1
    buf2 = m * buf1 + (g1 + wd * p1)
    p2 = p1 - lr * buf2
    p, buf = p0.clone(), torch.full_like(p0, float("nan"))  # overwritten at the first step
    sgd_update([p], [g0], [buf], lr=lr, momentum=m, weight_decay=wd, first_step=True)
    sgd_update([p], [g1], [buf], lr=lr, momentum=m, weight_decay=wd)
    torch.testing.assert_close(p, p2, rtol=1e-14, atol=0)
    torch.testing.assert_close(buf, buf2, rtol=1e-14, atol=0)


def test_adam_update_is_the_bias_corrected_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    p0, g0, g1 = (torch.randn(4, 2, dtype=torch.float64, generator=gen) for _ in range(3))
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 1e-3
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    want, mm, vv = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate((g0, g1), start=1):
        d = g + wd * want
        mm = b1 * mm + (1 - b1) * d
        vv = b2 * vv + (1 - b2) * d * d
        want = want - lr * (mm / (1 - b1**t)) / ((vv / (1 - b2**t)).sqrt() + eps)
        adam_update([p], [g], [m], [v], t, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    torch.testing.assert_close(p, want, rtol=1e-12, atol=0)


# ---------------------------------------------------------- stacked clients, and vmap

K = 3
SHAPES = [(4, 3), (3,), ()]


def client_data(n_steps: int) -> tuple[list[list[Tensor]], list[list[list[Tensor]]]]:
    """Per client: initial parameters, and per step and client: gradients."""
    gen = torch.Generator().manual_seed(4)
    init = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(K)]
    grads = [[[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(K)] for _ in range(n_steps)]
    return init, grads


def separate_torch_optim(name: str, kw: dict[str, float], n_steps: int) -> list[list[Tensor]]:
    """K clients, each with its own torch.optim optimizer: the reference for a stacked update."""
    init, grads = client_data(n_steps)
    out = []
    for k in range(K):
        params = [nn.Parameter(t.clone()) for t in init[k]]
        opt = torch.optim.Adam(params, **kw) if name == "adam" else torch.optim.SGD(params, **kw)
        for step_grads in grads:
            for p, g in zip(params, step_grads[k], strict=True):
                p.grad = g.clone()
            opt.step()
        out.append([p.detach() for p in params])
    return out


def stack(per_client: list[list[Tensor]]) -> list[Tensor]:
    return [torch.stack([c[j] for c in per_client]) for j in range(len(SHAPES))]


SGD_KW = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
ADAM_KW = {"lr": 1e-2, "weight_decay": 1e-3}


@pytest.mark.parametrize("foreach", [True, False])
def test_sgd_update_on_stacked_clients_is_k_separate_updates(foreach: bool) -> None:
    n_steps = 5
    init, grads = client_data(n_steps)
    params = stack(init)
    bufs = [torch.empty_like(p) for p in params]
    for t, step_grads in enumerate(grads):
        sgd_update(params, stack(step_grads), bufs, **SGD_KW, first_step=t == 0, foreach=foreach)
    for k, want in enumerate(separate_torch_optim("sgd", SGD_KW, n_steps)):
        for p, w in zip(params, want, strict=True):
            assert torch.equal(p[k], w)


@pytest.mark.parametrize("foreach", [True, False])
def test_adam_update_on_stacked_clients_is_k_separate_updates(foreach: bool) -> None:
    n_steps = 5
    init, grads = client_data(n_steps)
    params = stack(init)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        adam_update(params, stack(step_grads), m, v, t, **ADAM_KW, foreach=foreach)
    for k, want in enumerate(separate_torch_optim("adam", ADAM_KW, n_steps)):
        for p, w in zip(params, want, strict=True):
            assert torch.equal(p[k], w)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_updates_under_vmap_over_clients(name: str) -> None:
    """Inside torch.func.vmap (no foreach batching rule) the default falls back to per-tensor ops."""
    n_steps = 4
    init, grads = client_data(n_steps)
    params = stack(init)
    state = [torch.zeros_like(p) for p in params] + [torch.zeros_like(p) for p in params]
    n = len(params)

    def one_client(t: int) -> Callable[..., list[Tensor]]:
        def update(ps: list[Tensor], gs: list[Tensor], st: list[Tensor]) -> list[Tensor]:
            if name == "sgd":
                sgd_update(ps, gs, st[:n], **SGD_KW, first_step=t == 1)
            else:
                adam_update(ps, gs, st[:n], st[n:], t, **ADAM_KW)
            return ps

        return update

    for t, step_grads in enumerate(grads, start=1):
        torch.func.vmap(one_client(t))(params, stack(step_grads), state)
    kw = SGD_KW if name == "sgd" else ADAM_KW
    for k, want in enumerate(separate_torch_optim(name, kw, n_steps)):
        for p, w in zip(params, want, strict=True):
            assert torch.equal(p[k], w)


# ---------------------------------------------------------------------- start-up cost

_NO_DYNAMO = """
import sys
import torch
torch.set_num_threads(1)
from torch import nn
import fedlt.training.optim as o
net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
params = list(net.parameters())
for name in ("sgd", "adam"):
    opt = o.make_local_optimizer(name, params, 0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(5, 4)).square().sum().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
print("torch._dynamo" in sys.modules)
"""


def test_training_steps_never_import_dynamo() -> None:
    """The point of the module: torch.optim's first optimizer imports torch._dynamo (seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _NO_DYNAMO], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    assert out.stdout.strip() == "False", out.stdout + out.stderr
