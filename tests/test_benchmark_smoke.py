"""Smoke test of the serial-engine benchmark: both sides run on a tiny workload and print times.

Why: benchmarks/bench_serial.py is run by hand, rarely; this keeps the floor script, the fedlt
scenario it builds and its output parsing from rotting in between. Both sides run in this
process (the benchmark itself uses subprocesses) so the test pays for one torch import, not
three. No timing is asserted.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from types import ModuleType

import pytest
from support.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = {"N": "4", "PER": "20", "R": "1", "FRAC": "0.5"}


def _load_bench() -> ModuleType:
    return load_script(Path("benchmarks/bench_serial.py"), "fedlt_bench_serial")


def test_floor_and_fedlt_sides_run_and_print_times(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load_bench()
    for key, value in TINY.items():
        monkeypatch.setenv(key, value)

    runpy.run_path(str(ROOT / "benchmarks" / "floor_fedavg.py"), run_name="__main__")
    floor = bench._numbers(capsys.readouterr().out)
    assert floor["raw_wall_s"] >= 0

    bench.fedlt_child()  # what `bench_serial.py --child` runs: fedlt.run on the equivalent scenario
    fedlt = bench._numbers(capsys.readouterr().out)
    assert fedlt["fedlt_wall_s"] >= fedlt["fedlt_rounds_s"] >= 0
    assert fedlt["torch_threads"] >= 1


def test_async_benchmark_children_run_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench_async.py's child (one mode of part 1) and split_async.py run and print what the
    parents parse; the async child starts its 400 clients plus the ones in flight at the end."""
    import json

    bench = load_script(Path("benchmarks/bench_async.py"), "fedlt_bench_async")
    bench.child_mode("digits", "buffered", tmp_path / "run")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["starts"] == 400 + 8 and out["wall_s"] > 0
    split = load_script(Path("benchmarks/split_async.py"), "fedlt_split_async")
    split.main("digits", "sync")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("digits sync: total") and "train" in line and "checkpoint" in line
