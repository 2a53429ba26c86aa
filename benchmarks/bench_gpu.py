"""Vectorized client training on one GPU: fedlt's engines beside gpu_floor.py's floors, in one run.

Why: on a GPU a simulator that trains clients one after another is bound by kernel launches;
fedlt's ``engine.vectorize`` trains a round's clients together (torch.func, vmap over stacked
parameters). This script measures, on the same machine and in the same process, four ways to
train one FedAvg round of the same workload (the small CNN of ``../shared/bench/gpu_floor.py``,
width 32, synthetic CIFAR-shaped data, 10 steps of batch 32 per client, plain SGD lr 0.01):

- ``floor seq``: gpu_floor.py's sequential floor (one model, clients one after another);
- ``floor vmap``: gpu_floor.py's vmap floor (all clients at once, nothing else);
- ``fedlt serial``: fedlt's serial engine (``engine.vectorize = "off"``);
- ``fedlt vectorized``: fedlt's vectorized engine (``engine.vectorize = "on"``);

at 12, 100 and 400 clients per round, float32 and bfloat16 (autocast; fedlt's serial engine runs
it through ``engine.dtype`` on its one-by-one path). A fedlt round is ``engine.train_round`` plus
FedAvg over the yielded results, as the runner does it (every client's context, seeded plan and
hooks included); a floor round is what gpu_floor.py times. Targets: fedlt vectorized >= 10x fedlt
serial at 100 clients, and >= 0.8x the vmap floor.

Then, when the CIFAR-10 tarball is at hand, the FedLoGe protocol (ResNet-18, CIFAR-10-LT IF 100,
40 clients, 20% a round, 5 local epochs of batch 8, ``sse-c`` + ``gla-fr``): seconds per training
round (round 2: selection, training, aggregation; no evaluation, no checkpoint), serial and
vectorized, next to the 190 s per round the FedLoGe authors report.

Usage (repo root; fedlt installed, ``pip install -e .``)::

    python benchmarks/bench_gpu.py            # on a CUDA machine: about 5 minutes on an H200,
                                              # writes its section of docs/benchmarks.md
    python benchmarks/bench_gpu.py --smoke    # tiny sizes, any device (CPU here): checks the
                                              # script end to end, writes nothing

The floors come from ``--floor`` (default ``../shared/bench/gpu_floor.py``, else
``shared/bench/gpu_floor.py``), imported, not copied.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_gpu:begin -->", "<!-- bench_gpu:end -->"
FLOOR_CANDIDATES = (
    ROOT.parent / "shared" / "bench" / "gpu_floor.py",
    ROOT / "shared" / "bench" / "gpu_floor.py",
)
CIFAR_CANDIDATES = (
    ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz",
    ROOT / "shared" / "data" / "cifar10-jpeg.tar.gz",
)
#: The FedLoGe authors' seconds per round (ResNet-18, CIFAR-10-LT), the comparison point.
AUTHORS_SECONDS_PER_ROUND = 190.0
#: Targets of the issue "Speed where it matters".
TARGET_VS_SERIAL = 10.0
TARGET_VS_FLOOR = 0.8


@dataclass(frozen=True)
class Workload:
    """Per client: ``steps`` steps of batch ``bs``; the CNN's first width ``width``."""

    clients: tuple[int, ...]
    steps: int
    bs: int
    width: int
    reps: int


FULL = Workload(clients=(12, 100, 400), steps=10, bs=32, width=32, reps=3)
SMOKE = Workload(clients=(4, 8), steps=2, bs=8, width=8, reps=1)


# --------------------------------------------------------------------------- setup


def ensure_fedlt() -> None:
    """Import fedlt from this checkout; register the built-in plugins when fedlt is not installed.

    Without ``pip install -e .`` the ``fedlt_plugins`` package (the ``plugins/`` folder) has no
    entry points; it is then imported from ``plugins/`` and named in ``FEDLT_EXTRA_PLUGINS``.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import fedlt_plugins  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fedlt_plugins",
            ROOT / "plugins" / "__init__.py",
            submodule_search_locations=[str(ROOT / "plugins")],
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fedlt_plugins"] = module
        spec.loader.exec_module(module)
    from fedlt.hooks.discovery import EXTRA_PLUGINS_ENV, discover_plugins

    found = discover_plugins()
    extra = {"sse-c": "fedlt_plugins.etf:SSEC", "gla-fr": "fedlt_plugins.gla_fr:GLAFR"}
    missing = [f"{name}={value}" for name, value in extra.items() if name not in found]
    if missing:
        os.environ[EXTRA_PLUGINS_ENV] = ",".join(filter(None, [os.environ.get(EXTRA_PLUGINS_ENV), *missing]))


def find_file(given: str | None, candidates: Sequence[Path]) -> Path | None:
    if given:
        return Path(given)
    return next((p for p in candidates if p.is_file()), None)


def load_floor(path: Path) -> ModuleType:
    """gpu_floor.py as a module (its ``bench`` function; its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location("gpu_floor", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the four rounds


def floor_rate(floor: ModuleType, mode: str, w: Workload, k: int, dtype: Any) -> float:
    """Samples/s of gpu_floor.py's ``bench`` (it prints; the number is read from its line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        floor.bench(mode, w.width, k, w.steps, w.bs, dtype, w.reps)
    match = re.search(r"samples/s=\s*([0-9.]+)", out.getvalue())
    if match is None:
        raise RuntimeError(f"gpu_floor.py printed no rate: {out.getvalue()!r}")
    return float(match.group(1))


def workload_scenario(w: Workload, device: str) -> dict[str, Any]:
    """gpu_floor.py's workload as a fedlt scenario: max(clients) IID clients of steps x bs samples."""
    k = max(w.clients)
    return {
        "name": "bench-gpu",
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "n_train": k * w.steps * w.bs,
            "n_test": 10,
            "num_classes": 10,
            "shape": [3, 32, 32],
        },
        "partition": {"kind": "iid", "n_clients": k},
        # conv 3->w, w->2w, 2w->4w (3x3, ReLU, 2x2 max-pool after each), then the linear head
        "model": {"name": "cnn", "widths": [w.width, 2 * w.width, 4 * w.width]},
        "train": {"local_steps": w.steps, "batch_size": w.bs, "lr": 0.01},
        "engine": {"device": device},
    }


def fedlt_rate(scenario: Any, data: Any, w: Workload, k: int, vectorize: str, dtype: str) -> float:
    """Samples/s of fedlt rounds of the first ``k`` clients: train_round + FedAvg, as the runner."""
    import torch

    from fedlt.engines.serial import SerialEngine
    from fedlt.prepare import prepare
    from fedlt.server.aggregation import FedAvg
    from fedlt.training.round import ClientTask

    device = torch.device(scenario.engine.device)
    settings = {"vectorize": vectorize, "dtype": dtype}
    scenario = scenario.model_copy(update={"engine": scenario.engine.model_copy(update=settings)})
    engine = SerialEngine(prepare(scenario, device, data=data, checked=True))
    state = engine.trainer.model.state_dict()
    global_state = {key: state[key].clone() for key in engine.trainer.keys}

    def one_round() -> None:
        tasks = [ClientTask(c, 1, {"round": 1}, {}) for c in range(k)]
        agg = FedAvg(global_state)
        for result in engine.train_round(tasks, global_state):
            agg.add(result.weights, result.n_samples, result.client_id)
        agg.result()

    one_round()  # warm-up: kernels chosen, the first vmap's one-time imports
    sync(device)
    t0 = time.perf_counter()
    for _ in range(w.reps):
        one_round()
    sync(device)
    seconds = (time.perf_counter() - t0) / w.reps
    engine.close()
    return k * w.steps * w.bs / seconds


def fedloge_seconds(cifar: Path | None, device: str, smoke: bool) -> dict[str, float]:
    """Seconds of round 2 of the FedLoGe protocol, serial and vectorized."""
    from fedlt.driver.runner import Run
    from fedlt.scenario.config import load_scenario

    if smoke:
        data: dict[str, Any] = {
            "dataset": "synthetic",
            "n_train": 400,
            "n_test": 40,
            "num_classes": 10,
            "shape": [3, 16, 16],
            "augment": "crop-flip",
        }
        model: dict[str, Any] = {"name": "resnet8", "width": 16}
        plugins = [{"name": "sse-c", "n_refit_steps": 10}, {"name": "gla-fr"}]
        n_max = None
    else:
        data = {"dataset": "imagefolder", "root": str(cifar), "augment": "crop-flip"}
        model = {"name": "resnet18"}
        plugins = [{"name": "sse-c"}, {"name": "gla-fr"}]
        n_max = 5000
    spec = {
        "name": "fedloge-protocol",
        "seed": 3407,
        "data": data,
        # IF 10 at smoke size: 40 samples a class cannot hold a 100:1 tail (a class would be empty).
        "long_tail": {"profile": "exponential", "imbalance_factor": 10 if smoke else 100}
        | ({"n_max": n_max} if n_max else {}),
        "partition": {"kind": "dirichlet", "n_clients": 40, "alpha": 0.5},
        "model": model,
        "train": {
            "local_epochs": 1 if smoke else 5,
            "batch_size": 8,
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 5e-4,
        },
        "federation": {"rounds": 3, "fraction_clients": 0.2, "eval_every": 0},
        "eval": {"shot_rule": "cumulative", "personalized": False},
        "checkpoint": {"every": 1000},
        "plugins": plugins,
        "engine": {"device": device},
    }
    out = {}
    for vectorize in ("off", "on"):
        scenario = load_scenario(spec)
        scenario = scenario.model_copy(
            update={"engine": scenario.engine.model_copy(update={"vectorize": vectorize})}
        )
        stamps: dict[int, float] = {}

        def stamp(r: int, record: Any, stamps: dict[int, float] = stamps) -> None:
            stamps[r] = time.perf_counter()

        with tempfile.TemporaryDirectory() as tmp:
            run = Run.create(scenario, Path(tmp) / "run")
            run.on_round = stamp
            run.execute()
        out["serial" if vectorize == "off" else "vectorized"] = stamps[2] - stamps[1]
    return out


# --------------------------------------------------------------------------- reporting


def machine(device: Any) -> str:
    import platform

    import torch

    from fedlt.base.provenance import cpu_model

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    python = platform.python_version()
    return f"{where}, {os.cpu_count()} cores, torch {torch.__version__}{cuda}, Python {python}"


def render(
    rows: list[dict[str, Any]], fedloge: dict[str, float] | None, info: dict[str, str], w: Workload
) -> str:
    """The Markdown section (between markers, so a rerun replaces it in place)."""
    lines = [
        BEGIN,
        "## Vectorized client training on one GPU",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}",
        f"- Command (repo root): `{info['command']}`",
        f"- Workload: gpu_floor.py's small CNN (width {w.width}; fedlt's `cnn` with widths "
        f"[{w.width}, {2 * w.width}, {4 * w.width}], the same three convolutions), synthetic CIFAR-shaped "
        f"data, {w.steps} steps of batch {w.bs} per client, SGD lr 0.01; {w.reps} timed rounds after a "
        "warm-up. fedlt rounds: `train_round` + FedAvg over its results (contexts, seeded plans, hooks "
        "included); fedlt serial in bfloat16 is the serial path under autocast (`engine.dtype`).",
        "- Samples/s (higher is better):",
        "",
        "| clients | dtype | floor seq | floor vmap | fedlt serial | fedlt vectorized | vectorized / serial "
        "| vectorized / vmap floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['dtype']} | {r['floor_seq']:,.0f} | {r['floor_vmap']:,.0f} | "
            f"{r['serial']:,.0f} | {r['vectorized']:,.0f} | {r['vs_serial']:.1f}x | {r['vs_floor']:.2f}x |"
        )
    lines.append("")
    at100 = [r for r in rows if r["clients"] == 100]
    for r in at100:
        ok_serial = "pass" if r["vs_serial"] >= TARGET_VS_SERIAL else "FAIL"
        ok_floor = "pass" if r["vs_floor"] >= TARGET_VS_FLOOR else "FAIL"
        lines.append(
            f"- Targets at 100 clients, {r['dtype']}: vectorized / serial {r['vs_serial']:.1f}x "
            f"(>= {TARGET_VS_SERIAL:.0f}x: {ok_serial}); vectorized / vmap floor {r['vs_floor']:.2f}x "
            f"(>= {TARGET_VS_FLOOR}x: {ok_floor})."
        )
    if fedloge:
        lines += [
            "",
            "FedLoGe protocol (ResNet-18, CIFAR-10-LT IF 100 from the JPEG copy, 40 clients x 20% a round, "
            "5 local epochs of batch 8, `sse-c` + `gla-fr`), seconds per training round (round 2; "
            "no evaluation or checkpoint inside):",
            "",
            "| fedlt serial | fedlt vectorized | authors (reported) |",
            "|---|---|---|",
            f"| {fedloge['serial']:.1f} s | {fedloge['vectorized']:.1f} s "
            f"| {AUTHORS_SECONDS_PER_ROUND:.0f} s |",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_doc(section: str, path: Path = DOC) -> None:
    """Replace this script's section of ``path`` (or append it), leaving the rest as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def fast_math() -> Any:
    """cuDNN autotuning and TF32, as gpu_floor.py's main sets them, for every side; restored after."""
    import torch

    before = (
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        (
            torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ) = before


def measure(
    args: argparse.Namespace, w: Workload, dtypes: list[str], device: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    """The floors, both engines and the FedLoGe round; the doc section written unless told not to."""
    import torch

    from fedlt.data.federated import build_federated_data
    from fedlt.scenario.config import load_scenario

    floor_path = find_file(args.floor, FLOOR_CANDIDATES)
    if floor_path is None:
        raise SystemExit("gpu_floor.py not found: pass --floor PATH")
    floor = load_floor(floor_path)
    if floor.dev != device.type:
        raise SystemExit(f"gpu_floor.py runs on {floor.dev}, this script on {device.type}")
    log(f"device: {machine(device)}; floor: {floor_path}")

    t0 = time.perf_counter()
    scenario = load_scenario(workload_scenario(w, device.type))
    data = build_federated_data(scenario, device)
    log(f"data: {data.x_train.shape[0]} samples on {device} in {time.perf_counter() - t0:.1f} s")
    rows = []
    for dtype in dtypes:
        torch_dtype = getattr(torch, dtype)
        for k in w.clients:
            row: dict[str, Any] = {"clients": k, "dtype": dtype}
            row["floor_seq"] = floor_rate(floor, "seq", w, k, torch_dtype)
            row["floor_vmap"] = floor_rate(floor, "vmap", w, k, torch_dtype)
            row["serial"] = fedlt_rate(scenario, data, w, k, "off", dtype)
            row["vectorized"] = fedlt_rate(scenario, data, w, k, "on", dtype)
            row["vs_serial"] = row["vectorized"] / row["serial"]
            row["vs_floor"] = row["vectorized"] / row["floor_vmap"]
            rows.append(row)
            log(
                f"{k:4d} clients {dtype:8s} samples/s: floor seq {row['floor_seq']:,.0f}, "
                f"floor vmap {row['floor_vmap']:,.0f}, fedlt serial {row['serial']:,.0f}, "
                f"fedlt vectorized {row['vectorized']:,.0f} ({row['vs_serial']:.1f}x serial, "
                f"{row['vs_floor']:.2f}x vmap floor)"
            )
    del data
    fedloge = None
    cifar = find_file(args.cifar, CIFAR_CANDIDATES)
    if not args.no_fedloge and (args.smoke or cifar is not None):
        fedloge = fedloge_seconds(cifar, device.type, args.smoke)
        log(
            f"FedLoGe protocol: {fedloge['serial']:.1f} s per round serial, {fedloge['vectorized']:.1f} s "
            f"vectorized (authors: {AUTHORS_SECONDS_PER_ROUND:.0f} s)"
        )
    elif not args.no_fedloge:
        log("FedLoGe protocol skipped: no CIFAR-10 tarball (pass --cifar PATH)")
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(device),
        "command": " ".join(["python benchmarks/bench_gpu.py", *args.argv]),
    }
    section = render(rows, fedloge, info, w)
    if not (args.smoke or args.no_doc):
        write_doc(section)
        log(f"wrote {DOC}")
    log(f"total {time.perf_counter() - t0:.0f} s")
    return {"rows": rows, "fedloge": fedloge, "section": section}


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device; writes nothing")
    p.add_argument("--clients", help="comma-separated clients per round (default 12,100,400)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--reps", type=int, help="timed rounds per measurement (default 3)")
    p.add_argument("--floor", help="path of gpu_floor.py (default ../shared/bench/gpu_floor.py)")
    p.add_argument("--cifar", help="CIFAR-10 JPEG tarball (default ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--no-fedloge", action="store_true", help="skip the FedLoGe protocol round")
    p.add_argument("--no-doc", action="store_true", help="print only; do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    ensure_fedlt()
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = SMOKE if args.smoke else FULL
    w = Workload(
        clients=tuple(int(c) for c in args.clients.split(",")) if args.clients else base.clients,
        steps=base.steps,
        bs=base.bs,
        width=base.width,
        reps=args.reps or base.reps,
    )
    dtypes = [d for d in args.dtypes.split(",") if d]
    with fast_math():
        return measure(args, w, dtypes, device, log)


if __name__ == "__main__":
    main()
