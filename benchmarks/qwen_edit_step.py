"""Qwen-Image-Edit training steps with seed 000's mask loss on vs off, and with the latent cache
on vs off, measured side by side on the tiny random model (CPU).

The mask-loss variants run on pre-encoded batches (what --cache_latents feeds the loop), in
alternating blocks of one process. The cache comparison times whole steps from pixels: without
the cache every step runs the vision-language encoder and encodes the condition image at the
pipeline's 1024x1024 area; with it, a step reads tensors.

    python benchmarks/qwen_edit_step.py [--resolution 64] [--batch 2] [--blocks 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import tempfile

import torch

import train_qwen_edit_mask as qwen
from benchmarks.harness import print_ratios, time_variants, training_step
from data.rows import collate_items
from data.synthetic import write_text_edit_dataset
from data.text_edits import TextEditDataset
from training.config import MaskLossSettings
from training.lora.adapters import LoraFormat, add_lora
from worlds.tiny_models import tiny_qwen_image_edit_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per variant")
    parser.add_argument("--steps", type=int, default=3, help="steps per block")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = tiny_qwen_image_edit_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    common = {"pretrained_model_name_or_path": "-", "train_data_dir": "-", "rank": 16}
    plain = qwen.QwenEditConfig(**common)
    masked = dataclasses.replace(plain, mask_loss=MaskLossSettings(enabled=True))
    add_lora(pipe.transformer, plain, qwen.LORA_LAYERS, LoraFormat(type(pipe)))
    with tempfile.TemporaryDirectory() as folder:
        write_text_edit_dataset(folder, n=args.batch, resolution=args.resolution, seed=0)
        dataset = TextEditDataset.from_folder(
            folder, resolution=args.resolution, use_text_mask=True
        )
        pixels = collate_items([dataset[i] for i in range(args.batch)])
    encoder = qwen.QwenEditEncoder(pipe, plain)
    encoded = encoder(pixels)
    optimizer = torch.optim.AdamW(
        [p for p in pipe.transformer.parameters() if p.requires_grad], lr=1e-4
    )

    def step(config, batch, is_encoded):
        loss_fn = qwen.QwenEditLoss(pipe, config, encoder, is_encoded)
        return training_step(pipe.transformer, loss_fn, batch, optimizer, "cpu")

    print(f"tiny Qwen-Image-Edit, cpu, batch {args.batch}, {args.resolution}x{args.resolution}")
    print_ratios(
        time_variants(
            {
                "flow matching": step(plain, encoded, True),
                "+ mask loss": step(masked, encoded, True),
            },
            args.blocks,
            args.steps,
            "cpu",
        )
    )
    print_ratios(
        time_variants(
            {
                "cached (tensors)": step(plain, encoded, True),
                "uncached (pixels)": step(plain, pixels, False),
            },
            max(1, args.blocks // 2),
            1,
            "cpu",
        )
    )


if __name__ == "__main__":
    main()
