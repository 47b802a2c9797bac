"""Real-size training steps on one GPU: seconds per step, peak memory and model FLOPs utilisation,
the suite's step beside the same model's bare forward and backward, in one process.

For FLUX.1 Kontext (1024x1024 target + 1024x1024 context), FLUX.1 Fill (1024x1024), Qwen-Image-Edit
(1024x1024 target + condition) and SD1.5 inpainting (512x512), batch 1, bf16 weights, LoRA rank
16, every mask term on, encoded batches (``--cache_latents``); without and with gradient
checkpointing, and with ``--compile`` also with the repeated blocks compiled. Models are built
from their published configurations with random weights (``benchmarks/real_size.py``).

- suite: the script's own ``compute_loss`` (noise, timesteps, packing, every mask term), the
  backward pass and AdamW, as the loop runs them;
- bare: the same model called on exactly the inputs the suite's step built (recorded from it),
  a mean-square loss, the backward pass; nothing else.

The two alternate in blocks (``benchmarks/harness.py``); ``× suite/bare`` is the suite's
overhead. Model FLOPs are counted once per model by torch's FlopCounterMode on the bare step
without checkpointing (recomputation is not useful work and is not counted); MFU divides them by
the time of a step and the GPU's dense bf16 peak.

    python benchmarks/run.py --gpu [--compile]
"""

from __future__ import annotations

import argparse
import functools
import gc
import time

import torch

from benchmarks.harness import markdown_table, time_variants, training_step
from benchmarks.real_size import CASES, counted_flops, parameter_count
from training.compiling import compile_repeated_blocks

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}

HEADER = [
    "model",
    "resolution",
    "variant",
    "suite s/step",
    "bare s/step",
    "× suite/bare",
    "peak memory GiB",
    "MFU suite",
    "MFU bare",
]


def recorded_inputs(case, device, dtype) -> tuple[tuple, dict]:
    """The positional and keyword arguments the suite's step passes to ``case.model``."""
    recorded: dict = {}

    def hook(module, args, kwargs):
        recorded["args"], recorded["kwargs"] = args, kwargs

    handle = case.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), autocast(device, dtype):
            case.loss(case.model, case.batch, torch.Generator(device).manual_seed(0))
    finally:
        handle.remove()
    return recorded["args"], recorded["kwargs"]


def autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def bare_step(model, args: tuple, kwargs: dict, device, dtype):
    """``step(index)``: the model on fixed inputs, a mean-square loss, backward; no optimizer."""

    def step(index: int) -> None:
        with autocast(device, dtype):
            output = model(*args, **kwargs)
        if isinstance(output, tuple | list):
            output = output[0]
        output.float().square().mean().backward()
        for param in model.parameters():
            param.grad = None

    return step


def peak_flops(device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for fragment, peak in PEAK_BF16.items() if fragment in name), None)


def measure_family(family: str, args, device, dtype, peak: float | None) -> list[list[str]]:
    """Rows for one model: each variant's times, memory and MFU (or why it has none)."""
    build, resolution, _ = CASES[family]
    resolution = args.resolution or resolution
    torch.manual_seed(0)
    case = build(args.tiny, args.batch, resolution, device, dtype)
    params = parameter_count(case.denoiser)
    optimizer = torch.optim.AdamW([p for p in case.model.parameters() if p.requires_grad], lr=1e-4)
    call_args, call_kwargs = recorded_inputs(case, device, dtype)
    bare = bare_step(case.model, call_args, call_kwargs, device, dtype)
    flops = counted_flops(functools.partial(bare, 0))
    autocast_dtype = None if dtype == torch.float32 else dtype
    suite = training_step(case.model, case.loss, case.batch, optimizer, device, autocast_dtype)
    variants = [("no checkpointing", None), ("checkpointing", "checkpointing")]
    if args.compile:
        variants.append(("checkpointing + compile", "compile"))
    rows = []
    for label, change in variants:
        if change == "checkpointing":
            case.denoiser.enable_gradient_checkpointing()
        elif change == "compile":
            start = time.perf_counter()
            compile_repeated_blocks(case.denoiser)
            label += f" (first steps {time.perf_counter() - start:.0f} s)"
        size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
        name = f"{case.name} ({size})"
        try:
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = time_variants({"suite": suite, "bare": bare}, args.blocks, args.steps, device)
        except torch.OutOfMemoryError:
            rows.append([name, f"{resolution}²", label, *["out of memory"] * 6])
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        memory = "n/a"
        if torch.device(device).type == "cuda":
            memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
        mfu = [f"{flops / times[k] / peak:.1%}" if peak else "n/a" for k in ("suite", "bare")]
        rows.append(
            [
                name,
                f"{resolution}²",
                label,
                f"{times['suite']:.3f}",
                f"{times['bare']:.3f}",
                f"{times['suite'] / times['bare']:.3f}",
                memory,
                *mfu,
            ]
        )
    del case, optimizer, suite, bare, call_args, call_kwargs
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the table. On a machine without CUDA, ``--tiny --device cpu`` runs the
    same code on the tiny models (how the tests check it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (tests, no GPU)")
    parser.add_argument("--compile", action="store_true", help="also time compiled blocks")
    parser.add_argument("--families", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--resolution", type=int, default=None, help="default: per model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/run.py --gpu needs CUDA; no GPU is visible here")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = peak_flops(device, args.peak_tflops)
    rows = []
    for family in args.families:
        start = time.perf_counter()
        rows += measure_family(family, args, device, dtype, peak)
        print(f"{family}: {time.perf_counter() - start:.0f} s", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = markdown_table(HEADER, rows)
    print(f"{where}, {dtype}, batch {args.batch}, torch {torch.__version__}")
    print(table)
    return table
