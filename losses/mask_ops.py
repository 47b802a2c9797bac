"""Mask layout normalisation and morphology by pooling (seed 001's mask utilities).

Masks are float in [0, 1] with 1 marking the region of interest. Morphology uses a square
structuring element of side ``2 * radius + 1`` (Chebyshev distance), computed with max-pooling so
it runs on any device and is differentiable where that makes sense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses._common import check_ndim


def as_mask_4d(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Bring a mask to ``[B, 1, H, W]`` float.

    Args:
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``; bool or floating in [0, 1].
        name: argument name used in error messages.

    Integer masks are refused rather than guessed at: a uint8 mask may hold 0/1 or 0/255.
    """
    check_ndim(mask, name, (2, 3, 4), "[H, W], [B, H, W] or [B, 1, H, W]")
    if mask.dtype == torch.bool:
        mask = mask.float()
    elif not mask.is_floating_point():
        raise ValueError(
            f"{name} must be bool or floating point in [0, 1], got {mask.dtype}; "
            "convert 0/255 images with `mask.float() / 255`"
        )
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask[:, None]
    if mask.shape[1] != 1:
        raise ValueError(f"{name} must have one channel, got shape {list(mask.shape)}")
    return mask


def downsample_mask_area(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-preserving resize of a pixel mask to latent resolution.

    Args:
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` in [0, 1].
        size: ``(h, w)`` of the latent grid.

    Returns:
        ``[B, 1, h, w]`` where each value is the fraction of its pixel footprint inside the mask
        (``interpolate(mode="area")`` is average pooling when downsampling by an integer factor),
        so the mask's total area is preserved up to the scale factor.
    """
    return F.interpolate(as_mask_4d(mask), size=tuple(size), mode="area")


def dilate(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Grey-scale dilation: each pixel takes the max over its ``(2r+1) x (2r+1)`` neighbourhood.

    ``mask: [B, 1, H, W]`` -> ``[B, 1, H, W]``; ``radius=0`` returns the mask unchanged.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def erode(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Grey-scale erosion: the min over each ``(2r+1) x (2r+1)`` neighbourhood.

    ``mask: [B, 1, H, W]`` -> ``[B, 1, H, W]``. Pixels beyond the image border do not count as
    background, so a mask touching the border is not eroded from that side (the object may
    continue outside the crop).
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0:
        return mask
    return -F.max_pool2d(-mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def boundary_band(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Band around the mask contour: ``dilate(mask, r) - erode(mask, r)``.

    ``mask: [B, 1, H, W]`` -> ``[B, 1, H, W]``. For a binary mask the band is 1 on every pixel
    within Chebyshev distance ``radius`` of a pixel of the other label (both sides of the contour,
    ``2r`` pixels wide), 0 elsewhere; empty and full masks have no band.
    """
    return dilate(mask, radius) - erode(mask, radius)


def sure_background(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Pixels certainly outside the region: ``1 - dilate(mask > 0.5, radius)``.

    ``mask``: any layout :func:`as_mask_4d` accepts -> ``[B, 1, H, W]`` in {0, 1}. The dilation
    keeps the uncertain rim around the contour (soft, area-downsampled values) out of it.
    """
    inside = (as_mask_4d(mask) > 0.5).to(mask.dtype if mask.is_floating_point() else torch.float32)
    return 1 - dilate(inside, radius)
