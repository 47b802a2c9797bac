"""Before/after evidence of a Kontext LoRA trained on the tiny world: what ``make demo`` shows.

    python evidence/demo_report.py --world worlds/kontext_world_data --run outputs/demo/kontext

writes into ``--run``: ``before_after.png`` (held-out pairs: context, target, the base model's
output, the output with the LoRA; each output with its change mask outlined against the known
mask), ``loss_curve.png`` (the total loss and every weighted term per step, from metrics.jsonl)
and ``evidence.json`` (IoU, area error, boundary F-score, background PSNR, no-edit rate before
and after, on the held-out pairs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import yaml
from diffusers import FluxKontextPipeline
from jsonargparse import auto_cli
from PIL import Image

from evidence.ablation import evaluate, heldout_pairs, kontext_defaults
from evidence.plots import line_plot
from train_kontext_lora import TERM_WEIGHT_FLAGS
from training.metrics import read_metrics
from training.validation import image_grid
from worlds.kontext_world import SHIPPED_WORLD


def weighted_terms(records: list[dict], weights: dict[str, float]) -> dict[str, tuple]:
    """Per-step curves of the total loss and of each logged term times its weight (the share
    of the total each term is), for terms with a non-zero weight."""
    steps = [record["step"] for record in records]
    curves = {"total": (steps, [record["loss"] for record in records])}
    for name, weight in weights.items():
        if weight and all(name in record for record in records):
            curves[f"{weight:g}*{name}"] = (steps, [weight * record[name] for record in records])
    return curves


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps: one step's loss depends on its random sigma."""
    return [float(np.mean(values[max(0, i - window + 1) : i + 1])) for i in range(len(values))]


def main(
    world: Path = SHIPPED_WORLD,
    run: Path = Path("outputs/demo/kontext"),
    pairs: int = 6,
    inference_steps: int = 8,
    seed: int = 0,
    config: Path | None = Path("configs/kontext_demo.yaml"),
) -> None:
    """Sample held-out pairs with and without the LoRA in ``run``, plot its losses.

    Args:
        world: the tiny world the LoRA was trained on.
        run: the training run's --output_dir.
        pairs: held-out pairs to show and score.
        inference_steps: denoising steps.
        seed: sampling seed (the same noise before and after).
        config: the YAML config the run was trained with, for the loss weights.
    """
    heldout = heldout_pairs(world / "heldout", pairs)
    pipe = FluxKontextPipeline.from_pretrained(world / "model")
    pipe.set_progress_bar_config(disable=True)
    before, before_outputs = evaluate(pipe, None, heldout, seed, inference_steps)
    after, after_outputs = evaluate(pipe, run, heldout, seed, inference_steps)

    rows = []
    for index, pair in enumerate(heldout):
        target_path = world / "heldout" / "images" / f"{index:04d}_target.png"
        row = [pair["context"], Image.open(target_path).convert("RGB")]
        row += [Image.fromarray(before_outputs[index]), Image.fromarray(after_outputs[index])]
        rows.append([image.resize((96, 96), Image.Resampling.NEAREST) for image in row])
    grid = image_grid(rows, ["context", "target", "before", "after LoRA"])
    grid.save(run / "before_after.png")

    settings = yaml.safe_load(config.read_text()) if config else {}
    records = read_metrics(run)
    defaults = kontext_defaults()
    weights = {"fm": settings.get("flow_matching_weight", defaults["flow_matching_weight"])}
    for name, flag in TERM_WEIGHT_FLAGS.items():
        weights[name] = settings.get(flag, defaults[flag]) or 0.0
    curves = weighted_terms(records, weights)
    window = max(1, len(records) // 20)
    smoothed = {name: (xs, _smooth(list(ys), window)) for name, (xs, ys) in curves.items()}
    title = f"loss terms x weight (trailing mean of {window} steps, log scale)"
    line_plot(smoothed, title, log_y=True).save(run / "loss_curve.png")
    evidence = {"heldout_pairs": len(heldout), "before": before, "after": after}
    (run / "evidence.json").write_text(json.dumps(evidence, indent=2) + "\n")
    print(json.dumps(evidence, indent=2))
    print(f"grid: {run / 'before_after.png'}\nloss curve: {run / 'loss_curve.png'}")


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
