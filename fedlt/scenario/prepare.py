"""Getting a validated scenario ready to run: its data, with every check that needs the data."""

from __future__ import annotations

from typing import Any

import torch

from fedlt.data.federated import FederatedData, build_federated_data
from fedlt.data.raw import RawDataset
from fedlt.models import check_model

__all__ = ["build_data"]


def build_data(scenario: Any, device: torch.device | str = "cpu") -> FederatedData:
    """The scenario's data, with the model checked against the samples' shape and classes as soon
    as the dataset is loaded (before the long tail, the partition or any tensor is built), so a
    model that does not fit fails in milliseconds, naming the ``model.*`` key."""

    def model_fits(raw: RawDataset) -> None:
        check_model(scenario.model.name, tuple(raw.input_shape), raw.num_classes, **scenario.model.params())

    return build_federated_data(scenario, device, check_raw=model_fits)
