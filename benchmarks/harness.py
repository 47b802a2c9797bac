"""Timing variants of a training step side by side, in alternating blocks of one process.

Alternating blocks let drift (thermal, other load) and warm-up hit every variant alike; the
median over blocks is reported, as a ratio to the first variant.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader


def time_variants(
    steps: dict[str, Callable[[int], None]], blocks: int, steps_per_block: int, device
) -> dict[str, float]:
    """Median seconds per step of each ``steps[name](index)``, after one warm-up step each."""

    def synchronize():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    for step in steps.values():  # warm-up: allocator, kernels, lazy imports
        step(0)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for block in range(blocks):
        for name, step in steps.items():
            synchronize()
            start = time.perf_counter()
            for index in range(steps_per_block):
                step(block * steps_per_block + index)
            synchronize()
            times[name].append((time.perf_counter() - start) / steps_per_block)
    return {name: statistics.median(values) for name, values in times.items()}


def print_ratios(medians: dict[str, float]) -> None:
    """One line per variant: ms per step and the ratio to the first variant."""
    reference = next(iter(medians.values()))
    for name, median in medians.items():
        print(f"{name:<28} {median * 1e3:10.1f} ms/step   x{median / reference:.3f}")


def training_step(model, loss_fn, batch, optimizer, device, autocast_dtype=None):
    """``step(index)``: forward, backward and AdamW on ``batch`` with noise seeded by index."""

    def step(index: int) -> None:
        generator = torch.Generator(device).manual_seed(index)
        with torch.autocast(
            torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            loss, _ = loss_fn(model, batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def loader_items_per_second(dataset, collate_fn, passes: int = 1) -> float:
    """Items per second one data-loader process delivers from ``dataset`` (the loop's
    ``--dataloader_num_workers 0``): reading, decoding, resizing and collating each item."""
    loader = DataLoader(dataset, batch_size=1, collate_fn=collate_fn, num_workers=0)
    for _ in loader:  # warm-up: file-system caches, lazy imports
        break
    start = time.perf_counter()
    count = 0
    for _ in range(passes):
        for _ in loader:
            count += 1
    return count / (time.perf_counter() - start)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """``rows`` under ``header`` as a Markdown table, numbers right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
