"""What asynchrony costs the simulator: async vs sync doing the same client work, and the cost of a
server update with 100 clients in flight among 1,000 to 100,000.

Why: a researcher compares sync, FedAsync and FedBuff at equal client work, so the asynchronous
modes must not be slower to simulate (target: at most 1.1x the synchronous run's wall time); and
an asynchronous federation of 100,000 clients must cost per server update what one of 1,000
does (target: within 1.2x), since a start, an arrival and an update touch only the clients
involved.

Part 1 (same client work), on three workloads: ``digits`` (long-tailed digits, 20 clients of
about 21 samples, MLP [128, 64], 2 local epochs: a client trains in about 2 ms, so per-update
bookkeeping shows), ``synthetic`` (20 clients of 500 samples, 64 features, MLP [128, 64],
1 local epoch: about 8 ms a client) and ``anchor-w2`` (the project's overhead-bound anchor of
../shared/bench: 100 clients of 50 CIFAR-shaped samples, the floor's CNN, one batch of 50).
``sync`` 50 rounds of 8 clients, ``async`` 400 updates with 8 in flight, ``buffered`` 50 updates
of 8 arrivals; one evaluation at the end; a checkpoint every 8 client trainings in each (every
round; every 8 async updates, the default there), and on digits ``async`` again with a checkpoint
after every update. Each run is a fresh process with one thread, imports excluded; the median of
``--repeats`` runs, the runs of one repeat back to back so the machine's load hits them alike.

Part 2 (scale): synthetic data (2 samples a client plus 10,000), iid, MLP [32]; ``async`` with
100 clients in flight, 300 updates, a checkpoint every 100; seconds per update = the median of
updates 51-299 (the first ones warm up, the last evaluates).

Usage (repo root, the venv's python)::

    python benchmarks/bench_async.py                  # writes docs/benchmarks.md
    python benchmarks/bench_async.py --no-doc --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- bench_async:begin -->", "<!-- bench_async:end -->"

DIGITS: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "digits"},
    "long_tail": {"profile": "exponential", "imbalance_factor": 20},
    "partition": {"kind": "dirichlet", "n_clients": 20, "alpha": 0.3},
    "model": {"name": "mlp", "hidden": [128, 64]},
    "train": {"local_epochs": 2, "batch_size": 16, "lr": 0.05, "momentum": 0.5},
    "system": {"speed": "lognormal", "speed_sigma": 0.5, "latency": 0.05, "tail_slowdown": 10.0},
    "eval": {"shot_rule": "count", "shot_thresholds": [60, 20], "personalized": False},
    "engine": {"threads": 1},
}
SYNTHETIC: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "synthetic", "n_train": 10_000, "n_test": 2000, "shape": [64]},
    "partition": {"kind": "iid", "n_clients": 20},
    "model": {"name": "mlp", "hidden": [128, 64]},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
    "system": {"speed": "lognormal", "speed_sigma": 0.5},
    "eval": {"personalized": False},
    "engine": {"threads": 1},
}
#: The project's overhead-bound anchor (../shared/bench W2: 100 clients of 50 CIFAR-shaped samples,
#: the floor's CNN, batch 50, one local epoch), as bench_serial.py runs it.
ANCHOR_W2: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "synthetic", "n_train": 5000, "n_test": 100, "num_classes": 10, "shape": [3, 32, 32]},
    "long_tail": {"profile": "none"},
    "partition": {"kind": "iid", "n_clients": 100},
    "model": {"name": "cnn", "widths": [16, 32]},
    "train": {"local_epochs": 1, "batch_size": 50, "lr": 0.05},
    "system": {"speed": "lognormal", "speed_sigma": 0.5},
    "eval": {"personalized": False},
    "engine": {"threads": 1},
}
WORKLOADS = {"digits": DIGITS, "synthetic": SYNTHETIC, "anchor-w2": ANCHOR_W2}
#: Part 1's modes: the federation table and the checkpoint cadence of each.
MODES: dict[str, tuple[dict[str, Any], int | None]] = {
    "sync": ({"rounds": 50, "fraction_clients": 0.4, "eval_every": 0}, 1),
    "async": ({"mode": "async", "rounds": 400, "concurrency": 8, "eval_every": 0}, None),
    "buffered": ({"mode": "buffered", "rounds": 50, "concurrency": 8, "buffer_size": 8, "eval_every": 0}, 1),
    "async, checkpoint every update": (
        {"mode": "async", "rounds": 400, "concurrency": 8, "eval_every": 0},
        1,
    ),
    "sync, no checkpoint until the end": ({"rounds": 50, "fraction_clients": 0.4, "eval_every": 0}, 10_000),
    "async, no checkpoint until the end": (
        {"mode": "async", "rounds": 400, "concurrency": 8, "eval_every": 0},
        10_000,
    ),
}
SIZES = (1_000, 10_000, 100_000)
UPDATES, IN_FLIGHT = 300, 100


def scenario_for(workload: str, name: str) -> dict[str, Any]:
    """Part 1's scenario of ``workload`` in mode ``name``: 8 clients a round or in flight."""
    federation, every = MODES[name]
    if "fraction_clients" in federation:  # 8 clients a round, whatever the federation's size
        federation = {**federation, "fraction_clients": 8 / WORKLOADS[workload]["partition"]["n_clients"]}
    s = {
        **WORKLOADS[workload],
        "name": "bench-async",
        "federation": federation,
        "checkpoint": {"every": every},
    }
    if every is None:
        del s["checkpoint"]
    return s


def child_mode(workload: str, name: str, out: Path) -> None:
    import fedlt
    import fedlt.api

    s = scenario_for(workload, name)
    t0 = time.perf_counter()
    summary = fedlt.run(s, out=out)
    wall = time.perf_counter() - t0
    starts = summary["federation"]["starts"]
    print(json.dumps({"wall_s": wall, "starts": starts, "accuracy": summary["final"]["accuracy"]}))


def child_scale(n: int, out: Path) -> None:
    from docsection import timed_rounds

    build, times = timed_rounds(
        {
            "name": f"async-{n}",
            "data": {"dataset": "synthetic", "n_train": 2 * n + 10_000, "n_test": 2000, "shape": [20]},
            "partition": {"kind": "iid", "n_clients": n},
            "model": {"name": "mlp", "hidden": [32]},
            "train": {"batch_size": 16},
            "federation": {"mode": "async", "rounds": UPDATES, "concurrency": IN_FLIGHT, "eval_every": 0},
            "system": {"speed": "lognormal", "speed_sigma": 0.5},
            "checkpoint": {"every": 100},
            "eval": {"personalized": False},
            "engine": {"threads": 1},
        },
        out,
    )
    print(json.dumps({"n": n, "build_s": build, "updates_s": times}))


def _child(args: list[str], out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, *args, "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--scale", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    if args.mode is not None:
        child_mode(*args.mode, args.out)
        return 0
    if args.scale is not None:
        child_scale(args.scale, args.out)
        return 0
    work = Path(tempfile.mkdtemp(prefix="fedlt-async-"))
    cases = [(w, m) for w in WORKLOADS for m in MODES if w == "digits" or "every update" not in m]
    walls: dict[tuple[str, str], list[float]] = {c: [] for c in cases}
    info: dict[tuple[str, str], dict[str, Any]] = {}
    scale: dict[int, dict[str, Any]] = {}
    try:
        for i in range(args.repeats):
            for j, case in enumerate(cases):
                r = _child(["--mode", *case], work / f"{i}-{j}")
                walls[case].append(r["wall_s"])
                info[case] = r
                print(f"repeat {i + 1}: {case}: {r['wall_s']:.2f} s", file=sys.stderr)
        for n in SIZES:
            scale[n] = _child(["--scale", str(n)], work / f"scale-{n}")
            print(
                f"{n} clients: {statistics.median(scale[n]['updates_s'][50:-1]) * 1e3:.1f} ms/update",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from fedlt.base.provenance import cpu_model

    med = {c: statistics.median(w) for c, w in walls.items()}
    per_update = {n: statistics.median(r["updates_s"][50:-1]) for n, r in scale.items()}
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        BEGIN,
        "## Asynchronous federations",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {os.cpu_count()} cores, "
        f"{cpu_model()}; fedlt at {commit}; one thread",
        f"- Command (repo root): `python benchmarks/bench_async.py --repeats {args.repeats}`.",
        "",
        f"Same client work (400 client trainings; median wall seconds of {args.repeats} fresh processes):",
        "",
        "| workload | mode | clients started | wall | vs sync |",
        "|---|---|---|---|---|",
    ]
    for w, m in cases:
        ratio = med[(w, m)] / med[(w, "sync")]
        lines.append(f"| {w} | {m} | {info[(w, m)]['starts']} | {med[(w, m)]:.2f} s | {ratio:.2f}x |")
    lines.append("")
    for w in WORKLOADS:
        worst = max(med[(w, "async")], med[(w, "buffered")]) / med[(w, "sync")]
        verdict = "pass" if worst <= 1.1 else "FAIL"
        bare = med[(w, "async, no checkpoint until the end")] / med[(w, "sync, no checkpoint until the end")]
        lines.append(
            f"- {w}: async and buffered at most {worst:.2f}x sync with their default checkpoints (target "
            f"<= 1.1: {verdict}); without checkpoints until the end, async {bare:.2f}x sync "
            f"({'pass' if bare <= 1.1 else 'FAIL'}). An async checkpoint holds the weights each in-flight "
            "client started from (8 models here, 1 for sync): the price of resuming it exactly."
        )
    every = med[("digits", "async, checkpoint every update")] / med[("digits", "async")]
    bare_ms = {
        w: (med[(w, "async, no checkpoint until the end")] - med[(w, "sync, no checkpoint until the end")])
        / 400
        * 1e3
        for w in WORKLOADS
    }
    lines += [
        "- Where async's extra time goes: a server update, a start and a copy of the global weights per "
        "client trained instead of per round of 8 (FedAsync mixes the whole model at each arrival; the "
        "copy is what the clients started from that version train from): "
        + ", ".join(f"{w} {ms:+.2f} ms" for w, ms in bare_ms.items())
        + " per client against sync without checkpoints (a digits client trains in about 2 ms). Checkpoints "
        "are serialised in the loop and written on a background thread, so their fsyncs overlap training.",
        f"- A checkpoint after every async update (`checkpoint.every = 1`) costs {every:.2f}x the default of "
        "one every `concurrency` updates.",
        "- Clients started beyond 400: the ones still in flight at the end (started, never trained).",
        "",
        f"Scale ({IN_FLIGHT} clients in flight, {UPDATES} updates, 2 samples a client):",
        "",
        "| clients | data build | seconds per update |",
        "|---|---|---|",
    ]
    for n, r in scale.items():
        lines.append(f"| {n:,} | {r['build_s']:.1f} s | {per_update[n] * 1e3:.2f} ms |")
    ratio = per_update[SIZES[-1]] / per_update[SIZES[0]]
    lines += [
        "",
        f"- Seconds per update, {SIZES[-1]:,} / {SIZES[0]:,} clients: {ratio:.2f} (target <= 1.2: "
        f"{'pass' if ratio <= 1.2 else 'FAIL'}).",
        END,
    ]
    from docsection import publish

    publish(lines, write=not args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
