"""Real-size LoRA training steps in the low-memory modes on one GPU: seconds per step and peak
memory, beside the memory plan of the same run.

    python benchmarks/run.py --gpu --lowmem            # FLUX.1 Kontext and Qwen-Image-Edit, 1024 px
    python benchmarks/low_memory.py --tiny --device cpu   # the same code on the tiny models

For each model (``benchmarks/real_size.py``: published configurations, random weights), batch
1, bf16, LoRA rank 16, every mask term on, encoded batches, gradient checkpointing, 8-bit AdamW:
the suite's own step (its ``compute_loss``, backward, the optimizer) with the frozen base

- ``bf16``: as published; ``int8`` / ``nf4``: its linear weights quantized in place by torchao
  (int8 weight-only) and bitsandbytes (4-bit NormalFloat, CUDA only), as ``--quantize_base``
  loads them;
- ``+ offload``: with ``--offload_blocks all`` (every block's frozen weights on the CPU).

Columns: median s/step and its ratio to bf16; the measured peak (``torch.cuda.max_memory_allocated``
over the steps, the weights included); the plan's total and activation estimate
(``training.memory.plan``) and the activations the peak implies (peak minus the plan's exact
weights, LoRA, gradients and optimizer state), so the estimate can be checked.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import train_kontext_lora
import train_qwen_edit_mask
from benchmarks.harness import markdown_table, time_variants, training_step
from benchmarks.real_size import kontext_case, qwen_case
from training.config import MaskLossSettings
from training.memory.offload import offload_blocks
from training.memory.plan import plan_memory, readable
from training.optimizers import build_optimizer

# family -> (case builder, train script, its config class, extra flags the case trains with)
FAMILIES = {
    "kontext": (kontext_case, train_kontext_lora, train_kontext_lora.KontextConfig, {}),
    "qwen-edit": (
        qwen_case,
        train_qwen_edit_mask,
        train_qwen_edit_mask.QwenEditConfig,
        {"mask_loss": MaskLossSettings(enabled=True)},
    ),
}
VARIANTS = ("bf16", "bf16 + offload", "int8", "int8 + offload", "nf4", "nf4 + offload")
HEADER = [
    "model",
    "variant",
    "s/step",
    "× bf16",
    "peak measured",
    "plan total",
    "plan activations",
    "activations measured",
]


def _frozen_linear(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and "lora_" not in name


def quantize_in_place(denoiser: torch.nn.Module, mode: str) -> None:
    """The frozen linear weights of ``denoiser`` in ``mode``, by the libraries
    ``--quantize_base`` loads them with (bitsandbytes as diffusers' ``BitsAndBytesConfig``
    builds it: nf4 without nested statistics, computing in the weights' dtype)."""
    if mode == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(denoiser, Int8WeightOnlyConfig(), filter_fn=_frozen_linear)
    elif mode == "nf4":
        import bitsandbytes

        for parent in list(denoiser.modules()):
            for name, child in list(parent.named_children()):
                if not _frozen_linear(child, name):
                    continue
                layer = bitsandbytes.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=child.weight.dtype,
                    compress_statistics=False,
                    quant_type="nf4",
                    device="meta",
                )
                layer.weight = bitsandbytes.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type="nf4"
                )
                layer.bias = child.bias
                setattr(parent, name, layer.to(child.weight.device))


def measure(family: str, variant: str, args, device, dtype) -> list[str]:
    build, script, config_cls, extra = FAMILIES[family]
    mode, offloaded = variant.split(" + ")[0], variant.endswith("offload")
    name = {"kontext": "FLUX.1 Kontext", "qwen-edit": "Qwen-Image-Edit"}[family]
    if mode == "nf4" and device.type != "cuda":
        return [name, variant, *["needs CUDA"] * 6]
    torch.manual_seed(0)
    prepare = None if mode == "bf16" else functools.partial(quantize_in_place, mode=mode)
    case = build(args.tiny, 1, args.resolution, device, dtype, prepare=prepare)
    case.denoiser.enable_gradient_checkpointing()
    if offloaded:
        offload_blocks(case.denoiser, "all", device)
    config = config_cls(
        pretrained_model_name_or_path="published",
        train_data_dir="-",
        resolution=args.resolution,
        rank=16,
        mixed_precision="bf16" if dtype == torch.bfloat16 else "no",
        gradient_checkpointing=True,
        quantize_base="none" if mode == "bf16" else mode,
        offload_blocks="all" if offloaded else 0,
        optimizer="adamw8bit",
        cache_latents=True,
        offload_encoders=True,
        **extra,
    )
    optimizer = build_optimizer(config, case.model)
    autocast = None if dtype == torch.float32 else dtype
    step = training_step(case.model, case.loss, case.batch, optimizer, device, autocast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_variants({variant: step}, args.blocks, args.steps, device)[variant]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if args.tiny:
        config.pretrained_model_name_or_path = str(args.tiny_model_dir / family)
    plan = plan_memory(config, script.MEMORY_PLAN)
    exact = plan.total - plan.activations
    del case, optimizer, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [
        name,
        variant,
        f"{seconds:.3f}",
        "",
        readable(peak) if peak is not None else "n/a",
        readable(plan.total),
        readable(plan.activations),
        readable(peak - exact) if peak is not None else "n/a",
    ]


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (tests, no GPU)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--resolution", type=int, default=None, help="default: 1024 (tiny 32)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/low_memory.py needs CUDA; no GPU is visible here")
    args.resolution = args.resolution or (32 if args.tiny else 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        # The plan of a tiny case reads the tiny model's own configs.
        import tempfile

        from worlds.tiny_models import tiny_flux_kontext_pipeline, tiny_qwen_image_edit_pipeline

        args.tiny_model_dir = Path(tempfile.mkdtemp(prefix="tiny-models-"))
        tiny_flux_kontext_pipeline(seed=0).save_pretrained(args.tiny_model_dir / "kontext")
        tiny_qwen_image_edit_pipeline(seed=0).save_pretrained(args.tiny_model_dir / "qwen-edit")
    rows = []
    for family in args.families:
        family_rows = [measure(family, v, args, device, dtype) for v in args.variants]
        base = next((float(r[2]) for r in family_rows if r[1] == "bf16"), None)
        for row in family_rows:
            if base and row[2] not in ("needs CUDA",):
                row[3] = f"{float(row[2]) / base:.2f}"
        rows += family_rows
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = markdown_table(HEADER, rows)
    print(f"{where}, {dtype}, {args.resolution} px, batch 1, torch {torch.__version__}")
    print(table)
    return table


if __name__ == "__main__":
    main()
