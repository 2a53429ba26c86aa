"""From a validated scenario to what a run needs, one way for every entry point and worker.

:func:`preflight` runs every check the scenario alone can answer (device, packages, plugins and
their parameters, plugin requirements, data that cannot fit) and returns the problems, so
``fedlt validate``, ``fedlt run``, ``fedlt export-flower`` and the Python API refuse the same
scenarios with the same messages, before any data is loaded. :func:`prepare` then builds the
data, the plugins and the model, checking what only the data can tell (does the model fit the
samples?). The driver, ``fedlt validate``, Ray actors and Flower nodes all prepare this way.
"""

from fedlt.prepare.build import Prepared, build_data, prepare
from fedlt.prepare.checks import preflight, raise_problems, resolve_device

__all__ = ["Prepared", "build_data", "preflight", "prepare", "raise_problems", "resolve_device"]
