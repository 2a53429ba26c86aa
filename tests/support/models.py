"""Tiny hand-set models for tests that work a formula out by hand."""

from __future__ import annotations

import torch
from torch import nn

import fedlt


class Linear(fedlt.FedModel):
    """Features are the inputs; the head is a linear layer with the given weights."""

    def __init__(self, weight: list[list[float]], bias: list[float] | None = None) -> None:
        super().__init__()
        self.num_classes, self.feature_dim = len(weight), len(weight[0])
        self.head = nn.Linear(self.feature_dim, self.num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(weight))
            self.head.bias.copy_(torch.tensor(bias or [0.0] * self.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)
