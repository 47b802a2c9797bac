"""Run a trained LoRA with its family's diffusers pipeline, beside the base model.

    python scripts/infer.py --family kontext --model black-forest-labs/FLUX.1-Kontext-dev \\
        --lora outputs/kontext --input my_pairs --output_dir outputs/kontext/inference
    python scripts/infer.py --family sd15-inpaint \\
        --model stable-diffusion-v1-5/stable-diffusion-inpainting --lora outputs/sd15-inpaint \\
        --input room.png --mask mask.png --prompt "a red armchair"
    python scripts/infer.py --family flux2 --model black-forest-labs/FLUX.2-klein-base-4B \\
        --lora outputs/flux2 --input my_edits --output_dir outputs/flux2/inference

Every example is run twice from the same seed, without and with the LoRA; ``--output_dir``
receives ``<nnn>_<name>_base.png``, ``<nnn>_<name>_lora.png`` and ``grid.png`` (input | mask |
without LoRA | with LoRA, one row per example).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training.inference import (
    FAMILIES,
    check_references,
    family_pipeline,
    load_examples,
    load_family_pipeline,
    run_with_and_without,
)
from training.inputs.flux2 import sampling_guidance
from training.runtime import refuse

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family",
        required=True,
        choices=tuple(FAMILIES),
        help="which pipeline runs the LoRA: kontext (FluxKontextPipeline), qwen-edit "
        "(QwenImageEditPipeline or QwenImageEditPlusPipeline, from the model), flux-fill "
        "(FluxFillPipeline), sd15-inpaint (StableDiffusionInpaintPipeline), flux2 "
        "(Flux2KleinPipeline or Flux2Pipeline, from the model)",
    )
    parser.add_argument(
        "--model", required=True, help="base pipeline: a diffusers folder or a Hub id"
    )
    parser.add_argument(
        "--lora",
        required=True,
        type=Path,
        help="LoRA .safetensors file (diffusers or kohya layout) or a training --output_dir",
    )
    parser.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="a folder in the training layout (metadata.jsonl: context or image, mask, prompt), "
        "or image files",
    )
    parser.add_argument(
        "--mask",
        nargs="+",
        default=[],
        help="inpainting families with image files: one mask per --input (white = the region)",
    )
    parser.add_argument(
        "--prompt",
        nargs="+",
        default=[],
        help="one prompt for every example, or one per example; required with image files, "
        "and replaces a folder's prompts",
    )
    parser.add_argument(
        "--output_dir", type=Path, default=Path("inference"), help="where results go"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        help="fit each example to the nearest aspect-ratio bucket of about this squared "
        "(as training does); default: its own size, cropped to multiples of 16",
    )
    parser.add_argument(
        "--lora_scale", type=float, default=1.0, help="LoRA strength (1.0: as trained)"
    )
    parser.add_argument(
        "--num_inference_steps", type=int, default=28, help="denoising steps per image"
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        help="the pipeline's guidance_scale; default: the pipeline's own (1.0 for a "
        "step-distilled FLUX.2 [klein], which ignores it)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every example's noise")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="weights' dtype; default: bfloat16 on a GPU, float32 on the CPU",
    )
    parser.add_argument("--device", help="torch device; default: cuda when available, else cpu")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")]
    family = FAMILIES[args.family]
    try:
        examples = load_examples(family, args.input, args.mask, args.prompt, args.resolution)
        check_references(family, family_pipeline(args.family, args.model), examples)
        pipe = load_family_pipeline(args.family, args.model, dtype, device)
        kwargs = {"num_inference_steps": args.num_inference_steps}
        guidance_scale = sampling_guidance(pipe, args.guidance_scale)
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        grid = run_with_and_without(
            pipe,
            family,
            examples,
            args.lora,
            args.output_dir,
            lora_scale=args.lora_scale,
            seed=args.seed,
            pipeline_kwargs=kwargs,
        )
    except ValueError as error:  # bad inputs (DataError too), a LoRA diffusers cannot read
        refuse(error)
    print(
        f"{len(examples)} example(s) without and with the LoRA in {args.output_dir}; grid: {grid}"
    )


if __name__ == "__main__":
    main()
