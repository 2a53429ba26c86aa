"""Every random draw in fedlt derives from (seed, round, client) and a purpose tag.

Deriving streams this way, rather than from global RNG state, is what makes engines agree: the
same client in the same round draws the same numbers whichever process or worker trains it.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["derive_seed", "hash_uniform", "hash_uniforms", "numpy_rng", "seed_torch", "torch_generator"]


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


# --------------------------------------------------------------------------- counter-based draws

_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers that spreads every input bit."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def hash_uniform(seed: int, *parts: int | str) -> float:
    """A uniform number in [0, 1) named by ``(seed, *parts)``, without a generator.

    For draws looked up one at a time in any order (is client ``c`` available in window ``w``?
    does it drop out of dispatch ``d``?), where a generator per query would cost tens of
    microseconds and one generator would make the answer depend on the order of the questions.
    """
    z = _mix(_key(seed))
    for part in parts:
        z = _mix(z ^ _key(part))
    return (z >> 11) / float(1 << 53)


def hash_uniforms(seed: int, tag: int | str, clients: np.ndarray, *parts: int | str) -> np.ndarray:
    """:func:`hash_uniform` ``(seed, tag, client, *parts)`` for many clients at once (the same numbers)."""
    with np.errstate(over="ignore"):
        base = np.uint64(_mix(_mix(_key(seed)) ^ _key(tag)))
        z = _mix_array(base ^ np.asarray(clients, dtype=np.uint64))
        for part in parts:
            z = _mix_array(z ^ np.uint64(_key(part)))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _mix_array(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
