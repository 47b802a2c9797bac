"""VAE latents as distributions: encode once (or cache), sample at every step as the pipelines do.

The inpainting pipelines encode their masked image by *sampling* the VAE's latent distribution
(``retrieve_latents`` in sample mode) with the call's generator, then shift and scale it. Keeping
the distribution (mean and standard deviation, ``[B, C, h, w]``) instead of one sample lets a
cached item be sampled afresh at every step, and the draw is exactly the pipeline's for the same
generator state.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor


def latent_distribution(vae, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pixels: [B, 3, H, W]`` in [-1, 1] -> ``{"mean", "std"}``, each ``[B, C, H/8, W/8]``,
    of the VAE's latent distribution, before any shift or scale."""
    distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
    return {"mean": distribution.mean, "std": distribution.std}


def sample_scaled_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator | None,
    scaling_factor: float,
    shift_factor: float | None = None,
) -> torch.Tensor:
    """``(mean + std * eps - shift) * scale``, ``eps`` drawn as diffusers' ``latent_dist.sample``
    draws it (``randn_tensor`` of ``mean``'s shape, device and dtype): ``[B, C, h, w]``."""
    noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    sample = mean + std * noise
    return (sample - (shift_factor or 0.0)) * scaling_factor
