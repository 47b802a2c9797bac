"""The loop, record and report every ablation shares: configurations x seeds, each trained into
its own folder, each checkpoint scored on held-out pairs, mean and spread over seeds.

A family's ablation (``evidence/ablation.py`` for the Kontext mask losses,
``evidence/text_ablation.py`` for the Qwen text-region loss) says how to train a run and how
to score a LoRA; :func:`run_ablation` does the rest and writes ``results.json`` after every run,
so an ablation cut short keeps what it measured and resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from evidence.plots import line_plot


@dataclass
class AblationPlan:
    """What one family's ablation runs.

    ``train(run_dir, flags, seed)`` trains one LoRA into ``run_dir`` (a ``checkpoint-<step>``
    every ``every`` steps) and returns its wall-clock seconds; ``evaluate(lora, seed)`` scores a
    LoRA folder (the base model when None) and returns ``(metrics, outputs)``, outputs
    ``[H, W, 3]`` uint8 arrays; ``example_grid(examples)`` draws the first
    :data:`EXAMPLES` outputs of each configuration (``base`` first).
    ``noise_per_seed``: whether a run is scored with its training seed's noise; when False,
    every run is scored with ``evaluate(lora, 0)``, the same noise for every configuration and
    seed (seeds then vary only the training), and the base model once.
    """

    configs: dict[str, dict]
    metrics: tuple[str, ...]
    train: Callable[[Path, dict, int], float]
    evaluate: Callable[[Path | None, int], tuple[dict[str, float], list]]
    example_grid: Callable[[dict[str, list]], Image.Image]
    noise_per_seed: bool = True


EXAMPLES = 4


def save_examples(out: Path, name: str, outputs: list[np.ndarray]) -> None:
    """The first :data:`EXAMPLES` outputs of configuration ``name`` as
    ``out/examples/<name>/<index>.png``, so that a resumed ablation still draws them."""
    folder = out / "examples" / name
    folder.mkdir(parents=True, exist_ok=True)
    for index, output in enumerate(outputs[:EXAMPLES]):
        Image.fromarray(output).save(folder / f"{index}.png")


def saved_examples(out: Path, names: list[str]) -> dict[str, list[np.ndarray]]:
    """The outputs :func:`save_examples` kept for each of ``names`` that has any."""
    examples = {}
    for name in names:
        files = sorted((out / "examples" / name).glob("*.png"), key=lambda f: int(f.stem))
        if files:
            examples[name] = [np.asarray(Image.open(file)) for file in files]
    return examples


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; each in-process run needs a clean slate."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_on_world(
    main: Callable[[list[str]], None],
    world: Path,
    out: Path,
    *,
    resolution: int,
    steps: int,
    every: int,
    seed: int,
    cache_dir: Path,
    flags: dict,
) -> float:
    """Train one LoRA on a world's ``train/`` set into ``out`` with a training script's ``main``,
    in this process: the ablations' common settings (batch 8, rank 8, learning rate 1e-3, a
    checkpoint every ``every`` steps, the encoded set cached in ``cache_dir``, shared by runs)
    plus the configuration's ``flags`` (booleans as ``true`` / ``false``). Returns wall-clock
    seconds."""
    values = {
        "pretrained_model_name_or_path": world / "model",
        "train_data_dir": world / "train",
        "output_dir": out,
        "resolution": resolution,
        "train_batch_size": 8,
        "max_train_steps": steps,
        "learning_rate": 1e-3,
        "rank": 8,
        "seed": seed,
        "checkpointing_steps": every,
        "cache_latents": True,
        "gradient_checkpointing": False,
        "cache_dir": cache_dir,
        "overwrite_output_dir": True,
        **flags,
    }
    args = [
        token
        for key, value in values.items()
        for token in (f"--{key}", str(value).lower() if isinstance(value, bool) else str(value))
    ]
    started = time.perf_counter()
    reset_accelerate()
    try:
        main(args)
    finally:
        reset_accelerate()
    return time.perf_counter() - started


def earlier_runs(out: Path, settings: dict) -> tuple[dict, dict]:
    """``(results, train seconds)`` by configuration and seed (as strings) of the runs recorded in
    ``out/results.json`` with the same ``settings``; empty when there are none or they differ."""
    path = out / "results.json"
    if not path.exists():
        return {}, {}
    record = json.loads(path.read_text())
    if record.get("settings") != settings:
        return {}, {}
    return record["results"], record["train_seconds"]


def run_ablation(
    plan: AblationPlan,
    out: Path,
    names: list[str],
    seeds: tuple[int, ...],
    settings: dict,
    reference: dict[str, float],
) -> None:
    """Train and score every configuration in ``names`` with every seed (all configurations
    with the first seed before any with the next, so a cut-short ablation still covers them
    all); ``settings`` must hold ``steps`` and ``every``. Runs ``out/results.json`` already holds
    with the same ``settings`` are kept, not repeated: an ablation cut short resumes, and a new
    configuration joins the table of the others. Writes ``results.json``, ``examples.png``,
    ``table.md`` and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results, seconds = earlier_runs(out, settings)
    # Examples of the runs kept from an earlier invocation, whose outputs are not recomputed.
    kept = [name for name in names if results.get(name)]
    examples = saved_examples(out, ["base", *kept]) if kept else {}
    for name in names:
        results.setdefault(name, {})
        seconds.setdefault(name, {})
    steps, every = settings["steps"], settings["every"]
    eval_steps = [*range(every, steps, every), steps]
    started = time.perf_counter()
    bases: dict[int, dict[str, float]] = {}
    for seed in seeds:
        noise_seed = seed if plan.noise_per_seed else 0
        for name in names:
            if str(seed) in results[name]:
                continue
            if noise_seed not in bases:
                bases[noise_seed], base_outputs = plan.evaluate(None, noise_seed)
                if "base" not in examples:
                    examples["base"] = base_outputs
                    save_examples(out, "base", base_outputs)
            run_dir = out / name / f"seed{seed}"
            seconds[name][str(seed)] = round(plan.train(run_dir, plan.configs[name], seed), 1)
            run = {"0": bases[noise_seed]}
            for step in eval_steps:
                run[str(step)], outputs = plan.evaluate(run_dir / f"checkpoint-{step}", noise_seed)
            results[name][str(seed)] = run
            if name not in examples:
                examples[name] = outputs
                save_examples(out, name, outputs)
            print(name, seed, json.dumps(run[str(steps)]), flush=True)
            record = {
                "settings": settings,
                "configs": {name: plan.configs[name] for name in results},
                "seeds": sorted({int(seed) for runs in results.values() for seed in runs}),
                "reference": reference,
                "train_seconds": seconds,
                "elapsed_seconds": round(time.perf_counter() - started, 1),
                "results": results,
            }
            (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
            ordered = {key: examples[key] for key in ["base", *names] if key in examples}
            plan.example_grid(ordered).save(out / "examples.png")
    print(write_report(out, plan.metrics))
    print(f"total {time.perf_counter() - started:.0f} s")


def summary_table(
    results: dict,
    configs: list[str],
    step: str,
    metrics: tuple[str, ...],
    reference: dict[str, float] | None = None,
) -> str:
    """Markdown table: mean ± standard deviation over seeds of each of ``metrics`` at ``step``,
    after a row for the base (step 0) and before one for ``reference`` (the VAE's reconstruction
    of the targets) when given."""

    def cells(runs: list[dict[str, float]]) -> str:
        return " | ".join(
            f"{np.mean([run[metric] for run in runs]):.3f} ± "
            f"{np.std([run[metric] for run in runs]):.3f}"
            for metric in metrics
        )

    header = "| config | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    base = [run["0"] for run in results[configs[0]].values()]
    lines = [f"| base (no LoRA) | {cells(base)} |"]
    for config in configs:
        lines.append(f"| {config} | {cells([run[step] for run in results[config].values()])} |")
    if reference is not None:
        values = " | ".join(f"{reference[metric]:.3f}" for metric in metrics)
        lines.append(f"| VAE(target): the ceiling | {values} |")
    return header + "\n".join(lines) + "\n"


def write_report(out: Path, metrics: tuple[str, ...]) -> str:
    """``table.md`` and one PNG per metric from ``out/results.json`` (runs finished so far:
    a configuration's curve averages the seeds it has); returns the table."""
    record = json.loads((out / "results.json").read_text())
    results = {name: runs for name, runs in record["results"].items() if runs}
    names = list(results)
    last = str(record["settings"]["steps"])
    table = summary_table(results, names, last, metrics, record.get("reference"))
    (out / "table.md").write_text(table)
    for metric in metrics:
        curves = {}
        for name in names:
            steps = sorted({int(step) for run in results[name].values() for step in run})
            means = [
                float(np.mean([run[str(step)][metric] for run in results[name].values()]))
                for step in steps
            ]
            curves[name] = (steps, means)
        line_plot(curves, f"{metric} vs training step (held-out mean over seeds)").save(
            out / f"{metric}.png"
        )
    return table
