"""Scenario dicts shared by the tests (imported by conftest.py and by test modules)."""

from __future__ import annotations

import copy
from typing import Any

from fedlt.testing import TINY as _CHECK

#: fedlt.testing's conformance scenario (4 clients, 3 rounds, half a round), named "tiny", with the
#: engine's default threads: conftest pins "auto" to one thread through OMP_NUM_THREADS.
TINY: dict[str, Any] = {**{k: copy.deepcopy(v) for k, v in _CHECK.items() if k != "engine"}, "name": "tiny"}
