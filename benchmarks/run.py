"""One table for every train script: loss terms, data loader and latent cache, side by side.

For each script, on its tiny random model and a synthetic folder at --resolution, in one process:

- step time with the mask/auxiliary terms off and on (whole steps: forward, backward, AdamW,
  on encoded batches, the two variants in alternating blocks; median and ratio);
- step time from pixels (every step runs the encoders) and from encoded tensors (what
  ``--cache_latents`` feeds the loop), alternating likewise;
- the data loader's throughput in items/s, from the raw folder and from the filled cache, beside
  the items/s a training step consumes.

    python benchmarks/run.py [--resolution 64] [--batch 2] [--blocks 5] [--steps 2]
    python benchmarks/run.py --gpu [--compile]   # real-size models on CUDA (benchmarks/gpu.py)
    python benchmarks/run.py --gpu --lowmem      # their low-memory modes (benchmarks/low_memory.py)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # tqdm reads this when it is imported: the caching progress bars would split the table.
    os.environ.setdefault("TQDM_DISABLE", "1")
# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
import platform
import tempfile
import time

import torch
from accelerate import Accelerator

from benchmarks.families import SCRIPTS, FamilyBench, build
from benchmarks.harness import (
    loader_items_per_second,
    markdown_table,
    time_variants,
    training_step,
)
from data.cache import TensorCache
from training.inputs.caching import CachedItems, fill_cache

HEADER = [
    "script",
    "auxiliary terms",
    "off ms/step",
    "on ms/step",
    "× on/off",
    "pixels ms/step",
    "cached ms/step",
    "× pixels/cached",
    "loader items/s (raw / cached)",
    "step items/s (pixels / cached)",
]


def same_size_batch(bench: FamilyBench, batch: int) -> dict:
    """The first ``batch`` items sharing item 0's bucket, collated (pixels)."""
    buckets = bench.dataset.bucket_of_items
    indices = [i for i, bucket in enumerate(buckets) if bucket == buckets[0]][:batch]
    if len(indices) < batch:
        raise ValueError(f"{bench.script}: fewer than {batch} items of one size; raise --items")
    return bench.collate([bench.dataset[i] for i in indices])


def measure(bench: FamilyBench, folder: Path, args, accelerator: Accelerator) -> list[str]:
    """One row of the table for ``bench``."""
    pixels = same_size_batch(bench, args.batch)
    optimizers = {
        aux: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for aux, model in bench.models.items()
    }

    def step(aux: bool, batch: dict, encoded: bool):
        loss = bench.loss(aux, encoded)
        return training_step(bench.models[aux], loss, batch, optimizers[aux], "cpu")

    encoded = bench.encoder(pixels) if bench.encoder is not None else pixels
    is_encoded = bench.encoder is not None
    aux = time_variants(
        {"off": step(False, encoded, is_encoded), "on": step(True, encoded, is_encoded)},
        args.blocks,
        args.steps,
        "cpu",
    )
    raw_loader = loader_items_per_second(bench.dataset, bench.collate, args.passes)
    row = [
        bench.script,
        bench.aux_terms,
        f"{aux['off'] * 1e3:.1f}",
        f"{aux['on'] * 1e3:.1f}",
        f"{aux['on'] / aux['off']:.3f}",
    ]
    if bench.encoder is None:
        # The multispectral adapter trains the encoder's input: there is nothing to cache.
        items_per_step = args.batch / aux["on"]
        return [
            *row,
            f"{aux['on'] * 1e3:.1f}",
            "n/a",
            "n/a",
            f"{raw_loader:.0f} / n/a",
            f"{items_per_step:.1f} / n/a",
        ]
    cache = TensorCache(folder / "cache", bench.encoder.fingerprint())
    fill_cache(accelerator, bench.dataset, cache, bench.collate, bench.encoder)
    cached_loader = loader_items_per_second(
        CachedItems(bench.dataset, cache), bench.cached_collate, args.passes
    )
    # Encoding every step is the slow side: fewer, single-step blocks keep the run short.
    cache_times = time_variants(
        {"pixels": step(True, pixels, False), "cached": step(True, encoded, True)},
        max(1, args.blocks // 2),
        1,
        "cpu",
    )
    return [
        *row,
        f"{cache_times['pixels'] * 1e3:.1f}",
        f"{cache_times['cached'] * 1e3:.1f}",
        f"{cache_times['pixels'] / cache_times['cached']:.2f}",
        f"{raw_loader:.0f} / {cached_loader:.0f}",
        f"{args.batch / cache_times['pixels']:.1f} / {args.batch / cache_times['cached']:.1f}",
    ]


def cpu_table(args) -> str:
    accelerator = Accelerator(cpu=True)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for script in args.scripts:
            folder = Path(root) / Path(script).stem
            start = time.perf_counter()
            bench = build(script, folder, args.resolution, args.items)
            rows.append(measure(bench, folder, args, accelerator))
            print(f"{script}: measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return markdown_table(HEADER, rows)


def machine() -> str:
    """The processor, its cores and torch's version, for the record."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="real-size models on CUDA instead")
    parser.add_argument("--compile", action="store_true", help="--gpu: also time --compile")
    parser.add_argument(
        "--lowmem",
        action="store_true",
        help="--gpu: the low-memory modes (benchmarks/low_memory.py)",
    )
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--items", type=int, default=4, help="synthetic examples per script")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per variant")
    parser.add_argument("--steps", type=int, default=2, help="steps per block")
    parser.add_argument("--passes", type=int, default=2, help="passes over the data per loader")
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS)
    args, rest = parser.parse_known_args(argv)
    if args.gpu and args.lowmem:
        from benchmarks.low_memory import main as low_memory_main

        low_memory_main(rest)
        return
    if args.gpu:
        # The GPU half has options of its own (benchmarks/gpu.py --help).
        from benchmarks.gpu import main as gpu_main

        gpu_main([*rest, *(["--compile"] if args.compile else [])])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.disable(logging.WARNING)  # cache and fingerprint notices would split the table
    torch.manual_seed(0)
    try:
        table = cpu_table(args)
    finally:
        logging.disable(logging.NOTSET)
    print(
        f"tiny models, cpu ({machine()}), batch {args.batch}, "
        f"{args.resolution}x{args.resolution}, {time.strftime('%Y-%m-%d')}"
    )
    print(table)


if __name__ == "__main__":
    main()
