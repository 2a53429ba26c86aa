"""fedlt's version, in a module of its own so packaging and ``fedlt --version`` read it without
importing anything else."""

__version__ = "0.2.0"
