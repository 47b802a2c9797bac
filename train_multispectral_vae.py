"""Adapt the SD3 VAE to multispectral leaf images with masked per-band MSE and SAM.

The pretrained ``AutoencoderKL`` stays frozen; ``AutoencoderKLMultispectralAdapter`` trains a
per-pixel spectral gate, an N -> 3 input adapter before the encoder and a 3 -> N output adapter
after the decoder (``--adapter_placement``), and optionally a LoRA on the decoder
(``--decoder_lora``). Per-band normalisation statistics (robust percentiles of the training set's
leaf pixels) are computed once and saved in the adapter's config. The loss is

    mean over bands of the per-band MSE on leaf pixels (normalised units)
    + sam_weight * mean spectral angle of leaf pixels (radians)
    + range_weight * squared excess beyond each band's data range,

background and no-data (NaN) pixels never reaching the encoder, the loss or its gradient.

    accelerate launch train_multispectral_vae.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers \\
        --vae_subfolder vae --train_data_dir leaves --output_dir out \\
        --resolution 512 --max_train_steps 2000 --validation_steps 250

then ``AutoencoderKLMultispectralAdapter.from_pretrained("out/multispectral_adapter")``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from training.config import TrainConfig, bounded, exit_after_help, parse_config


@dataclass(kw_only=True)
class MultispectralConfig(TrainConfig):
    """Adapt the SD3 VAE to multispectral images with masked per-band MSE and SAM."""

    shipped_configs: ClassVar[str] = "multispectral"
    """Prefix of this script's files in configs/, which --help lists."""
    cache_latents: bool = False
    """Not used here: the encoder's input is what trains."""
    vae_subfolder: str | None = None
    """Subfolder of the VAE in --pretrained_model_name_or_path ('vae' for a full SD3 pipeline);
    by default the folder itself, or its vae/ when it holds a pipeline."""
    resolution: int = bounded(512, low=16)
    """Side of every training image: images are centre-cropped or padded (padding is background)
    to it, never resampled. A multiple of 16."""
    bands: str | None = None
    """Comma-separated band indices (from 0) to take from each image, e.g. 9,18,32,42,55 from a
    hyperspectral cube; default: every band."""
    adapter_placement: Literal["input", "output", "both"] = "both"
    """Learned adapters before the encoder (input), after the decoder (output) or both; a side
    without one uses the fixed band-group rule (see models/multispectral.py)."""
    use_spectral_attention: bool = True
    """Learn a per-pixel gate over the bands; its mean per band is logged as band_weight_<b>."""
    use_sam_loss: bool = True
    """Add the spectral angle (SAM) of leaf pixels to the loss."""
    sam_weight: float = bounded(1.0, low=0)
    """Weight of SAM (radians) against the per-band MSE (normalised units)."""
    range_weight: float = bounded(0.0, low=0)
    """Weight of the penalty on reconstructions outside each band's range over the training set's
    leaf pixels (0: off)."""
    adapter_hidden_channels: int = bounded(32, low=1)
    """Hidden width of the per-pixel adapters."""
    decoder_lora: bool = False
    """Also train a LoRA on the VAE decoder (--rank, --lora_alpha, --lora_layers)."""
    rank: int | None = None
    """Rank of the decoder LoRA (--decoder_lora); default 16."""
    lora_alpha: float | None = bounded(None, low=0, low_open=True)
    """Alpha of the decoder LoRA; default: its rank (scale 1)."""
    lora_layers: str | None = None
    """Comma-separated decoder module names or suffixes the decoder LoRA adapts; default
    conv1,conv2,to_q,to_k,to_v,to_out.0."""
    init_lora_weights: str | None = None
    """A saved multispectral adapter (folder, or its adapter_model.safetensors) to start from:
    its weights and normalisation statistics. The architecture flags must match it."""
    norm_low_percentile: float = bounded(1.0, low=0, high=100)
    """Percentile of each band's training leaf pixels mapped to -1."""
    norm_high_percentile: float = bounded(99.0, low=0, high=100)
    """Percentile of each band's training leaf pixels mapped to 1."""
    validation_data_dir: str | None = None
    """Folder of held-out images (same layout as --train_data_dir) for validation."""
    holdout_images: int = bounded(1, low=0)
    """Without --validation_data_dir: the last this many images (name order) of --train_data_dir
    are held out from training for validation."""
    num_validation_images: int = bounded(2, low=1)
    """Held-out images shown in each validation grid; the metrics use every held-out image."""
    validation_inference_steps: int = 28
    """Not used here: a VAE reconstructs in one pass."""
    false_colour_bands: str | None = None
    """NIR,red,green band indices (from 0, among the kept bands) of the validation composites;
    default: the last, the middle and the quarter band (4,2,1 for 5 bands)."""

    def __post_init__(self) -> None:
        if self.dataset_name is not None:
            raise ValueError("--dataset_name is not supported here; use --train_data_dir")
        super().__post_init__()
        if self.cache_latents:
            raise ValueError("--cache_latents does not apply: the encoder's input is trained")
        for flag in ("validation_prompt", "validation_prompts", "validation_images"):
            if getattr(self, flag) is not None:
                raise ValueError(f"--{flag} does not apply to a VAE (see --validation_data_dir)")
        parse_bands(self.bands)
        colours = parse_bands(self.false_colour_bands)
        if colours is not None and len(colours) != 3:
            raise ValueError(f"--false_colour_bands needs 3 bands, got {self.false_colour_bands}")
        if not 0 <= self.norm_low_percentile < self.norm_high_percentile <= 100:
            raise ValueError("need 0 <= --norm_low_percentile < --norm_high_percentile <= 100")
        if self.holdout_images < 0:
            raise ValueError(f"--holdout_images must be >= 0, got {self.holdout_images}")
        held_out = self.validation_data_dir is not None or self.holdout_images > 0
        if self.validation_steps is not None and not held_out:
            raise ValueError(
                "validation needs held-out images: --holdout_images or --validation_data_dir"
            )


# --help answers here, before torch, diffusers and the models load.
exit_after_help(__name__, MultispectralConfig, __doc__)

import numpy as np
import torch
from PIL import Image

from data.images import DataError
from data.multispectral import (
    MultispectralDataset,
    band_statistics,
    find_leaf_images,
    parse_bands,
)
from data.rows import collate_items
from losses import masked_mse_per_channel, masked_sam_loss
from models.multispectral import (
    BACKGROUND,
    DEFAULT_DECODER_LORA_LAYERS,
    AutoencoderKLMultispectralAdapter,
)
from training.checkpointing.checkpoints import resolve_checkpoint
from training.datasets import bucket_sampler
from training.loop import TrainingParts, train
from training.lora.adapters import DEFAULT_RANK, target_modules
from training.model_card import ModelCardInfo
from training.runtime import build_accelerator, run_main, weight_dtype
from training.validation import image_grid, save_grid, to_pil

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "multispectral_adapter"
# Error maps turn white at this absolute error in normalised units: 10% of the band's range.
ERROR_FULL_SCALE = 0.2
OFF_LEAF_COLOUR = (0, 0, 64)


def build_datasets(
    config: MultispectralConfig,
) -> tuple[MultispectralDataset, MultispectralDataset | None]:
    """The training images and the held-out ones (None when there are none), every file
    checked: one ``DataError`` naming each bad file."""
    bands = parse_bands(config.bands)
    images = find_leaf_images(config.train_data_dir)
    if config.validation_data_dir is not None:
        held = find_leaf_images(config.validation_data_dir)
    else:
        keep = len(images) - config.holdout_images
        if keep < 1:
            raise DataError(
                f"'{config.train_data_dir}': {len(images)} image(s); --holdout_images "
                f"{config.holdout_images} would leave none to train on"
            )
        images, held = images[:keep], images[keep:]
    train_set = MultispectralDataset(images, resolution=config.resolution, bands=bands)
    if not held:
        return train_set, None
    held_out = MultispectralDataset(held, resolution=config.resolution, bands=bands)
    if held_out.num_bands != train_set.num_bands:
        raise DataError(
            f"held-out images have {held_out.num_bands} bands, training images "
            f"{train_set.num_bands}"
        )
    return train_set, held_out


def build_model(
    config: MultispectralConfig, train_set: MultispectralDataset
) -> AutoencoderKLMultispectralAdapter:
    """The adapter around the pretrained VAE, with normalisation statistics of ``train_set``.

    A run resumed from a checkpoint, or started from --init_lora_weights, takes its statistics
    from there instead, so they are computed once per training history.
    """
    resuming = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint) is not None
    statistics = {}
    if not resuming and config.init_lora_weights is None:
        found = band_statistics(train_set, config.norm_low_percentile, config.norm_high_percentile)
        statistics = {
            "band_low": found.low,
            "band_high": found.high,
            "band_min": found.minimum,
            "band_max": found.maximum,
        }
        logger.info("normalisation: low %s, high %s", found.low, found.high)
    rank = (config.rank or DEFAULT_RANK) if config.decoder_lora else 0
    model = AutoencoderKLMultispectralAdapter.from_pretrained(
        config.pretrained_model_name_or_path,
        subfolder=config.vae_subfolder,
        torch_dtype=weight_dtype(config),
        num_bands=train_set.num_bands,
        adapter_placement=config.adapter_placement,
        use_spectral_attention=config.use_spectral_attention,
        use_sam_loss=config.use_sam_loss,
        sam_weight=config.sam_weight,
        range_weight=config.range_weight,
        adapter_hidden_channels=config.adapter_hidden_channels,
        decoder_lora_rank=rank,
        decoder_lora_alpha=(config.lora_alpha or rank) if rank else None,
        decoder_lora_layers=target_modules(config, DEFAULT_DECODER_LORA_LAYERS),
        decoder_lora_dropout=config.lora_dropout,
        **statistics,
    )
    if config.init_lora_weights is not None:
        init = Path(config.init_lora_weights)
        model.load_adapter(init if init.is_dir() else init.parent)
        logger.info("started from %s", init)
    if config.gradient_checkpointing:
        model.vae.enable_gradient_checkpointing()
    return model


def band_labels(config: MultispectralConfig, num_bands: int) -> list[str]:
    """Each kept band's name in metrics: its index in the files (``--bands`` picks)."""
    bands = parse_bands(config.bands)
    return [str(band) for band in (bands if bands is not None else range(num_bands))]


class MultispectralLoss:
    """Seed 002's losses for one batch (the loop's ``compute_loss``); the components logged are
    ``mse``, ``sam`` (radians), ``range``, ``mse_band<b>``, ``band_weight_<b>`` (the spectral
    gate's mean on the leaf) and ``coverage``. The reconstruction is deterministic (the
    posterior's mode), so the step's generator is not used."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels

    def __call__(
        self, model: torch.nn.Module, batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, losses = model(sample=batch["image"], mask=batch["mask"])
        components = {
            name: losses[name].detach() for name in ("mse", "sam", "range") if name in losses
        }
        for name, key in (("mse_band", "mse_per_channel"), ("band_weight_", "band_weights")):
            if key in losses:
                values = losses[key].detach()
                components.update(
                    {f"{name}{label}": values[b] for b, label in enumerate(self.labels)}
                )
        coverage = losses["mask_stats"]["coverage"]
        components["coverage"] = torch.tensor(coverage, device=batch["image"].device)
        return losses["total"], components


def leaf_metrics(
    predicted: torch.Tensor, measured: torch.Tensor, peak: torch.Tensor, labels: list[str]
) -> dict[str, float]:
    """Validation metrics over leaf pixels pooled across images.

    ``predicted, measured: [N, P]`` spectra in data units, ``peak: [N]`` each band's
    normalisation range. Returns ``val_psnr_<b>`` (dB, peak = the band's range), their mean
    ``val_psnr`` and ``val_sam_deg``, the mean spectral angle in degrees.
    """
    pred, meas = predicted[None, :, None, :].float(), measured[None, :, None, :].float()
    everywhere = torch.ones_like(pred[:, :1])
    mse = masked_mse_per_channel(pred, meas, everywhere)
    psnr = 10 * torch.log10(peak.float() ** 2 / mse.clamp_min(torch.finfo(mse.dtype).tiny))
    sam = masked_sam_loss(pred, meas, everywhere)
    return {
        **{f"val_psnr_{label}": value.item() for label, value in zip(labels, psnr, strict=True)},
        "val_psnr": psnr.mean().item(),
        "val_sam_deg": math.degrees(sam.item()),
    }


def false_colour(normalized: torch.Tensor, bands: tuple[int, int, int]) -> Image.Image:
    """``normalized: [N, H, W]`` -> RGB of bands (NIR, red, green) over their [-1, 1] ranges;
    no-data shows black."""
    return to_pil(normalized[list(bands)].nan_to_num(BACKGROUND))


def error_maps(
    reconstruction: torch.Tensor, measured: torch.Tensor, leaf: torch.Tensor
) -> list[Image.Image]:
    """One image per band: |error| on the leaf, black (0) to white (``ERROR_FULL_SCALE``);
    off the leaf ``OFF_LEAF_COLOUR``. ``reconstruction, measured: [N, H, W]`` normalised,
    ``leaf: [H, W]`` bool."""
    error = ((reconstruction - measured).abs() / ERROR_FULL_SCALE).clamp(0, 1).nan_to_num(0)
    grey = (error * 255).round().byte().cpu().numpy()
    off_leaf = ~leaf.cpu().numpy()
    maps = []
    for band in grey:
        rgb = np.repeat(band[..., None], 3, axis=-1)
        rgb[off_leaf] = OFF_LEAF_COLOUR
        maps.append(Image.fromarray(rgb))
    return maps


class MultispectralValidation:
    """On every held-out image: per-band PSNR and mean SAM over leaf pixels (returned, so they
    join metrics.jsonl), and for the first --num_validation_images a grid row: input and
    reconstruction as (NIR, red, green) false colour, then |error| per band on the leaf."""

    def __init__(
        self,
        dataset: MultispectralDataset,
        config: MultispectralConfig,
        accelerator,
        labels: list[str],
    ) -> None:
        self.dataset = dataset
        self.config = config
        self.accelerator = accelerator
        self.labels = labels
        n = dataset.num_bands
        self.bands = parse_bands(config.false_colour_bands) or (n - 1, n // 2, n // 4)
        if max(self.bands) >= n:
            raise ValueError(f"--false_colour_bands {self.bands}: there are only {n} bands")

    def __call__(self, model: AutoencoderKLMultispectralAdapter, step: int) -> dict[str, float]:
        predicted, measured, rows = [], [], []
        for index in range(len(self.dataset)):
            item = self.dataset[index]
            sample = item["image"][None].to(self.accelerator.device)
            mask = item["mask"][None].to(self.accelerator.device)
            with self.accelerator.autocast():
                reconstruction, _ = model(sample, mask)
            reconstruction = reconstruction.float()
            leaf = model.leaf_mask(sample, mask)[0, 0]
            predicted.append(reconstruction[0][:, leaf])
            measured.append(sample[0][:, leaf])
            if index < self.config.num_validation_images:
                normalized = model.normalize(sample[0])
                output = model.normalize(reconstruction[0])
                rows.append(
                    [
                        false_colour(normalized, self.bands),
                        false_colour(output, self.bands),
                        *error_maps(output, normalized, leaf),
                    ]
                )
        if rows:
            labels = ["input", "reconstruction", *(f"err {label}" for label in self.labels)]
            save_grid(image_grid(rows, labels), self.config.output_dir, step)
        pixels = torch.cat(measured, dim=1)
        if pixels.shape[1] == 0:
            logger.warning("no leaf pixels in the held-out images: no validation metrics")
            return {}
        return leaf_metrics(
            torch.cat(predicted, dim=1), pixels, model.high - model.low, self.labels
        )


def save_adapter(model: AutoencoderKLMultispectralAdapter, folder: Path) -> None:
    """The loop's ``save_lora``: the adapter into ``folder/multispectral_adapter``."""
    model.save_pretrained(Path(folder) / ADAPTER_FOLDER)


def load_adapter(model: AutoencoderKLMultispectralAdapter, folder: Path) -> None:
    """The loop's ``load_lora``: weights and statistics from ``folder/multispectral_adapter``."""
    model.load_adapter(Path(folder) / ADAPTER_FOLDER)


def adapter_usage(base: str, weights: str) -> str:
    """The model card's snippet: the saved adapter, loaded with its statistics and VAE."""
    return (
        "import torch\n\n"
        "from models import AutoencoderKLMultispectralAdapter  # from the maskloom checkout\n\n"
        "model = AutoencoderKLMultispectralAdapter.from_pretrained(\n"
        f'    "{weights}", subfolder="{ADAPTER_FOLDER}"\n'
        ")  # the frozen VAE comes from the config's base_model_name_or_path (or pass vae=)\n"
        "bands = 5000 * torch.rand(1, model.config.num_bands, 512, 512)  # [B, N, H, W]\n"
        "leaf = torch.ones(1, 1, 512, 512)  # [B, 1, H, W], 1 = leaf\n"
        "with torch.no_grad():\n"
        "    reconstruction, losses = model(bands, mask=leaf)\n"
    )


def card_info(config: MultispectralConfig) -> ModelCardInfo:
    """The model card's family part; the loss terms by their metrics.jsonl names."""
    return ModelCardInfo(
        title="SD3 VAE multispectral adapter",
        tags=("multispectral", "vae", "sd3"),
        losses={"mse": 1.0, "sam": config.sam_weight, "range": config.range_weight},
        usage=adapter_usage,
        pipeline_tag=None,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_config(MultispectralConfig, argv, description=__doc__)
    accelerator = build_accelerator(config)

    train_set, held_out = build_datasets(config)
    labels = band_labels(config, train_set.num_bands)
    validate = None
    if held_out is not None:
        validate = MultispectralValidation(held_out, config, accelerator, labels)
    model = build_model(config, train_set).to(accelerator.device)

    parts = TrainingParts(
        model=model,
        dataset=train_set,
        sampler=bucket_sampler(config, accelerator, train_set.bucket_of_items),
        collate_fn=collate_items,
        compute_loss=MultispectralLoss(labels),
        save_lora=save_adapter,
        load_lora=load_adapter,
        card=card_info(config),
        validate=validate,
    )
    train(accelerator, config, parts)


if __name__ == "__main__":
    run_main(main)
