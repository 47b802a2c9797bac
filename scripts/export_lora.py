"""Use a trained LoRA outside diffusers: convert its key layout, or merge it into the base model.

    python scripts/export_lora.py outputs/kontext --to kohya --out kontext_kohya.safetensors
    python scripts/export_lora.py kontext_kohya.safetensors --to diffusers --out back.safetensors
    python scripts/export_lora.py outputs/kontext --merge --model FLUX.1-Kontext-dev \\
        --out merged [--scale 0.8]

``--to kohya`` writes the layout ComfyUI's LoRA loader and kohya-based tools read (FLUX.1 and
FLUX.2: Black Forest Labs' module names with q/k/v fused; Qwen-Image and SD1.5: diffusers' names
underscored), keeping each module's alpha; diffusers' ``load_lora_weights`` reads it too.
``--to diffusers`` reads such a file back into diffusers' layout. Both print a key-coverage
report and stop with an error, writing nothing, when a module has no place in the target layout.
``--merge`` fuses the LoRA into the transformer or UNet (and SD1.5's text encoder when the LoRA
adapts it) and saves them under ``--out/<component>`` with ``save_pretrained`` (safetensors,
sharded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training.lora.adapters import cast_lora_file
from training.lora.export import (
    DIFFUSERS,
    FAMILIES,
    KOHYA,
    convert,
    detect_family,
    read_lora,
    write_conversion,
)
from training.lora.merge import DEFAULT_MAX_SHARD_SIZE, merge_lora
from training.runtime import refuse

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "lora",
        type=Path,
        help="LoRA .safetensors file (diffusers or kohya layout), or a training --output_dir "
        "holding pytorch_lora_weights.safetensors",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--to",
        choices=(KOHYA, DIFFUSERS),
        help="convert to this key layout: kohya (ComfyUI, kohya sd-scripts, diffusers) or "
        "diffusers (peft keys with the LoRA config as metadata)",
    )
    mode.add_argument(
        "--merge",
        action="store_true",
        help="fuse the LoRA into the base weights of --model instead of converting it",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="with --to: the .safetensors file to write; with --merge: the folder that receives "
        "one subfolder per merged component (transformer, unet, text_encoder)",
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        help="model family (flux: FLUX.1 dev, Kontext, Fill; qwen-image: Qwen-Image and its "
        "Edit models; sd15; flux2: FLUX.2 klein and dev); default: from --model, the module "
        "names, or the training run's model card",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="base diffusers pipeline folder (model_index.json); required with --merge, and "
        "names the family otherwise",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="--merge: strength the LoRA is fused at (1.0: as trained)",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="dtype of the written weights; default: with --to, the LoRA's own (a fp32 LoRA "
        "in bfloat16 is half the size), with --merge, the base component's",
    )
    parser.add_argument(
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="--merge: largest safetensors shard, as save_pretrained takes it (e.g. 5GB)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge and args.model is None:
        parser.error("--merge needs --model BASE")
    if not args.merge and args.scale != 1.0:
        parser.error("--scale applies to --merge only")
    try:
        if args.merge:
            dtype = DTYPES[args.dtype] if args.dtype else None
            folders = merge_lora(
                args.lora, args.model, args.out, args.scale, dtype, args.max_shard_size, args.family
            )
            for component, folder in folders.items():
                print(f"merged {component} at scale {args.scale}: {folder}")
            return
        lora = read_lora(args.lora)
        conversion = convert(lora, args.to, detect_family(lora, args.family, args.model))
        print("\n".join(conversion.report()))
        written = write_conversion(conversion, args.out)
        if args.dtype:
            cast_lora_file(written, DTYPES[args.dtype])
        print(f"wrote {written}" + (f" in {args.dtype}" if args.dtype else ""))
    except ValueError as error:  # LayoutError too, and what diffusers cannot merge
        refuse(error)


if __name__ == "__main__":
    main()
