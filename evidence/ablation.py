"""Ablation of the Kontext mask losses on the tiny pretrained world.

    python evidence/ablation.py [--world outputs/world] [--out outputs/ablation]
    python evidence/ablation.py --quick        # smoke test: one seed, two configs, few steps

Trains the Kontext LoRA (``train_kontext_lora.py``, in this process) from the same seeds with

- ``fm``: plain flow matching,
- ``fm+<term>``: flow matching plus one seed 001 geometry term at the seed's weight,
- ``starter``: seed 001's starter mix (all five geometry terms),
- ``starter+emb``: the starter mix plus seed 003's embedding terms on latent tokens,
- ``balanced``: every term at the demo's weights (``configs/kontext_demo.yaml``), where none
  dwarfs the rest,
- ``balanced@int8``, ``balanced@bf16``, ``balanced@fp8``: the balanced mix trained on an int8
  base, in bf16, and on an fp8 base (which computes in bf16), each scored on the unquantized
  base,

then samples every saved checkpoint on the world's held-out pairs (never trained on) and scores
each output against its context (``evidence.edit_metrics``): IoU, signed area error and boundary
F-score of the change, IoU and area error of the object drawn, background PSNR outside the mask,
no-edit rate. The held-out targets passed through the VAE are scored the same way: the ceiling
of any LoRA on this world. Writes ``results.json`` (every number), ``table.md`` (mean and
spread over seeds at the last step), ``examples.png`` (the first held-out outputs of each
configuration, kept in ``examples/``) and one PNG per metric (metric vs training step per
configuration) into ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import yaml
from diffusers import FluxKontextPipeline
from jsonargparse import auto_cli
from PIL import Image

import train_kontext_lora
from evidence.ablation_runs import AblationPlan, run_ablation, train_on_world, write_report
from evidence.edit_metrics import insertion_metrics
from worlds.kontext_world import WORLD_MAX_SEQUENCE_LENGTH, WorldSettings, build_tiny_world

GEOMETRY_FLAGS = {
    "mse": "geometry_mse_weight",
    "bg": "background_weight",
    "dice": "dice_weight",
    "area": "area_weight",
    "bnd": "boundary_weight",
}
EMBEDDING_FLAGS = ("identity_weight", "geometry_match_weight", "overlay_weight")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "kontext_demo.yaml"
METRICS = (
    "iou",
    "object_iou",
    "area_error",
    "object_area_error",
    "boundary_f",
    "background_psnr",
    "no_edit",
)


def kontext_defaults() -> dict[str, object]:
    """The Kontext script's flag defaults (the seeds' loss weights), without a config to parse."""
    return {
        field.name: field.default
        for field in dataclasses.fields(train_kontext_lora.KontextConfig)
        if field.default is not dataclasses.MISSING
    }


def ablation_configs() -> dict[str, dict[str, float | str]]:
    """Loss weights (and base quantization) of every configuration, by flag; the seeds' weights
    where a term is on."""
    defaults = kontext_defaults()
    off = {flag: 0.0 for flag in (*GEOMETRY_FLAGS.values(), *EMBEDDING_FLAGS)}
    starter = {**off, **{flag: defaults[flag] for flag in GEOMETRY_FLAGS.values()}}
    configs = {"fm": off}
    for name, flag in GEOMETRY_FLAGS.items():
        configs[f"fm+{name}"] = {**off, flag: defaults[flag]}
    configs["starter"] = starter
    # On latent tokens the geometry-match term is a sigma-reweighted flow matching (see the
    # script's --geometry_match_weight): the script's default 0 stays; identity and overlay on.
    configs["starter+emb"] = {
        **starter,
        "identity_weight": defaults["identity_weight"],
        "overlay_weight": defaults["overlay_weight"],
    }
    # Every term at the demo's weights, chosen so that each starts between a tenth of flow
    # matching and flow matching itself: the seed's weights leave some terms at 1-3 % of it.
    demo = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    configs["balanced"] = {flag: float(demo[flag]) for flag in off}
    # The balanced LoRA trained on a quantized base, in each mode a CPU runs, and scored on the
    # unquantized base as users apply it: what quantization costs. fp8 computes in bf16, so
    # bf16 alone is its reference.
    configs["balanced@int8"] = {**configs["balanced"], "quantize_base": "int8"}
    configs["balanced@bf16"] = {**configs["balanced"], "mixed_precision": "bf16"}
    configs["balanced@fp8"] = {**configs["balanced@bf16"], "quantize_base": "fp8"}
    return configs


def train_run(
    world: Path,
    steps: int,
    every: int,
    cache_dir: Path,
    out: Path,
    weights: dict[str, float],
    seed: int,
) -> float:
    """Train one LoRA with ``weights`` into ``out`` (a checkpoint every ``every`` steps), the
    encoded training set cached in ``cache_dir`` (shared by runs); returns wall-clock seconds."""
    return train_on_world(
        train_kontext_lora.main,
        world,
        out,
        resolution=WorldSettings().resolution,
        steps=steps,
        every=every,
        seed=seed,
        cache_dir=cache_dir,
        flags={"max_sequence_length": WORLD_MAX_SEQUENCE_LENGTH, **weights},
    )


def heldout_rows(folder: Path, limit: int | None, images: tuple[str, ...]) -> list[dict]:
    """The first ``limit`` rows of ``folder``'s ``metadata.jsonl``: each of ``images`` a PIL
    image, ``mask`` ``[H, W]`` bool, ``prompt``."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [
        {
            **{field: Image.open(folder / row[field]).convert("RGB") for field in images},
            "mask": np.asarray(Image.open(folder / row["mask"]).convert("L")) > 127,
            "prompt": row["prompt"],
        }
        for row in rows[:limit]
    ]


def heldout_pairs(folder: Path, limit: int | None) -> list[dict]:
    """The held-out edit pairs: ``context`` and ``target`` PIL images, ``mask`` ``[H, W]`` bool,
    ``prompt``."""
    return heldout_rows(folder, limit, ("context", "target"))


def sample_by_size(
    sizes: list[tuple[int, int]], call: Callable[[list[int], int, int], list]
) -> list[np.ndarray]:
    """``[H, W, 3]`` uint8 output per item of ``sizes`` (``(width, height)`` each), from
    ``call(indices, width, height)``, the pipeline's images for the items of one size.

    Items of one size share a pipeline call (a batch with one generator per item): on a CPU the
    per-call cost, not the batch, dominates sampling.
    """
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        by_size.setdefault(size, []).append(index)
    outputs: list = [None] * len(sizes)
    for (width, height), indices in by_size.items():
        for index, image in zip(indices, call(indices, width, height), strict=True):
            outputs[index] = np.asarray(image)
    return outputs


@torch.no_grad()
def sample(pipe: FluxKontextPipeline, pairs: list[dict], seed: int, steps: int) -> list:
    """``[H, W, 3]`` uint8 output per pair, each with its own fixed noise seed."""

    def call(indices: list[int], width: int, height: int) -> list:
        return pipe(
            image=[pairs[index]["context"] for index in indices],
            prompt=[pairs[index]["prompt"] for index in indices],
            height=height,
            width=width,
            max_area=height * width,
            _auto_resize=False,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=WORLD_MAX_SEQUENCE_LENGTH,
            generator=[torch.Generator().manual_seed(seed * 1000 + index) for index in indices],
        ).images

    return sample_by_size([pair["context"].size for pair in pairs], call)


def score(outputs: list, pairs: list[dict]) -> dict[str, float]:
    """Mean of every insertion metric over the pairs."""
    rows = [
        insertion_metrics(output, np.asarray(pair["context"]), pair["mask"])
        for output, pair in zip(outputs, pairs, strict=True)
    ]
    return {name: float(np.mean([row[name] for row in rows])) for name in METRICS}


def evaluate(
    pipe: FluxKontextPipeline, lora: Path | None, pairs: list[dict], seed: int, steps: int
) -> tuple[dict[str, float], list]:
    """Metrics of the base (``lora`` None) or of the base with one LoRA folder loaded."""
    if lora is not None:
        pipe.load_lora_weights(lora)
    try:
        outputs = sample(pipe, pairs, seed, steps)
    finally:
        if lora is not None:
            pipe.unload_lora_weights()
    return score(outputs, pairs), outputs


@torch.no_grad()
def reconstruction_reference(pipe: FluxKontextPipeline, pairs: list[dict]) -> dict[str, float]:
    """Metrics of each target passed through the VAE (encode, decode): what a LoRA that produced
    the target's latents exactly would score, the ceiling every configuration is read against."""
    outputs = []
    for pair in pairs:
        pixels = pipe.image_processor.preprocess(pair["target"])
        latents = pipe.vae.encode(pixels).latent_dist.mode()
        decoded = pipe.vae.decode(latents).sample
        outputs.append(np.asarray(pipe.image_processor.postprocess(decoded)[0]))
    return score(outputs, pairs)


def main(
    world: Path = Path("outputs/world"),
    out: Path = Path("outputs/ablation"),
    seeds: tuple[int, ...] = (0, 1, 2),
    steps: int = 500,
    every: int = 250,
    heldout: int | None = 12,
    inference_steps: int = 8,
    configs: list[str] | None = None,
    quick: bool = False,
    report_only: bool = False,
) -> None:
    """Run the ablation and write results.json, table.md and the plots into ``out``.

    Args:
        world: folder of the tiny world (built first when missing).
        out: output folder; each run trains into ``out/<config>/seed<k>``; the encoded
            training set is cached once in ``out/cache``. Runs its results.json already holds
            with the same settings (world, steps, every, held-out pairs, inference steps) are
            not repeated.
        seeds: training and sampling seeds; every configuration runs with the first seed
            before any runs with the next, so a cut-short ablation still covers them all.
        steps: optimizer steps per run.
        every: checkpoint (and evaluation) interval in steps.
        heldout: evaluate on the first this many held-out pairs (None: all).
        inference_steps: denoising steps of the sampler.
        configs: configuration names to run (default: all of ``ablation_configs``).
        quick: a smoke test: one seed, ``fm`` and ``starter``, 4 steps, 2 held-out pairs.
        report_only: only redraw table.md and the plots from an existing results.json.
    """
    if report_only:
        print(write_report(out, METRICS))
        return
    if quick:
        seeds, steps, every, heldout, inference_steps = (0,), 4, 2, 2, 2
        configs = configs or ["fm", "starter"]
    world_record = build_tiny_world(world)
    pairs = heldout_pairs(world / "heldout", heldout)
    pipe = FluxKontextPipeline.from_pretrained(world / "model")
    pipe.set_progress_bar_config(disable=True)
    settings = {
        "world": world_record["settings"],
        "steps": steps,
        "every": every,
        "heldout_pairs": len(pairs),
        "inference_steps": inference_steps,
    }
    plan = AblationPlan(
        configs=ablation_configs(),
        metrics=METRICS,
        train=partial(train_run, world, steps, every, out / "cache"),
        evaluate=lambda lora, seed: evaluate(pipe, lora, pairs, seed, inference_steps),
        example_grid=partial(_example_grid, pairs),
    )
    names = configs or list(plan.configs)
    run_ablation(plan, out, names, seeds, settings, reconstruction_reference(pipe, pairs))


def _example_grid(pairs: list[dict], examples: dict[str, list]) -> Image.Image:
    """Rows = held-out pairs (first four), columns = context, mask, then each configuration."""
    from training.validation import image_grid

    count = min(4, len(pairs))
    labels = ["context", "mask", *examples]
    rows = []
    for index in range(count):
        size = pairs[index]["context"].size
        row = [pairs[index]["context"], Image.fromarray(pairs[index]["mask"]).convert("RGB")]
        row += [Image.fromarray(outputs[index]).resize(size) for outputs in examples.values()]
        rows.append([image.resize((64, 64)) for image in row])
    return image_grid(rows, [label[:10] for label in labels])


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
