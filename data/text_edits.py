"""The instruction-edit dataset of Qwen-Image-Edit: (context, target, prompt[, text mask]) rows.

Rows are the edit-pair folder's (``metadata.jsonl`` with ``context``, a path or a list of them for
several references, ``target``, ``prompt`` and an optional ``mask``), a Hugging Face dataset's,
or those of the layouts :mod:`data.edit_sources` reads. Seed 000 also keeps masks beside the data:
with ``use_text_mask``, a row without a ``mask`` takes ``<dataset>/<mask_dir_name>/<target
path>.png`` (or ``.jpg``; the target's path under the data set, or its stem alone when no other
target shares it) when that file exists. Masks are white (255) on the text region, the
target's size, and go through exactly the target's resize and crop. A row may have no mask at all;
its item says so (``has_mask``) and the loss falls back to the plain one for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from data.images import ImageRef, to_model_range
from data.rows import (
    AtMostSeveral,
    BucketedRowDataset,
    FolderRows,
    HFRows,
    Row,
    RowFields,
    RowFilter,
    RowSource,
)

TEXT_EDIT_FIELDS = RowFields(
    "edit-pair", ("context", "target"), ("mask",), size_reference="target", several="context"
)
MASK_SUFFIXES = (".png", ".jpg", ".jpeg")


class ParallelMasks(RowFilter):
    """``rows`` with a missing ``mask`` taken from seed 000's parallel layout where such a file
    exists: ``folder/<target's path under root, without suffix>.<png|jpg>``, else
    ``folder/<target stem>.<png|jpg>`` when no other target shares that stem (a mask found by a
    shared stem could belong to any of them: refused, naming the targets). A found mask is
    validated like any other."""

    def __init__(self, rows: RowSource, root: Path, folder: Path) -> None:
        super().__init__(rows)
        self.root = root
        self.folder = folder
        self._stems: dict[str, list[Path]] | None = None

    def _targets_by_stem(self) -> dict[str, list[Path]]:
        """Every distinct target file of the data set, by stem."""
        if self._stems is None:
            self._stems = {}
            for index in range(len(self.rows)):
                row, _ = self.rows.parse(index)
                target = row.images["target"].source if row is not None else None
                if isinstance(target, Path):
                    sharing = self._stems.setdefault(target.stem, [])
                    if target not in sharing:
                        sharing.append(target)
        return self._stems

    def _found(self, base: Path) -> Path | None:
        for suffix in MASK_SUFFIXES:
            candidate = base.with_name(base.name + suffix)
            if candidate.is_file():
                return candidate
        return None

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        row, problems = self.rows.parse(index)
        if row is None or "mask" in row.images:
            return row, problems
        target = row.images["target"].source
        if not isinstance(target, Path):
            return row, problems  # image bytes have no file name to look a mask up by
        found = None
        if target.is_relative_to(self.root):
            found = self._found(self.folder / target.relative_to(self.root).with_suffix(""))
        if found is None:
            found = self._found(self.folder / target.stem)
            sharing = self._targets_by_stem().get(target.stem, [])
            if found is not None and len(sharing) > 1:
                names = ", ".join(str(path.relative_to(self.root)) for path in sharing[:4])
                return None, [
                    f"{row.images['target'].label}: its mask {found.relative_to(self.root)} "
                    f"could be any of the targets named {target.stem!r} ({names}); put each "
                    f"mask at {self.folder.name}/<the target's path>, e.g. "
                    f"{self.folder.name}/{target.relative_to(self.root)}"
                ]
        if found is None:
            return row, problems
        where = f"{row.images['target'].what} (mask from {self.folder.name}/)"
        return Row({**row.images, "mask": ImageRef(found, where)}, row.prompt), []


def text_edit_rows(rows: RowSource, root: Path, use_text_mask: bool, mask_dir_name: str):
    """``rows`` as the dataset reads them: masks ignored unless ``use_text_mask``, then missing
    ones looked up in ``root/mask_dir_name``."""
    if not use_text_mask:
        return WithoutMasks(rows)
    return ParallelMasks(rows, root, root / mask_dir_name)


class WithoutMasks(RowFilter):
    """``rows`` with every mask dropped: seed 000's ``use_text_mask: false`` loads none."""

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        row, problems = self.rows.parse(index)
        if row is None:
            return row, problems
        images = {field: ref for field, ref in row.images.items() if field != "mask"}
        return Row(images, row.prompt), problems


class TextEditDataset(BucketedRowDataset):
    """Instruction edits resized to aspect-ratio buckets, with one or more references.

    The target takes its bucket. A reference of the target's size is scaled and cropped to the
    same bucket, so it stays aligned with the target and its mask; a reference of another size is
    kept as it is, for the pipeline's own resize rule. Batches group items whose references
    reach the denoiser in the same shapes (:attr:`batch_group_of_items`).

    Args:
        rows: where the rows come from; prefer :meth:`from_folder` and :meth:`from_hf`.
        resolution: bucket area is about ``resolution**2``; a multiple of 16 (several: every
            row once per size, see :class:`data.rows.BucketedRowDataset`).
        max_aspect: the most elongated bucket's long/short side ratio.
        reference_grid: ``(height, width)`` of a reference as handed over -> the shape it reaches
            the denoiser in (the pipeline's resize rule), to group batches by; default: the
            size itself.
        mask_factor: pixels per cell of the latent grid the geometry losses read the mask on:
            items then carry ``mask_latent`` and ``signed_distance_map`` on it
            (:meth:`mask_geometry`); None: not needed.
    """

    key_version = "text-edit/cover-crop/lanczos+bilinear-mask/references/v2"

    def __init__(
        self,
        rows: RowSource,
        *,
        resolution: int | Sequence[int],
        max_aspect: float = 2.0,
        reference_grid: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
        trigger_word: str | None = None,
        mask_factor: int | None = None,
    ) -> None:
        super().__init__(
            rows, resolution=resolution, max_aspect=max_aspect, trigger_word=trigger_word
        )
        self.mask_factor = mask_factor
        grid = reference_grid or (lambda size: size)
        groups: dict[tuple, int] = {}
        self.batch_group_of_items = [
            groups.setdefault(
                (bucket, tuple(grid(size) for size in self.reference_sizes(index))), len(groups)
            )
            for index, bucket in enumerate(self.bucket_of_items)
        ]

    def reference_sizes(self, index: int) -> list[tuple[int, int]]:
        """``(height, width)`` of each reference of item ``index`` as :meth:`__getitem__` hands
        it over (from the sizes validated when the dataset was built)."""
        fields, sizes = self.rows.fields, self.image_sizes[index]
        bucket = self.bucket_size(index)
        found = []
        while (field := fields.numbered(len(found))) in sizes:
            found.append(bucket if sizes[field] == sizes["target"] else sizes[field])
        return found

    @classmethod
    def from_rows(
        cls,
        rows: RowSource,
        root: Path,
        *,
        resolution: int | Sequence[int],
        use_text_mask: bool = False,
        mask_dir_name: str = "text_masks",
        max_references: tuple[int, str] | None = None,
        reference_grid: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
        trigger_word: str | None = None,
        mask_factor: int | None = None,
    ) -> TextEditDataset:
        """The edits of ``rows``, masks ignored unless ``use_text_mask`` (then missing ones looked
        up in ``root/mask_dir_name``); ``max_references``: ``(limit, the model that reads no
        more)``, rows with more refused."""
        return cls.from_read_rows(
            text_edit_rows(rows, root, use_text_mask, mask_dir_name),
            resolution=resolution,
            max_references=max_references,
            reference_grid=reference_grid,
            trigger_word=trigger_word,
            mask_factor=mask_factor,
        )

    @classmethod
    def from_read_rows(
        cls,
        rows: RowSource,
        *,
        resolution: int | Sequence[int],
        max_references: tuple[int, str] | None = None,
        reference_grid: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
        trigger_word: str | None = None,
        mask_factor: int | None = None,
    ) -> TextEditDataset:
        """The edits of ``rows`` whose masks :func:`text_edit_rows` has settled already (each
        data set's beside its own folder); the other options as :meth:`from_rows`."""
        if max_references is not None:
            rows = AtMostSeveral(rows, *max_references)
        return cls(
            rows,
            resolution=resolution,
            reference_grid=reference_grid,
            trigger_word=trigger_word,
            mask_factor=mask_factor,
        )

    @classmethod
    def from_folder(
        cls, root: str | Path, *, allow_paths_outside: bool = False, **options
    ) -> TextEditDataset:
        """The edits listed in ``root/metadata.jsonl`` (paths inside ``root`` unless
        ``allow_paths_outside``); ``options`` as :meth:`from_rows`."""
        rows = FolderRows(root, TEXT_EDIT_FIELDS, allow_paths_outside)
        return cls.from_rows(rows, Path(root), **options)

    @classmethod
    def from_hf(
        cls,
        name_or_path: str | Path,
        *,
        split: str = "train",
        context_column: str = "context",
        target_column: str = "target",
        mask_column: str | None = "mask",
        prompt_column: str = "prompt",
        **options,
    ) -> TextEditDataset:
        """The edits of a Hugging Face dataset (``context_column`` may hold lists of images);
        the parallel mask folder is looked up beside a ``save_to_disk`` folder, for rows whose
        target is a file path; ``options`` as :meth:`from_rows`."""
        columns = {
            "context": context_column,
            "target": target_column,
            "mask": mask_column,
            "prompt": prompt_column,
        }
        rows = HFRows.load(name_or_path, split=split, columns=columns, fields=TEXT_EDIT_FIELDS)
        return cls.from_rows(rows, Path(name_or_path), **options)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item at the bucket size ``(h, w)``.

        Returns:
            ``context``, ``target``: ``[3, h, w]`` in [-1, 1] (the first reference in the target's
            bucket); ``references``: list of ``[3, h_i, w_i]`` in [-1, 1] (:meth:`reference_sizes`);
            ``mask``: ``[1, h, w]`` in {0, 1} (zeros when the row has none); ``has_mask``: bool
            tensor; ``prompt``; ``index``; with ``mask_factor`` ``f``, ``mask_latent`` and
            ``signed_distance_map`` ``[1, h/f, w/f]``.
        """
        row = self.rows[index]
        size = self.bucket_size(index)
        has_mask = "mask" in row.images
        if has_mask:
            mask = self.fitted_mask(row.images["mask"], size)
        else:
            mask = torch.zeros(1, *size)
        references = [
            self.fitted_image(ref, size) if ref_size == size else to_model_range(ref.open("RGB"))
            for ref, ref_size in zip(
                row.several(self.rows.fields), self.reference_sizes(index), strict=True
            )
        ]
        item = {
            "context": self.fitted_image(row.images["context"], size),
            "target": self.fitted_image(row.images["target"], size),
            "references": references,
            "mask": mask,
            "has_mask": torch.tensor(has_mask),
            "prompt": row.prompt,
            "index": index,
        }
        if self.mask_factor is not None:
            item.update(self.mask_geometry(mask, self.mask_factor))
        return item
