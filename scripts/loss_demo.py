"""Show what seed 001's geometry losses see: score four candidate insertions of one object.

A square object is inserted into a background inside a known mask. The candidates are the correct
insertion, a shrunk object, a shifted object and a correct object with background drift. Each
geometry term should rank the correct insertion best; plain MSE cannot tell shrink from drift.

    python scripts/loss_demo.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from losses import (
    downsample_mask_area,
    geometry_starter_loss,
    signed_distance_map_from_mask,
)

LATENT = 32
CHANNELS = 16


def insert(
    context: torch.Tensor, obj: torch.Tensor, top: int, left: int, size: int
) -> torch.Tensor:
    """Paste the top-left ``size x size`` of ``obj: [1, C, S, S]`` into ``context`` at top/left."""
    out = context.clone()
    out[..., top : top + size, left : left + size] = obj[..., :size, :size]
    return out


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, CHANNELS, LATENT, LATENT, generator=generator)
    obj = 3 + torch.randn(1, CHANNELS, 12, 12, generator=generator)
    pixel_mask = torch.zeros(1, LATENT * 8, LATENT * 8)
    pixel_mask[:, 80:176, 80:176] = 1  # the 12x12 latent square at (10, 10)
    mask = downsample_mask_area(pixel_mask, (LATENT, LATENT))
    phi = signed_distance_map_from_mask(mask > 0.5, normalize=True)
    target = insert(context, obj, 10, 10, 12)
    drift = target + 0.5 * torch.randn(target.shape, generator=generator) * (1 - mask)
    candidates = {
        "correct": target,
        "shrunk": insert(context, obj, 12, 12, 8),
        "shifted": insert(context, obj, 13, 13, 12),
        "bg drift": drift,
    }
    names = ("mse", "bg", "dice", "area", "bnd")
    print(f"{'candidate':<10}" + "".join(f"{name:>9}" for name in (*names, "total")))
    for label, z_pred in candidates.items():
        total, parts = geometry_starter_loss(z_pred, target, context, mask, signed_distance_map=phi)
        row = "".join(f"{parts[name].item():9.4f}" for name in names)
        print(f"{label:<10}{row}{total.item():9.4f}")


if __name__ == "__main__":
    main()
