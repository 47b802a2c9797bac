"""Rectified-flow training utilities: timestep sampling, shift, loss weighting, x_t and x0.

The sampling densities and loss weightings are diffusers' own
(``compute_density_for_timestep_sampling`` / ``compute_loss_weighting_for_sd3``); sigmas are
drawn continuously in (0, 1) rather than indexed from a 1000-step table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from training.config import FlowMatchingConfig


def resolution_shift(image_seq_len: int, scheduler_config) -> float:
    """The pipeline's shift ``exp(mu)`` for ``image_seq_len`` tokens (diffusers' calculate_shift
    with the scheduler's base/max sequence lengths and shifts)."""
    mu = calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )
    return math.exp(mu)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``s * sigma / (1 + (s - 1) * sigma)``: with s > 1, more time at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    config: FlowMatchingConfig,
    batch_size: int,
    image_seq_len: int,
    scheduler_config,
    generator: torch.Generator,
    auto_shift: Callable[[int], float] | None = None,
) -> torch.Tensor:
    """Per-sample noise levels ``[B]`` in (0, 1) for --weighting_scheme and --timestep_shift.

    --timestep_shift auto takes ``auto_shift(image_seq_len)``, the family's own rule, by default
    the FLUX.1 and Qwen-Image pipelines' :func:`resolution_shift`.

    diffusers' examples turn the density's draw ``u`` into a timestep by indexing the scheduler's
    descending table, i.e. ``sigma = 1 - u``; the same convention here keeps --logit_mean and
    --mode_scale meaning what they mean there.
    """
    u = compute_density_for_timestep_sampling(
        weighting_scheme=config.weighting_scheme,
        batch_size=batch_size,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        device=generator.device,
        generator=generator,
    )
    if config.timestep_shift != "auto":
        shift = float(config.timestep_shift)
    elif auto_shift is not None:
        shift = auto_shift(image_seq_len)
    else:
        shift = resolution_shift(image_seq_len, scheduler_config)
    return shift_sigmas(1 - u, shift)


def loss_weighting(config: FlowMatchingConfig, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights ``[B]`` for the scheme, or None where the scheme weights nothing."""
    if config.weighting_scheme not in ("sigma_sqrt", "cosmap"):
        return None
    return compute_loss_weighting_for_sd3(config.weighting_scheme, sigmas)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma noise``; ``sigmas: [B]`` broadcast over ``x0: [B, ...]``."""
    sigma = sigmas.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def predicted_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Clean latents implied by a velocity prediction: ``x0_hat = x_t - sigma v``."""
    sigma = sigmas.reshape(-1, *([1] * (x_t.ndim - 1))).to(velocity.dtype)
    return x_t - sigma * velocity
