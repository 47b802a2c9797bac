"""The model card every training run writes, and the upload of its folder to the Hub.

At the end of a run the main process writes ``README.md`` into ``--output_dir`` in the Hub's
format: YAML front matter (``base_model`` when it is a Hub id, ``library_name: diffusers``, the
license of the known base models, tags) and a body with the inference snippet for the family's
pipeline, the data, the training settings, the losses and their weights, the last step's metrics
from ``metrics.jsonl`` and the latest validation grid. With ``--push_to_hub`` the folder (but its
checkpoints and latent cache) then goes to ``--hub_model_id`` with ``huggingface_hub``.

What differs between families (title, tags, loss terms, the snippet) comes from the script as a
:class:`ModelCardInfo` in its ``TrainingParts``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from training.config import TrainConfig
from training.lora.export import LORA_WEIGHTS_NAME, most_common_rank_alpha, read_lora
from training.metrics import METRICS_FILE, read_metrics
from training.validation import VALIDATION_DIR

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
# What --push_to_hub leaves out: resumable checkpoints (optimizer state, several times the LoRA),
# half-written checkpoints and files (hidden, .partial) and the latent cache.
UPLOAD_IGNORED = ("checkpoint-*", ".*", "*.partial", "cache/*")
# Base-model Hub id prefixes -> their license fields in the card's metadata.
LICENSES = {
    "black-forest-labs/FLUX.1-": {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    },
    "Qwen/Qwen-Image": {"license": "apache-2.0"},
    "stable-diffusion-v1-5/": {"license": "creativeml-openrail-m"},
    "runwayml/stable-diffusion-": {"license": "creativeml-openrail-m"},
    "stabilityai/stable-diffusion-3": {
        "license": "other",
        "license_name": "stabilityai-ai-community",
        "license_link": "https://huggingface.co/stabilityai/stable-diffusion-3-medium/blob/main/LICENSE.md",
    },
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# (base model, where the weights are) -> a Python snippet that uses them.
Usage = Callable[[str, str], str]


@dataclass(frozen=True)
class ModelCardInfo:
    """What a family's runs say about themselves in their model card: a ``title``, Hub
    ``tags`` (with the family's own, which ``training.lora.export`` reads back), the loss
    terms with their weights (a term's name as ``metrics.jsonl`` logs it where it does, or a
    description; a weight, or a setting in words), and the ``usage`` snippet."""

    title: str
    tags: tuple[str, ...]
    losses: Mapping[str, float | str]
    usage: Usage
    pipeline_tag: str | None = "image-to-image"


def _lora_usage(pipeline: str, call: str, base: str, weights: str) -> str:
    return (
        "import torch\n"
        f"from diffusers import {pipeline}\n"
        "from diffusers.utils import load_image\n\n"
        f'pipe = {pipeline}.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")\n'
        f'pipe.load_lora_weights("{weights}")\n'
        f"image = pipe({call}).images[0]\n"
        'image.save("output.png")\n'
    )


def lora_usage(pipeline: str, call: str) -> Usage:
    """The snippet of a LoRA for the diffusers pipeline class ``pipeline``: the base model,
    ``load_lora_weights``, and the call with the arguments ``call`` (Python source)."""
    return partial(_lora_usage, pipeline, call)


def edit_call(prompt: str | None) -> str:
    """The call arguments of an edit pipeline (Kontext, Qwen-Image-Edit) in a snippet."""
    return f'image=load_image("input.png"), prompt={prompt or "your instruction"!r}'


def inpainting_call(prompt: str | None) -> str:
    """The call arguments of an inpainting pipeline (FLUX.1 Fill, SD1.5) in a snippet."""
    return (
        f"prompt={prompt or 'what to paint in the mask'!r}, "
        'image=load_image("image.png"), mask_image=load_image("mask.png")'
    )


def region_weighted(config, plain: str) -> dict[str, float]:
    """The loss rows of a denoising loss ``plain`` with seed 000's region weighting
    (``config.mask_loss``): ``(1 - weight) * plain + weight * region-weighted`` when on."""
    settings = config.mask_loss
    if not settings.enabled:
        return {plain: 1.0}
    weighted = (
        f"{plain}, region-weighted (x{settings.text_region_weight:g} inside the mask, "
        f"x{settings.background_weight:g} outside)"
    )
    return {plain: 1 - settings.weight, weighted: settings.weight}


def grpo_terms(config) -> dict[str, float | str]:
    """The loss rows of GRPO (``training.grpo.policy.GRPOConfig``)."""
    return {
        f"GRPO clipped objective (clip range {config.clip_range:g})": 1.0,
        "KL divergence to the base model": config.kl_beta,
        "reward (maximised)": config.reward,
    }


def _table(rows: Mapping[str, object], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    for name, value in rows.items():
        shown = f"{value:.6g}" if isinstance(value, float) else value
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def _data_summary(config: TrainConfig, examples: int) -> str:
    controls = getattr(config, "control_dirs", None)
    if getattr(config, "train_data_file", None):
        source = f"the file `{config.train_data_file}`"
    elif config.train_data_dir and controls:
        folders = ", ".join(f"`{folder}`" for folder in controls)
        source = f"the targets in `{config.train_data_dir}` with references in {folders}"
    elif config.train_data_dir:
        source = f"the folder `{config.train_data_dir}`"
    else:
        split = getattr(config, "dataset_split", "train")
        source = f"the dataset `{config.dataset_name}` (split `{split}`)"
    sizes = config.resolutions
    if len(sizes) == 1:
        summary = f"{examples} examples from {source}, at `--resolution {sizes[0]}`."
    else:  # the dataset holds every example once per size
        listed = ",".join(map(str, sizes[::-1]))
        summary = (
            f"{examples // len(sizes)} examples from {source}, each at {len(sizes)} sizes "
            f"(`--resolution {listed}`)."
        )
    trigger = getattr(config, "trigger_word", None)
    if trigger:
        summary += f" Every training prompt held the trigger word `{trigger}`: put it in yours."
    return summary


def _training_rows(config: TrainConfig, steps: int, processes: int) -> dict[str, object]:
    per_step = config.train_batch_size * config.gradient_accumulation_steps * processes
    rows = {
        "optimizer steps": steps,
        "examples per step": (
            f"{per_step} ({config.train_batch_size} per batch x "
            f"{config.gradient_accumulation_steps} accumulated x {processes} processes)"
        ),
        "learning rate": (
            f"{config.learning_rate:g}, {config.lr_scheduler}, {config.lr_warmup_steps} warm-up"
        ),
        "optimizer": config.optimizer,
        "mixed precision": config.mixed_precision,
        "seed": config.seed,
    }
    quantized = getattr(config, "quantize_base", "none")
    if quantized != "none":
        rows["base during training"] = f"{quantized} weights (`--quantize_base {quantized}`)"
    lora = Path(config.output_dir) / LORA_WEIGHTS_NAME
    if lora.is_file():  # the final save has just written it
        pairs = read_lora(lora).pairs
        rank, alpha = most_common_rank_alpha(pairs)
        rows["LoRA"] = f"{len(pairs)} modules, rank {rank}, alpha {alpha:g}"
    return rows


def _metrics_section(output_dir: Path) -> str:
    if not (output_dir / METRICS_FILE).is_file():
        return "No optimizer step was logged."
    records = read_metrics(output_dir)
    if not records:
        return "No optimizer step was logged."
    last = records[-1]
    values = {name: value for name, value in last.items() if name not in ("step", "epoch")}
    return f"At step {last['step']} (every step's values are in `{METRICS_FILE}`):\n\n" + _table(
        values, ("metric", "value")
    )


def _validation_section(output_dir: Path) -> str:
    grids = sorted((output_dir / VALIDATION_DIR).glob("step-*.png"))
    if not grids:
        return "No validation images (set `--validation_steps`)."
    latest = grids[-1].relative_to(output_dir).as_posix()
    return f"The latest validation grid, `{latest}`:\n\n![validation]({latest})"


def model_card(
    config: TrainConfig, info: ModelCardInfo, *, steps: int, examples: int, processes: int
) -> ModelCard:
    """The run's model card (see the module docstring)."""
    base = config.pipeline_source
    on_hub = bool(_HUB_ID.match(base)) and not Path(base).exists()
    license_fields = next(
        (fields for prefix, fields in LICENSES.items() if on_hub and base.startswith(prefix)), {}
    )
    data = ModelCardData(
        base_model=base if on_hub else None,
        library_name="diffusers",
        tags=[*info.tags, "diffusers", "lora", "maskloom"],
        pipeline_tag=info.pipeline_tag,
        **license_fields,
    )
    output_dir = Path(config.output_dir)
    weights = config.hub_model_id if config.push_to_hub else str(output_dir)
    base_text = f"[{base}](https://huggingface.co/{base})" if on_hub else f"`{base}` (local)"
    body = "\n\n".join(
        [
            f"# {info.title}: {output_dir.name}",
            f"A maskloom training run on {base_text}.",
            "## Use it",
            f"```py\n{info.usage(base, weights)}```",
            "## Data",
            _data_summary(config, examples),
            "## Training",
            _table(_training_rows(config, steps, processes), ("setting", "value")),
            "## Losses",
            _table(info.losses, ("term", "weight")),
            "## Final metrics",
            _metrics_section(output_dir),
            "## Validation",
            _validation_section(output_dir),
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def publish_run(
    config: TrainConfig, info: ModelCardInfo, *, steps: int, examples: int, processes: int
) -> Path:
    """Write the model card into ``--output_dir``, and upload the folder with
    ``--push_to_hub``; returns the card's path."""
    path = Path(config.output_dir) / CARD_FILE
    model_card(config, info, steps=steps, examples=examples, processes=processes).save(path)
    logger.info("model card: %s", path)
    if config.push_to_hub:
        push_to_hub(config)
    return path


def push_to_hub(config: TrainConfig) -> str:
    """Create ``--hub_model_id`` (if missing) and upload ``--output_dir`` to it, without
    checkpoints or cache; returns the commit URL. A failure names the folder, which is complete
    on disk, and how to upload it later."""
    api = HfApi(token=config.hub_token)
    try:
        repo = api.create_repo(config.hub_model_id, private=config.hub_private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=config.output_dir,
            commit_message=f"maskloom run {Path(config.output_dir).name}",
            ignore_patterns=list(UPLOAD_IGNORED),  # a list of our own: it gets extended
        )
    except Exception as error:
        raise RuntimeError(
            f"--push_to_hub: uploading {config.output_dir} to {config.hub_model_id} failed "
            f"({type(error).__name__}: {error}). The run's outputs are complete there; upload "
            f"them later with `hf upload {config.hub_model_id} {config.output_dir} "
            f"--exclude {' --exclude '.join(repr(p) for p in UPLOAD_IGNORED)}`"
        ) from error
    logger.info("uploaded %s to %s", config.output_dir, commit.commit_url)
    return commit.commit_url
