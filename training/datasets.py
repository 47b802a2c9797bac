"""Build the datasets the flags describe."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import yaml
from accelerate import Accelerator

from data.buckets import BucketBatchSampler
from data.edit_pairs import EDIT_PAIR_FIELDS, EditPairDataset
from data.edit_sources import edit_rows
from data.fill_latents import MANIFEST_FILE, FillLatentDataset, VaeScaling
from data.images import DataError
from data.inpainting import InpaintingDataset
from data.rows import ConcatRows, FolderRows, RowFields, RowSource
from data.text_edits import TEXT_EDIT_FIELDS, TextEditDataset, text_edit_rows
from training.config import TrainConfig

logger = logging.getLogger(__name__)

# The flags a data set of --dataset_config may set (those the script has), besides repeats.
DATA_SET_FLAGS = (
    "train_data_dir",
    "train_data_file",
    "control_dirs",
    "caption",
    "caption_extension",
    "mask_dir",
    "text_mask_dir",
)


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


def data_sets(config) -> list[tuple[object, int]]:
    """Each data set of --dataset_config as a copy of ``config`` with its data flags (checked
    as the command line's are), with its repeats; ``[(config, 1)]`` without the file.

    Raises:
        DataError: naming the file, when it is not a list of mappings, or a data set names a
            flag this script has no use for there or a repeat count that is not an integer
            >= 1. Relative paths in it are relative to the file's folder.
    """
    if config.dataset_config is None:
        return [(config, 1)]
    path = Path(config.dataset_config)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DataError(f"--dataset_config {path}: not a readable YAML file ({error})") from error
    if not (isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)):
        raise DataError(f"--dataset_config {path}: expected a list of data sets (mappings)")
    known = [name for name in DATA_SET_FLAGS if hasattr(config, name)]
    sets = []
    for number, entry in enumerate(entries, start=1):
        entry = dict(entry)
        repeats = entry.pop("repeats", 1)
        unknown = sorted(set(entry) - set(known))
        if unknown or not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            problem = f"unknown key(s) {', '.join(unknown)}" if unknown else f"repeats {repeats!r}"
            raise DataError(
                f"--dataset_config {path}, data set {number}: {problem}; a data set takes "
                f"{', '.join(known)} and repeats (an integer >= 1)"
            )
        for name in ("train_data_dir", "train_data_file"):
            if entry.get(name) is not None:
                entry[name] = str(path.parent / entry[name])
        if entry.get("control_dirs"):
            entry["control_dirs"] = [str(path.parent / name) for name in entry["control_dirs"]]
        for name in ("mask_dir", "text_mask_dir"):
            if entry.get(name) is not None:
                entry[name] = str(path.parent / entry[name])
        try:
            sets.append((dataclasses.replace(config, dataset_config=None, **entry), repeats))
        except ValueError as error:
            raise DataError(f"--dataset_config {path}, data set {number}: {error}") from error
    return sets


def data_folders(config) -> list[str | None]:
    """Every folder the training data is read from: --train_data_dir, or each data set's of
    --dataset_config (read and checked here, before anything loads)."""
    if getattr(config, "dataset_config", None) is None:
        return [config.train_data_dir]
    return [data_set.train_data_dir for data_set, _ in data_sets(config)]


def several_edit_rows(
    config,
    fields: RowFields,
    mask_flag: str,
    each: Callable[[RowSource, object], RowSource] | None = None,
) -> RowSource:
    """The edit rows the data flags name: one layout's (``data.edit_sources.edit_rows``), or
    with --dataset_config every data set's, one after another with their repeats.
    ``mask_flag`` names the script's mask folder flag; ``each(rows, data_set_config)`` rewrites
    each data set's rows (masks looked up beside its own folder, say)."""
    sets = data_sets(config)
    sources = []
    for entry, _ in sets:
        rows = edit_rows(fields, **edit_sources(entry, getattr(entry, mask_flag)))
        sources.append(each(rows, entry) if each else rows)
    if config.dataset_config is None:
        return sources[0]
    return ConcatRows(sources, [repeats for _, repeats in sets])


def edit_pair_dataset(config, latent_factor: int) -> EditPairDataset:
    """The edit pairs of --train_data_dir (metadata.jsonl, or target and control folders),
    --train_data_file or --dataset_name (HF dataset), their masks downsampled by
    ``latent_factor`` (the VAE's ``vae_scale_factor``).

    ``config`` is a script config inheriting ``TrainConfig`` and ``EditPairDataConfig``.
    """
    if config.dataset_name is None:
        return EditPairDataset(
            several_edit_rows(config, EDIT_PAIR_FIELDS, "mask_dir"),
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
    if config.dataset_config is not None:
        fields = InpaintingDataset.fields(config.random_masks)
        sets = data_sets(config)
        rows = [
            FolderRows(s.train_data_dir, fields, config.allow_paths_outside_data) for s, _ in sets
        ]
        return InpaintingDataset(
            ConcatRows(rows, [repeats for _, repeats in sets]),
            resolution=config.resolution,
            random_masks=config.random_masks,
            seed=config.seed,
            trigger_word=config.trigger_word,
        )
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


def text_edits_dataset(
    config,
    reference_grid: Callable,
    max_references: tuple[int, str] | None,
    mask_factor: int | None = None,
) -> TextEditDataset:
    """The instruction edits of --train_data_dir (metadata.jsonl, or target and control
    folders), --train_data_file, --dataset_config or --dataset_name; ``reference_grid``,
    ``max_references`` and ``mask_factor`` as ``TextEditDataset.from_read_rows`` takes them.
    With --strict_masks every row must have a mask (a DataError lists those without); without,
    the rows lacking one are counted in a warning. Reads image headers only: runs before any
    model loads.

    ``config`` is a script config inheriting ``TrainConfig`` and ``TextEditDataConfig``.
    """
    use_text_mask = config.data.use_text_mask or config.text_mask_dir is not None
    options = {
        "resolution": config.resolution,
        "reference_grid": reference_grid,
        "trigger_word": config.trigger_word,
        "max_references": max_references,
        "mask_factor": mask_factor,
    }

    def read_masks(rows: RowSource, data_set) -> RowSource:
        root = Path(data_set.train_data_dir or Path(data_set.train_data_file).parent)
        return text_edit_rows(rows, root, use_text_mask, config.data.mask_dir_name)

    if config.dataset_name is None:
        rows = several_edit_rows(config, TEXT_EDIT_FIELDS, "text_mask_dir", read_masks)
        dataset = TextEditDataset.from_read_rows(rows, **options)
    else:
        dataset = TextEditDataset.from_hf(
            config.dataset_name,
            split=config.dataset_split,
            use_text_mask=use_text_mask,
            mask_dir_name=config.data.mask_dir_name,
            **edit_columns(config),
            **options,
        )
    if use_text_mask:
        rows = range(dataset.row_count)  # the first size's items: every row once
        missing = [i for i in rows if "mask" not in dataset.rows[i].images]
        if missing and config.strict_masks:
            shown = ", ".join(dataset.rows[i].images["target"].label for i in missing[:5])
            raise DataError(
                f"{dataset.rows.description}: {len(missing)} row(s) without a mask "
                f"(--strict_masks), e.g. {shown}"
            )
        if missing:
            logger.warning(
                "%d of %d rows have no mask; they train with the plain loss "
                "(metrics: masked_samples)",
                len(missing),
                dataset.row_count,
            )
    return dataset


def fill_dataset(config, vae_config):
    """FLUX.1 Fill's examples: the raw ones (:func:`inpainting_dataset`), or a precomputed
    folder (``manifest.json`` in --train_data_dir) read with the VAE's shift and scale from
    ``vae_config``; a precomputed folder refuses GRPO and --trigger_word, which need pixels and
    raw prompts."""
    if config.train_data_dir and (Path(config.train_data_dir) / MANIFEST_FILE).is_file():
        if config.objective == "grpo":
            raise ValueError(
                f"{config.train_data_dir} is a precomputed folder: --objective grpo scores "
                "sampled images against the source pixels, which it lacks; give the raw folder"
            )
        if config.trigger_word:
            raise ValueError(
                f"{config.train_data_dir} is a precomputed folder: its prompts are already "
                "encoded, so --trigger_word cannot reach them; give the raw folder"
            )
        if len(config.resolutions) > 1:
            sizes = ",".join(map(str, config.resolution))
            raise ValueError(
                f"{config.train_data_dir} is a precomputed folder: its latents keep the size "
                f"they were encoded at, so --resolution {sizes} cannot resize them; "
                "give the raw folder"
            )
        scaling = VaeScaling(vae_config.scaling_factor, vae_config.shift_factor or 0.0)
        return FillLatentDataset(config.train_data_dir, scaling, require_latents=True)
    return inpainting_dataset(config)


def inpainting_validation_examples(config, dataset) -> InpaintingDataset | None:
    """The raw examples validation draws from: --validation_data_dir, else the training set,
    or None when that is a precomputed folder."""
    if config.validation_data_dir is not None:
        return InpaintingDataset.from_folder(
            config.validation_data_dir,
            resolution=config.largest_resolution,
            seed=config.seed,
            allow_paths_outside=config.allow_paths_outside_data,
        )
    return None if isinstance(dataset, FillLatentDataset) else dataset


def bucket_sampler(
    config: TrainConfig,
    accelerator: Accelerator,
    bucket_of_items: list[int],
    repeats: list[int] | None = None,
) -> BucketBatchSampler:
    """This rank's bucketed batches of --train_batch_size, seeded by --seed, whole optimizer
    steps of --gradient_accumulation_steps per epoch; each item drawn ``repeats[i]`` times an
    epoch (the data sets of --dataset_config)."""
    return BucketBatchSampler(
        bucket_of_items,
        config.train_batch_size,
        repeats=repeats,
        seed=config.seed,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )
