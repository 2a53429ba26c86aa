"""The vectorized engine on CUDA against the serial engine, with host-device syncs counted.

Why: ``engine.vectorize = "auto"`` turns vectorized training on for every CUDA run, so what the CPU
tests check (serial == vectorized within float rounding, ``tests/test_vectorized.py``) must hold on
a GPU too, and the vectorized step should not stall on host-device syncs. For five scenarios (an
MLP with momentum and weight decay; a CNN with Adam and crop-flip; a BatchNorm ResNet-8; a
Si-Blurry stream with a prior-based loss estimated from the model and the seen-class mask; FedLoGe's
SSE-C + GLA-FR with its trained local heads) this runs three rounds serially and vectorized on
CUDA, compares the final weights and client states (``|v - s| <= 5e-5 + 1e-4 |s|``, the CPU
tolerance; TF32 off) and counts, with ``torch.cuda.set_sync_debug_mode("warn")``, the synchronising
calls inside each vectorized training round (evaluation and checkpoints excluded).

Usage (repo root, on a CUDA machine)::

    python benchmarks/gpu_check.py                 # prints the table, writes docs/benchmarks.md
    python benchmarks/gpu_check.py --out DIR       # also DIR/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --rounds 1 --no-doc   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
TOL = {"rtol": 1e-4, "atol": 5e-5}

IMAGES = {"dataset": "synthetic", "n_train": 480, "n_test": 80, "num_classes": 10, "shape": [3, 16, 16]}
BASE: dict[str, Any] = {
    "name": "gpu-check",
    "seed": 3,
    "data": {"dataset": "digits"},
    "long_tail": {"profile": "exponential", "imbalance_factor": 10},
    "partition": {"kind": "dirichlet", "n_clients": 8, "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [64]},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    "federation": {"rounds": 3, "fraction_clients": 1.0, "eval_every": 1},
    "eval": {"shot_rule": "count", "shot_thresholds": [60, 20], "personalized": False},
}

SCENARIOS: dict[str, dict[str, Any]] = {
    "mlp-momentum": {},
    "cnn-adam-cropflip": {
        "data": {**IMAGES, "augment": "crop-flip"},
        "model": {"name": "cnn", "widths": [8, 16]},
        "train": {"optimizer": "adam", "lr": 0.003, "momentum": 0.0},
        "eval": {"shot_rule": "count", "shot_thresholds": [40, 20], "personalized": False},
    },
    "resnet8-batchnorm": {
        "data": {**IMAGES, "augment": "crop-flip"},
        "model": {"name": "resnet8", "width": 8},
        "eval": {"shot_rule": "count", "shot_thresholds": [40, 20], "personalized": False},
    },
    "stream-prior-loss": {
        "stream": {"kind": "si-blurry", "n_tasks": 2, "samples_per_round": 64, "online_iter": 2},
        "plugins": [{"name": "logit-adjust", "prior": "estimated"}, {"name": "seen-class-mask"}],
        "train": {"momentum": 0.0, "weight_decay": 0.0},
    },
    "sse-c+gla-fr": {"plugins": [{"name": "sse-c", "n_refit_steps": 20}, {"name": "gla-fr"}]},
}


def _scenario(name: str, device: str, rounds: int) -> dict[str, Any]:
    out = copy.deepcopy(BASE)
    for key, value in SCENARIOS[name].items():
        out[key] = {**out.get(key, {}), **value} if key == "train" else value
    out["federation"]["rounds"] = rounds
    out["engine"] = {"device": device, "threads": 1}
    return out


def _run(spec: dict[str, Any], vectorize: str, out: Path, syncs: list[int]) -> Any:
    import torch

    from fedlt.driver.runner import Run
    from fedlt.engines.serial import SerialEngine
    from fedlt.scenario.config import load_scenario

    spec = copy.deepcopy(spec)
    spec["engine"]["vectorize"] = vectorize
    run = Run.create(load_scenario(spec), out)
    real = SerialEngine.train_round

    def counted(self: Any, tasks: Any, global_state: Any) -> Any:
        # Only the engine's own work is watched (not the aggregation between results), and results
        # are passed on one at a time: a serial engine's weights are live until the next one.
        cuda, gen, n = self.device.type == "cuda", real(self, tasks, global_state), 0
        while True:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    result = next(gen, None)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
            n += sum("synchroniz" in str(w.message) for w in seen)
            if result is None:
                break
            yield result
        syncs.append(n)

    SerialEngine.train_round = counted  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        run.execute()
        seconds = time.perf_counter() - t0
    finally:
        SerialEngine.train_round = real  # type: ignore[method-assign]
    return run, seconds


def _max_difference(a: Any, b: Any) -> tuple[float, bool]:
    """Largest |a - b| over the final weights and client states, and whether all are within TOL."""
    import torch

    worst, ok = 0.0, True

    def walk(x: Any, y: Any) -> None:
        nonlocal worst, ok
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                worst = max(worst, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
                ok &= bool(torch.allclose(y.double(), x.double(), **TOL))
            else:
                ok &= bool(torch.equal(x, y))
        elif isinstance(x, dict):
            for k in x:
                walk(x[k], y[k])
        elif isinstance(x, list | tuple):
            for u, v in zip(x, y, strict=True):
                walk(u, v)

    walk(a.model.state_dict(), b.model.state_dict())
    walk(a.client_states, b.client_states)
    return worst, ok


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", help="comma-separated scenario names")
    p.add_argument("--out", type=Path, help="also write gpu_check.json here")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from bench_gpu import ensure_fedlt, machine

    ensure_fedlt()
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedlt-gpu-check-") as tmp:
        for name in names:
            spec = _scenario(name, args.device, args.rounds)
            serial_syncs: list[int] = []
            vector_syncs: list[int] = []
            serial, s_time = _run(spec, "off", Path(tmp) / f"{name}-serial", serial_syncs)
            vectorized, v_time = _run(spec, "on", Path(tmp) / f"{name}-vectorized", vector_syncs)
            worst, ok = _max_difference(serial, vectorized)
            loss_rel = max(
                abs(b["train_loss"] - a["train_loss"]) / max(abs(a["train_loss"]), 1e-12)
                for a, b in zip(serial.history, vectorized.history, strict=True)
            )
            row = {
                "scenario": name,
                "vectorized": all(t["vectorized"] for t in vectorized.training),
                "max_abs_difference": worst,
                "within_tolerance": ok,
                "max_train_loss_rel": loss_rel,
                "syncs_per_round_vectorized": vector_syncs,
                "syncs_per_round_serial": serial_syncs,
                "seconds_serial": round(s_time, 2),
                "seconds_vectorized": round(v_time, 2),
                "peak_memory_mb": max(t.get("peak_memory_mb") or 0 for t in vectorized.training),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    section = _section(rows, machine(device), argv)
    print(section)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    if not args.no_doc and device.type == "cuda":
        _write(section)
    return {"rows": rows, "section": section}


def _section(rows: list[dict[str, Any]], where: str, argv: list[str] | None) -> str:
    cmd = "python benchmarks/gpu_check.py" + ("" if not argv else " " + " ".join(argv))
    lines = [
        BEGIN,
        "## Vectorized on CUDA against serial, host-device syncs per training round",
        "",
        f"- Date: {time.strftime('%a %b %d %H:%M:%S UTC %Y', time.gmtime())}",
        f"- Machine: {where}",
        f"- Command (repo root): `{cmd}`",
        "- Tolerance: |vectorized - serial| <= 5e-5 + 1e-4 |serial| on the final weights and client "
        "states (TF32 off); syncs: calls `torch.cuda.set_sync_debug_mode('warn')` flags inside a "
        "training round.",
        "",
        "| scenario | vectorized | max abs difference | within tolerance | train loss rel | "
        "syncs/round vectorized | syncs/round serial | s serial | s vectorized |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['vectorized']} | {r['max_abs_difference']:.2e} | "
            f"{r['within_tolerance']} | {r['max_train_loss_rel']:.1e} | {r['syncs_per_round_vectorized']} | "
            f"{r['syncs_per_round_serial']} | {r['seconds_serial']} | {r['seconds_vectorized']} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def _write(section: str) -> None:
    text = DOC.read_text() if DOC.is_file() else "# Benchmarks\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
