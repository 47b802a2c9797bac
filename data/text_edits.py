"""The instruction-edit dataset of Qwen-Image-Edit: (context, target, prompt[, text mask]) rows.

Rows are the edit-pair folder's (``metadata.jsonl`` with ``context``, ``target``, ``prompt`` and
an optional ``mask``) or a Hugging Face dataset's. Seed 000 also keeps masks beside the data:
with ``use_text_mask``, a row without a ``mask`` takes ``<dataset>/<mask_dir_name>/<target
path>.png`` (or ``.jpg``; the target's path under the data set, or its stem alone when no other
target shares it) when that file exists. Masks are white (255) on the text region, the
target's size, and go through exactly the target's resize and crop. A row may have no mask at all;
its item says so (``has_mask``) and the loss falls back to the plain one for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from data.images import ImageRef
from data.rows import BucketedRowDataset, FolderRows, HFRows, Row, RowFields, RowSource

TEXT_EDIT_FIELDS = RowFields("edit-pair", ("context", "target"), ("mask",))
MASK_SUFFIXES = (".png", ".jpg", ".jpeg")


class _RowFilter(RowSource):
    """A row source that rewrites the rows of another (``parse``)."""

    def __init__(self, rows: RowSource) -> None:
        self.rows = rows
        self.fields = rows.fields
        self.description = rows.description

    def __len__(self) -> int:
        return len(self.rows)


class ParallelMasks(_RowFilter):
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


class WithoutMasks(_RowFilter):
    """``rows`` with every mask dropped: seed 000's ``use_text_mask: false`` loads none."""

    def parse(self, index: int) -> tuple[Row | None, list[str]]:
        row, problems = self.rows.parse(index)
        if row is None:
            return row, problems
        images = {field: ref for field, ref in row.images.items() if field != "mask"}
        return Row(images, row.prompt), problems


class TextEditDataset(BucketedRowDataset):
    """Instruction edits resized to aspect-ratio buckets (the target's bucket for both images).

    Args:
        rows: where the rows come from; prefer :meth:`from_folder` and :meth:`from_hf`.
        resolution: bucket area is about ``resolution**2``; a multiple of 16.
        max_aspect: the most elongated bucket's long/short side ratio.
    """

    key_version = "text-edit/cover-crop/lanczos+bilinear-mask/v1"

    @classmethod
    def from_folder(
        cls,
        root: str | Path,
        *,
        resolution: int,
        use_text_mask: bool = False,
        mask_dir_name: str = "text_masks",
        allow_paths_outside: bool = False,
    ) -> TextEditDataset:
        """The edits listed in ``root/metadata.jsonl`` (paths inside ``root`` unless
        ``allow_paths_outside``)."""
        rows = FolderRows(root, TEXT_EDIT_FIELDS, allow_paths_outside)
        return cls(
            text_edit_rows(rows, Path(root), use_text_mask, mask_dir_name), resolution=resolution
        )

    @classmethod
    def from_hf(
        cls,
        name_or_path: str | Path,
        *,
        resolution: int,
        split: str = "train",
        context_column: str = "context",
        target_column: str = "target",
        mask_column: str | None = "mask",
        prompt_column: str = "prompt",
        use_text_mask: bool = False,
        mask_dir_name: str = "text_masks",
    ) -> TextEditDataset:
        """The edits of a Hugging Face dataset; the parallel mask folder is looked up beside a
        ``save_to_disk`` folder, for rows whose target is a file path."""
        columns = {
            "context": context_column,
            "target": target_column,
            "mask": mask_column,
            "prompt": prompt_column,
        }
        rows = HFRows.load(name_or_path, split=split, columns=columns, fields=TEXT_EDIT_FIELDS)
        return cls(
            text_edit_rows(rows, Path(name_or_path), use_text_mask, mask_dir_name),
            resolution=resolution,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One item at the bucket size ``(h, w)``.

        Returns:
            ``context``, ``target``: ``[3, h, w]`` in [-1, 1]; ``mask``: ``[1, h, w]`` in
            {0, 1} (zeros when the row has none); ``has_mask``: bool tensor; ``prompt``; ``index``.
        """
        row = self.rows[index]
        size = self.bucket_size(index)
        has_mask = "mask" in row.images
        if has_mask:
            mask = self.fitted_mask(row.images["mask"], size)
        else:
            mask = torch.zeros(1, *size)
        return {
            "context": self.fitted_image(row.images["context"], size),
            "target": self.fitted_image(row.images["target"], size),
            "mask": mask,
            "has_mask": torch.tensor(has_mask),
            "prompt": row.prompt,
            "index": index,
        }
