"""Engines train a round's clients: in one process (serial), on Ray actors, or on Flower.

Only the serial engine is imported here; Ray and Flower engines load when a scenario asks.
"""

from fedlt.engines.base import Engine
from fedlt.engines.factory import make_engine
from fedlt.engines.serial import SerialEngine

__all__ = ["Engine", "SerialEngine", "make_engine"]
