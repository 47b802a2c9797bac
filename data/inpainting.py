"""The inpainting dataset: (image, mask, prompt) rows for FLUX.1 Fill and SD1.5 inpainting.

A folder has a ``metadata.jsonl`` in seed 004's format, one JSON object per line::

    {"image": "images/train_000000.png", "mask": "masks/train_000000.png",
     "prompt": "a watercolor painting"}

with paths relative to the folder; a Hugging Face dataset has one column per field
(:mod:`data.rows`). Masks are white (255) on the region to fill. Without masks
(``random_masks=True``), each image gets strokes and boxes drawn from a generator seeded by the
seed and the item's index: the same mask on every epoch, on resume and in a latent cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.images import ImageRef
from data.rows import BucketedRowDataset, FolderRows, HFRows, RowFields, RowSource

INPAINTING_FIELDS = RowFields("inpainting", ("image", "mask"))
# With random masks a row's own mask is optional: used when present, drawn when absent.
INPAINTING_FIELDS_RANDOM_MASKS = RowFields("inpainting", ("image",), ("mask",))
# Part of the key of an item with a drawn mask: change it when the drawing changes.
RANDOM_MASK_VERSION = "strokes+boxes/v1"


def random_inpainting_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W]`` bool: thick random strokes, boxes, or both, covering 5-50% of the image.

    Large-mask inpainting trainers draw such masks so that a model learns to fill both thin
    scratches and whole objects; the coverage target is drawn per mask.
    """
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    kind = rng.choice(["strokes", "boxes", "both"])
    target = rng.uniform(0.05, 0.5)
    short = min(height, width)
    for _ in range(64):
        if kind == "boxes" or (kind == "both" and rng.random() < 0.5):
            box_height = rng.uniform(0.1, 0.5) * height
            box_width = rng.uniform(0.1, 0.5) * width
            top = rng.uniform(0, height - box_height)
            left = rng.uniform(0, width - box_width)
            draw.rectangle((left, top, left + box_width, top + box_height), fill=255)
        else:
            points = [(rng.uniform(0, width), rng.uniform(0, height))]
            for _ in range(int(rng.integers(2, 6))):
                angle = rng.uniform(0, 2 * np.pi)
                length = rng.uniform(0.1, 0.4) * short
                x, y = points[-1]
                points.append(
                    (
                        float(np.clip(x + length * np.cos(angle), 0, width - 1)),
                        float(np.clip(y + length * np.sin(angle), 0, height - 1)),
                    )
                )
            thickness = max(1, round(rng.uniform(0.03, 0.12) * short))
            draw.line(points, fill=255, width=thickness, joint="curve")
        if np.asarray(canvas).mean() / 255 >= target:
            break
    return np.asarray(canvas) > 127


class InpaintingDataset(BucketedRowDataset):
    """Inpainting examples resized to aspect-ratio buckets.

    Args:
        rows: where the rows come from; prefer :meth:`from_folder` and :meth:`from_hf`.
        resolution: bucket area is about ``resolution**2``; a multiple of 16 (several: every
            row once per size, see :class:`data.rows.BucketedRowDataset`).
        random_masks: draw a mask for rows without one (rows must then have no ``mask``, or
            may have one, which is used).
        seed: seeds the drawn masks, with the item's index.
        max_aspect: the most elongated bucket's long/short side ratio.

    Raises:
        DataError: listing every bad row found (up to ``data.rows.MAX_REPORTED_PROBLEMS``).
    """

    key_version = "inpainting/cover-crop/lanczos+bilinear-mask/v1"

    def __init__(
        self,
        rows: RowSource,
        *,
        resolution: int | Sequence[int],
        random_masks: bool = False,
        seed: int = 0,
        max_aspect: float = 2.0,
        trigger_word: str | None = None,
    ) -> None:
        super().__init__(
            rows, resolution=resolution, max_aspect=max_aspect, trigger_word=trigger_word
        )
        self.random_masks = random_masks
        self.seed = seed

    @staticmethod
    def fields(random_masks: bool) -> RowFields:
        return INPAINTING_FIELDS_RANDOM_MASKS if random_masks else INPAINTING_FIELDS

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        *,
        random_masks: bool = False,
        allow_paths_outside: bool = False,
        **options,
    ) -> InpaintingDataset:
        """The examples listed in ``root/metadata.jsonl`` (paths inside ``root`` unless
        ``allow_paths_outside``); ``options``: the constructor's (``resolution``, ``seed``,
        ``trigger_word``, ...)."""
        rows = FolderRows(root, cls.fields(random_masks), allow_paths_outside)
        return cls(rows, random_masks=random_masks, **options)

    @classmethod
    def from_hf(
        cls,
        name_or_path: str | Path,
        *,
        split: str = "train",
        image_column: str = "image",
        mask_column: str | None = "mask",
        prompt_column: str = "prompt",
        random_masks: bool = False,
        cache_dir: str | None = None,
        **options,
    ) -> InpaintingDataset:
        """The examples of a Hugging Face dataset (``save_to_disk`` folder or hub name);
        ``options``: the constructor's."""
        columns = {"image": image_column, "mask": mask_column, "prompt": prompt_column}
        rows = HFRows.load(
            name_or_path,
            split=split,
            columns=columns,
            fields=cls.fields(random_masks),
            cache_dir=cache_dir,
        )
        return cls(rows, random_masks=random_masks, **options)

    def key_parts(self, index: int) -> dict[str, Any]:
        if "mask" in self.rows[index].images:
            return {}
        return {"random_mask": [self.seed, RANDOM_MASK_VERSION]}

    def drawn_mask(self, index: int) -> torch.Tensor:
        """Item ``index``'s drawn mask, ``[1, h, w]`` in {0, 1}: a function of (seed, index)."""
        rng = np.random.default_rng([self.seed, index])
        return torch.from_numpy(random_inpainting_mask(rng, *self.bucket_size(index))).float()[None]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item at its bucket size ``(h, w)``, with seed 004's runtime fields.

        Returns:
            ``image``: ``[3, h, w]`` in [-1, 1]; ``mask``: ``[1, h, w]`` in {0, 1}, 1 = fill;
            ``masked_image``: ``image * (1 - mask)``; ``prompt``: str; ``image_path``,
            ``mask_path``: where they came from (str); ``index``: int.
        """
        row = self.rows[index]
        size = self.bucket_size(index)
        image = self.fitted_image(row.images["image"], size)
        if "mask" in row.images:
            mask = self.fitted_mask(row.images["mask"], size)
            mask_path = _where(row.images["mask"])
        else:
            mask = self.drawn_mask(index)
            mask_path = f"random mask (seed {self.seed}, item {index})"
        return {
            "image": image,
            "mask": mask,
            "masked_image": image * (1 - mask),
            "prompt": row.prompt,
            "image_path": _where(row.images["image"]),
            "mask_path": mask_path,
            "index": index,
        }


def _where(ref: ImageRef) -> str:
    """The file an image came from, or the dataset cell holding its bytes."""
    return str(ref.source) if isinstance(ref.source, Path) else ref.what
