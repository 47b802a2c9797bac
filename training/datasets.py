"""Build the datasets the flags describe."""

from __future__ import annotations

from data.edit_pairs import EditPairDataset


def edit_pair_dataset(config) -> EditPairDataset:
    """The edit pairs of --train_data_dir (metadata.jsonl) or --dataset_name (HF dataset).

    ``config`` is a script config inheriting ``TrainConfig`` and ``EditPairDataConfig``.
    """
    if config.train_data_dir is not None:
        return EditPairDataset.from_folder(config.train_data_dir, resolution=config.resolution)
    return EditPairDataset.from_hf(
        config.dataset_name,
        resolution=config.resolution,
        split=config.dataset_split,
        context_column=config.context_column,
        target_column=config.target_column,
        mask_column=config.mask_column,
        prompt_column=config.prompt_column,
        overlay_column=config.overlay_column,
    )
