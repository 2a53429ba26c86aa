"""Regenerate the example figures of docs/research.md from real runs (about two minutes on 2 cores).

    python docs/images/make.py

Offline: the quickstart with FedAvg, focal loss and balanced softmax (seed 0, 30 rounds).
Continual: scenarios/siblurry_quick.toml fine-tuned and with replay. Each figure is what
`fedlt plot` draws for those run folders, and the client/stream figures what
`fedlt inspect --plot` draws.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import fedlt
from fedlt.analysis.plotting import plot_client_class_counts, plot_runs, plot_stream_timeline, stream_labels
from fedlt.data.federated import build_federated_data

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="fedlt-figures-"))
    try:
        offline = []
        for name, plugins in (("fedavg", []), ("focal", [{"name": "focal"}]),
                              ("balanced-softmax", [{"name": "balanced-softmax"}])):
            fedlt.run("quickstart", out=work / name, plugins=plugins)
            offline.append(work / name)
        for path in plot_runs(offline, work / "offline"):
            shutil.copy(path, HERE / f"quickstart-{path.name}")
        continual = []
        stream = ROOT / "scenarios" / "siblurry_quick.toml"
        for name, plugins in (("fine-tune", []), ("replay", [{"name": "replay", "memory_size": 32}])):
            fedlt.run(stream, out=work / name, plugins=plugins)
            continual.append(work / name)
        for path in plot_runs(continual, work / "continual"):
            if path.name in ("anytime_accuracy.png", "task_class_accuracy.png"):
                shutil.copy(path, HERE / f"siblurry-{path.name}")
        quick = build_federated_data(fedlt.load_scenario("quickstart"))
        plot_client_class_counts(quick.client_counts, HERE / "quickstart-client_class_counts.png")
        data = build_federated_data(fedlt.load_scenario(stream))
        labels, ends = stream_labels(data)
        plot_stream_timeline(labels, HERE / "siblurry-stream_timeline.png", ends, data.num_classes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
