"""Seven remedies as fedlt plugins, written from docs/plugins.md alone: the worked example.

Client side: label smoothing (a loss), FedProx (a proximal term), gradient-similarity weights,
feature-space SMOTE. Server side: server momentum (an aggregator with state), staleness
weighting (per-client config and an aggregator). Evaluation: a neural-collapse diagnostic.
"""

from fedlt_example_remedies.diagnostic import WithinClassVariability
from fedlt_example_remedies.fedprox import FedProx
from fedlt_example_remedies.gradsim import GradientSimilarity
from fedlt_example_remedies.label_smoothing import LabelSmoothing
from fedlt_example_remedies.server_momentum import ServerMomentum
from fedlt_example_remedies.smote import FeatureSMOTE
from fedlt_example_remedies.staleness import Staleness

__all__ = [
    "FeatureSMOTE",
    "FedProx",
    "GradientSimilarity",
    "LabelSmoothing",
    "ServerMomentum",
    "Staleness",
    "WithinClassVariability",
]
