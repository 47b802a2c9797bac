"""Validation images: tensors to PIL, mask overlays and labelled grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

VALIDATION_DIR = "validation"


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> RGB image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def mask_overlay(image: Image.Image, mask: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``mask: [1, H, W]`` in [0, 1] tinted red."""
    base = np.asarray(image, dtype=np.float32)
    weight = alpha * mask.detach().float().cpu()[0].numpy()[..., None]
    tinted = base * (1 - weight) + np.array([255.0, 0.0, 0.0]) * weight
    return Image.fromarray(tinted.round().astype(np.uint8))


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str]) -> Image.Image:
    """Rows of equally sized images under a header of column ``labels``."""
    width, height = rows[0][0].size
    header = 14
    grid = Image.new("RGB", (width * len(labels), header + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((column * width + 2, 1), label, fill="black")
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            grid.paste(image.resize((width, height)), (column * width, header + row_index * height))
    return grid


def save_grid(grid: Image.Image, output_dir: str | Path, step: int) -> Path:
    """Write ``grid`` to ``<output_dir>/validation/step-<step>.png``."""
    folder = Path(output_dir) / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    grid.save(path)
    return path
