"""Mask-aware training data: image and mask I/O, aspect buckets, edit pairs, synthetic sets.

- :mod:`data.images`: :func:`open_image`, :func:`open_mask`, :func:`image_size`,
  :func:`mask_to_tensor`, :func:`to_model_range`, :class:`ImageRef` and :class:`DataError`, the
  one error for bad input,
  whose message names the file (or dataset row and column) and the fault;
- :mod:`data.buckets`: :func:`make_buckets`, :func:`nearest_bucket`, :func:`fit_to_bucket` and
  :class:`BucketBatchSampler` (one bucket per batch; deterministic, sharded, resumable);
- :mod:`data.rows`: rows of image datasets (folders with ``metadata.jsonl`` or Hugging Face
  datasets) validated up front, :class:`BucketedRowDataset` and :func:`collate_items`;
- :mod:`data.edit_sources`: the edit layouts other trainers use, :class:`ControlFolderRows`
  (targets and one folder per reference, ``.txt`` captions) and :class:`MusubiJsonlRows`
  (musubi-tuner's JSON Lines), and :func:`edit_rows`, which picks the reader the flags describe;
- :mod:`data.edit_pairs`: :class:`EditPairDataset` and :func:`composite_overlay`;
- :mod:`data.inpainting`: :class:`InpaintingDataset` (seed 004's image/mask/prompt rows) and
  :func:`random_inpainting_mask`;
- :mod:`data.fill_latents`: :class:`FillLatentDataset`, seed 004's precomputed FLUX.1 Fill
  folders, and the 8x8 pixel-mask rearrangement the Fill pipeline uses;
- :mod:`data.multispectral`: :class:`MultispectralDataset` (multi-band TIFFs or folders of
  16-bit band PNGs, leaf masks from PNGs or NaN no-data, ``--bands``), :func:`band_statistics`
  (robust per-band normalisation over leaf pixels) and the synthetic leaf set;
- :mod:`data.synthetic`: :func:`write_synthetic_dataset` and the Kontext insertion set.
"""

from data.buckets import BucketBatchSampler, fit_to_bucket, make_buckets, nearest_bucket
from data.edit_pairs import EDIT_PAIR_FIELDS, EditPairDataset, composite_overlay
from data.edit_sources import ControlFolderRows, MusubiJsonlRows, edit_rows
from data.fill_latents import (
    FillLatentDataset,
    VaeScaling,
    mask_latents_from_pixels,
    pixels_from_mask_latents,
)
from data.images import (
    DataError,
    ImageRef,
    image_size,
    mask_to_tensor,
    open_image,
    open_mask,
    to_model_range,
)
from data.inpainting import InpaintingDataset, random_inpainting_mask
from data.multispectral import (
    BandStatistics,
    LeafImage,
    MultispectralDataset,
    band_statistics,
    find_leaf_images,
    parse_bands,
    write_multispectral_dataset,
)
from data.rows import (
    BucketedRowDataset,
    FolderRows,
    HFRows,
    Row,
    RowFields,
    RowSource,
    collate_items,
)
from data.synthetic import (
    KontextExample,
    make_kontext_example,
    write_kontext_dataset,
    write_synthetic_dataset,
)

__all__ = [
    "EDIT_PAIR_FIELDS",
    "BandStatistics",
    "BucketBatchSampler",
    "BucketedRowDataset",
    "ControlFolderRows",
    "DataError",
    "EditPairDataset",
    "FillLatentDataset",
    "FolderRows",
    "HFRows",
    "ImageRef",
    "InpaintingDataset",
    "KontextExample",
    "LeafImage",
    "MultispectralDataset",
    "MusubiJsonlRows",
    "Row",
    "RowFields",
    "RowSource",
    "VaeScaling",
    "band_statistics",
    "collate_items",
    "composite_overlay",
    "edit_rows",
    "find_leaf_images",
    "fit_to_bucket",
    "image_size",
    "make_buckets",
    "make_kontext_example",
    "mask_latents_from_pixels",
    "mask_to_tensor",
    "nearest_bucket",
    "open_image",
    "open_mask",
    "parse_bands",
    "pixels_from_mask_latents",
    "random_inpainting_mask",
    "to_model_range",
    "write_kontext_dataset",
    "write_multispectral_dataset",
    "write_synthetic_dataset",
]
