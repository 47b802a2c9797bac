"""Masks of where an edit changed an image, for instruction-edit sets without OCR masks.

The change is the colour distance between context and target; thresholding it marks changed
pixels, a morphological closing joins the strokes of one word into one region and an opening
removes isolated specks (JPEG noise, resampling); an optional dilation adds a margin. The result
is what seed 000's text-region loss weighs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def change_mask(
    context: Image.Image,
    target: Image.Image,
    *,
    threshold: float = 24.0,
    close: int = 3,
    open_: int = 1,
    dilate: int = 0,
) -> np.ndarray:
    """``[H, W]`` bool: where ``target`` differs from ``context`` (same size, RGB).

    Args:
        threshold: Euclidean RGB distance (0..441) above which a pixel counts as changed.
        close: radius in pixels of the closing that merges nearby changes (0: none).
        open_: radius of the opening that removes specks smaller than it (0: none).
        dilate: radius of a final dilation, a margin around the change (0: none).

    Raises:
        ValueError: the images differ in size.
    """
    if context.size != target.size:
        raise ValueError(
            f"context {context.size[0]}x{context.size[1]} and target "
            f"{target.size[0]}x{target.size[1]} differ in size (width x height)"
        )
    before = np.asarray(context.convert("RGB"), dtype=np.float32)
    after = np.asarray(target.convert("RGB"), dtype=np.float32)
    changed = np.sqrt(((after - before) ** 2).sum(axis=-1)) > threshold
    if close:
        # Pad first, so a region at the border is not eroded by the closing's outside zeros.
        padded = np.pad(changed, close)
        changed = ndimage.binary_closing(padded, _disk(close))[close:-close, close:-close]
    if open_:
        changed = ndimage.binary_opening(changed, _disk(open_))
    if dilate:
        changed = ndimage.binary_dilation(changed, _disk(dilate))
    return changed


def mask_preview(target: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``target`` with ``mask`` tinted red, for checking masks by eye."""
    base = np.asarray(target.convert("RGB"), dtype=np.float32)
    weight = alpha * mask[..., None].astype(np.float32)
    tinted = base * (1 - weight) + np.array([255.0, 0.0, 0.0]) * weight
    return Image.fromarray(tinted.round().astype(np.uint8))
