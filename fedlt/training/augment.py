"""Batch augmentation on the device (no DataLoader workers): the standard CIFAR recipe.

Split into the random draws (:func:`draw_crop_flip`, from a client's own generator) and the
gather that applies them (:func:`crop_flip_drawn`), so one client's batch and many clients'
batches trained together (vectorized) are augmented by the same code with the same draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_flip", "crop_flip_drawn", "draw_crop_flip"]


def draw_crop_flip(generator: torch.Generator, b: int, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of a crop-flip of ``b`` images, in this order: ``(2, b)`` crop offsets in
    ``[0, 2 pad]``, then ``b`` flip decisions. ``generator`` is a CPU generator."""
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    return offsets, flips


def crop_flip_drawn(
    x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int = 4
) -> torch.Tensor:
    """Crop-flip images with the draws given, for any number of images at once.

    Sample ``i`` of ``x`` (N, C, H, W) is zero-padded by ``pad``, cropped to H x W at rows
    ``offsets[0, i] + [0, H)`` and columns ``offsets[1, i] + [0, W)``, and mirrored when
    ``flips[i]``. Concatenating several clients' draws augments each client's images exactly as
    its own generator would. Non-image batches (fewer than 4 dims) are returned unchanged.
    """
    if x.dim() != 4:
        return x
    n, _, h, w = x.shape
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel zero-padded crop and horizontal flip, per sample, for (B, C, H, W).

    Draws from ``generator`` (a CPU generator) so results depend only on (seed, round, client).
    Non-image batches (fewer than 4 dims) are returned unchanged, and nothing is drawn for them.
    """
    if x.dim() != 4:
        return x
    return crop_flip_drawn(x, *draw_crop_flip(generator, x.shape[0], pad), pad)
