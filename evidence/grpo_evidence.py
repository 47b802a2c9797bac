"""GRPO against supervised training on the tiny pretrained FLUX.1 Fill world.

    python -m evidence.grpo_evidence --out outputs/grpo_evidence --seeds 0 1 2
    python -m evidence.grpo_evidence --out outputs/grpo_evidence_quick --quick   # smoke test

For each seed, with ``train_flux_fill.py`` in this process (``evidence.ablation_runs``):

1. ``sft``: supervised training from the base of ``worlds.fill_world`` for ``--sft_steps``;
2. from that LoRA (``--init_lora_weights``), the same number of denoiser forward-and-backward
   passes on single examples more (:func:`matched_grpo_steps`), three ways:

   - ``sft+more``: supervised, ``--extra_steps`` steps;
   - ``grpo``: GRPO with the default reward mix (``training.grpo.config.DEFAULT_REWARD``);
   - ``grpo+colour``: GRPO with the background reward and :func:`prompted_colour`, a
     model-free score of the colour the prompt names, which this world can judge;

3. samples the base and every LoRA on the held-out examples with ``FluxFillPipeline`` (fixed
   noise per example, the same for every LoRA and seed) and scores each sample against its
   image (``evidence.edit_metrics``): object IoU (the saturated pixels against the mask),
   background PSNR outside the mask, and the checks of a reward that is gamed: the fill's
   high-frequency energy against the true fill's (:func:`interior_energy_ratio`: above 1 is
   noise), the share of grey holes (:func:`is_grey_hole`) and the default reward mix itself;
   and the true images passed through the VAE, the ceiling.

The world is built (or reused) in ``--world``, ``OUT/world`` by default; every field of
:class:`EvidenceSettings` is a flag (``--sft_steps 3000``, ``--extra_steps 1000``, ...). Seeds
already in ``OUT/results.json`` with the same settings are kept, so a run cut short resumes.

The compute is matched by passes, not wall time: a pass costs the same in either objective,
while wall time on a shared CPU moves with the machine's load. A GRPO step also samples its
groups (as many forward passes again, without gradients, and a decode), so GRPO gets more
wall time than ``sft+more``; both are recorded. Writes ``results.json`` (every number, per
seed, and mean and spread over seeds), ``table.md`` and ``object_iou.png`` /
``background_psnr.png`` (each metric against passes, mean over seeds) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxFillPipeline
from PIL import Image

import train_flux_fill
from data.synthetic import OBJECT_COLOURS
from evidence.ablation import heldout_rows, sample_by_size
from evidence.ablation_runs import train_on_world
from evidence.edit_metrics import change_mask, insertion_metrics, iou, is_no_edit, object_mask
from evidence.plots import line_plot
from training.grpo.config import DEFAULT_REWARD
from training.grpo.rewards import RewardOptions, Rewards, gradient_magnitude
from worlds.fill_world import FILL_GUIDANCE, FillWorldSettings, build_fill_world
from worlds.fitting import reconstructions
from worlds.kontext_world import WORLD_MAX_SEQUENCE_LENGTH

# The striped objects' mean shade: ``data.synthetic.textured_object`` spans 70-100 % of the
# colour, half way on average.
OBJECT_SHADE = 0.85
ARMS = ("sft+more", "grpo", "grpo+colour")
REWARD_OF_ARM = {
    "grpo": DEFAULT_REWARD,
    "grpo+colour": "background,evidence.grpo_evidence:prompted_colour",
}
METRICS = (
    "object_iou",
    "named_object_iou",
    "background_psnr",
    "interior_energy_ratio",
    "grey_hole_share",
    "default_reward",
)


def named_colour(prompt: str) -> str:
    """The key of ``data.synthetic.OBJECT_COLOURS`` that ``prompt`` names ("a red ball": red)."""
    return next(word for word in prompt.split() if word in OBJECT_COLOURS)


def named_object_mask(output: np.ndarray, prompt: str) -> np.ndarray:
    """``[H, W]`` bool: the object pixels of ``output`` (``evidence.edit_metrics.object_mask``)
    nearer the shade of the colour ``prompt`` names than any other object colour's: the object
    drawn *as asked*, where object IoU counts any saturated colour."""
    shades = OBJECT_SHADE * np.asarray(list(OBJECT_COLOURS.values()), dtype=np.float64)
    distance = ((output.astype(np.float64)[..., None, :] - shades) ** 2).sum(axis=-1)
    named = list(OBJECT_COLOURS).index(named_colour(prompt))
    return object_mask(output) & (distance.argmin(axis=-1) == named)


def prompted_colour(
    images: torch.Tensor, prompts: list[str], masks: torch.Tensor, sources: torch.Tensor
) -> torch.Tensor:
    """A reward (``training.grpo.rewards``' signature): minus the mean squared distance, inside
    the mask, between ``images [N, 3, H, W]`` in [0, 1] and the shade of the colour each prompt
    names (a key of ``data.synthetic.OBJECT_COLOURS``, at :data:`OBJECT_SHADE`): ``[N]``, at most
    0. The mask is the object's shape, so a fill that covers it in the named colour scores
    highest; the background is left to the ``background`` reward."""
    colours = torch.tensor([OBJECT_COLOURS[named_colour(p)] for p in prompts], dtype=torch.float32)
    shades = (OBJECT_SHADE * colours / 255).to(images.device)[:, :, None, None]
    distance = ((images.float() - shades) ** 2).sum(dim=1, keepdim=True) * masks
    return -distance.sum(dim=(1, 2, 3)) / masks.sum(dim=(1, 2, 3)).clamp_min(1)


def interior_energy_ratio(output: np.ndarray, image: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient magnitude inside ``mask`` (``[H, W]`` bool) of ``output`` over that of the
    true ``image`` (both ``[H, W, 3]`` uint8): 1 for a fill as busy as the true one, above 1 for
    noise, below for a flat or grey fill."""

    def energy(pixels: np.ndarray) -> float:
        tensor = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None] / 255
        return float(gradient_magnitude(tensor)[0, 0][torch.tensor(mask)].mean())

    return energy(output) / max(energy(image), 1e-6)


def is_grey_hole(output: np.ndarray, masked: np.ndarray, mask: np.ndarray) -> bool:
    """Whether ``output`` left the hole as the pipeline's masked input shows it (grey): its
    change from ``masked`` covers under a tenth of ``mask`` (``evidence.edit_metrics``). This
    world's backgrounds are muted (every channel 80-180), within the change threshold of the grey
    on most pixels, so a fill that continues the background counts too: read it as "no object
    drawn"."""
    return is_no_edit(change_mask(output, masked), mask)


@dataclass(frozen=True)
class EvidenceSettings:
    """What the evidence depends on; the world's settings are recorded beside them."""

    sft_steps: int = 3000
    """Supervised steps of the starting LoRA."""
    extra_steps: int = 1000
    """Supervised steps of ``sft+more``; the GRPO arms get as many passes."""
    sft_batch_size: int = 8
    """Examples per supervised step."""
    groups: int = 1
    """GRPO: examples (groups) per step."""
    generations: int = 8
    """GRPO: images sampled per example."""
    sampling_steps: int = 4
    """GRPO: denoising steps per sampled image, every one trained."""
    grpo_learning_rate: float = 1e-3
    """GRPO's learning rate (supervised runs use the ablations' 1e-3)."""
    heldout: int = 24
    """Held-out examples evaluated."""
    inference_steps: int = 8
    """Denoising steps of the evaluation sampler."""


def matched_grpo_steps(settings: EvidenceSettings) -> int:
    """GRPO steps with the forward-and-backward passes of ``sft+more``: a supervised step makes
    one per example, a GRPO step one per sampled image and trained denoising step.

    Raises:
        ValueError: the passes do not divide into whole GRPO steps.
    """
    passes = settings.extra_steps * settings.sft_batch_size
    per_step = settings.groups * settings.generations * settings.sampling_steps
    if passes % per_step:
        raise ValueError(f"{passes} supervised passes are not a whole number of GRPO steps")
    return passes // per_step


def heldout_examples(folder: Path, limit: int) -> list[dict]:
    """The first ``limit`` held-out rows: ``image`` (PIL), ``mask`` ``[H, W]`` bool,
    ``prompt``."""
    return heldout_rows(folder, limit, ("image",))


@torch.no_grad()
def sample(pipe: FluxFillPipeline, examples: list[dict], steps: int) -> list[np.ndarray]:
    """``[H, W, 3]`` uint8 fill per example, each with its own fixed noise seed."""

    def call(indices: list[int], width: int, height: int) -> list:
        return pipe(
            prompt=[examples[index]["prompt"] for index in indices],
            image=[examples[index]["image"] for index in indices],
            mask_image=[Image.fromarray(examples[index]["mask"]) for index in indices],
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=FILL_GUIDANCE,
            max_sequence_length=WORLD_MAX_SEQUENCE_LENGTH,
            generator=[torch.Generator().manual_seed(index) for index in indices],
        ).images

    return sample_by_size([example["image"].size for example in examples], call)


def score(outputs: list[np.ndarray], examples: list[dict]) -> dict[str, float]:
    """Mean over the examples of every entry of :data:`METRICS`."""
    rows = []
    for output, example in zip(outputs, examples, strict=True):
        image, mask = np.asarray(example["image"]), example["mask"]
        masked = np.where(mask[..., None], 127.5, image)
        metrics = insertion_metrics(output, image, mask)
        rows.append(
            {
                "object_iou": metrics["object_iou"],
                "named_object_iou": iou(named_object_mask(output, example["prompt"]), mask),
                "background_psnr": metrics["background_psnr"],
                "interior_energy_ratio": interior_energy_ratio(output, image, mask),
                "grey_hole_share": float(is_grey_hole(output, masked, mask)),
            }
        )
    means = {name: float(np.mean([row[name] for row in rows])) for name in rows[0]}
    return {**means, "default_reward": default_reward(outputs, examples)}


def default_reward(outputs: list[np.ndarray], examples: list[dict]) -> float:
    """The default reward mix's mean total on the samples, as GRPO scores them (``sources`` the
    true images)."""
    rewards = Rewards(DEFAULT_REWARD, RewardOptions(), "cpu")
    totals = []
    for output, example in zip(outputs, examples, strict=True):
        images, sources = (
            torch.tensor(np.asarray(pixels), dtype=torch.float32).permute(2, 0, 1)[None] / 255
            for pixels in (output, example["image"])
        )
        masks = torch.tensor(example["mask"], dtype=torch.float32)[None, None]
        total, _ = rewards(images, [example["prompt"]], masks, sources)
        totals.append(float(total[0]))
    return float(np.mean(totals))


def vae_reference(pipe: FluxFillPipeline, examples: list[dict]) -> dict[str, float]:
    """:func:`score` of each true image passed through the VAE: what a LoRA that produced the
    true latents exactly would score, the ceiling every model is read against."""
    outputs = []
    for example in examples:
        pixels = torch.tensor(np.asarray(example["image"]), dtype=torch.float32)
        decoded = reconstructions(pipe.vae, pixels.permute(2, 0, 1)[None] / 127.5 - 1)[0]
        outputs.append(((decoded.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    return score(outputs, examples)


def evaluate(
    pipe: FluxFillPipeline, lora: Path | None, examples: list[dict], steps: int
) -> dict[str, float]:
    """:func:`score` of the base (``lora`` None) or of the base with a LoRA folder loaded."""
    if lora is not None:
        pipe.load_lora_weights(lora)
    try:
        return score(sample(pipe, examples, steps), examples)
    finally:
        if lora is not None:
            pipe.unload_lora_weights()


def train_arm(
    world: Path,
    resolution: int,
    out: Path,
    arm: str,
    seed: int,
    settings: EvidenceSettings,
    start: Path | None,
) -> float:
    """Train ``arm`` (``sft`` from the base, or one of :data:`ARMS` from the LoRA file
    ``start``) on the world of ``resolution`` into ``out``; the encoded training set is cached
    beside the seeds' folders. Returns wall-clock seconds."""
    flags: dict = {"max_sequence_length": WORLD_MAX_SEQUENCE_LENGTH}
    steps = settings.sft_steps if arm == "sft" else settings.extra_steps
    if start is not None:
        flags["init_lora_weights"] = start
    if arm in REWARD_OF_ARM:
        steps = matched_grpo_steps(settings)
        flags |= {
            "objective": "grpo",
            "reward": REWARD_OF_ARM[arm],
            "train_batch_size": settings.groups,
            "num_generations": settings.generations,
            "sampling_steps": settings.sampling_steps,
            "learning_rate": settings.grpo_learning_rate,
        }
    else:
        flags["train_batch_size"] = settings.sft_batch_size
    return train_on_world(
        train_flux_fill.main,
        world,
        out,
        resolution=resolution,
        steps=steps,
        every=steps,
        seed=seed,
        cache_dir=out.parents[1] / "cache",
        flags=flags,
    )


def passes_of(settings: EvidenceSettings) -> dict[str, int]:
    """Forward-and-backward passes on single examples behind each evaluated model."""
    sft = settings.sft_steps * settings.sft_batch_size
    more = sft + settings.extra_steps * settings.sft_batch_size
    return {"base": 0, "sft": sft, **{arm: more for arm in ARMS}}


def summary(runs: dict[str, dict]) -> dict[str, dict[str, list[float]]]:
    """``{model: {metric: [mean, standard deviation over seeds]}}`` of ``runs`` (by seed)."""
    models = next(iter(runs.values()))["metrics"]
    return {
        model: {
            metric: [
                float(np.mean([run["metrics"][model][metric] for run in runs.values()])),
                float(np.std([run["metrics"][model][metric] for run in runs.values()])),
            ]
            for metric in METRICS
        }
        for model in models
    }


def table(
    means: dict[str, dict[str, list[float]]], passes: dict[str, int], reference: dict[str, float]
) -> str:
    """Markdown table: mean ± standard deviation over seeds, a row per model, then the VAE's
    reconstruction of the true images (``reference``), the ceiling."""
    header = "| model | passes | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS)
    lines = [header]
    for model, metrics in means.items():
        cells = " | ".join(f"{mean:.3f} ± {spread:.3f}" for mean, spread in metrics.values())
        lines.append(f"| {model} | {passes[model]} | {cells} |")
    ceiling = " | ".join(f"{reference[metric]:.3f}" for metric in METRICS)
    lines.append(f"| VAE(image): the ceiling | | {ceiling} |")
    return "\n".join(lines) + "\n"


def plots(out: Path, means: dict, passes: dict[str, int]) -> None:
    """``<metric>.png`` for object IoU and background PSNR: each arm's path base -> sft -> arm
    against passes, mean over seeds."""
    for metric in ("object_iou", "background_psnr"):
        curves = {
            arm: (
                [passes["base"], passes["sft"], passes[arm]],
                [means[model][metric][0] for model in ("base", "sft", arm)],
            )
            for arm in ARMS
        }
        title = f"{metric} vs passes (FLUX.1 Fill world, held-out mean over seeds)"
        line_plot(curves, title).save(out / f"{metric}.png")


def run_seed(
    world: Path,
    resolution: int,
    out: Path,
    seed: int,
    settings: EvidenceSettings,
    pipe: FluxFillPipeline,
    examples: list[dict],
) -> dict:
    """Train ``sft`` and every arm of one seed into ``out/seed<k>`` and score them all."""
    folder = out / f"seed{seed}"
    seconds = {}
    for arm in ("sft", *ARMS):
        start = None if arm == "sft" else folder / "sft" / "pytorch_lora_weights.safetensors"
        train = train_arm(world, resolution, folder / arm, arm, seed, settings, start)
        seconds[arm] = round(train, 1)
    return {"train_seconds": seconds, "metrics": score_seed(folder, settings, pipe, examples)}


def score_seed(
    folder: Path, settings: EvidenceSettings, pipe: FluxFillPipeline, examples: list[dict]
) -> dict[str, dict[str, float]]:
    """:func:`evaluate` of ``sft`` and every arm trained in ``folder``."""
    return {
        model: evaluate(pipe, folder / model, examples, settings.inference_steps)
        for model in ("sft", *ARMS)
    }


def scored(metrics: dict[str, float]) -> bool:
    """Whether ``metrics`` holds every entry of :data:`METRICS`."""
    return set(METRICS) <= set(metrics)


def run_evidence(
    world: Path,
    out: Path,
    seeds: list[int],
    settings: EvidenceSettings,
    world_settings: FillWorldSettings,
) -> dict:
    """Build (or reuse) the world, run every seed, write ``results.json``, ``table.md`` and the
    plots into ``out``; returns the results. Seeds ``results.json`` holds from a run with the
    same settings are kept, so a run cut short resumes; one recorded before a metric was added is
    scored again from its LoRAs, not trained again."""
    record = build_fill_world(world, world_settings)
    examples = heldout_examples(world / "heldout", settings.heldout)
    pipe = FluxFillPipeline.from_pretrained(world / "model")
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    recorded = {"settings": asdict(settings), "world": record["settings"]}
    results = json.loads(path.read_text()) if path.exists() else {}
    if {key: results.get(key) for key in recorded} != recorded:
        results = {**recorded, "runs": {}}
    if not scored(results.get("base", {})):
        results["base"] = evaluate(pipe, None, examples, settings.inference_steps)
        results["vae_reference"] = vae_reference(pipe, examples)
    passes = passes_of(settings)
    for seed in seeds:
        run = results["runs"].get(str(seed))
        if run is None:
            run = run_seed(world, world_settings.resolution, out, seed, settings, pipe, examples)
        elif all(scored(metrics) for metrics in run["metrics"].values()):
            continue
        else:
            run["metrics"] = score_seed(out / f"seed{seed}", settings, pipe, examples)
        run["metrics"]["base"] = results["base"]
        results["runs"][str(seed)] = run
        # The seeds scored so far: a resumed run scores the others in turn.
        done = {
            key: kept
            for key, kept in results["runs"].items()
            if all(scored(metrics) for metrics in kept["metrics"].values())
        }
        means = summary(done)
        ordered = {model: means[model] for model in ("base", "sft", *ARMS)}
        results |= {
            "passes": passes,
            "grpo_steps": matched_grpo_steps(settings),
            "summary": ordered,
        }
        path.write_text(json.dumps(results, indent=2) + "\n")
        (out / "table.md").write_text(table(ordered, passes, results["vae_reference"]))
        plots(out, ordered, passes)
        print(f"seed {seed}", json.dumps(run["train_seconds"]), flush=True)
    print((out / "table.md").read_text())
    return results


# The smoke test's settings: a world and runs of seconds.
QUICK = EvidenceSettings(
    sft_steps=2,
    extra_steps=2,
    sft_batch_size=2,
    generations=2,
    sampling_steps=2,
    heldout=2,
    inference_steps=2,
)
QUICK_WORLD = FillWorldSettings(
    resolution=32, n_train=4, n_heldout=2, scenes=18, vae_steps=2, base_steps=2, base_batch_size=4
)


def main(argv: list[str] | None = None) -> dict:
    """The command line: see the module's docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--world", type=Path, default=None, help="world folder (default: OUT/world)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed, tiny world and runs")
    for name, value in asdict(EvidenceSettings()).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in asdict(EvidenceSettings())}
    settings, world_settings = EvidenceSettings(**values), FillWorldSettings()
    if args.quick:
        settings, world_settings, args.seeds = QUICK, QUICK_WORLD, args.seeds[:1]
    world = args.world or args.out / "world"
    return run_evidence(world, args.out, args.seeds, settings, world_settings)


if __name__ == "__main__":
    # One thread: the machine is shared, and a tiny model gains little from more.
    torch.set_num_threads(1)
    main()
