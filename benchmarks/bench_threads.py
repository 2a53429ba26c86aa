"""The default thread count against 1 thread and all cores, on a quiet machine and under load.

Why: with two busy processes on a 2-core machine the quickstart's rounds took 16.9 s with torch's
default (2 intra-op threads) and 8.1 s with 1; on a quiet machine the two were equal (3.9 vs 4.1 s).
Target: the default (``engine.threads = "auto"``) within 1.1x of the better of {1 thread, all
cores}, both quiet and with two busy processes, which this script starts itself. Measured on the
quickstart (a small MLP, where 1 thread wins even when quiet) and on a small CNN (where all cores
win when quiet), so both ways "auto" can go are exercised.

Each measurement is a fresh ``fedlt run quickstart`` process (OMP_NUM_THREADS unset, so "auto"
measures the machine); the time is the run's own rounds timer (``summary.json`` wall_seconds).
Settings alternate in a rotating order; medians.

Usage (repo root, the venv's python)::

    python benchmarks/bench_threads.py                 # 5 repeats, writes docs/benchmarks.md
    python benchmarks/bench_threads.py --repeats 1 --no-doc
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- bench_threads:begin -->", "<!-- bench_threads:end -->"
BUSY = "while True: pass"


def cnn_scenario(work: Path) -> str:
    """W1 of bench_serial.py (the small CIFAR-shaped CNN) for 2 rounds: where more threads pay."""
    import tomli_w

    sys.path.insert(0, str(HERE))
    from bench_serial import scenario

    path = work / "cnn.toml"
    path.write_text(tomli_w.dumps(scenario(20, 500, 2, 0.5)))
    return str(path)


def run_once(scenario: str, threads: str, out: Path, env: dict[str, str]) -> tuple[float, int]:
    """Rounds seconds and the thread count the run used."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "fedlt.cli", "run", scenario, "--out", str(out), "--quiet"]
    if threads != "auto":
        cmd += ["--set", f"engine.threads={threads}"]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    return summary["wall_seconds"], summary["provenance"]["threads"]


def measure(
    scenario: str, settings: list[str], repeats: int, work: Path, env: dict[str, str]
) -> dict[str, dict]:
    times: dict[str, list[float]] = {s: [] for s in settings}
    used: dict[str, list[int]] = {s: [] for s in settings}
    for i in range(repeats):
        order = settings[i % len(settings) :] + settings[: i % len(settings)]
        for s in order:
            t, n = run_once(scenario, s, work / f"run-{s}", env)
            times[s].append(t)
            used[s].append(n)
    return {
        s: {"median": statistics.median(times[s]), "runs": times[s], "threads": used[s]} for s in settings
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = ["auto", "1", str(cores)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    work = Path(tempfile.mkdtemp(prefix="fedlt-threads-"))
    results = {}
    try:
        workloads = {"quickstart (MLP, digits)": "quickstart", "W1 CNN, 2 rounds": cnn_scenario(work)}
        for name, sc in workloads.items():
            results[(name, "quiet")] = measure(sc, settings, args.repeats, work, env)
        load = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
        try:
            time.sleep(1.0)
            for name, sc in workloads.items():
                results[(name, "two busy processes")] = measure(sc, settings, args.repeats, work, env)
        finally:
            for proc in load:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from fedlt.base.provenance import cpu_model

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        BEGIN,
        "## Thread default",
        "",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {cores} cores, "
        f"{cpu_model()}; fedlt at {commit}",
        f"- Command (repo root): `python benchmarks/bench_threads.py --repeats {args.repeats}`: the "
        "rounds of the quickstart and of bench_serial.py's W1 CNN (summary.json wall_seconds), each a fresh "
        "process, settings in rotating order, medians; the load is two `while True: pass` processes "
        "started by the script.",
        "",
        f"| workload | machine | auto | 1 thread | {cores} threads | auto / best | target | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (workload, condition), r in results.items():
        best = min(r["1"]["median"], r[str(cores)]["median"])
        ratio = r["auto"]["median"] / best
        lines.append(
            f"| {workload} | {condition} | {r['auto']['median']:.2f} s ({r['auto']['threads'][0]} threads) | "
            f"{r['1']['median']:.2f} s | {r[str(cores)]['median']:.2f} s | {ratio:.2f} | <= 1.1 | "
            f"{'pass' if ratio <= 1.1 else 'FAIL'} |"
        )
    for (workload, condition), r in results.items():
        lines.append(
            f"- {workload}, {condition}, runs (s): "
            + "; ".join(f"{s}: {[round(x, 2) for x in r[s]['runs']]}" for s in settings)
        )
    lines.append(END)
    from docsection import publish

    publish(lines, write=not args.no_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
