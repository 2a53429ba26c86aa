"""Seed derivation: streams named by (seed, round, client, tag) are stable and independent."""

from __future__ import annotations

import sys

import pytest
import torch

from fedlt.base.allocator import keep_freed_memory
from fedlt.base.seeding import derive_seed, numpy_rng, seed_torch, torch_generator


def test_derive_seed_is_stable_and_separates_streams() -> None:
    assert derive_seed(0, "torch", 1, 2) == derive_seed(0, "torch", 1, 2)
    seeds = {derive_seed(0, "torch", r, c) for r in range(5) for c in range(5)}
    assert len(seeds) == 25 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, "torch", 1, 2) != derive_seed(0, "torch", 1, 2)
    with pytest.raises(ValueError, match=">= 0"):
        derive_seed(0, -1)


def test_seed_torch_reproduces_global_draws() -> None:
    seed_torch(3, "torch", 2, 7)
    a = torch.rand(4)
    torch.rand(10)  # advance the global generator
    seed_torch(3, "torch", 2, 7)
    assert torch.equal(torch.rand(4), a)
    seed_torch(3, "torch", 2, 8)
    assert not torch.equal(torch.rand(4), a)


def test_generators_agree_with_derived_seed() -> None:
    g = torch_generator(5, "x", 1)
    assert g.initial_seed() == derive_seed(5, "x", 1)
    assert numpy_rng(5, "x").integers(1 << 30) == numpy_rng(5, "x").integers(1 << 30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_allocator_tuning_applies_on_linux() -> None:
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
