"""Time per round and memory against the total number of clients: 1,000 vs 100,000.

Why: a federation of 100,000 clients with 100 trained per round should cost per round what one
of 1,000 does (targets: seconds per round within 1.2x), and memory should grow only with what
clients own (their index arrays, per-client plugin state), never with per-client models.

Each size is a fresh process: synthetic data (2 samples per client plus 10,000), an iid split,
a small MLP, 100 clients a round, 8 rounds; seconds per round is the median of rounds 2-7 (round 1
warms up, the last one evaluates); peak RSS from getrusage.

Usage (repo root, the venv's python)::

    python benchmarks/bench_clients.py                 # writes docs/benchmarks.md
    python benchmarks/bench_clients.py --no-doc
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- bench_clients:begin -->", "<!-- bench_clients:end -->"
ROUNDS = 8
PER_ROUND = 100


def child(n: int, out: Path) -> None:
    from docsection import timed_rounds

    build, times = timed_rounds(
        {
            "name": f"clients-{n}",
            "data": {"dataset": "synthetic", "n_train": 2 * n + 10_000, "n_test": 2000, "shape": [20]},
            "partition": {"kind": "iid", "n_clients": n},
            "model": {"name": "mlp", "hidden": [32]},
            "train": {"batch_size": 16},
            "federation": {"rounds": ROUNDS, "fraction_clients": PER_ROUND / n, "eval_every": 0},
            "eval": {"personalized": False},
            "engine": {"threads": 1},
        },
        out,
    )
    ckpt = (out / "checkpoint.pt").stat().st_size
    print(
        json.dumps(
            {
                "n": n,
                "build_s": build,
                "rounds_s": times,
                "ckpt_bytes": ckpt,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child, args.out)
        return 0
    work = Path(tempfile.mkdtemp(prefix="fedlt-clients-"))
    results = {}
    try:
        for n in (1_000, 100_000):
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--out", str(work / str(n))],
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                check=True,
                capture_output=True,
                text=True,
            )
            results[n] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_round = {n: statistics.median(r["rounds_s"][1:-1]) for n, r in results.items()}
    ratio = per_round[100_000] / per_round[1_000]
    from fedlt.base.provenance import cpu_model

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        BEGIN,
        "## 100,000 clients",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {os.cpu_count()} cores, "
        f"{cpu_model()}; fedlt at {commit}; one thread",
        "- Command (repo root): `python benchmarks/bench_clients.py`: synthetic data (2 samples a client + "
        f"10,000), iid split, MLP [32], {PER_ROUND} clients a round, {ROUNDS} rounds, one process per size; "
        "seconds per round = median of rounds 2-7.",
        "",
        "| clients | data build | seconds per round | peak RSS | checkpoint |",
        "|---|---|---|---|---|",
    ]
    for n, r in results.items():
        lines.append(
            f"| {n:,} | {r['build_s']:.1f} s | {per_round[n]:.3f} s | {r['peak_rss_mib']:.0f} MiB | "
            f"{r['ckpt_bytes'] / 1024:.0f} KiB |"
        )
    lines += [
        "",
        f"- Seconds per round, 100,000 / 1,000 clients: {ratio:.2f} (target <= 1.2: "
        f"{'pass' if ratio <= 1.2 else 'FAIL'}).",
        "- What grows with the clients: their index arrays and class counts (owned data), the data build "
        "(partition and local test views, once); per-client plugin state is stored only for clients that "
        "have any, and no per-client model is ever kept.",
        END,
    ]
    from docsection import publish

    publish(lines, write=not args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
