"""A model and a dataset for fedlt, declared outside it: each is an ``Entry`` (name, parameters,
one-line summary, builder) that pyproject.toml registers under an entry point of the same name."""

import math

import numpy as np
import torch
from pydantic import Field, PositiveInt
from torch import nn

from fedlt.base.registry import Entry, Params
from fedlt.base.seeding import numpy_rng
from fedlt.data.raw import RawDataset, RawSplit
from fedlt.models import FedModel

# --------------------------------------------------------------------------- the model


class TinyNetParams(Params):
    """tinynet's keys under [model], checked like a built-in model's (unknown keys refused)."""

    width: int = Field(8, ge=1, description="Hidden units.")
    gain: float = Field(1.0, gt=0, description="Scale of the initial hidden weights.")


class TinyNet(FedModel):
    """One hidden tanh layer: ``features`` and a linear ``head``, as every fedlt model has."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int, gain: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh())
        with torch.no_grad():
            self.body[1].weight.mul_(gain)
        self.feature_dim, self.num_classes = width, num_classes
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


#: build(input_shape, num_classes, **params) -> FedModel; "head": head plugins may use it.
MODEL = Entry("tinynet", TinyNetParams, "One hidden tanh layer.", TinyNet, frozenset({"head"}))

# --------------------------------------------------------------------------- the dataset


class BlobsParams(Params):
    """blobs' keys under [data]."""

    n_per_class: PositiveInt = Field(40, description="Training samples per class.")
    num_classes: int = Field(3, ge=2, description="Classes.")
    spread: float = Field(0.5, gt=0, description="Standard deviation around each class centre.")


def load_blobs(seed: int, n_per_class: int, num_classes: int, spread: float) -> RawDataset:
    """Gaussian blobs in 4 dimensions around centres drawn from the scenario's seed."""
    rng = numpy_rng(seed, "blobs")
    centres = 3.0 * rng.standard_normal((num_classes, 4))

    def split(n: int) -> RawSplit:
        y = np.repeat(np.arange(num_classes), n)
        x = centres[y] + spread * rng.standard_normal((len(y), 4))
        return RawSplit(x.astype(np.float32), y.astype(np.int64))

    return RawDataset(
        name="blobs",
        train=split(n_per_class),
        test=split(10),
        num_classes=num_classes,
        class_names=tuple(str(c) for c in range(num_classes)),
        input_shape=(4,),
        mean=(0.0,),
        std=(1.0,),
    )


#: build(seed, **params) -> RawDataset.
DATASET = Entry("blobs", BlobsParams, "Gaussian blobs around seeded centres.", load_blobs)
