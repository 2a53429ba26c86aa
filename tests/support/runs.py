"""Runs cut off as a kill would leave them, for resume and bad-folder tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedlt
from fedlt.driver.runner import Run


class Interrupted(Exception):
    """Raised from a run's round callback to cut it off, as a crash would."""


def interrupt_run(scenario: dict[str, Any], run_dir: Path, after: int) -> Run:
    """Start ``scenario`` in ``run_dir`` and cut it off after round ``after``: the folder then holds
    what a killed run leaves (the checkpoint of round ``after``)."""
    run = Run.create(fedlt.load_scenario(scenario), run_dir)

    def stop(r: int, record: Any) -> None:
        if r == after:
            raise Interrupted

    run.on_round = stop
    with pytest.raises(Interrupted):
        run.execute()
    return run
