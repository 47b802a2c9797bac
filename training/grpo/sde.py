"""Stochastic denoising steps with exact Gaussian log-densities, for policy-gradient training.

A sampler whose every step is a Gaussian transition ``x_next ~ N(mean, std^2 I)`` makes the
probability of a sampled trajectory explicit; GRPO compares it between the policy that sampled
and the policy being trained. Two such steps are here, each with the same marginals as the
deterministic sampler it replaces:

- :func:`flow_sde_step`: Flow-GRPO's SDE form of the rectified-flow Euler step (FLUX);
- :func:`ddim_step`: the DDIM step with ``eta > 0`` (Stable Diffusion), through diffusers' own
  ``DDIMScheduler.step``.

:func:`gaussian_log_prob` evaluates a step's density with the step's own standard deviation,
never a tempered one. Everything is fp32.
"""

from __future__ import annotations

import math

import torch


def gaussian_log_prob(
    sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float
) -> torch.Tensor:
    """``log N(sample; mean, std^2 I)`` per sample, averaged over its elements: ``[N]``.

    ``sample, mean: [N, ...]``; ``std``: a positive scalar (the steps here share one standard
    deviation across a batch) or a tensor broadcastable to ``mean``. The average is the joint
    log-density divided by the element count, so that a log-ratio of two policies, and with it
    ``--clip_range``, does not scale with the resolution (as in DDPO and Flow-GRPO).
    """
    sample, mean = sample.float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    log_density = (
        -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    )
    return log_density.flatten(1).mean(dim=1)


def gaussian_kl(
    mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor | float
) -> torch.Tensor:
    """``KL(N(mean_p, std^2 I) || N(mean_q, std^2 I))`` per sample, averaged over its elements
    like :func:`gaussian_log_prob`: ``[N]``. Two steps from one state share their std, so the
    KL is the squared distance of the means in units of the variance."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_p.device)
    return ((mean_p.float() - mean_q.float()) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)


def flow_sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float,
    sigma_next: float,
    sigma_max: float,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of Flow-GRPO's stochastic step from ``sigma`` to ``sigma_next < sigma``.

    With ``x_t = (1 - t) x0 + t eps`` and the velocity ``v = eps - x0``, the SDE
    ``dx = [v + s_t^2 / (2t) (x + (1 - t) v)] dt + s_t dw`` has the ODE's marginals; its Euler-
    Maruyama step over ``dt = sigma_next - sigma`` (negative) is Gaussian with

        s_t  = a * sqrt(sigma / (1 - sigma))           (a = ``noise_level``)
        mean = x + [v + s_t^2 / (2 sigma) (x + (1 - sigma) v)] dt
        std  = s_t * sqrt(-dt)

    At ``sigma = 1`` the denominator uses ``sigma_max`` (the schedule's second sigma) instead, as
    Flow-GRPO does, so the first step stays finite. ``noise_level = 0`` is the Euler step.

    Args:
        latents, velocity: ``[N, ...]`` fp32, the state and the model's velocity at ``sigma``.
        sigma, sigma_next: noise levels of this step, in [0, 1].
        sigma_max: the largest noise level below 1 in the schedule.
        noise_level: ``a``.

    Returns:
        ``(mean [N, ...], std)``, ``std`` a 0-dim fp32 tensor.
    """
    latents, velocity = latents.float(), velocity.float()
    dt = sigma_next - sigma
    denominator = 1 - (sigma_max if sigma == 1 else sigma)
    s_t = noise_level * math.sqrt(sigma / denominator)
    drift = velocity + s_t**2 / (2 * sigma) * (latents + (1 - sigma) * velocity)
    mean = latents + drift * dt
    std = torch.tensor(s_t * math.sqrt(-dt), dtype=torch.float32, device=latents.device)
    return mean, std


def ddim_step(
    scheduler, model_output: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the DDIM step from ``timestep`` with noise weight ``eta``.

    ``scheduler`` is a ``diffusers.DDIMScheduler`` after ``set_timesteps``; its ``step`` with
    zero noise gives the mean (prediction type, clipping and the final alpha as configured), and
    the std is ``eta * sqrt(variance)`` with DDIM's

        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)

    (``a`` the cumulative alphas, ``a_prev`` at the previous timestep of the schedule).

    Args:
        model_output: ``[N, ...]`` fp32, the (guided) prediction at ``timestep``.
        timestep: the integer timestep (0-dim).
        latents: ``[N, ...]`` fp32.
        eta: 0 is deterministic DDIM, 1 is DDPM's posterior variance.

    Returns:
        ``(mean [N, ...] fp32, std)``, ``std`` a 0-dim fp32 tensor.
    """
    mean = scheduler.step(
        model_output.float(),
        timestep,
        latents.float(),
        eta=eta,
        variance_noise=torch.zeros_like(latents, dtype=torch.float32),
        return_dict=False,
    )[0]
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[timestep]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    std = (eta * variance**0.5).to(device=latents.device, dtype=torch.float32)
    return mean, std
