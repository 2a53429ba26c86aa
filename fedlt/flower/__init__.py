"""fedlt on Flower's Message API: a ClientApp, a ServerApp that runs fedlt's round loop, the wire
format between them, a Simulation Runtime driver, and the ``flwr run`` project export.

Import the parts from their modules (``fedlt.flower.client_app``, ``fedlt.flower.server_app``,
...); this package imports nothing itself, so ``import fedlt.flower`` does not import flwr.
The dependency direction is one way: the Flower engine (:mod:`fedlt.flower.engine`) uses
this package, and only :mod:`fedlt.flower.server_app` uses fedlt's runner.
"""
