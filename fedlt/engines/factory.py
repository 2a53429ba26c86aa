"""Which engine a scenario gets: the serial one, or Ray's or Flower's (imported only when asked).

Kept apart from :mod:`fedlt.engines.base` so the engine modules (which import the base class)
and the factory (which imports them) form no import cycle.
"""

from __future__ import annotations

import importlib

from fedlt.engines.base import Engine
from fedlt.prepare import Prepared

__all__ = ["ENGINE_CLASSES", "make_engine"]

#: Engines other than the serial one, by ``engine.kind``: where each class lives, imported only
#: when a scenario asks for it. Flower's engine lives with fedlt's Flower apps (``fedlt.flower``),
#: whose ServerApp runs the driver's round loop: naming it here, not importing it, keeps the
#: layers one-way (``tests/test_layout.py``).
ENGINE_CLASSES = {"ray": "fedlt.engines.ray_engine:RayEngine", "flower": "fedlt.flower.engine:FlowerEngine"}

def make_engine(prepared: Prepared) -> Engine:
    """The engine the prepared scenario's ``[engine] kind`` names (imported only when asked for).

    ``serial`` trains one by one or, with ``engine.vectorize``, in vectorized groups: an option of
    the serial engine, not an engine of its own.
    """
    kind = prepared.scenario.engine.kind
    if kind in ENGINE_CLASSES:
        module, _, name = ENGINE_CLASSES[kind].partition(":")
        engine_cls = getattr(importlib.import_module(module), name)
    else:
        from fedlt.engines.serial import SerialEngine as engine_cls
    return engine_cls(prepared)
