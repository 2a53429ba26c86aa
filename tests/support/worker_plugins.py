"""A plugin that works in the driver but cannot be built on a worker (tests/test_recovery.py).

Registered through $FEDLT_EXTRA_PLUGINS so Ray workers import it too. Its ``configure_model``
raises in any process other than the driver, whose pid the test puts in
$FEDLT_TEST_DRIVER_PID: the situation of a plugin whose dependency is missing on a cluster node.
"""

from __future__ import annotations

import os

from fedlt import Plugin, hookimpl

DRIVER_PID_ENV = "FEDLT_TEST_DRIVER_PID"


class DriverOnly(Plugin):
    """Builds in the driver; raises while configuring the model anywhere else."""

    @hookimpl
    def configure_model(self, model, ctx):
        if os.getpid() != int(os.environ[DRIVER_PID_ENV]):
            raise RuntimeError(f"cannot be built on a worker (pid {os.getpid()}): a missing dependency")
