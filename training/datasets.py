"""Build the datasets the flags describe."""

from __future__ import annotations

from accelerate import Accelerator

from data.buckets import BucketBatchSampler
from data.edit_pairs import EDIT_PAIR_FIELDS, EditPairDataset
from data.edit_sources import edit_rows
from data.inpainting import InpaintingDataset
from training.config import TrainConfig


def edit_columns(config) -> dict[str, str | None]:
    """The HF dataset columns of an edit example (--context_column, --target_column,
    --mask_column, --prompt_column) as the datasets' ``from_hf`` takes them."""
    names = ("context_column", "target_column", "mask_column", "prompt_column")
    return {name: getattr(config, name) for name in names}


def edit_sources(config, mask_dir: str | None) -> dict:
    """The arguments of ``data.edit_sources.edit_rows`` the flags give (``config`` inherits
    ``ImagePairDataConfig``; ``mask_dir``: the script's mask folder flag)."""
    return {
        "train_data_dir": config.train_data_dir,
        "train_data_file": config.train_data_file,
        "control_dirs": config.control_dirs,
        "caption": config.caption,
        "caption_extension": config.caption_extension,
        "mask_dir": mask_dir,
        "allow_paths_outside": config.allow_paths_outside_data,
    }


def edit_pair_dataset(config, latent_factor: int) -> EditPairDataset:
    """The edit pairs of --train_data_dir (metadata.jsonl, or target and control folders),
    --train_data_file or --dataset_name (HF dataset), their masks downsampled by
    ``latent_factor`` (the VAE's ``vae_scale_factor``).

    ``config`` is a script config inheriting ``TrainConfig`` and ``EditPairDataConfig``.
    """
    if config.dataset_name is None:
        return EditPairDataset(
            edit_rows(EDIT_PAIR_FIELDS, **edit_sources(config, config.mask_dir)),
            resolution=config.resolution,
            latent_factor=latent_factor,
            trigger_word=config.trigger_word,
        )
    return EditPairDataset.from_hf(
        config.dataset_name,
        resolution=config.resolution,
        latent_factor=latent_factor,
        trigger_word=config.trigger_word,
        split=config.dataset_split,
        overlay_column=config.overlay_column,
        **edit_columns(config),
    )


def inpainting_dataset(config) -> InpaintingDataset:
    """The inpainting examples of --train_data_dir (metadata.jsonl) or --dataset_name.

    ``config`` is a script config inheriting ``TrainConfig`` and ``InpaintingDataConfig``.
    """
    if config.train_data_dir is not None:
        return InpaintingDataset.from_folder(
            config.train_data_dir,
            resolution=config.resolution,
            random_masks=config.random_masks,
            seed=config.seed,
            allow_paths_outside=config.allow_paths_outside_data,
            trigger_word=config.trigger_word,
        )
    return InpaintingDataset.from_hf(
        config.dataset_name,
        resolution=config.resolution,
        split=config.dataset_split,
        image_column=config.image_column,
        mask_column=config.mask_column,
        prompt_column=config.prompt_column,
        random_masks=config.random_masks,
        seed=config.seed,
        trigger_word=config.trigger_word,
    )


def bucket_sampler(
    config: TrainConfig, accelerator: Accelerator, bucket_of_items: list[int]
) -> BucketBatchSampler:
    """This rank's bucketed batches of --train_batch_size, seeded by --seed, whole optimizer
    steps of --gradient_accumulation_steps per epoch."""
    return BucketBatchSampler(
        bucket_of_items,
        config.train_batch_size,
        seed=config.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )
