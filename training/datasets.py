"""Build the datasets the flags describe."""

from __future__ import annotations

from accelerate import Accelerator

from data.buckets import BucketBatchSampler
from data.edit_pairs import EditPairDataset
from data.inpainting import InpaintingDataset
from training.config import TrainConfig


def edit_columns(config) -> dict[str, str | None]:
    """The HF dataset columns of an edit example (--context_column, --target_column,
    --mask_column, --prompt_column) as the datasets' ``from_hf`` takes them."""
    names = ("context_column", "target_column", "mask_column", "prompt_column")
    return {name: getattr(config, name) for name in names}


def edit_pair_dataset(config, latent_factor: int) -> EditPairDataset:
    """The edit pairs of --train_data_dir (metadata.jsonl) or --dataset_name (HF dataset), their
    masks downsampled by ``latent_factor`` (the pipeline's ``vae_scale_factor``).

    ``config`` is a script config inheriting ``TrainConfig`` and ``EditPairDataConfig``.
    """
    if config.train_data_dir is not None:
        return EditPairDataset.from_folder(
            config.train_data_dir,
            resolution=config.resolution,
            latent_factor=latent_factor,
            allow_paths_outside=config.allow_paths_outside_data,
        )
    return EditPairDataset.from_hf(
        config.dataset_name,
        resolution=config.resolution,
        latent_factor=latent_factor,
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
