"""FLUX.1 Fill and SD1.5 inpainting training steps with the mask terms on vs off, side by side.

Each script's loss runs on its tiny random model with pre-encoded batches (what --cache_latents
feeds the loop), in alternating blocks of one process: Fill with plain flow matching, with seed
000's region weighting, and with the region weighting plus seed 001's background term; SD1.5
with the plain and the region-weighted loss.

    python benchmarks/inpaint_step.py [--resolution 128] [--batch 2] [--blocks 9]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses

import torch

import train_flux_fill as fill
import train_sd15_inpaint as sd15
from benchmarks.harness import print_ratios, time_variants, training_step
from data.fill_latents import mask_latents_from_pixels
from training.config import MaskLossSettings
from training.inputs.flux import FLUX_LORA_LAYERS
from training.lora.adapters import add_lora
from worlds.tiny_models import tiny_flux_fill_pipeline, tiny_sd15_inpaint_pipeline


def random_encoding(batch: int, resolution: int, channels: int) -> dict[str, torch.Tensor]:
    """Latent distributions and a box mask shaped as the scripts' encoders produce them."""
    generator = torch.Generator().manual_seed(0)
    latent = resolution // 8
    mask = torch.zeros(batch, 1, resolution, resolution)
    mask[..., resolution // 4 : resolution * 3 // 4, resolution // 3 : resolution * 2 // 3] = 1
    shape = (batch, channels, latent, latent)
    return {
        "latents_mean": torch.randn(shape, generator=generator),
        "latents_std": torch.full(shape, 0.01),
        "masked_latents_mean": torch.randn(shape, generator=generator),
        "masked_latents_std": torch.full(shape, 0.01),
        "mask": mask,
    }


def fill_variants(args) -> dict:
    pipe = tiny_flux_fill_pipeline(seed=0)
    common = {"pretrained_model_name_or_path": "-", "train_data_dir": "-", "rank": 16}
    plain = fill.FillConfig(**common)
    add_lora(pipe.transformer, plain, FLUX_LORA_LAYERS, fill.FILL_LORA)
    encoded = random_encoding(args.batch, args.resolution, 16)
    config = pipe.transformer.config
    encoded["mask_latents"] = mask_latents_from_pixels(encoded.pop("mask"))
    encoded["prompt_embeds"] = torch.randn(args.batch, 512, config.joint_attention_dim)
    encoded["pooled_prompt_embeds"] = torch.randn(args.batch, config.pooled_projection_dim)
    region = dataclasses.replace(plain, mask_loss=MaskLossSettings(enabled=True))
    both = dataclasses.replace(region, background_preservation_weight=0.5)
    configs = {"Fill: flow matching": plain, "Fill: + region": region, "Fill: + region + bg": both}
    return variants(pipe.transformer, pipe, fill.FillLoss, configs, encoded, args)


def sd15_variants(args) -> dict:
    pipe = tiny_sd15_inpaint_pipeline(seed=0)
    common = {"pretrained_model_name_or_path": "-", "train_data_dir": "-", "rank": 16}
    plain = sd15.SD15InpaintConfig(**common)
    add_lora(pipe.unet, plain, sd15.UNET_LORA_LAYERS, sd15.UNET_LORA)
    encoded = random_encoding(args.batch, args.resolution, 4)
    encoded["prompt_embeds"] = torch.randn(args.batch, 77, pipe.text_encoder.config.hidden_size)
    region = dataclasses.replace(plain, mask_loss=MaskLossSettings(enabled=True))
    configs = {"SD1.5: epsilon MSE": plain, "SD1.5: + region": region}
    model = sd15.InpaintDenoiser(pipe.unet, None)
    return variants(model, pipe, sd15.SD15Loss, configs, encoded, args)


def variants(model, pipe, loss_cls, configs: dict, encoded: dict, args) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return {
        name: training_step(model, loss_cls(pipe, config, None, True), encoded, optimizer, "cpu")
        for name, config in configs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=9, help="alternating blocks per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"tiny models, cpu, batch {args.batch}, {args.resolution}x{args.resolution}")
    for build in (fill_variants, sd15_variants):
        print_ratios(time_variants(build(args), args.blocks, args.steps, "cpu"))


if __name__ == "__main__":
    main()
