"""Nothing leaks: a 1,000-round run keeps its memory flat (slow suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedlt


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux) to read the RSS")
def test_thousand_rounds_keep_memory_flat(tmp_path):
    """Quickstart-sized (digits, 10 clients, half per round), 1,000 rounds, checkpoints every 50
    and evaluations every 100: the resident set after round 1,000 is within 5% of round 50's."""
    rss: dict[int, int] = {}

    def record(r: int, _: object) -> None:
        if r in (50, 1000) or r % 100 == 0:
            rss[r] = _rss_kib()

    fedlt.run(
        "quickstart",
        out=tmp_path / "soak",
        on_round=record,
        **{
            "federation.rounds": 1000,
            "federation.eval_every": 100,
            "checkpoint.every": 50,
            "engine.threads": 1,
        },
    )
    growth = rss[1000] / rss[50] - 1
    assert growth < 0.05, f"RSS grew {growth:.1%} from round 50 to 1,000: {rss}"
