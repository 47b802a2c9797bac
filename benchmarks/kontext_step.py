"""Kontext training-step time with every loss on vs flow matching alone, measured side by side.

Both variants run in one process on the same LoRA-adapted transformer and the same pre-encoded
batches (what --cache_latents feeds the loop), in alternating blocks, so drift and warm-up hit
both alike. By default: the tiny random Kontext transformer on the CPU. With --flux-size: a
transformer built from FLUX.1's configuration with random weights (speed and memory do not depend
on the weights) in bf16 with gradient checkpointing, on CUDA, at 1024x1024 with a 1024x1024
context image; it also reports peak GPU memory.

    python benchmarks/kontext_step.py [--resolution 256] [--batch 2] [--blocks 9]
    python benchmarks/kontext_step.py --flux-size --resolution 1024 --batch 1
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel

import train_kontext_lora as kontext
from benchmarks.harness import print_ratios, time_variants, training_step
from benchmarks.real_size import FLUX_TRANSFORMER, denoiser_only, kontext_encoded_batch
from training.inputs.flux import FLUX_LORA_LAYERS
from training.lora.adapters import add_lora
from worlds.tiny_models import FLUX_DEV_SCHEDULER, tiny_flux_kontext_pipeline


def build_pipeline(flux_size: bool, device: torch.device, dtype: torch.dtype):
    """A Kontext pipeline holding the transformer and scheduler the loss needs."""
    if not flux_size:
        pipe = tiny_flux_kontext_pipeline(seed=0)
        return pipe.to(device)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER).to(device, dtype)
    return denoiser_only(FluxKontextPipeline, transformer, FLUX_DEV_SCHEDULER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flux-size", action="store_true", help="FLUX.1-size transformer, CUDA")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=9, help="alternating blocks per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per block")
    args = parser.parse_args()
    device = torch.device("cuda" if args.flux_size else "cpu")
    dtype = torch.bfloat16 if args.flux_size else torch.float32
    torch.manual_seed(0)

    pipe = build_pipeline(args.flux_size, device, dtype)
    common = {
        "pretrained_model_name_or_path": "benchmark",
        "train_data_dir": "benchmark",
        "resolution": args.resolution,
        "rank": 16,
    }
    # Every term on, the latent-token geometry match included (off by default there).
    all_losses = kontext.KontextConfig(**common, geometry_match_weight=0.5)
    plain = kontext.KontextConfig(
        **common, **{flag: 0 for flag in kontext.TERM_WEIGHT_FLAGS.values()}
    )
    add_lora(pipe.transformer, all_losses, FLUX_LORA_LAYERS, kontext.KONTEXT_LORA)
    if args.flux_size:
        pipe.transformer.enable_gradient_checkpointing()
    params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = kontext_encoded_batch(pipe, args.batch, args.resolution, device, dtype)
    autocast = dtype if args.flux_size else None
    variants = {
        name: kontext.KontextLoss(pipe, config, None, None, batches_are_encoded=True)
        for name, config in (("flow matching only", plain), ("all losses", all_losses))
    }

    medians = time_variants(
        {
            name: training_step(pipe.transformer, loss_fn, batch, optimizer, device, autocast)
            for name, loss_fn in variants.items()
        },
        args.blocks,
        args.steps,
        device,
    )
    tokens = (args.resolution // 16) ** 2
    size = "FLUX.1-size" if args.flux_size else "tiny"
    print(
        f"{size} Kontext transformer, {device.type}, batch {args.batch}, "
        f"{args.resolution}x{args.resolution} target + context ({2 * tokens} image tokens)"
    )
    print_ratios(medians)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
