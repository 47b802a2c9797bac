"""Fitting a tiny pretrained world's models, whatever the family: its VAE to the synthetic domain,
its transformer by flow matching, and the ``world.json`` record that lets a build be reused.

``worlds.kontext_world`` (FLUX.1 Kontext) and ``worlds.qwen_world`` (Qwen-Image-Edit) build their
worlds from these; the family decides the data, the layouts and the transformer's inputs.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

WORLD_FILE = "world.json"


def fit_autoencoder(
    vae,
    draw_batch: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
    max_grad_norm: float | None = None,
) -> list[float]:
    """Fit ``vae`` (an ``AutoencoderKL``-like model: ``encode(x).latent_dist``,
    ``decode(z).sample``) to the batches ``draw_batch(generator)`` returns, ``[B, 3, H, W]`` (or
    ``[B, 3, 1, H, W]`` for a video VAE) in [-1, 1]: L1 + MSE of the reconstruction from the
    posterior mean, plus a small KL that keeps latents bounded; a one-cycle learning rate peaking
    at ``lr``. Returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    vae.train()
    losses = []
    for step in range(steps):
        batch = draw_batch(generator)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.mode()).sample
        # diffusers sums the KL over dims 1-3 only; a video latent's last dim is summed here.
        kl = posterior.kl().reshape(len(batch), -1).sum(1).mean() / batch[0].numel()
        loss = F.mse_loss(reconstruction, batch) + F.l1_loss(reconstruction, batch) + 1e-3 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            logger.info("vae step %d loss %.4f", step, loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def posterior_means(vae, pixels: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``pixels: [N, 3, (1,) H, W]`` -> the posterior means ``[N, C, (1,) h, w]``,
    unnormalised, ``chunk`` images at a time."""
    return torch.cat([vae.encode(part).latent_dist.mode() for part in pixels.split(chunk)])


@torch.no_grad()
def reconstructions(vae, pixels: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """``vae``'s reconstruction (posterior mean, decoded, clamped to [-1, 1]) of
    ``pixels: [N, 3, (1,) H, W]`` in [-1, 1], ``chunk`` images at a time."""
    return torch.cat(
        [
            vae.decode(vae.encode(part).latent_dist.mode()).sample.clamp(-1, 1)
            for part in pixels.split(chunk)
        ]
    )


def mean_psnr(
    decoded: torch.Tensor, pixels: torch.Tensor, regions: torch.Tensor | None = None
) -> float:
    """Mean over images of the PSNR (dB, images in [0, 1]) of ``decoded`` vs ``pixels``
    (``[N, 3, (1,) H, W]`` in [-1, 1]), over whole images or inside each image's region
    (``regions: [N, H, W]`` bool)."""
    error = ((decoded - pixels) / 2).pow(2)
    if regions is None:
        mse = error.flatten(1).mean(1)
    else:
        planes = error.reshape(len(error), 3, *error.shape[-2:])
        mse = torch.stack(
            [plane[:, region].mean() for plane, region in zip(planes, regions, strict=True)]
        )
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def reconstruction_psnr(vae, pixels: torch.Tensor, chunk: int = 32) -> float:
    """Mean PSNR (dB, images in [0, 1]) of ``vae`` on ``pixels: [N, 3, (1,) H, W]`` in
    [-1, 1], ``chunk`` images at a time."""
    return mean_psnr(reconstructions(vae, pixels, chunk), pixels)


def pretrain_by_flow_matching(
    transformer: torch.nn.Module,
    step_loss: Callable[[torch.Generator], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
) -> list[float]:
    """Train every weight of ``transformer`` for ``steps`` AdamW steps on
    ``step_loss(generator)`` (one batch's flow-matching loss, its draws from ``generator``):
    one-cycle learning rate peaking at ``lr``, gradients clipped to norm 1. Returns the loss per
    step; the transformer is left frozen in eval mode."""
    transformer.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.2
    )
    losses = []
    for step in range(steps):
        loss = step_loss(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            logger.info("base step %d loss %.4f", step, loss.item())
    transformer.eval().requires_grad_(False)
    return losses


def reusable_record(out: Path, settings) -> dict | None:
    """The ``world.json`` record of the world in ``out`` when it was built with ``settings`` (a
    dataclass); otherwise None, with ``out`` emptied: a partial or differently built world is
    replaced as a whole, so nothing stale is mixed in."""
    record = out / WORLD_FILE
    if record.exists():
        built = json.loads(record.read_text(encoding="utf-8"))
        if built.get("settings") == asdict(settings):
            return built
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return None


def world_record(
    settings,
    psnr: float,
    vae_losses: list[float],
    base_losses: list[float],
    started: float,
    vae_seconds: float,
    **extra,
) -> dict:
    """A build's ``world.json`` record: its ``settings`` (a dataclass), the VAE's held-out
    reconstruction ``psnr``, the VAE's first and last loss, the base's first and last 20 steps'
    mean loss, the VAE's seconds and the seconds since ``started`` (``time.perf_counter``), then
    the world's ``extra`` fields."""
    assert math.isfinite(psnr)
    return {
        "settings": asdict(settings),
        "vae_reconstruction_psnr_db": round(psnr, 2),
        "vae_loss_first_last": [round(vae_losses[0], 4), round(vae_losses[-1], 4)],
        "base_loss_first_last": [
            round(float(np.mean(base_losses[:20])), 4),
            round(float(np.mean(base_losses[-20:])), 4),
        ],
        "vae_seconds": round(vae_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        **extra,
    }


def with_world_models(tiny_pipeline, vae: torch.nn.Module, transformer: torch.nn.Module):
    """``tiny_pipeline``'s class holding the world's ``vae`` and ``transformer``, and the tiny
    pipeline's other components (scheduler, tokenizers, text encoders)."""
    components = {
        name: value
        for name, value in tiny_pipeline.components.items()
        if name not in ("vae", "transformer")
    }
    return type(tiny_pipeline)(vae=vae, transformer=transformer, **components)


def write_record(out: Path, record: dict) -> None:
    """Write ``world.json``, the build's last step: a folder without it is unfinished and is
    rebuilt."""
    (out / WORLD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
