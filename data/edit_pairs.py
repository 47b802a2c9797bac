"""The edit-pair dataset: (context, target, mask, prompt[, overlay]) rows for insertion training.

A folder has a ``metadata.jsonl``, one JSON object per line::

    {"context": "images/0.png", "target": "images/0t.png", "mask": "masks/0.png",
     "prompt": "insert a red ball", "overlay": "images/0o.png"}

with paths relative to the folder (``mask`` and ``overlay`` optional); a Hugging Face dataset has
one column per field (:mod:`data.rows`); control folders and musubi-tuner JSON Lines files are
read by :mod:`data.edit_sources`. A context of another size than its target is scaled and
centre-cropped to the target's bucket like the target. A row without a mask trains with flow
matching alone. Every row is validated before any training step. The per-item work, including
the signed distance map the boundary loss needs, runs in ``__getitem__``, that is in the
DataLoader workers, never in the training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data.rows import AtMostSeveral, BucketedRowDataset, FolderRows, HFRows, RowFields, RowSource

EDIT_PAIR_FIELDS = RowFields(
    "edit-pair",
    ("context", "target"),
    ("mask", "overlay"),
    size_reference="target",
    several="context",
)


def composite_overlay(
    context: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The "double object" negative: the edit pasted half-transparently over the context.

    ``overlay = context * (1 - m) + (0.5 * context + 0.5 * target) * m`` with
    ``context, target: [3, h, w]`` in [-1, 1] and ``m = mask: [1, h, w]`` in {0, 1}.

    Seed 003's overlay-avoidance loss needs an example of painting the new object *on top of*
    what was there instead of replacing it. Blending source and target inside the edit region is
    exactly that failure: the old content shows through a ghost of the new object, while outside
    the mask the negative equals the context, so the loss cannot be lowered by editing background.
    """
    return context * (1 - mask) + (0.5 * context + 0.5 * target) * mask


class EditPairDataset(BucketedRowDataset):
    """Edit pairs resized to aspect-ratio buckets, with their latent-resolution mask geometry.

    Args:
        rows: where the rows come from; prefer :meth:`from_folder` and :meth:`from_hf`.
        resolution: bucket area is about ``resolution**2``; a multiple of 16 (several: every
            row once per size, see :class:`data.rows.BucketedRowDataset`).
        max_aspect: the most elongated bucket's long/short side ratio.
        latent_factor: pixels per latent cell (the VAE's downsampling, 8 for FLUX).

    Raises:
        DataError: listing every bad row found (up to ``data.rows.MAX_REPORTED_PROBLEMS``).
    """

    key_version = "edit-pair/cover-crop/lanczos+bilinear-mask/optional-mask/v2"

    def __init__(
        self,
        rows: RowSource,
        *,
        resolution: int | Sequence[int],
        max_aspect: float = 2.0,
        latent_factor: int = 8,
        trigger_word: str | None = None,
    ) -> None:
        rows = AtMostSeveral(rows, 1, "FluxKontextPipeline")
        super().__init__(
            rows, resolution=resolution, max_aspect=max_aspect, trigger_word=trigger_word
        )
        self.latent_factor = latent_factor

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        *,
        resolution: int | Sequence[int],
        max_aspect: float = 2.0,
        latent_factor: int = 8,
        allow_paths_outside: bool = False,
    ) -> EditPairDataset:
        """The edit pairs listed in ``root/metadata.jsonl`` (paths inside ``root`` unless
        ``allow_paths_outside``)."""
        return cls(
            FolderRows(root, EDIT_PAIR_FIELDS, allow_paths_outside),
            resolution=resolution,
            max_aspect=max_aspect,
            latent_factor=latent_factor,
        )

    @classmethod
    def from_hf(
        cls,
        name_or_path: str | Path,
        *,
        resolution: int | Sequence[int],
        split: str = "train",
        context_column: str = "context",
        target_column: str = "target",
        mask_column: str = "mask",
        prompt_column: str = "prompt",
        overlay_column: str | None = "overlay",
        cache_dir: str | None = None,
        max_aspect: float = 2.0,
        latent_factor: int = 8,
        trigger_word: str | None = None,
    ) -> EditPairDataset:
        """The edit pairs of a Hugging Face dataset (``save_to_disk`` folder or hub name).

        A dataset without ``overlay_column`` has no overlays (they are composited).
        """
        columns = {
            "context": context_column,
            "target": target_column,
            "mask": mask_column,
            "overlay": overlay_column,
            "prompt": prompt_column,
        }
        rows = HFRows.load(
            name_or_path, split=split, columns=columns, fields=EDIT_PAIR_FIELDS, cache_dir=cache_dir
        )
        return cls(
            rows,
            resolution=resolution,
            max_aspect=max_aspect,
            latent_factor=latent_factor,
            trigger_word=trigger_word,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item at its bucket size ``(h, w)``.

        Returns:
            ``context``, ``target``, ``overlay``: ``[3, h, w]`` in [-1, 1]; ``mask``:
            ``[1, h, w]`` in {0, 1} (zeros when the row has none); ``has_mask``: bool tensor;
            ``mask_latent``: ``[1, h/f, w/f]`` area fractions in [0, 1] (``f``:
            ``latent_factor``); ``signed_distance_map``: ``[1, h/f, w/f]`` of ``mask_latent >
            0.5``, normalised to [-1, 1]; ``prompt``: str; ``index``: int. (A cache reads
            :meth:`key`, which hashes the files, on its own; items do not carry it, so training
            without a cache never hashes anything.)
        """
        row = self.rows[index]
        size = self.bucket_size(index)
        context = self.fitted_image(row.images["context"], size)
        target = self.fitted_image(row.images["target"], size)
        has_mask = "mask" in row.images
        mask = self.fitted_mask(row.images["mask"], size) if has_mask else torch.zeros(1, *size)
        if "overlay" in row.images:
            overlay = self.fitted_image(row.images["overlay"], size)
        else:
            overlay = composite_overlay(context, target, mask)
        return {
            "context": context,
            "target": target,
            "overlay": overlay,
            "mask": mask,
            "has_mask": torch.tensor(has_mask),
            **self.mask_geometry(mask, self.latent_factor),
            "prompt": row.prompt,
            "index": index,
        }
