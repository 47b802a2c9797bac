"""Each train script's model, data, encoder and loss, built from its own code on tiny models.

:func:`build` returns a :class:`FamilyBench` for one script: the LoRA-adapted model the loop
trains, the script's dataset on a synthetic folder, its encoder (what ``--cache_latents``
stores) and its loss with the mask/auxiliary terms on or off. ``benchmarks/run.py`` times them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

import train_flux2_edit_lora as flux2
import train_flux_fill as fill
import train_kontext_lora as kontext
import train_multispectral_vae as multispectral
import train_qwen_edit_mask as qwen
import train_sd15_inpaint as sd15
from data.rows import collate_items
from data.synthetic import write_synthetic_dataset
from training.config import MaskLossSettings, TextMaskSettings
from training.datasets import fill_dataset, inpainting_dataset
from training.inputs.flux import FLUX_LORA_LAYERS
from training.inputs.flux2 import FLUX2_LORA_LAYERS
from training.lora.adapters import LoraFormat, add_lora
from worlds.tiny_flux2 import tiny_flux2_klein_pipeline
from worlds.tiny_models import (
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_sd3_vae,
    tiny_sd15_inpaint_pipeline,
)

SCRIPTS = (
    "train_kontext_lora.py",
    "train_qwen_edit_mask.py",
    "train_flux_fill.py",
    "train_sd15_inpaint.py",
    "train_multispectral_vae.py",
    "train_flux2_edit_lora.py",
)


@dataclass
class FamilyBench:
    """One script's pieces. ``loss(aux, encoded)`` is the script's ``compute_loss`` with the
    auxiliary terms named by ``aux_terms`` on or off, on encoded batches or on pixels; ``models``
    maps ``aux`` to the model it trains (one model unless the terms are part of the model).
    ``encoder`` is None where no cache applies; ``cached_collate`` collates cached items."""

    script: str
    aux_terms: str
    models: dict[bool, torch.nn.Module]
    dataset: Dataset
    collate: Callable[[list], dict]
    loss: Callable[[bool, bool], Callable]
    encoder: Callable[[dict], dict] | None = None
    cached_collate: Callable[[list], dict] = collate_items


def _common(folder: Path, resolution: int) -> dict:
    return {
        "pretrained_model_name_or_path": "-",
        "train_data_dir": str(folder),
        "resolution": resolution,
        "rank": 16,
        "output_dir": str(folder / "output"),
        # The measurements predate the GPU defaults and time the plain step.
        "gradient_checkpointing": False,
    }


def kontext_bench(folder: Path, resolution: int) -> FamilyBench:
    pipe = tiny_flux_kontext_pipeline(seed=0)
    common = _common(folder, resolution)
    # Every term on, the latent-token geometry match included (off by default there).
    on = kontext.KontextConfig(**common, geometry_match_weight=0.5)
    off = kontext.KontextConfig(**common, **dict.fromkeys(kontext.TERM_WEIGHT_FLAGS.values(), 0))
    add_lora(pipe.transformer, on, FLUX_LORA_LAYERS, kontext.KONTEXT_LORA)
    encoder = kontext.KontextEncoder(pipe, on, None)
    return FamilyBench(
        script="train_kontext_lora.py",
        aux_terms="geometry (5) + embedding (3)",
        models={True: pipe.transformer, False: pipe.transformer},
        dataset=kontext.edit_pair_dataset(on, pipe.vae_scale_factor),
        collate=collate_items,
        loss=lambda aux, encoded: kontext.KontextLoss(
            pipe, on if aux else off, encoder, None, encoded
        ),
        encoder=encoder,
    )


def flux2_bench(folder: Path, resolution: int) -> FamilyBench:
    pipe = tiny_flux2_klein_pipeline(seed=0)
    common = _common(folder, resolution)
    on = flux2.Flux2EditConfig(**common)
    off = flux2.Flux2EditConfig(
        **common, **{flag: 0 for name, flag in flux2.TERM_WEIGHT_FLAGS.items() if name != "fm"}
    )
    add_lora(pipe.transformer, on, FLUX2_LORA_LAYERS, LoraFormat(type(pipe)))
    encoder = flux2.Flux2Encoder(pipe, on)
    return FamilyBench(
        script="train_flux2_edit_lora.py",
        aux_terms="geometry (5)",
        models={True: pipe.transformer, False: pipe.transformer},
        dataset=flux2.text_edit_dataset(on),
        collate=collate_items,
        loss=lambda aux, encoded: flux2.Flux2Loss(pipe, on if aux else off, encoder, encoded),
        encoder=encoder,
    )


def qwen_bench(folder: Path, resolution: int) -> FamilyBench:
    pipe = tiny_qwen_image_edit_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    off = qwen.QwenEditConfig(
        **_common(folder, resolution), data=TextMaskSettings(use_text_mask=True)
    )
    on = dataclasses.replace(off, mask_loss=MaskLossSettings(enabled=True))
    add_lora(pipe.transformer, off, qwen.LORA_LAYERS, LoraFormat(type(pipe)))
    encoder = qwen.QwenEditEncoder(pipe, off)
    return FamilyBench(
        script="train_qwen_edit_mask.py",
        aux_terms="text-region mask loss",
        models={True: pipe.transformer, False: pipe.transformer},
        dataset=qwen.text_edit_dataset(off, type(pipe)),
        collate=collate_items,
        loss=lambda aux, encoded: qwen.QwenEditLoss(pipe, on if aux else off, encoder, encoded),
        encoder=encoder,
        cached_collate=qwen.collate_encoded,
    )


def fill_bench(folder: Path, resolution: int) -> FamilyBench:
    pipe = tiny_flux_fill_pipeline(seed=0)
    off = fill.FillConfig(**_common(folder, resolution))
    on = dataclasses.replace(
        off, mask_loss=MaskLossSettings(enabled=True), background_preservation_weight=0.5
    )
    add_lora(pipe.transformer, off, FLUX_LORA_LAYERS, fill.FILL_LORA)
    encoder = fill.FillEncoder(pipe, off)
    return FamilyBench(
        script="train_flux_fill.py",
        aux_terms="region weighting + background",
        models={True: pipe.transformer, False: pipe.transformer},
        dataset=fill_dataset(off, pipe.vae.config),
        collate=collate_items,
        loss=lambda aux, encoded: fill.FillLoss(pipe, on if aux else off, encoder, encoded),
        encoder=encoder,
    )


def sd15_bench(folder: Path, resolution: int) -> FamilyBench:
    pipe = tiny_sd15_inpaint_pipeline(seed=0)
    off = sd15.SD15InpaintConfig(**_common(folder, resolution))
    on = dataclasses.replace(off, mask_loss=MaskLossSettings(enabled=True))
    add_lora(pipe.unet, off, sd15.UNET_LORA_LAYERS, sd15.UNET_LORA)
    model = sd15.InpaintDenoiser(pipe.unet, None)
    encoder = sd15.SD15Encoder(pipe, off)
    return FamilyBench(
        script="train_sd15_inpaint.py",
        aux_terms="region weighting",
        models={True: model, False: model},
        dataset=inpainting_dataset(off),
        collate=collate_items,
        loss=lambda aux, encoded: sd15.SD15Loss(pipe, on if aux else off, encoder, encoded),
        encoder=encoder,
    )


def multispectral_bench(folder: Path, resolution: int) -> FamilyBench:
    vae_folder = folder / "sd3-vae"
    tiny_sd3_vae(seed=0).save_pretrained(vae_folder)
    common = {**_common(folder, resolution), "pretrained_model_name_or_path": str(vae_folder)}
    models, train_set = {}, None
    # SAM is computed inside the model's forward, switched by its config: one model per variant,
    # both from the same weights and statistics.
    for aux in (True, False):
        config = multispectral.MultispectralConfig(**common, use_sam_loss=aux, holdout_images=0)
        train_set, _ = multispectral.build_datasets(config)
        torch.manual_seed(0)
        models[aux] = multispectral.build_model(config, train_set)
    labels = multispectral.band_labels(config, train_set.num_bands)
    return FamilyBench(
        script="train_multispectral_vae.py",
        aux_terms="spectral angle (SAM)",
        models=models,
        dataset=train_set,
        collate=collate_items,
        loss=lambda aux, encoded: multispectral.MultispectralLoss(labels),
    )


BUILDERS = {
    "train_kontext_lora.py": ("kontext", kontext_bench),
    "train_qwen_edit_mask.py": ("qwen-edit", qwen_bench),
    "train_flux_fill.py": ("flux-fill", fill_bench),
    "train_sd15_inpaint.py": ("sd15-inpaint", sd15_bench),
    "train_multispectral_vae.py": ("multispectral", multispectral_bench),
    "train_flux2_edit_lora.py": ("kontext", flux2_bench),
}


def build(script: str, folder: Path, resolution: int, items: int) -> FamilyBench:
    """``script``'s pieces on ``items`` synthetic examples at ``resolution`` written to
    ``folder``."""
    family, builder = BUILDERS[script]
    write_synthetic_dataset(family, folder, n=items, resolution=resolution, seed=0)
    torch.manual_seed(0)
    return builder(folder, resolution)
