"""fedlt's Ray engine (2 workers) against its serial engine and against Flower's simulation.

Why: the Ray engine exists to use more cores than one process does; Flower's Simulation Runtime
is what users of federated simulators reach for. Both comparisons run the W1 anchor workload of
../shared/bench (20 clients x 500 CIFAR-shaped samples, 5 rounds, half the clients a round, the
small CNN, batch 50, SGD lr 0.05) in fresh subprocesses, alternating, with medians.

Timed inside each process after imports, like the anchors themselves: ``fedlt.run(...)`` for
fedlt (Ray start-up included for the Ray engine), ``run_simulation`` for Flower (its
``flower_wall_s``, Ray start-up included). Whole-process times are recorded beside them. The
steady state (time per round once workers are up) is also reported for fedlt, from the run's
own round timestamps.

Usage (repo root, the venv's python, ``pip install -e '.[ray,flower]'``)::

    python benchmarks/bench_engines.py              # 3 repeats, writes docs/benchmarks.md
    python benchmarks/bench_engines.py --quick      # 1 repeat, R=2, no doc
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
FLOWER = ROOT.parent / "shared" / "bench" / "flower_fedavg.py"
BEGIN, END = "<!-- bench_engines:begin -->", "<!-- bench_engines:end -->"


def scenario(n: int, per: int, rounds: int, frac: float, engine: dict[str, Any]) -> dict[str, Any]:
    """The W1 workload as a fedlt scenario (same model, data shapes and optimisation)."""
    return {
        "name": "bench-w1",
        "data": {"dataset": "synthetic", "n_train": n * per, "n_test": 100, "shape": [3, 32, 32]},
        "partition": {"kind": "iid", "n_clients": n},
        "model": {"name": "cnn", "widths": [16, 32]},
        "train": {"batch_size": 50, "lr": 0.05, "momentum": 0.0, "local_epochs": 1},
        "federation": {"rounds": rounds, "fraction_clients": frac, "eval_every": 0},
        "eval": {"personalized": False},
        "checkpoint": {"every": rounds},
        "engine": engine,
    }


def child(engine: str, n: int, per: int, rounds: int, frac: float, workers: int) -> None:
    """Run once and print one JSON line (run in a subprocess). The serial engine takes the idle
    cores (engine.threads = "auto"); Ray gets ``workers`` one-core workers."""
    import fedlt

    eng = {"kind": "serial"} if engine == "serial" else {"kind": "ray", "num_workers": workers, "num_cpus": 1}
    stamps: list[float] = []
    from fedlt.driver.runner import Run

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = Run.create(fedlt.load_scenario(scenario(n, per, rounds, frac, eng)), Path(tmp) / "r")
        run.on_round = lambda r, rec: stamps.append(time.perf_counter())
        run.execute()
        wall = time.perf_counter() - t0
    per_round = statistics.median([b - a for a, b in itertools.pairwise(stamps)]) if len(stamps) > 1 else None
    print(json.dumps({"wall_s": wall, "round_s": per_round}))


def ceiling_child(threads: int, steps: int) -> None:
    """Time the W1 training step (the anchor's CNN, batch 50, SGD) with ``threads`` intra-op threads."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    from floor_fedavg import Net

    from fedlt.base.allocator import keep_freed_memory

    keep_freed_memory()  # as the serial engine and every Ray worker do
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = torch.randn(500, 3, 32, 32), torch.randint(0, 10, (500,))

    def run(n: int) -> None:
        for i in range(n):
            b = slice((i % 10) * 50, (i % 10) * 50 + 50)
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()

    run(20)
    t = time.perf_counter()
    run(steps)
    print(json.dumps({"step_s": (time.perf_counter() - t) / steps}))


def ceiling(steps: int, repeats: int, workers: int = 2) -> dict[str, float]:
    """The most any ``workers``-worker engine can gain here: steps/s of that many single-thread
    processes at once against one process with that many threads (what the serial engine uses on
    as many idle cores), same step, same machine."""
    cmd = [sys.executable, __file__, "--ceiling-child", "{t}", "--steps", str(steps)]

    def launch(t: int) -> subprocess.Popen:
        return subprocess.Popen([c.format(t=t) for c in cmd], stdout=subprocess.PIPE, text=True)

    def step_s(proc: subprocess.Popen) -> float:
        out, _ = proc.communicate()
        return json.loads(out.strip().splitlines()[-1])["step_s"]

    two_threads, alone, pair = [], [], []
    for _ in range(repeats):
        two_threads.append(step_s(launch(workers)))
        alone.append(step_s(launch(1)))
        procs = [launch(1) for _ in range(workers)]
        pair.append(max(step_s(p) for p in procs))
    t2, t1, tp = (statistics.median(v) for v in (two_threads, alone, pair))
    return {"two_threads_s": t2, "one_thread_s": t1, "pair_s": tp, "speedup": workers * t2 / tp}


def measure(kind: str, env: dict[str, str], args: argparse.Namespace) -> dict[str, float | None]:
    t0 = time.perf_counter()
    if kind == "flower":
        out = subprocess.run(
            [sys.executable, str(FLOWER)], env=env, capture_output=True, text=True, cwd=FLOWER.parent
        )
        proc = time.perf_counter() - t0
        m = re.search(r"flower_wall_s ([\d.]+)", out.stdout)
        if not m:
            raise RuntimeError(f"flower run failed: {out.stderr[-2000:]}")
        return {"wall_s": float(m.group(1)), "round_s": None, "process_s": proc}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--n",
        str(args.n),
        "--per",
        str(args.per),
        "--rounds",
        str(args.rounds),
        "--frac",
        str(args.frac),
        "--workers",
        str(args.workers),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    proc = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = proc
    return res


def machine() -> str:
    import torch

    from fedlt.base.provenance import cpu_model

    cores = f"{os.cpu_count()} cores ({cpu_model()})"
    return f"{cores}, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", choices=["serial", "ray"])
    p.add_argument("--ceiling-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=200, help="training steps per ceiling measurement")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--per", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--frac", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Ray workers (one core each) and threads of the ceiling's single process (default 2; on a "
        "16-core machine run 8 and 16 with --n 64)",
    )
    args = p.parse_args()
    if args.child:
        child(args.child, args.n, args.per, args.rounds, args.frac, args.workers)
        return
    if args.ceiling_child:
        ceiling_child(args.ceiling_child, args.steps)
        return
    if args.quick:
        args.repeats, args.rounds = 1, 2
    env = {
        **os.environ,
        "N": str(args.n),
        "PER": str(args.per),
        "R": str(args.rounds),
        "FRAC": str(args.frac),
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONWARNINGS": "ignore",
    }
    ceil = ceiling(
        50 if args.quick else args.steps, args.repeats if args.quick else max(args.repeats, 3), args.workers
    )
    print(
        f"ceiling: {args.workers} threads {1000 * ceil['two_threads_s']:.1f} ms/step, 1 thread alone"
        f" {1000 * ceil['one_thread_s']:.1f}, {args.workers} single-thread processes at once"
        f" {1000 * ceil['pair_s']:.1f}"
        f" -> at most {ceil['speedup']:.2f}x",
        flush=True,
    )
    kinds = ["serial", "ray"] + (["flower"] if FLOWER.exists() else [])
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rep in range(args.repeats):
        order = kinds if rep % 2 == 0 else list(reversed(kinds))
        for kind in order:
            r = measure(kind, env, args)
            results[kind].append(r)
            print(
                f"repeat {rep + 1} {kind:6s} wall {r['wall_s']:.2f}s  process {r['process_s']:.2f}s"
                + (f"  round {r['round_s']:.2f}s" if r.get("round_s") else ""),
                flush=True,
            )

    def med(kind: str, key: str) -> float | None:
        vals = [r[key] for r in results[kind] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    s_wall, r_wall = med("serial", "wall_s"), med("ray", "wall_s")
    s_round, r_round = med("serial", "round_s"), med("ray", "round_s")
    lines = [
        BEGIN,
        f"## Ray engine ({args.workers} workers) vs serial engine vs Flower simulation (W1)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}.",
        f"Command: `python benchmarks/bench_engines.py --repeats {args.repeats} --workers {args.workers}`"
        f" (N={args.n} PER={args.per}"
        f" R={args.rounds} FRAC={args.frac}; medians of {args.repeats} alternating runs).",
        "",
        "| engine | run wall (s) | whole process (s) | steady round (s) |",
        "|---|---|---|---|",
    ]
    for kind in kinds:
        rs = med(kind, "round_s")
        lines.append(
            f"| {kind} | {med(kind, 'wall_s'):.2f} | {med(kind, 'process_s'):.2f} | "
            f"{'-' if rs is None else f'{rs:.2f}'} |"
        )
    lines += [
        "",
        f"- Ray ({args.workers} workers) speedup over serial, whole run: **{s_wall / r_wall:.2f}x**"
        + (f"; steady state per round: **{s_round / r_round:.2f}x**" if s_round and r_round else "")
        + ".",
    ]
    if "flower" in kinds:
        f_wall = med("flower", "wall_s")
        lines.append(
            f"- fedlt on Ray vs Flower simulation, whole run: **{f_wall / r_wall:.2f}x** faster"
            f" (Flower {f_wall:.2f}s vs fedlt-Ray {r_wall:.2f}s; target: faster)."
        )
    lines += [
        f"- Ceiling on this machine, measured in the same run: one W1 training step takes"
        f" {1000 * ceil['two_threads_s']:.1f} ms with {args.workers} intra-op threads (the serial engine),"
        f" {1000 * ceil['one_thread_s']:.1f} ms with 1 thread alone, and"
        f" {1000 * ceil['pair_s']:.1f} ms when {args.workers} single-thread processes run at once (the"
        f" cores slow each other down). So no {args.workers}-worker engine can train more than"
        f" **{ceil['speedup']:.2f}x** as fast as the serial engine here, before any start-up or"
        " communication; the Ray steady state above is measured against that.",
        "- The serial engine uses the idle cores (engine.threads = 'auto'); each Ray worker one thread.",
        "  Ray start-up (`ray.init` plus two actors importing torch, several seconds) is inside both"
        " the Ray and the Flower wall times.",
        END,
    ]
    block = "\n".join(lines)
    print(block)
    if args.quick:
        return
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
