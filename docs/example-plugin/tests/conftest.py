"""Make the example distribution usable as if it were pip-installed: importable here and in
worker processes, its plugins discoverable by name. (After `pip install -e docs/example-plugin`
this file changes nothing.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "label-smoothing": "fedlt_example_remedies.label_smoothing:LabelSmoothing",
    "fedprox": "fedlt_example_remedies.fedprox:FedProx",
    "gradient-similarity": "fedlt_example_remedies.gradsim:GradientSimilarity",
    "feature-smote": "fedlt_example_remedies.smote:FeatureSMOTE",
    "server-momentum": "fedlt_example_remedies.server_momentum:ServerMomentum",
    "staleness": "fedlt_example_remedies.staleness:Staleness",
    "within-class-variability": "fedlt_example_remedies.diagnostic:WithinClassVariability",
}

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
try:
    import importlib.metadata as md

    installed = {ep.name for ep in md.entry_points(group="fedlt.plugins")}
except Exception:  # pragma: no cover - metadata unavailable
    installed = set()
missing = [f"{n}={v}" for n, v in ENTRY_POINTS.items() if n not in installed]
if missing:
    os.environ["FEDLT_EXTRA_PLUGINS"] = ",".join(missing)
