"""Encode an inpainting folder once into seed 004's precomputed FLUX.1 Fill layout.

python scripts/precompute_flux_fill.py \\
    --pretrained_model_name_or_path black-forest-labs/FLUX.1-Fill-dev \\
    --train_data_dir my_inpainting --out my_inpainting_encoded --resolution 1024

writes ``manifest.json`` and the folders ``prompt_embed/ pooled_prompt_embeds/ text_ids/
masked_latents/ mask_latents/ latents/`` of safetensors files (see ``data.fill_latents``);
``train_flux_fill.py --train_data_dir my_inpainting_encoded`` then trains without running the
VAE and the text encoders again.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from diffusers import FluxFillPipeline
from jsonargparse import auto_cli
from safetensors.torch import save_file
from tqdm.auto import tqdm

from data.fill_latents import FOLDERS, MANIFEST_FILE
from data.rows import collate_items
from train_flux_fill import FillConfig, FillEncoder
from training.datasets import inpainting_dataset

# Manifest key -> the encoder outputs stored in its file (a distribution, or one tensor).
STORED = {
    "prompt_embed_path": {"data": "prompt_embeds"},
    "pooled_prompt_embeds_path": {"data": "pooled_prompt_embeds"},
    "masked_latents_path": {"mean": "masked_latents_mean", "std": "masked_latents_std"},
    "mask_latents_path": {"data": "mask_latents"},
    "latents_path": {"mean": "latents_mean", "std": "latents_std"},
}


def main(
    pretrained_model_name_or_path: str,
    train_data_dir: Path,
    out: Path,
    resolution: int = 512,
    max_sequence_length: int = 512,
    random_masks: bool = False,
    seed: int = 0,
) -> None:
    """Encode every example of an inpainting folder for FLUX.1 Fill.

    Args:
        pretrained_model_name_or_path: the FLUX.1 Fill pipeline whose encoders to use.
        train_data_dir: inpainting folder (metadata.jsonl of image, mask, prompt).
        out: folder to write; it must not hold a manifest yet.
        resolution: bucket resolution, as train_flux_fill.py's --resolution.
        max_sequence_length: T5 prompt length, as train_flux_fill.py's.
        random_masks: draw masks for rows without one, as train_flux_fill.py's.
        seed: seeds the drawn masks.
    """
    if (out / MANIFEST_FILE).exists():
        raise SystemExit(f"'{out / MANIFEST_FILE}' already exists; choose another --out")
    config = FillConfig(
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        train_data_dir=str(train_data_dir),
        resolution=resolution,
        max_sequence_length=max_sequence_length,
        random_masks=random_masks,
        seed=seed,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = FluxFillPipeline.from_pretrained(pretrained_model_name_or_path).to(device)
    encoder = FillEncoder(pipe, config)
    dataset = inpainting_dataset(config)
    for folder in FOLDERS.values():
        (out / folder).mkdir(parents=True, exist_ok=True)
    records = []
    for index in tqdm(range(len(dataset)), desc="encoding"):
        item = dataset[index]
        encoded = encoder(collate_items([item]))
        name = f"{index:06d}.safetensors"
        record = {"caption": item["prompt"], "text_ids": name}
        tokens = encoded["prompt_embeds"].shape[1]
        save_file({"data": torch.zeros(tokens, 3)}, out / FOLDERS["text_ids"] / name)
        for key, stored in STORED.items():
            tensors = {k: encoded[v][0].contiguous().cpu() for k, v in stored.items()}
            save_file(tensors, out / FOLDERS[key] / name)
            record[key] = name
        records.append(record)
    partial = out / f"{MANIFEST_FILE}.partial"
    partial.write_text(json.dumps(records, indent=1))
    os.replace(partial, out / MANIFEST_FILE)
    print(f"wrote {len(records)} encoded examples: {out / MANIFEST_FILE}")


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
