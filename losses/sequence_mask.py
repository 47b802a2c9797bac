"""Pixel masks as weights over FLUX / Qwen-Image packed latent sequences (seed 000).

The VAE compresses 8x (the real checkpoints; another factor is passed as ``vae_scale_factor``, the
pipeline's) and the transformer patchifies the latent 2x2, so token ``i`` of a packed sequence
covers a 16x16 pixel block; diffusers' ``_pack_latents`` orders the blocks row-major. A mask
becomes one weight per token: average over each 8x8 pixel block (the latent cell), then the max
over the 2x2 cells of a token, so a token touching the region at all counts as inside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from losses._common import check_ndim
from losses.mask_ops import as_mask_4d

VAE_SCALE_FACTOR = 8
PATCH_SIZE = 2


def _check_packable(height: int, width: int, name: str, vae_scale_factor: int) -> None:
    pixels_per_token = vae_scale_factor * PATCH_SIZE
    if height % pixels_per_token or width % pixels_per_token:
        fit_h = max(pixels_per_token, height // pixels_per_token * pixels_per_token)
        fit_w = max(pixels_per_token, width // pixels_per_token * pixels_per_token)
        raise ValueError(
            f"{name} of size {height}x{width} (HxW) cannot be packed: height and width must be "
            f"multiples of {pixels_per_token} (VAE factor {vae_scale_factor} x patch "
            f"{PATCH_SIZE}); resize or crop the image and its mask, e.g. to {fit_h}x{fit_w}"
        )


def map_mask_to_latent(
    image_mask: torch.Tensor, vae_scale_factor: int = VAE_SCALE_FACTOR
) -> torch.Tensor:
    """Map an image-space mask to one weight per packed latent token.

    Args:
        image_mask: ``[B, H, W]`` in [0, 1] (bool accepted), ``H`` and ``W`` multiples of
            ``2 * vae_scale_factor`` (16 for FLUX and Qwen-Image).
        vae_scale_factor: pixels per latent cell, the pipeline's ``vae_scale_factor``.

    Returns:
        ``[B, (H/16) * (W/16)]`` (for factor 8): avg-pool over each latent cell, then max over
        2x2 cells (the token), flattened row-major. Token ``i`` lines up with token ``i`` of
        ``FluxPipeline._pack_latents`` on the ``[B, C, H/8, W/8]`` latents; at 832x576 that is
        1872 tokens.
    """
    check_ndim(image_mask, "image_mask", (3,), "[B, H, W]")
    _check_packable(image_mask.shape[-2], image_mask.shape[-1], "image_mask", vae_scale_factor)
    cells = F.avg_pool2d(as_mask_4d(image_mask, "image_mask"), kernel_size=vae_scale_factor)
    tokens = F.max_pool2d(cells, kernel_size=PATCH_SIZE)
    return tokens.flatten(1)


def pack_pixel_mask(mask: torch.Tensor) -> torch.Tensor:
    """:func:`map_mask_to_latent` for a mask in any common layout.

    Args:
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``, bool or float in [0, 1], for an image
            whose height and width are multiples of 16 (any aspect ratio).

    Returns:
        ``[B, (H/16) * (W/16)]`` token weights; raises ``ValueError`` naming the size and the
        nearest packable size when the image cannot be packed.
    """
    return map_mask_to_latent(as_mask_4d(mask)[:, 0])
