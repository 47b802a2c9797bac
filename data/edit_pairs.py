"""The edit-pair dataset: (context, target, mask, prompt[, overlay]) rows for insertion training.

Two sources hold rows. A folder has a ``metadata.jsonl``, one JSON object per line::

    {"context": "images/0.png", "target": "images/0t.png", "mask": "masks/0.png",
     "prompt": "insert a red ball", "overlay": "images/0o.png"}

with paths relative to the folder (``overlay`` optional). A Hugging Face dataset (a folder written
by ``Dataset.save_to_disk`` or a name ``datasets.load_dataset`` resolves, from the local cache when
offline) has one column per field, holding images (``datasets.Image``) or paths.

Every row is validated when the dataset is built, before any training step, and all faults found
(up to :data:`MAX_REPORTED_PROBLEMS`) are reported in one :class:`DataError`, so a dataset is fixed
in one pass. The per-item work, including the signed distance map the boundary loss needs, runs in
``__getitem__``, that is in the DataLoader workers, never in the training step.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.buckets import fit_to_bucket, make_buckets, nearest_bucket
from data.images import DataError, ImageRef, mask_to_tensor, to_model_range
from losses import downsample_mask_area, signed_distance_map_from_mask

MAX_REPORTED_PROBLEMS = 20
METADATA_FILE = "metadata.jsonl"
REQUIRED_IMAGES = ("context", "target", "mask")

# Part of every item key: change it when preprocessing changes, so latents cached under old keys
# are never reused for differently prepared pixels.
_KEY_VERSION = "edit-pair/cover-crop/lanczos+bilinear-mask/v1"


@dataclass(frozen=True)
class EditPairRow:
    """One well-formed row: where its images come from and its prompt."""

    context: ImageRef
    target: ImageRef
    mask: ImageRef
    overlay: ImageRef | None
    prompt: str

    def images(self) -> dict[str, ImageRef]:
        """The row's images by field name, the overlay only when present."""
        images = {"context": self.context, "target": self.target, "mask": self.mask}
        if self.overlay is not None:
            images["overlay"] = self.overlay
        return images


def _prompt_problem(prompt: Any, where: str) -> str | None:
    if isinstance(prompt, str) and prompt.strip():
        return None
    return f"{where}: prompt-less row (prompt is {prompt!r}); every row needs a non-empty prompt"


class EditPairRows(ABC):
    """A source of rows; ``description`` names it in error messages."""

    description: str

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def parse(self, index: int) -> tuple[EditPairRow | None, list[str]]:
        """Row ``index``, or ``None`` and the faults that make it unusable."""

    def __getitem__(self, index: int) -> EditPairRow:
        row, problems = self.parse(index)
        if row is None:
            raise DataError("; ".join(problems))
        return row


class FolderRows(EditPairRows):
    """Rows of ``root/metadata.jsonl``; paths in it are relative to ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.metadata = self.root / METADATA_FILE
        self.description = f"edit-pair folder '{self.root}'"
        if not self.root.is_dir():
            raise DataError(f"{self.description}: not a directory")
        if not self.metadata.is_file():
            raise DataError(
                f"'{self.metadata}': file does not exist; an edit-pair folder needs one JSON "
                'object per line: {"context", "target", "mask", "prompt", "overlay"?}'
            )
        # Lines are kept raw (line number, bytes) and parsed per item: cheap, and picklable.
        self._lines = [
            (number, line)
            for number, line in enumerate(self.metadata.read_bytes().splitlines(), start=1)
            if line.strip()
        ]

    def __len__(self) -> int:
        return len(self._lines)

    def parse(self, index: int) -> tuple[EditPairRow | None, list[str]]:
        number, line = self._lines[index]
        where = f"'{self.metadata}' line {number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return None, [f"{where}: malformed JSON ({error})"]
        if not isinstance(record, dict):
            return None, [f"{where}: expected a JSON object, got {type(record).__name__}"]
        problems = []
        refs: dict[str, ImageRef | None] = {}
        for field in (*REQUIRED_IMAGES, "overlay"):
            value = record.get(field)
            if value is None:
                if field != "overlay":
                    problems.append(f"{where}: missing key '{field}'")
                refs[field] = None
            elif not isinstance(value, str) or not value:
                problems.append(f"{where}: '{field}' must be a relative path, got {value!r}")
            else:
                refs[field] = ImageRef(self.root / value, f"{where}: {field}")
        prompt_problem = _prompt_problem(record.get("prompt"), where)
        if prompt_problem:
            problems.append(prompt_problem)
        if problems:
            return None, problems
        return EditPairRow(prompt=record["prompt"], **refs), []


class HFRows(EditPairRows):
    """Rows of a Hugging Face ``datasets.Dataset``; image columns hold images or paths.

    ``datasets.Image`` columns are read undecoded (encoded bytes or a path), so validation reads
    only image headers and the content hashes cover the stored bytes.
    """

    def __init__(
        self, dataset: Any, columns: dict[str, str | None], description: str, base: Path
    ) -> None:
        import datasets

        missing = [
            f"'{column}' (for {field})"
            for field, column in columns.items()
            if field != "overlay" and column not in dataset.column_names
        ]
        if missing:
            raise DataError(
                f"{description}: no column {', '.join(missing)}; "
                f"its columns are {dataset.column_names}"
            )
        if columns.get("overlay") not in dataset.column_names:
            columns = {**columns, "overlay": None}
        present = [column for column in columns.values() if column is not None]
        dataset = dataset.select_columns(present)
        for field, column in columns.items():
            if field != "prompt" and column is not None:
                if isinstance(dataset.features[column], datasets.Image):
                    dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        self.columns = columns
        self.description = description
        self.base = base

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        *,
        split: str,
        columns: dict[str, str | None],
        cache_dir: str | None = None,
    ) -> HFRows:
        """Load with ``load_from_disk`` (a ``save_to_disk`` folder) or ``load_dataset``.

        A saved single ``Dataset`` has no splits and is used whatever ``split`` is.
        """
        import datasets

        path = Path(name_or_path)
        description = f"dataset '{name_or_path}' split '{split}'"
        saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        try:
            if saved:
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(name_or_path), split=split, cache_dir=cache_dir)
        except (OSError, ValueError) as error:
            raise DataError(f"{description}: cannot be loaded ({error})") from error
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{description}: no such split; it has {list(loaded)}")
            loaded = loaded[split]
        base = path if path.is_dir() else Path()
        return cls(loaded, columns, description, base)

    def __len__(self) -> int:
        return len(self.dataset)

    def _image_ref(self, value: Any, where: str) -> ImageRef | str:
        """The reference for one cell, or a fault message."""
        if isinstance(value, dict) and value.get("bytes"):
            return ImageRef(value["bytes"], where)
        if isinstance(value, dict) and value.get("path"):
            return ImageRef(self.base / value["path"], where)
        if isinstance(value, str) and value:
            return ImageRef(self.base / value, where)
        return f"{where}: expected an image or a path, got {value!r}"

    def parse(self, index: int) -> tuple[EditPairRow | None, list[str]]:
        record = self.dataset[index]
        problems = []
        refs: dict[str, ImageRef | None] = {}
        for field, column in self.columns.items():
            if field == "prompt":
                continue
            value = None if column is None else record[column]
            if value is None and field == "overlay":
                refs[field] = None
                continue
            ref = self._image_ref(value, f"dataset row {index}, column '{column}'")
            if isinstance(ref, str):
                problems.append(ref)
            else:
                refs[field] = ref
        prompt_column = self.columns["prompt"]
        prompt = record[prompt_column]
        prompt_problem = _prompt_problem(prompt, f"dataset row {index}, column '{prompt_column}'")
        if prompt_problem:
            problems.append(prompt_problem)
        if problems:
            return None, problems
        return EditPairRow(prompt=prompt, **refs), []


def _size_problems(row: EditPairRow) -> tuple[tuple[int, int] | None, list[str]]:
    """The context's ``(height, width)`` and the faults of the row's images (headers only)."""
    sizes, problems = {}, []
    for field, ref in row.images().items():
        try:
            sizes[field] = ref.size()
        except DataError as error:
            problems.append(str(error))
    context_size = sizes.get("context")
    for field, size in sizes.items():
        if context_size is not None and size != context_size:
            context = row.context.source
            named = f" '{context}'" if isinstance(context, Path) else ""
            problems.append(
                f"{row.images()[field].label}: size {size[1]}x{size[0]} differs from the context "
                f"image{named} size {context_size[1]}x{context_size[0]} (width x height)"
            )
    return (None if problems else context_size), problems


def _validated_sizes(rows: EditPairRows) -> list[tuple[int, int]]:
    """Every row's context size; one :class:`DataError` listing the faults if any row has some."""
    sizes, problems = [], []
    for index in range(len(rows)):
        row, row_problems = rows.parse(index)
        if row is not None:
            size, row_problems = _size_problems(row)
            sizes.append(size)
        problems += row_problems
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            problems = [
                *problems[:MAX_REPORTED_PROBLEMS],
                f"(stopped after {index + 1} of {len(rows)} rows; there may be more)",
            ]
            break
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise DataError(f"{rows.description}: bad rows; fix them and run again:\n{listed}")
    if not sizes:
        raise DataError(f"{rows.description}: no rows")
    return sizes


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


class EditPairDataset(Dataset):
    """Edit pairs resized to aspect-ratio buckets, with their latent-resolution mask geometry.

    Args:
        rows: where the rows come from (:class:`FolderRows`, :class:`HFRows`); prefer
            :meth:`from_folder` and :meth:`from_hf`.
        resolution: bucket area is about ``resolution**2``; a multiple of 16.
        max_aspect: the most elongated bucket's long/short side ratio.
        latent_factor: pixels per latent cell (the VAE's downsampling, 8 for FLUX).

    Raises:
        DataError: listing every bad row found (up to :data:`MAX_REPORTED_PROBLEMS`).

    Attributes:
        buckets: ``(height, width)`` of every bucket.
        bucket_of_items: index into ``buckets`` of every item, for :class:`BucketBatchSampler`.
    """

    def __init__(
        self,
        rows: EditPairRows,
        *,
        resolution: int,
        max_aspect: float = 2.0,
        latent_factor: int = 8,
    ) -> None:
        self.buckets = make_buckets(resolution, max_aspect=max_aspect)
        self.rows = rows
        self.latent_factor = latent_factor
        self.bucket_of_items = [
            self.buckets.index(nearest_bucket(height, width, self.buckets))
            for height, width in _validated_sizes(rows)
        ]
        self._file_digests: dict[Path, str] = {}
        self._keys: dict[int, str] = {}

    @classmethod
    def from_folder(
        cls, root: str | Path, *, resolution: int, max_aspect: float = 2.0
    ) -> EditPairDataset:
        """The edit pairs listed in ``root/metadata.jsonl``."""
        return cls(FolderRows(root), resolution=resolution, max_aspect=max_aspect)

    @classmethod
    def from_hf(
        cls,
        name_or_path: str | Path,
        *,
        resolution: int,
        split: str = "train",
        context_column: str = "context",
        target_column: str = "target",
        mask_column: str = "mask",
        prompt_column: str = "prompt",
        overlay_column: str = "overlay",
        cache_dir: str | None = None,
        max_aspect: float = 2.0,
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
        rows = HFRows.load(name_or_path, split=split, columns=columns, cache_dir=cache_dir)
        return cls(rows, resolution=resolution, max_aspect=max_aspect)

    def __len__(self) -> int:
        return len(self.rows)

    def bucket_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of item ``index``'s bucket."""
        return self.buckets[self.bucket_of_items[index]]

    def _digest(self, ref: ImageRef) -> str:
        if isinstance(ref.source, bytes):
            return hashlib.sha256(ref.source).hexdigest()
        if ref.source not in self._file_digests:
            self._file_digests[ref.source] = hashlib.sha256(ref.content()).hexdigest()
        return self._file_digests[ref.source]

    def key(self, index: int) -> str:
        """sha256 hex digest of item ``index``'s content, computed once and kept.

        It covers the bytes of every image (files or stored image bytes), the prompt and the
        bucket size: identical pairs share a key and different pairs never do, so a latent cache
        keyed by it is shared across copies of a file and never serves stale latents.
        """
        if index not in self._keys:
            row = self.rows[index]
            fields = {field: self._digest(ref) for field, ref in row.images().items()}
            fields.update(prompt=row.prompt, size=self.bucket_size(index), version=_KEY_VERSION)
            encoded = json.dumps(fields, sort_keys=True).encode()
            self._keys[index] = hashlib.sha256(encoded).hexdigest()
        return self._keys[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item at its bucket size ``(h, w)``.

        Returns:
            ``context``, ``target``, ``overlay``: ``[3, h, w]`` in [-1, 1]; ``mask``:
            ``[1, h, w]`` in {0, 1}; ``mask_latent``: ``[1, h/8, w/8]`` area fractions in [0, 1];
            ``signed_distance_map``: ``[1, h/8, w/8]`` of ``mask_latent > 0.5``, normalised to
            [-1, 1]; ``prompt``: str; ``index``: int. (A cache reads :meth:`key`, which hashes
            the files, on its own; items do not carry it, so training without a cache never
            hashes anything.)
        """
        row = self.rows[index]
        size = self.bucket_size(index)
        context = to_model_range(fit_to_bucket(row.context.open("RGB"), size))
        target = to_model_range(fit_to_bucket(row.target.open("RGB"), size))
        # The same box transform as the images, filtered on 0..255 grey, then thresholded.
        mask_image = fit_to_bucket(row.mask.open("L"), size, Image.Resampling.BILINEAR)
        mask = mask_to_tensor(mask_image)
        if row.overlay is None:
            overlay = composite_overlay(context, target, mask)
        else:
            overlay = to_model_range(fit_to_bucket(row.overlay.open("RGB"), size))
        latent_size = (size[0] // self.latent_factor, size[1] // self.latent_factor)
        mask_latent = downsample_mask_area(mask, latent_size)[0]
        signed_distance_map = signed_distance_map_from_mask(mask_latent > 0.5, normalize=True)[0]
        return {
            "context": context,
            "target": target,
            "overlay": overlay,
            "mask": mask,
            "mask_latent": mask_latent,
            "signed_distance_map": signed_distance_map,
            "prompt": row.prompt,
            "index": index,
        }


def collate_edit_pairs(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of one bucket: every tensor field gains a batch dim ``[B, ...]``, ``index``
    becomes a ``[B]`` long tensor, other fields (``prompt``) become lists.

    Works for dataset items and for cached items alike.

    Raises:
        ValueError: the items come from buckets of different sizes.
    """
    batch: dict[str, Any] = {}
    for field, value in items[0].items():
        values = [item[field] for item in items]
        if field == "index":
            batch[field] = torch.tensor(values, dtype=torch.long)
        elif isinstance(value, torch.Tensor):
            shapes = sorted({tuple(v.shape) for v in values})
            if len(shapes) > 1:
                raise ValueError(
                    f"a batch mixes bucket sizes ({field} shapes {shapes}); "
                    "draw batches with BucketBatchSampler"
                )
            batch[field] = torch.stack(values)
        else:
            batch[field] = values
    return batch
