"""Where a run of bench_async.py's part 1 spends its time: client training, checkpoints, evaluation,
and the rest (the server's bookkeeping), timed in-process without a profiler.

Usage (repo root): ``python benchmarks/split_async.py synthetic async`` (a workload and a mode of
``bench_async.py``); one line of seconds per part.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_async  # noqa: E402


def main(workload: str, mode: str) -> None:
    import fedlt
    import fedlt.api
    import fedlt.driver.runner as runner
    import fedlt.training.worker as worker

    spent = {"train": 0.0, "checkpoint": 0.0, "evaluate": 0.0}

    def timed(owner: type, name: str, part: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(worker.ClientTrainer, "run", "train")
    timed(runner.Run, "_checkpoint", "checkpoint")
    timed(runner.Run, "_evaluate", "evaluate")
    s = bench_async.scenario_for(workload, mode)
    out = Path(tempfile.mkdtemp(prefix="fedlt-split-"))
    try:
        t0 = time.perf_counter()
        fedlt.run(s, out=out / "run")
        total = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    parts = " ".join(f"{k} {v:.3f}" for k, v in spent.items())
    print(f"{workload} {mode}: total {total:.3f} s: {parts}, rest {total - sum(spent.values()):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
