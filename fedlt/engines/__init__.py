"""Engines train a round's clients: in one process (serial), later on Ray or Flower."""

from fedlt.engines.base import Engine, make_engine
from fedlt.engines.serial import SerialEngine

__all__ = ["Engine", "SerialEngine", "make_engine"]
