"""Seconds per GRPO iteration of FLUX.1 Fill and SD1.5 inpainting, split into its three phases.

One iteration of ``--objective grpo`` samples a group of images per example (sampling: every
denoising step and the decode, no gradients), scores them (reward: the built-in rewards and the
advantages) and updates the LoRA (update: one forward and backward pass per trained step, then
AdamW). The three phases run on the scripts' own code and tiny random models, with pre-encoded
batches (what --cache_latents feeds the loop), in alternating blocks of one process (see
``benchmarks/harness.py``); the median over blocks is reported.

    python benchmarks/grpo_step.py [--resolution 64] [--batch 1] [--generations 4] \\
        [--sampling-steps 8] [--reward background,seam] [--blocks 5] [--steps 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import torch
from accelerate import Accelerator

import train_flux_fill as fill
import train_sd15_inpaint as sd15
from benchmarks.harness import time_variants
from benchmarks.inpaint_step import random_encoding
from data.fill_latents import mask_latents_from_pixels
from training.grpo.policy import policy_update, sample_groups, score_groups
from training.grpo.rewards import RewardOptions, Rewards
from training.inputs.flux import FLUX_LORA_LAYERS
from training.lora.adapters import add_lora
from worlds.tiny_models import tiny_flux_fill_pipeline, tiny_sd15_inpaint_pipeline

PHASES = ("sampling", "reward", "update")


def grpo_flags(args) -> dict:
    return {
        "pretrained_model_name_or_path": "-",
        "train_data_dir": "-",
        "rank": 16,
        "objective": "grpo",
        "resolution": args.resolution,
        "train_batch_size": args.batch,
        "num_generations": args.generations,
        "sampling_steps": args.sampling_steps,
        "reward": args.reward,
    }


def pixels(batch: int, resolution: int) -> dict:
    """What the rewards score against: source images in [-1, 1] and prompts (the encoding's box
    mask comes with :func:`random_encoding`)."""
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1
    return {"image": image, "prompt": ["a red ball"] * batch}


def fill_parts(args):
    pipe = tiny_flux_fill_pipeline(seed=0)
    config = fill.FillConfig(**grpo_flags(args), max_sequence_length=args.max_sequence_length)
    add_lora(pipe.transformer, config, FLUX_LORA_LAYERS, fill.FILL_LORA)
    batch = {
        **random_encoding(args.batch, args.resolution, 16),
        **pixels(args.batch, args.resolution),
    }
    batch["mask_latents"] = mask_latents_from_pixels(batch["mask"])
    width = pipe.transformer.config
    batch["prompt_embeds"] = torch.randn(
        args.batch, config.max_sequence_length, width.joint_attention_dim
    )
    batch["pooled_prompt_embeds"] = torch.randn(args.batch, width.pooled_projection_dim)
    return pipe.transformer, fill.FillPolicy(pipe, config, None, encoded=True), config, batch


def sd15_parts(args):
    pipe = tiny_sd15_inpaint_pipeline(seed=0)
    config = sd15.SD15InpaintConfig(**grpo_flags(args))
    add_lora(pipe.unet, config, sd15.UNET_LORA_LAYERS, sd15.UNET_LORA)
    batch = {
        **random_encoding(args.batch, args.resolution, 4),
        **pixels(args.batch, args.resolution),
    }
    batch["prompt_embeds"] = torch.randn(args.batch, 77, pipe.text_encoder.config.hidden_size)
    model = sd15.InpaintDenoiser(pipe.unet, None)
    return (
        model,
        sd15.SD15Policy(pipe, config, None, encoded=True, device=pipe.unet.device),
        config,
        batch,
    )


def phases(accelerator, model, policy, config, batch, rewards) -> dict:
    """``{phase: step(index)}``; each phase works on what the one before it produced last."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    state = {}

    def sampling(index: int) -> None:
        generator = torch.Generator().manual_seed(index)
        state["samples"] = sample_groups(policy, model, batch, config, generator)

    def reward(index: int) -> None:
        state["rollout"] = score_groups(state["samples"], batch, config, rewards)

    def update(index: int) -> None:
        policy_update(accelerator, model, policy, [state["rollout"]], config)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"sampling": sampling, "reward": reward, "update": update}


def report(family: str, medians: dict[str, float]) -> None:
    total = sum(medians.values())
    for phase in PHASES:
        share = medians[phase] / total
        print(f"{family + ':':<7}{phase:<10} {medians[phase]:8.3f} s/iteration   {share:6.1%}")
    print(f"{family + ':':<7}{'iteration':<10} {total:8.3f} s/iteration")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="groups (examples) per iteration")
    parser.add_argument("--generations", type=int, default=4, help="images per group")
    parser.add_argument("--sampling-steps", type=int, default=8)
    parser.add_argument("--max-sequence-length", type=int, default=64, help="Fill's T5 length")
    parser.add_argument("--reward", default="background,seam")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per phase")
    parser.add_argument("--steps", type=int, default=2, help="iterations per block")
    args = parser.parse_args()
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    rewards = Rewards(args.reward, RewardOptions(), "cpu")
    print(
        f"tiny models, cpu, {args.batch} group(s) of {args.generations} at "
        f"{args.resolution}x{args.resolution}, {args.sampling_steps} sampling steps, all trained,"
        f" reward {args.reward}"
    )
    for family, build in (("Fill", fill_parts), ("SD1.5", sd15_parts)):
        medians = time_variants(
            phases(accelerator, *build(args), rewards), args.blocks, args.steps, "cpu"
        )
        report(family, medians)


if __name__ == "__main__":
    main()
