"""fedlt's serial engine against the plain PyTorch loop (the floor), on the anchor workloads.

Why: fedlt promises that running a scenario through it costs (almost) nothing over writing the
FedAvg loop by hand. This script measures that promise on the two anchor workloads of
../shared/bench (W1 compute-bound, W2 overhead-bound) and writes the result to
docs/benchmarks.md.

Each measurement is a fresh subprocess with the same environment (N, PER, R, FRAC), floor and
fedlt alternating (the order flips every repeat) so that machine noise hits both alike; the
ratio is taken from medians. Both sides time only the work, after their imports:

- floor: ``benchmarks/floor_fedavg.py`` times its rounds (client data generated inside them),
  with ``torch._dynamo`` imported before (its first torch.optim optimizer would import it inside
  the timer; fedlt's optimizers never import it).
- fedlt: this file with ``--child`` imports torch and fedlt's run modules, then times
  ``fedlt.run(...)`` (scenario validation, dataset build, rounds, per-round checkpoints, final
  evaluation).

Whole-process wall times (interpreter start and imports included) are recorded beside them.

Usage (repo root, the venv's python)::

    python benchmarks/bench_serial.py              # 5 repeats, writes docs/benchmarks.md
    python benchmarks/bench_serial.py --quick      # 1 repeat, R=1: smoke check, no doc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FLOOR = HERE / "floor_fedavg.py"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_serial:begin -->", "<!-- bench_serial:end -->"

BATCH_SIZE = 50
LR = 0.05
# fedlt always evaluates the global model after the last round; the floor never does. A small
# test set keeps that extra work to a single forward batch.
N_TEST = 100


@dataclass(frozen=True)
class Workload:
    """One anchor workload: N clients of PER samples, R rounds, FRAC of the clients a round."""

    name: str
    kind: str
    n: int
    per: int
    rounds: int
    frac: float
    target: float  # fedlt / floor must be at most this

    def env(self) -> dict[str, str]:
        return {"N": str(self.n), "PER": str(self.per), "R": str(self.rounds), "FRAC": str(self.frac)}

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.env().items())


WORKLOADS = (
    Workload("W1", "compute-bound", n=20, per=500, rounds=5, frac=0.5, target=1.05),
    Workload("W2", "overhead-bound", n=100, per=50, rounds=3, frac=0.5, target=1.0),
)


# --------------------------------------------------------------------------- the fedlt side


def scenario(n: int, per: int, rounds: int, frac: float) -> dict[str, Any]:
    """The fedlt scenario equivalent to the floor: same clients, data size, model and recipe."""
    return {
        "name": "bench-serial",
        "seed": 0,
        "data": {
            "dataset": "synthetic",
            "n_train": n * per,  # iid split into n equal parts: exactly PER samples per client
            "n_test": N_TEST,
            "num_classes": 10,
            "shape": [3, 32, 32],
        },
        "long_tail": {"profile": "none"},
        "partition": {"kind": "iid", "n_clients": n},
        "model": {"name": "cnn", "widths": [16, 32]},  # layer for layer the floor's Net
        "train": {
            "optimizer": "sgd",
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "local_epochs": 1,
        },
        "federation": {"rounds": rounds, "fraction_clients": frac, "eval_every": 0},
        "eval": {"personalized": False},
        "engine": {"kind": "serial", "device": "cpu"},
        "checkpoint": {"every": 1},  # fedlt's default: an atomic, fsynced checkpoint each round
    }


def fedlt_child() -> None:
    """Run one fedlt job from the N/PER/R/FRAC environment and print its in-process timings."""
    import torch

    import fedlt
    import fedlt.api
    import fedlt.driver.runner  # fedlt imports lazily: load what a run uses before the timer

    env = os.environ
    sc = scenario(
        int(env.get("N", 20)), int(env.get("PER", 500)), int(env.get("R", 5)), float(env.get("FRAC", 0.5))
    )
    out = Path(tempfile.mkdtemp(prefix="fedlt-bench-"))
    try:
        t = time.perf_counter()
        summary = fedlt.run(sc, out=out / "run")
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"fedlt_wall_s {wall:.3f}")
    print(f"fedlt_rounds_s {summary['wall_seconds']:.3f}")
    print(f"torch_threads {torch.get_num_threads()}")


# --------------------------------------------------------------------------- the parent


@dataclass
class Sample:
    """One subprocess: its timings, and how busy other processes kept the machine meanwhile."""

    side: str
    inner: float  # seconds the subprocess timed itself (after imports)
    process: float  # whole-process wall seconds
    cpu: float  # CPU seconds the subprocess used (user + system, all threads)
    others_before: float  # cores other processes used just before the run
    others_during: float  # cores other processes used, on average, during the run
    extra: dict[str, float] = field(default_factory=dict)


def _numbers(text: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) ([-+0-9.eE]+)$", text, re.M)}


def _cpu_times() -> tuple[float, float] | None:
    """Machine-wide (busy, total) CPU seconds since boot, from /proc/stat; None without it."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    return (sum(values) - idle) / tick, sum(values) / tick


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_side(side: str, env: dict[str, str], others_before: float = float("nan")) -> Sample:
    """Run the floor or fedlt once in a fresh interpreter with ``env`` added.

    Besides the times, records how many cores *other* processes kept busy during the run (all
    CPU used on the machine minus what this subprocess used), so noisy runs can be redone.
    """
    # The floor's first torch.optim optimizer imports torch._dynamo (about 2.5 s); fedlt's own
    # optimizers never do. Importing it before the floor's timer keeps that one-time cost out of
    # the in-process comparison, so the ratio compares the loops (it stays in the process times).
    floor = f"import torch._dynamo, runpy; runpy.run_path({str(FLOOR)!r}, run_name='__main__')"
    script = ["-c", floor] if side == "floor" else [str(Path(__file__)), "--child"]
    cmd = [sys.executable, *script]
    stat0, cpu0 = _cpu_times(), _children_cpu()
    t = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
    process = time.perf_counter() - t
    stat1, cpu = _cpu_times(), _children_cpu() - cpu0
    others = float("nan")
    if stat0 is not None and stat1 is not None:
        others = max(0.0, (stat1[0] - stat0[0]) - cpu) / process
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    nums = _numbers(proc.stdout)
    key = "raw_wall_s" if side == "floor" else "fedlt_wall_s"
    if key not in nums:
        raise RuntimeError(f"{side} printed no {key}:\n{proc.stdout}")
    inner = nums.pop(key)
    return Sample(side, inner, process, cpu, others_before, others, nums)


def busy_cores(interval: float = 1.0) -> float:
    """Cores kept busy by other processes right now (sampled between our runs, so not ours).

    The load average would still count our own previous run for minutes; /proc/stat over a
    short interval does not. Falls back to the 1-minute load where /proc is missing.
    """
    a = _cpu_times()
    if a is None:
        return os.getloadavg()[0]
    time.sleep(interval)
    b = _cpu_times()
    assert b is not None
    return (b[0] - a[0]) / interval


def wait_for_quiet(max_busy: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes use at most ``max_busy`` cores."""
    deadline = time.monotonic() + max_wait
    busy = busy_cores()
    while busy > max_busy and time.monotonic() < deadline:
        time.sleep(4)
        busy = busy_cores()
    return busy


def measure(w: Workload, repeats: int, max_busy: float, max_wait: float, retries: int) -> dict[str, Any]:
    """Alternate floor and fedlt ``repeats`` times on ``w``; medians, ratios, pass/fail.

    A pair in which other processes used more than ``max_busy`` cores during either run is
    redone (at most ``retries`` times per workload); if retries run out, the noisy pair is kept
    and counted in ``noisy_pairs_kept``.
    """
    env = w.env()
    pairs: list[tuple[Sample, Sample]] = []
    discarded, noisy_kept, left = 0, 0, retries
    rep = 0
    while rep < repeats:
        order = ("floor", "fedlt") if rep % 2 == 0 else ("fedlt", "floor")
        got: dict[str, Sample] = {}
        for side in order:
            got[side] = s = run_side(side, env, wait_for_quiet(max_busy, max_wait))
            print(
                f"  {w.name} rep {rep + 1}/{repeats} {side:5s} in-process {s.inner:7.2f} s  "
                f"process {s.process:6.2f} s  cpu {s.cpu:6.2f} s  other cores before "
                f"{s.others_before:.2f} during {s.others_during:.2f}",
                flush=True,
            )
        noisy = any(s.others_during > max_busy for s in got.values())
        if noisy and left > 0:
            left -= 1
            discarded += 1
            print(f"  {w.name} rep {rep + 1}: other processes were busy, redoing the pair", flush=True)
            continue
        noisy_kept += noisy
        pairs.append((got["floor"], got["fedlt"]))
        rep += 1
    floor = [f for f, _ in pairs]
    fed = [x for _, x in pairs]
    f_med = statistics.median(s.inner for s in floor)
    x_med = statistics.median(s.inner for s in fed)
    ratio = x_med / f_med
    f_proc = statistics.median(s.process for s in floor)
    x_proc = statistics.median(s.process for s in fed)
    return {
        "workload": asdict(w),
        "floor_median_s": f_med,
        "fedlt_median_s": x_med,
        "ratio": ratio,
        "paired_ratio_median": statistics.median(x.inner / f.inner for f, x in pairs),
        "fedlt_rounds_median_s": statistics.median(s.extra.get("fedlt_rounds_s", float("nan")) for s in fed),
        "floor_process_median_s": f_proc,
        "fedlt_process_median_s": x_proc,
        "process_ratio": x_proc / f_proc,
        "floor_cpu_median_s": statistics.median(s.cpu for s in floor),
        "fedlt_cpu_median_s": statistics.median(s.cpu for s in fed),
        "floor_runs_s": [round(s.inner, 2) for s in floor],
        "fedlt_runs_s": [round(s.inner, 2) for s in fed],
        "others_during": [round(max(f.others_during, x.others_during), 2) for f, x in pairs],
        "pairs_redone": discarded,
        "noisy_pairs_kept": noisy_kept,
        "passed": ratio <= w.target,
    }


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    """Cores, CPU model, torch version and thread count, for the record."""
    import torch

    from fedlt.base.provenance import cpu_model

    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def fedlt_source() -> str:
    """Which fedlt the children import (PYTHONPATH may point elsewhere) and its git revision."""
    import importlib.util

    spec = importlib.util.find_spec("fedlt")
    where = Path(spec.origin).parent.parent if spec and spec.origin else None
    if where is None:
        return "fedlt not found"

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    rev = git("rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "fedlt") else ""
    return f"{where}" + (f" at {rev}{dirty}" if rev else "")


def utc_date() -> str:
    try:
        return subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())


def render(results: list[dict[str, Any]], info: dict[str, Any], command: str, repeats: int) -> str:
    """The Markdown results section (between markers, so reruns replace it in place)."""
    lines = [
        BEGIN,
        "## Serial engine vs the plain PyTorch loop",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['cores']} cores, {info['cpu']}, torch {info['torch']} "
        f"({info['torch_threads']} intra-op threads), Python {info['python']}",
        f"- Command (repo root): `{command}`",
        f"- fedlt measured: {info['fedlt']}",
        f"- {repeats} repeats per workload; floor and fedlt alternate as separate subprocesses with "
        "the same environment (order flipped every repeat); medians of the in-process wall times.",
        "- Floor: `benchmarks/floor_fedavg.py` (a copy of `../shared/bench/raw_fedavg.py`), its own "
        "timer around the rounds. fedlt: time around `fedlt.run(...)` inside the subprocess, after "
        "`import torch, fedlt, fedlt.api, fedlt.driver.runner` (fedlt imports its modules lazily; the "
        "floor imports torch before its timer too).",
        "- Same work: N clients of PER samples (synthetic CIFAR-shaped, 10 classes), FRAC of them a "
        "round, one local epoch, batch 50, SGD lr 0.05 without momentum, the same CNN "
        "(conv 3->16, conv 16->32, max-pool after each, fc 2048->10).",
        "- What fedlt does beyond the floor, inside its timer: validates the scenario and writes "
        "scenario.toml; builds the whole dataset once (N*PER train + "
        f"{N_TEST} test samples) instead of regenerating each selected client's data; shuffles each "
        "client's samples (the floor takes them in order); writes an atomic, fsynced checkpoint "
        f"every round; evaluates the global model on the {N_TEST} test samples after the last "
        "round and writes metrics.jsonl and summary.json. The floor builds a new model per client; "
        "fedlt reuses one resident model.",
        "- torch._dynamo: a hand-written loop's first `torch.optim` optimizer imports it (about "
        "2.5 s, once per process); fedlt's optimizers (`fedlt/training/optim.py`, same numerics) never do. "
        "The floor subprocess imports it before its timer starts, so the in-process times compare "
        "the loops alone; the whole-process times include it on the floor side only.",
        "- Where fedlt gains: the serial engine raises glibc's mmap/trim thresholds "
        "(`fedlt/base/allocator.py`), so the buffers each step frees are reused instead of being returned "
        "to the OS and page-faulted back in (in a bare loop of the W1 step with 2 threads: 22 ms a "
        "step with glibc's defaults, 15 ms with these thresholds). The floor runs with glibc's "
        "defaults, as a hand-written loop does; the same thresholds given to the floor through "
        "`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` did not speed it up (W1, two pairs: "
        "10.75 and 10.36 s with defaults, 11.27 and 10.52 s with them).",
        "",
    ]
    for r in results:
        w = r["workload"]
        verdict = "pass" if r["passed"] else "FAIL"
        lines += [
            f"### {w['name']} ({w['kind']}): `N={w['n']} PER={w['per']} R={w['rounds']} FRAC={w['frac']}`",
            "",
            "| floor median | fedlt median | ratio fedlt/floor | target | result |",
            "|---|---|---|---|---|",
            f"| {r['floor_median_s']:.2f} s | {r['fedlt_median_s']:.2f} s | {r['ratio']:.3f} | "
            f"<= {w['target']:.2f} | {verdict} |",
            "",
            f"- Median of the per-repeat ratios: {r['paired_ratio_median']:.3f}. fedlt's own rounds timer "
            f"(`summary['wall_seconds']`: rounds, checkpoints, evaluation; no data build): "
            f"{r['fedlt_rounds_median_s']:.2f} s.",
            f"- Whole processes (interpreter start and imports included): floor "
            f"{r['floor_process_median_s']:.2f} s, fedlt {r['fedlt_process_median_s']:.2f} s, "
            f"ratio {r['process_ratio']:.3f}.",
            f"- CPU seconds per process (median, all threads): floor {r['floor_cpu_median_s']:.2f}, "
            f"fedlt {r['fedlt_cpu_median_s']:.2f}.",
            f"- Runs (s): floor {r['floor_runs_s']}, fedlt {r['fedlt_runs_s']}; cores other processes "
            f"used during each pair (max of the two): {r['others_during']}; pairs redone for noise: "
            f"{r['pairs_redone']}, noisy pairs kept: {r['noisy_pairs_kept']}.",
            "",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_doc(section: str, path: Path = DOC) -> None:
    """Replace this script's section of ``path`` (or append it), leaving the rest as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="alternating floor/fedlt pairs per workload")
    p.add_argument("--quick", action="store_true", help="smoke check: 1 repeat, R=1, no doc written")
    p.add_argument("--workloads", default="W1,W2", help="comma-separated subset of W1,W2")
    p.add_argument(
        "--max-busy",
        type=float,
        default=0.25,
        help="before each run, wait until other processes use at most this many cores",
    )
    p.add_argument("--max-wait", type=float, default=120.0, help="most seconds to wait for that, per run")
    p.add_argument(
        "--retries", type=int, default=5, help="noisy pairs redone at most this often, per workload"
    )
    p.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fedlt_child()
        return 0

    wanted = {s.strip() for s in args.workloads.split(",") if s.strip()}
    workloads = [w for w in WORKLOADS if w.name in wanted]
    repeats = args.repeats
    if args.quick:
        repeats = 1
        workloads = [Workload(w.name, w.kind, w.n, w.per, 1, w.frac, w.target) for w in workloads]
    info = {"date": utc_date(), **machine(), "fedlt": fedlt_source()}
    print(
        f"{info['date']} | {info['cores']} cores, {info['cpu']}, torch {info['torch']} "
        f"({info['torch_threads']} threads) | 1-min load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    for w in workloads:
        print(f"{w.name} ({w.kind}) {w.label()}", flush=True)
        r = measure(w, repeats, args.max_busy, args.max_wait, args.retries)
        results.append(r)
        print(
            f"{w.name}: floor {r['floor_median_s']:.2f} s  fedlt {r['fedlt_median_s']:.2f} s  "
            f"ratio {r['ratio']:.3f} (target <= {w.target})  {'pass' if r['passed'] else 'FAIL'}  | "
            f"process floor {r['floor_process_median_s']:.2f} s fedlt {r['fedlt_process_median_s']:.2f} s",
            flush=True,
        )
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/bench_serial.py", *given])
    for var in ("OMP_NUM_THREADS", "PYTHONPATH"):  # environment that changes what is measured
        if os.environ.get(var):
            command = f"{var}={shlex.quote(os.environ[var])} {command}"
    if args.json:
        args.json.write_text(json.dumps({"info": info, "command": command, "results": results}, indent=2))
    if not (args.quick or args.no_doc):
        write_doc(render(results, info, command, repeats))
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
