"""Write one benchmark's section of docs/benchmarks.md, between its markers, keeping the rest."""

from __future__ import annotations

from pathlib import Path

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
