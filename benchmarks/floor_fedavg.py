"""The floor: FedAvg as a plain sequential PyTorch loop, with no simulator around it.

Mirrors ../shared/bench/raw_fedavg.py (and the ``Net`` / ``client_data`` it imports from
flower_fedavg.py) line for line, minus the flwr import, so fedlt's serial engine can be timed
against the same floor on machines without Flower. Same environment variables: N clients, PER
samples each, R rounds, FRAC of the clients per round; batch 50, SGD lr 0.05. Prints
``raw_wall_s X``: seconds around the rounds only (client data generation included, as there).
"""

from __future__ import annotations

import os
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

N = int(os.environ.get("N", 20))
R = int(os.environ.get("R", 5))
PER = int(os.environ.get("PER", 500))
FRAC = float(os.environ.get("FRAC", 0.5))
BS = 50


class Net(nn.Module):
    """The anchor's small CNN: conv 3->16, conv 16->32 (max-pool after each), fc 32*8*8 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def client_data(cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``cid``'s synthetic CIFAR-shaped samples, regenerated from its id on every call."""
    g = torch.Generator().manual_seed(cid)
    y = torch.randint(0, 10, (PER,), generator=g)
    x = torch.randn(PER, 3, 32, 32, generator=g) + y.view(-1, 1, 1, 1) * 0.1
    return x, y


def main() -> float:
    """Run the rounds and return their wall seconds."""
    torch.manual_seed(0)
    random.seed(0)
    t = time.perf_counter()
    g = Net()
    k = max(1, int(N * FRAC))
    for _ in range(R):
        states, sizes = [], []
        for cid in random.sample(range(N), k):
            m = Net()
            m.load_state_dict(g.state_dict())
            x, y = client_data(cid)
            opt = torch.optim.SGD(m.parameters(), lr=0.05)
            for i in range(0, PER, BS):
                opt.zero_grad()
                F.cross_entropy(m(x[i : i + BS]), y[i : i + BS]).backward()
                opt.step()
            states.append(m.state_dict())
            sizes.append(PER)
        tot = sum(sizes)
        avg = {n: sum(s[n] * w / tot for s, w in zip(states, sizes, strict=True)) for n in states[0]}
        g.load_state_dict(avg)
    return time.perf_counter() - t


if __name__ == "__main__":
    print(f"raw_wall_s {main():.2f}")
