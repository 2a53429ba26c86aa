"""What the benchmark scripts share: a run timed round by round, and writing one benchmark's
section of docs/benchmarks.md between its markers, keeping the rest."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(begin: str, end: str, section: str, path: Path = DOC) -> None:
    """Replace the text between ``begin`` and ``end`` (markers included in ``section``), or append."""
    text = path.read_text()
    if begin in text:
        head, _, rest = text.partition(begin)
        text = head + section + rest.partition(end)[2].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def publish(lines: Sequence[str], write: bool, path: Path = DOC) -> str:
    """Print the section ``lines`` (its first and last line are the markers) and, when ``write``,
    put it into docs/benchmarks.md; returns the section."""
    section = "\n".join(lines) + "\n"
    print(section)
    if write:
        write_section(lines[0], lines[-1], section, path)
    return section


def timed_rounds(spec: Mapping[str, Any], out: Path) -> tuple[float, list[float]]:
    """Run scenario ``spec`` in ``out``: seconds to validate and build it, then each round's seconds."""
    import fedlt
    from fedlt.driver.runner import Run

    t0 = time.perf_counter()
    run = Run.create(fedlt.load_scenario(dict(spec)), out)
    build = time.perf_counter() - t0
    times: list[float] = []
    last = [time.perf_counter()]

    def on_round(r: int, record: object) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    run.on_round = on_round
    run.execute()
    return build, times
