"""Every random draw in fedlt derives from (seed, round, client) and a purpose tag.

Deriving streams this way, rather than from global RNG state, is what makes engines agree: the
same client in the same round draws the same numbers whichever process or worker trains it.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["derive_seed", "numpy_rng", "seed_torch", "torch_generator"]


def _key(part: int | str) -> int:
    # Strings become stable 32-bit ints (crc32), unlike hash() which is salted per process.
    if isinstance(part, str):
        return zlib.crc32(part.encode())
    if part < 0:
        raise ValueError(f"seed parts must be >= 0, got {part}")
    return int(part)


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed derived from ``seed`` and any number of ints or string tags."""
    seq = np.random.SeedSequence([_key(seed), *(_key(p) for p in parts)])
    return int(
        seq.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64)
    ) & ((1 << 63) - 1)


def numpy_rng(seed: int, *parts: int | str) -> np.random.Generator:
    """A numpy Generator for the stream named by ``(seed, *parts)``."""
    return np.random.default_rng(np.random.SeedSequence([_key(seed), *(_key(p) for p in parts)]))


def torch_generator(seed: int, *parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch Generator on ``device`` for the stream named by ``(seed, *parts)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *parts))
    return g


def seed_torch(seed: int, *parts: int | str) -> None:
    """Seed torch's global RNG (CPU and CUDA) for code that draws from it, e.g. dropout.

    Not ``torch.manual_seed``: that also queues lazy CUDA seeding with a captured stack trace,
    which costs more than a small client's training step. CUDA generators are seeded when CUDA
    is initialised; on a CUDA run it is (the data already lives on the device) whenever a client
    is trained, the only place code may draw from the global GPU generator.
    """
    s = derive_seed(seed, *parts)
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(s)
