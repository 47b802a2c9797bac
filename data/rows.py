"""Rows of image datasets: where each row's images come from, checked before training starts.

A dataset's rows hold a set of image fields and a prompt, described by :class:`RowFields` (an
edit pair: context, target, mask and an optional overlay; an inpainting example: image and
mask). Two sources hold rows. A folder has a ``metadata.jsonl``, one JSON object per line, with
paths relative to the folder. A Hugging Face dataset (a folder written by
``Dataset.save_to_disk`` or a name ``datasets.load_dataset`` resolves, from the local cache when
offline) has one column per field, holding images (``datasets.Image``) or paths.

Every row is validated when a dataset is built, before any training step, and all faults found
(up to :data:`MAX_REPORTED_PROBLEMS`) are reported in one :class:`DataError`, so a dataset is
fixed in one pass. :class:`BucketedRowDataset` resizes rows to aspect-ratio buckets and gives
each item a content key for latent caches.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.buckets import fit_to_bucket, make_buckets, nearest_bucket
from data.images import DataError, ImageRef, mask_to_tensor, to_model_range
from losses import downsample_mask_area, signed_distance_map_from_mask

logger = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 20
METADATA_FILE = "metadata.jsonl"


@dataclass(frozen=True)
class RowFields:
    """The image fields of a dataset's rows (every row also has a ``prompt``).

    ``required`` fields must be in every row; ``optional`` ones may be missing. The first required
    field is the reference: every other image of a row must have its size.
    """

    kind: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    size_reference: str | None = None
    """The field every other image's size is checked against; default: the first required."""
    several: str | None = None
    """A field that may hold a list of images (references): its second and later images are
    the fields ``<several>_2``, ``<several>_3``, ... (:meth:`numbered`), of any size."""

    @property
    def reference(self) -> str:
        return self.size_reference or self.required[0]

    def numbered(self, position: int) -> str:
        """The field of the ``several`` field's image at ``position`` (0-based)."""
        return self.several if position == 0 else f"{self.several}_{position + 1}"

    def any_size(self, field: str) -> bool:
        """Whether ``field`` may have another size than the reference: the ``several`` ones."""
        return self.several is not None and (
            field == self.several or field.startswith(f"{self.several}_")
        )

    @property
    def all(self) -> tuple[str, ...]:
        return self.required + self.optional

    def layout(self) -> str:
        """The JSON keys of a row, for messages: ``{"image", "mask", "prompt"}``."""
        keys = [f'"{name}"' for name in (*self.required, "prompt")]
        keys += [f'"{name}"?' for name in self.optional]
        return "{" + ", ".join(keys) + "}"


@dataclass(frozen=True)
class Row:
    """One well-formed row: its images by field (optional ones only when present), its prompt."""

    images: dict[str, ImageRef]
    prompt: str

    def several(self, fields: RowFields) -> list[ImageRef]:
        """The images of ``fields.several`` in order (the references of an edit)."""
        found = []
        while fields.numbered(len(found)) in self.images:
            found.append(self.images[fields.numbered(len(found))])
        return found


def prompt_problem(prompt: Any, where: str) -> str | None:
    if isinstance(prompt, str) and prompt.strip():
        return None
    return f"{where}: prompt-less row (prompt is {prompt!r}); every row needs a non-empty prompt"


class RowSource(ABC):
    """A source of rows with ``fields``; ``description`` names it in error messages."""

    description: str
    fields: RowFields

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        """Row ``index``, or ``None`` and the faults that make it unusable."""

    def source_problems(self) -> list[str]:
        """Faults of the source as a whole, not of one row (a file in only some folders)."""
        return []

    def repeats_of_rows(self) -> list[int] | None:
        """How many times an epoch draws each row; None: once each."""
        return None

    def __getitem__(self, index: int) -> Row:
        row, problems = self.parse(index)
        if row is None:
            raise DataError("; ".join(problems))
        return row


class JsonLinesRows(RowSource):
    """Rows read from the JSON objects of a JSON Lines file, one per non-blank line; lines are
    kept raw (number, bytes) and parsed per item: cheap, and picklable. Keys that ``known`` does
    not accept are warned about once (:func:`warn_about_unknown_keys`)."""

    def __init__(self, path: Path, known: Callable[[str], bool]) -> None:
        self.path = path
        lines = enumerate(path.read_bytes().splitlines(), start=1)
        self._lines = [(number, line) for number, line in lines if line.strip()]
        warn_about_unknown_keys(self.description, self._lines, known)

    def __len__(self) -> int:
        return len(self._lines)

    def record(self, index: int) -> tuple[str, dict | None, list[str]]:
        """Row ``index``'s place for messages (``'file' line N``), its JSON object, or None and
        why it is not one."""
        number, line = self._lines[index]
        where = f"'{self.path}' line {number}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return where, None, [f"{where}: malformed JSON ({error})"]
        if not isinstance(record, dict):
            return where, None, [f"{where}: expected a JSON object, got {type(record).__name__}"]
        return where, record, []


def warn_about_unknown_keys(
    description: str, lines: list[tuple[int, bytes]], known: Callable[[str], bool]
) -> None:
    """Warn once about every key of the JSON objects in ``lines`` that ``known`` does not
    accept, naming the line it first appears on: a key misspelt or from another tool's layout is
    never dropped silently. Malformed lines are left to row validation."""
    unknown: dict[str, int] = {}
    for number, line in lines:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            for key in record:
                if not known(key):
                    unknown.setdefault(key, number)
    if unknown:
        shown = ", ".join(f"'{key}' (first on line {line})" for key, line in unknown.items())
        logger.warning("%s: keys not read, ignored: %s", description, shown)


class RowFilter(RowSource):
    """A row source that rewrites the rows of another (``parse``)."""

    def __init__(self, rows: RowSource) -> None:
        self.rows = rows
        self.fields = rows.fields
        self.description = rows.description

    def __len__(self) -> int:
        return len(self.rows)

    def source_problems(self) -> list[str]:
        return self.rows.source_problems()

    def repeats_of_rows(self) -> list[int] | None:
        return self.rows.repeats_of_rows()


class ConcatRows(RowSource):
    """The rows of several sources (data sets of one layout family) one after another, the
    rows of ``sources[k]`` drawn ``repeats[k]`` times per epoch."""

    def __init__(self, sources: Sequence[RowSource], repeats: Sequence[int]) -> None:
        if len(sources) != len(repeats) or not sources:
            raise ValueError("one repeat count per source, and at least one source")
        self.sources = list(sources)
        self.repeats = list(repeats)
        self.fields = sources[0].fields
        self.description = " + ".join(source.description for source in sources)
        self._starts = list(itertools.accumulate((len(source) for source in sources), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        position = bisect.bisect_right(self._starts, index) - 1
        return self.sources[position].parse(index - self._starts[position])

    def source_problems(self) -> list[str]:
        return [problem for source in self.sources for problem in source.source_problems()]

    def repeats_of_rows(self) -> list[int]:
        return [
            count
            for source, count in zip(self.sources, self.repeats, strict=True)
            for _ in range(len(source))
        ]


class TiledRows(RowFilter):
    """The rows of ``rows`` ``times`` times over: row ``i`` of ``rows`` is rows ``i``,
    ``i + n``, ``i + 2n``, ... here (``n = len(rows)``), each drawn as often per epoch as the
    original (several training sizes: one tile per size)."""

    def __init__(self, rows: RowSource, times: int) -> None:
        super().__init__(rows)
        self.times = times

    def __len__(self) -> int:
        return len(self.rows) * self.times

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        return self.rows.parse(index % len(self.rows))

    def repeats_of_rows(self) -> list[int] | None:
        repeats = self.rows.repeats_of_rows()
        return None if repeats is None else repeats * self.times


TRIGGER_TOKEN = "[trigger]"


class WithTriggerWord(RowFilter):
    """``rows`` with ``word`` in every prompt: in place of each ``[trigger]`` token, or before
    the prompt (``"<word> <prompt>"``) when it has none."""

    def __init__(self, rows: RowSource, word: str) -> None:
        super().__init__(rows)
        self.word = word

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        row, problems = self.rows.parse(index)
        if row is None:
            return row, problems
        if TRIGGER_TOKEN in row.prompt:
            prompt = row.prompt.replace(TRIGGER_TOKEN, self.word)
        else:
            prompt = f"{self.word} {row.prompt}"
        return Row(row.images, prompt), problems


class AtMostSeveral(RowFilter):
    """``rows`` with rows of more than ``limit`` images in the ``several`` field refused,
    ``why`` saying which model reads no more."""

    def __init__(self, rows: RowSource, limit: int, why: str) -> None:
        super().__init__(rows)
        self.limit = limit
        self.why = why

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        row, problems = self.rows.parse(index)
        if row is None:
            return row, problems
        several = row.several(self.fields)
        if len(several) > self.limit:
            return None, [
                f"{several[0].label}: {len(several)} reference images; {self.why} reads at "
                f"most {self.limit}"
            ]
        return row, problems


class FolderRows(JsonLinesRows):
    """Rows of ``root/metadata.jsonl``; paths in it are relative to ``root``."""

    def __init__(self, root: str | Path, fields: RowFields, allow_outside: bool = False) -> None:
        self.root = Path(root)
        self.fields = fields
        self.allow_outside = allow_outside
        self.metadata = self.root / METADATA_FILE
        self.description = f"{fields.kind} folder '{self.root}'"
        if not self.root.is_dir():
            raise DataError(f"{self.description}: not a directory")
        if not self.metadata.is_file():
            other_layouts = (
                " (or, for a folder of targets with a folder per reference, give --control_dirs; "
                "for a musubi-tuner JSON Lines file, --train_data_file)"
                if fields.several
                else ""
            )
            raise DataError(
                f"'{self.metadata}': file does not exist; {_article(fields.kind)} {fields.kind} "
                f"folder needs one JSON object per line: {fields.layout()}{other_layouts}"
            )
        super().__init__(self.metadata, lambda key: key in (*fields.all, "prompt"))

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        where, record, problems = self.record(index)
        if record is None:
            return None, problems
        problems = []
        refs: dict[str, ImageRef] = {}
        for field, key, value in spread_several(self.fields, record):
            if value is None:
                if field in self.fields.required:
                    problems.append(f"{where}: missing key '{field}'")
            elif not isinstance(value, str) or not value:
                problems.append(f"{where}: '{key}' must be a relative path, got {value!r}")
            elif not self.allow_outside and leaves(self.root, value):
                problems.append(
                    f"{where}: '{key}' {value!r} leaves the data folder; pass "
                    "--allow_paths_outside_data to train on it"
                )
            else:
                refs[field] = ImageRef(self.root / value, f"{where}: {key}")
        fault = prompt_problem(record.get("prompt"), where)
        if fault:
            problems.append(fault)
        if problems:
            return None, problems
        return Row(refs, record["prompt"]), []


def spread_several(fields: RowFields, record: dict) -> list[tuple[str, str, Any]]:
    """``(field, key as written, value)`` of every image field of ``record`` (value None where
    absent); a list in the ``several`` field is spread over its numbered fields, keyed
    ``<field>[i]``."""
    spread = []
    for field in fields.all:
        value = record.get(field)
        if field == fields.several and isinstance(value, list) and value:
            spread += [(fields.numbered(i), f"{field}[{i}]", item) for i, item in enumerate(value)]
        else:
            spread.append((field, field, value))
    return spread


def leaves(root: Path, relative: str) -> bool:
    """Whether ``relative`` is absolute or climbs out of ``root`` (``../``), read as written:
    symbolic links inside the folder stay the user's business."""
    if Path(relative).is_absolute():
        return True
    inside = os.path.normpath(root / relative)
    return os.path.commonpath([os.path.normpath(root), inside]) != os.path.normpath(root)


class HFRows(RowSource):
    """Rows of a Hugging Face ``datasets.Dataset``; image columns hold images or paths.

    ``columns`` maps each field (and "prompt") to its column; an optional field whose column is
    absent (or None) is absent from every row. ``datasets.Image`` columns are read undecoded
    (encoded bytes or a path), so validation reads only image headers and the content hashes
    cover the stored bytes.
    """

    def __init__(
        self,
        dataset: Any,
        columns: dict[str, str | None],
        description: str,
        base: Path,
        fields: RowFields,
    ) -> None:
        import datasets

        missing = [
            f"'{columns[field]}' (for {field})"
            for field in (*fields.required, "prompt")
            if columns[field] not in dataset.column_names
        ]
        if missing:
            raise DataError(
                f"{description}: no column {', '.join(missing)}; "
                f"its columns are {dataset.column_names}"
            )
        columns = {
            field: column if field != "prompt" and column in dataset.column_names else None
            for field, column in columns.items()
            if field != "prompt"
        } | {"prompt": columns["prompt"]}
        present = [column for column in columns.values() if column is not None]
        dataset = dataset.select_columns(present)
        undecoded = datasets.Image(decode=False)
        for field, column in columns.items():
            if field != "prompt" and column is not None:
                feature = dataset.features[column]
                if isinstance(feature, datasets.Image):
                    dataset = dataset.cast_column(column, undecoded)
                elif isinstance(getattr(feature, "feature", None), datasets.Image):
                    dataset = dataset.cast_column(column, datasets.List(undecoded))
        self.dataset = dataset
        self.columns = columns
        self.description = description
        self.base = base
        self.fields = fields

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        *,
        split: str,
        columns: dict[str, str | None],
        fields: RowFields,
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
        return cls(loaded, columns, description, base, fields)

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

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        record = self.dataset[index]
        problems = []
        refs: dict[str, ImageRef] = {}
        values = {field: record[column] for field, column in self.columns.items() if column}
        for field, key, value in spread_several(self.fields, values):
            if value is None and field in self.fields.optional:
                continue
            name, _, position = key.partition("[")
            column = f"'{self.columns[name]}'" + (f"[{position}" if position else "")
            ref = self._image_ref(value, f"dataset row {index}, column {column}")
            if isinstance(ref, str):
                problems.append(ref)
            else:
                refs[field] = ref
        prompt_column = self.columns["prompt"]
        prompt = record[prompt_column]
        fault = prompt_problem(prompt, f"dataset row {index}, column '{prompt_column}'")
        if fault:
            problems.append(fault)
        if problems:
            return None, problems
        return Row(refs, prompt), []


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _size_problems(
    row: Row, fields: RowFields
) -> tuple[dict[str, tuple[int, int]] | None, list[str]]:
    """Every image's ``(height, width)`` by field and the faults of the row's images (headers
    only)."""
    reference = fields.reference
    sizes, problems = {}, []
    for field, ref in row.images.items():
        try:
            sizes[field] = ref.size()
        except DataError as error:
            problems.append(str(error))
    reference_size = sizes.get(reference)
    for field, size in sizes.items():
        if fields.any_size(field):
            continue
        if reference_size is not None and size != reference_size:
            source = row.images[reference].source
            named = f" '{source}'" if isinstance(source, Path) else ""
            problems.append(
                f"{row.images[field].label}: size {size[1]}x{size[0]} differs from the "
                f"{reference} image{named} size {reference_size[1]}x{reference_size[0]} "
                "(width x height)"
            )
    return (None if problems else sizes), problems


def validated_sizes(rows: RowSource) -> list[tuple[int, int]]:
    """Every row's reference size; one :class:`DataError` listing the faults if any row has
    some."""
    return [sizes[rows.fields.reference] for sizes in validated_image_sizes(rows)]


def validated_image_sizes(rows: RowSource) -> list[dict[str, tuple[int, int]]]:
    """Every row's image sizes ``(height, width)`` by field, each header read once; one
    :class:`DataError` listing the faults if any row has some."""
    sizes, problems = [], rows.source_problems()
    for index in range(len(rows)):
        row, row_problems = rows.parse(index)
        if row is not None:
            size, row_problems = _size_problems(row, rows.fields)
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


class BucketedRowDataset(Dataset):
    """Rows resized to aspect-ratio buckets; subclasses build items in ``__getitem__``.

    Args:
        rows: where the rows come from (:class:`FolderRows`, :class:`HFRows`).
        resolution: bucket area is about ``resolution**2``; a multiple of 16. Several sizes give
            one item per row and size (:class:`TiledRows`): items ``0..n-1`` at the largest
            size, the next ``n`` at the next one, and so on, each in its own size's buckets.
        max_aspect: the most elongated bucket's long/short side ratio.
        trigger_word: put in every prompt (:class:`WithTriggerWord`); None: prompts as written.

    Raises:
        DataError: listing every bad row found (up to :data:`MAX_REPORTED_PROBLEMS`).

    Attributes:
        row_count: how many rows the data holds (items are ``row_count`` times the sizes).
        image_sizes: every item's image sizes ``(height, width)`` by field, as validated.
        buckets: ``(height, width)`` of every bucket, of every size.
        bucket_of_items: index into ``buckets`` of every item, for ``BucketBatchSampler``.
    """

    # Part of every item key: change it when preprocessing changes, so latents cached under old
    # keys are never reused for differently prepared pixels.
    key_version: str

    def __init__(
        self,
        rows: RowSource,
        *,
        resolution: int | Sequence[int],
        max_aspect: float = 2.0,
        trigger_word: str | None = None,
    ) -> None:
        sizes = sorted({resolution} if isinstance(resolution, int) else set(resolution))[::-1]
        bucket_sets = [make_buckets(size, max_aspect=max_aspect) for size in sizes]
        self.buckets = sorted(set().union(*bucket_sets))
        self.rows = WithTriggerWord(rows, trigger_word) if trigger_word else rows
        if len(sizes) > 1:
            self.rows = TiledRows(self.rows, len(sizes))
        self.row_count = len(rows)
        image_sizes = validated_image_sizes(rows)
        self.image_sizes = image_sizes * len(sizes)
        self.bucket_of_items = [
            self.buckets.index(nearest_bucket(*sizes[rows.fields.reference], bucket_set))
            for bucket_set in bucket_sets
            for sizes in image_sizes
        ]
        self._file_digests: dict[Path, str] = {}
        self._keys: dict[int, str] = {}
        _warn_about_duplicates(rows)
        _warn_about_uniform_masks(rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def repeats_of_items(self) -> list[int] | None:
        """How many times an epoch draws each item (``BucketBatchSampler``'s ``repeats``)."""
        return self.rows.repeats_of_rows()

    def describe(self, index: int) -> str:
        """Item ``index``'s files, for messages: ``image 'a.png', mask 'm.png'``."""
        row, problems = self.rows.parse(index)
        if row is None:
            return "; ".join(problems)
        return ", ".join(ref.label for ref in row.images.values())

    def bucket_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of item ``index``'s bucket."""
        return self.buckets[self.bucket_of_items[index]]

    def _digest(self, ref: ImageRef) -> str:
        if isinstance(ref.source, bytes):
            return hashlib.sha256(ref.source).hexdigest()
        if ref.source not in self._file_digests:
            self._file_digests[ref.source] = hashlib.sha256(ref.content()).hexdigest()
        return self._file_digests[ref.source]

    def key_parts(self, index: int) -> dict[str, Any]:
        """What item ``index`` is made of besides its files; subclasses add their settings."""
        return {}

    def key(self, index: int) -> str:
        """sha256 hex digest of item ``index``'s content, computed once and kept.

        It covers the bytes of every image (files or stored image bytes), the prompt, the bucket
        size and :meth:`key_parts`: identical items share a key and different items never do, so
        a latent cache keyed by it is shared across copies of a file and never serves stale
        latents.
        """
        if index not in self._keys:
            row = self.rows[index]
            fields: dict[str, Any] = {field: self._digest(ref) for field, ref in row.images.items()}
            fields.update(
                prompt=row.prompt,
                size=self.bucket_size(index),
                version=self.key_version,
                **self.key_parts(index),
            )
            encoded = json.dumps(fields, sort_keys=True).encode()
            self._keys[index] = hashlib.sha256(encoded).hexdigest()
        return self._keys[index]

    @staticmethod
    def fitted_image(ref: ImageRef, size: tuple[int, int]) -> torch.Tensor:
        """``ref`` scaled and centre-cropped to ``size``: ``[3, h, w]`` in [-1, 1]."""
        return to_model_range(fit_to_bucket(ref.open("RGB"), size))

    @staticmethod
    def mask_geometry(mask: torch.Tensor, factor: int) -> dict[str, torch.Tensor]:
        """``mask: [1, h, w]`` on the latent grid of ``factor`` pixels a cell: ``mask_latent``
        ``[1, h/f, w/f]`` (area fractions in [0, 1]) and ``signed_distance_map`` ``[1, h/f,
        w/f]`` of ``mask_latent > 0.5``, normalised to [-1, 1]: what the geometry losses read,
        made here, in the data loader, never in the training step."""
        grid = (mask.shape[-2] // factor, mask.shape[-1] // factor)
        mask_latent = downsample_mask_area(mask, grid)[0]
        distances = signed_distance_map_from_mask(mask_latent > 0.5, normalize=True)[0]
        return {"mask_latent": mask_latent, "signed_distance_map": distances}

    @staticmethod
    def fitted_mask(ref: ImageRef, size: tuple[int, int]) -> torch.Tensor:
        """A mask with exactly the images' geometric transform: ``[1, h, w]`` in {0, 1}.

        Filtered on 0..255 grey, then thresholded, so edges land where the image's do.
        """
        return mask_to_tensor(fit_to_bucket(ref.open_mask(), size, Image.Resampling.BILINEAR))


# Masks read to tell a data set whose masks are all empty or all full (a sample, evenly spread).
MASKS_CHECKED = 32


def _warn_about_uniform_masks(rows: RowSource) -> None:
    """Warn when every mask of a sample of the rows is empty, or every one full: the mask terms
    then see no region (or nothing else), which is rarely meant (masks saved inverted, say)."""
    refs = []
    step = max(1, len(rows) // MASKS_CHECKED)
    for index in range(0, len(rows), step):
        row, _ = rows.parse(index)
        if row is not None and "mask" in row.images:
            refs.append(row.images["mask"])
    if len(refs) < 2:
        return
    shares = [float(mask_to_tensor(ref.open_mask()).mean()) for ref in refs[:MASKS_CHECKED]]
    for value, what in ((0.0, "empty"), (1.0, "full (white everywhere)")):
        if all(share == value for share in shares):
            logger.warning(
                "%s: all %d masks checked are %s; the mask losses will see %s. Check how the "
                "masks are stored (white is the region)",
                rows.description,
                len(shares),
                what,
                "no region" if value == 0 else "nothing outside the region",
            )


def _warn_about_duplicates(rows: RowSource) -> None:
    """Warn when rows list the same files and prompt: each is trained on as often as it is
    listed, which is rarely meant (a concatenated metadata file, say)."""
    seen: dict[tuple, int] = {}
    repeats = []
    for index in range(len(rows)):
        row = rows[index]
        sources = tuple(sorted((f, str(r.source)) for f, r in row.images.items()))
        if any(isinstance(r.source, bytes) for r in row.images.values()):
            continue  # stored image bytes: telling copies apart would mean hashing them all
        key = (sources, row.prompt)
        if key in seen:
            repeats.append((seen[key], index))
        else:
            seen[key] = index
    if repeats:
        shown = ", ".join(f"{a} and {b}" for a, b in repeats[:5])
        logger.warning(
            "%s: %d row(s) repeat an earlier row (rows %s%s); each is trained on as many times "
            "as it is listed",
            rows.description,
            len(repeats),
            shown,
            ", ..." if len(repeats) > 5 else "",
        )


def collate_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
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
