"""Batch augmentation on the device (no DataLoader workers): the standard CIFAR recipe."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_flip"]


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel zero-padded crop and horizontal flip, per sample, for (B, C, H, W).

    Draws from ``generator`` (a CPU generator) so results depend only on (seed, round, client).
    Non-image batches (fewer than 4 dims) are returned unchanged.
    """
    if x.dim() != 4:
        return x
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flips = torch.rand(b, generator=generator).to(x.device) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
