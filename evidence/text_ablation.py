"""Ablation of seed 000's text-region loss on the tiny pretrained Qwen-Image-Edit world.

    python evidence/text_ablation.py [--world outputs/qwen_world] [--out outputs/text_ablation]
    python evidence/text_ablation.py --quick true   # smoke test: one seed, few steps

Trains the Qwen-Image-Edit LoRA (``train_qwen_edit_mask.py``, in this process) from the same
seeds with ``alpha=0`` (plain flow matching) and ``alpha=0.3`` (seed 000: text region weight 2,
background 1, mixed at 0.3), on the same data with the same text masks, then samples every
saved checkpoint with ``QwenImageEditPipeline`` on the world's held-out text edits (never
trained on), from the same noise for every configuration and seed (seeds vary only the
training, so the base model is scored once), and scores each output against its target
(``evidence.edit_metrics``): PSNR inside the word's box, its gain over leaving the sign empty,
and PSNR outside the box. The same three scores of the *denoised* estimate (``denoised_*``):
the target's latents noised to ``--denoise_sigma``, one transformer call,
``x0 = x_sigma - sigma * v``, decoded: what the LoRA has learned of the target where sampling
from pure noise cannot show it yet. The held-out targets' latents decoded are scored the same
way: the ceiling of any LoRA on this world (for both kinds).
Writes ``results.json``, ``table.md``, ``examples.png`` (the first outputs of each configuration,
kept in ``examples/``) and one PNG per metric into ``--out``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from diffusers import QwenImageEditPipeline
from jsonargparse import auto_cli
from PIL import Image

import train_qwen_edit_mask
from evidence.ablation_runs import AblationPlan, run_ablation, train_on_world, write_report
from evidence.edit_metrics import text_edit_metrics
from models.qwen_processor import load_image_only_processor
from training.inputs.flow_matching import noisy_latents
from worlds.qwen_world import (
    WORLD_RESOLUTION,
    QwenWorldSettings,
    build_qwen_world,
    latent_statistics,
)

SCORES = ("text_psnr", "text_gain", "outside_psnr")
METRICS = (*SCORES, *(f"denoised_{name}" for name in SCORES))
# Seed 000's alpha: the share of the region-weighted loss; 0 is plain flow matching, bit for bit.
CONFIGS = {
    "alpha=0": {"mask_loss.enabled": False},
    "alpha=0.3": {"mask_loss.enabled": True, "mask_loss.weight": 0.3},
}


def train_run(
    world: Path, steps: int, every: int, cache_dir: Path, out: Path, flags: dict, seed: int
) -> float:
    """Train one LoRA with the mask-loss ``flags`` into ``out`` (a checkpoint every ``every``
    steps), the encoded training set cached in ``cache_dir`` (shared by runs); returns
    wall-clock seconds."""
    return train_on_world(
        train_qwen_edit_mask.main,
        world,
        out,
        resolution=WORLD_RESOLUTION,
        steps=steps,
        every=every,
        seed=seed,
        cache_dir=cache_dir,
        flags={"data.use_text_mask": True, **flags},
    )


def heldout_edits(folder: Path, limit: int | None) -> list[dict]:
    """The held-out text edits: ``context`` and ``target`` PIL images, ``text_box`` ``[H, W]``
    bool (from ``text_masks/``, named after the target), ``prompt``."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [
        {
            "context": Image.open(folder / row["context"]).convert("RGB"),
            "target": Image.open(folder / row["target"]).convert("RGB"),
            "text_box": np.asarray(
                Image.open(folder / "text_masks" / Path(row["target"]).name).convert("L")
            )
            > 127,
            "prompt": row["prompt"],
        }
        for row in rows[:limit]
    ]


def score(outputs: list[np.ndarray], edits: list[dict], prefix: str = "") -> dict[str, float]:
    """Mean of every text-edit score over the edits, named ``prefix + score``."""
    rows = [
        text_edit_metrics(
            output, np.asarray(edit["target"]), np.asarray(edit["context"]), edit["text_box"]
        )
        for output, edit in zip(outputs, edits, strict=True)
    ]
    return {prefix + name: float(np.mean([row[name] for row in rows])) for name in SCORES}


@dataclass
class EncodedEdits:
    """Held-out edits encoded as the script encodes its training edits: ``condition`` holds
    ``prompt_embeds`` (``[T_i, D]`` each), ``condition_tokens`` and ``condition_shapes``
    (``train_qwen_edit_mask.encode_condition``); ``target``: normalised latents
    ``[N, 16, h, w]``."""

    condition: dict
    target: torch.Tensor


@torch.no_grad()
def encode_edits(pipe: QwenImageEditPipeline, edits: list[dict]) -> EncodedEdits:
    """Encode ``edits`` (see :func:`heldout_edits`) with the script's own encoders."""
    conditions = [
        train_qwen_edit_mask.encode_condition(pipe, [e["context"]], e["prompt"]) for e in edits
    ]
    targets = [
        train_qwen_edit_mask.normalised_latents(
            pipe, pipe.image_processor.preprocess(edit["target"])[:, :, None]
        )
        for edit in edits
    ]
    return EncodedEdits(
        {
            "prompt_embeds": [c["prompt_embeds"] for c in conditions],
            "condition_tokens": torch.cat([c["condition_tokens"] for c in conditions]),
            "condition_shapes": torch.cat([c["condition_shapes"] for c in conditions]),
        },
        torch.cat(targets),
    )


@torch.no_grad()
def decode(pipe: QwenImageEditPipeline, latents: torch.Tensor) -> list[np.ndarray]:
    """Normalised latents ``[N, 16, 1, h, w]`` -> images ``[H, W, 3]`` uint8, as the pipeline
    decodes its final latents (one at a time: a 1024 px decode is the costly part)."""
    mean, std = latent_statistics(pipe.vae)
    return [
        np.asarray(
            pipe.image_processor.postprocess(pipe.vae.decode(z * std + mean).sample[:, :, 0])[0]
        )
        for z in latents.split(1)
    ]


@torch.no_grad()
def denoised_outputs(
    pipe: QwenImageEditPipeline, encoded: EncodedEdits, sigma: float, seed: int
) -> list[np.ndarray]:
    """The transformer's one-step estimate of each target from its latents noised to ``sigma``
    (noise drawn from ``seed``), ``x0 = x_sigma - sigma * v``, decoded; at ``sigma`` 0 the
    target's own latents, whatever the transformer predicts."""
    x0 = encoded.target
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.full((len(x0),), float(sigma))
    noisy = noisy_latents(x0, noise, sigmas)
    velocity = train_qwen_edit_mask.target_velocity(
        pipe.transformer, pipe, noisy, encoded.condition, sigmas
    )
    height, width = (side * pipe.vae_scale_factor for side in x0.shape[-2:])
    velocity = pipe._unpack_latents(velocity, height, width, pipe.vae_scale_factor)
    return decode(pipe, noisy[:, :, None] - sigma * velocity)


@torch.no_grad()
def evaluate(
    pipe: QwenImageEditPipeline,
    edits: list[dict],
    encoded: EncodedEdits,
    inference_steps: int,
    denoise_sigma: float,
    lora: Path | None,
    seed: int,
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Metrics of the base (``lora`` None) or of the base with one LoRA folder loaded: sampled,
    one pipeline call per edit (the edit pipeline takes one condition image), each with its own
    fixed noise seed; and denoised from ``denoise_sigma``."""
    if lora is not None:
        pipe.load_lora_weights(lora)
    try:
        outputs = [
            np.asarray(
                pipe(
                    image=edit["context"],
                    prompt=edit["prompt"],
                    height=edit["target"].height,
                    width=edit["target"].width,
                    num_inference_steps=inference_steps,
                    # No negative prompt: the pipeline's true cfg is off; say so.
                    true_cfg_scale=1.0,
                    generator=torch.Generator().manual_seed(seed * 1000 + index),
                ).images[0]
            )
            for index, edit in enumerate(edits)
        ]
        denoised = denoised_outputs(pipe, encoded, denoise_sigma, seed)
    finally:
        if lora is not None:
            pipe.unload_lora_weights()
    return {**score(outputs, edits), **score(denoised, edits, "denoised_")}, outputs


def reconstruction_reference(
    pipe: QwenImageEditPipeline, edits: list[dict], encoded: EncodedEdits
) -> dict[str, float]:
    """Metrics of each target's latents decoded (the VAE's reconstruction): the ceiling of any
    LoRA on this world, sampled or denoised."""
    ceiling = score(decode(pipe, encoded.target[:, :, None]), edits)
    return {**ceiling, **{f"denoised_{name}": value for name, value in ceiling.items()}}


def example_grid(edits: list[dict], examples: dict[str, list]) -> Image.Image:
    """Rows = held-out edits (first four), columns = context, target, then each configuration,
    shrunk to 256 px."""
    from training.validation import image_grid

    rows = []
    for index in range(min(4, len(edits))):
        edit = edits[index]
        images = [edit["context"], edit["target"]]
        images += [Image.fromarray(outputs[index]) for outputs in examples.values()]
        rows.append([image.resize((256, 256)) for image in images])
    return image_grid(rows, ["context", "target", *examples])


def main(
    world: Path = Path("outputs/qwen_world"),
    world_settings: QwenWorldSettings | None = None,
    out: Path = Path("outputs/text_ablation"),
    seeds: tuple[int, ...] = (0, 1, 2),
    steps: int = 300,
    every: int = 300,
    heldout: int | None = 8,
    inference_steps: int = 8,
    denoise_sigma: float = 0.5,
    quick: bool = False,
    report_only: bool = False,
) -> None:
    """Run the ablation and write results.json, table.md and the plots into ``out``.

    Args:
        world: folder of the tiny Qwen world (built first when missing).
        world_settings: the world's settings (default: ``QwenWorldSettings()``).
        out: output folder; each run trains into ``out/<config>/seed<k>``; the encoded
            training set is cached once in ``out/cache``. Runs its results.json already holds
            with the same settings are not repeated.
        seeds: training seeds (every run is sampled and noised from seed 0's noise).
        steps: optimizer steps per run.
        every: checkpoint (and evaluation) interval in steps (150 draws the curves of
            docs/ablation.md; 300, the default, evaluates once per run: 28 min here, not 39).
        heldout: evaluate on the first this many held-out edits (None: all).
        inference_steps: denoising steps of the sampler.
        denoise_sigma: noise level of the denoised scores (0 clean, 1 pure noise).
        quick: a smoke test: one seed, 2 steps, 1 held-out edit, 2 inference steps.
        report_only: only redraw table.md and the plots from an existing results.json.
    """
    if report_only:
        print(write_report(out, METRICS))
        return
    if quick:
        seeds, steps, every, heldout, inference_steps = (0,), 2, 2, 1, 2
    world_record = build_qwen_world(world, world_settings or QwenWorldSettings())
    edits = heldout_edits(world / "heldout", heldout)
    pipe = QwenImageEditPipeline.from_pretrained(
        world / "model", processor=load_image_only_processor(world / "model")
    )
    pipe.set_progress_bar_config(disable=True)
    encoded = encode_edits(pipe, edits)
    plan = AblationPlan(
        configs=CONFIGS,
        metrics=METRICS,
        train=partial(train_run, world, steps, every, out / "cache"),
        evaluate=partial(evaluate, pipe, edits, encoded, inference_steps, denoise_sigma),
        example_grid=partial(example_grid, edits),
        noise_per_seed=False,
    )
    settings = {
        "world": world_record["settings"],
        "steps": steps,
        "every": every,
        "heldout_edits": len(edits),
        "inference_steps": inference_steps,
        "denoise_sigma": denoise_sigma,
        "noise_per_seed": plan.noise_per_seed,
    }
    reference = reconstruction_reference(pipe, edits, encoded)
    run_ablation(plan, out, list(CONFIGS), seeds, settings, reference)


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
