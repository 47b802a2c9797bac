"""Write edit masks for an instruction-edit folder that has none (no OCR model needed).

    python scripts/make_edit_masks.py my_text_edits [--threshold 24] [--close 3] [--dilate 2]

For every row of ``my_text_edits/metadata.jsonl`` it writes ``text_masks/<target stem>.png``
(0/255, where the target differs from the context) and a preview with the mask tinted over the
target in ``text_masks_preview/``; ``train_qwen_edit_mask.py --data.use_text_mask`` then finds
the masks by their targets' names.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The suite runs from its checkout (its packages are never installed): import them from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from jsonargparse import auto_cli
from PIL import Image
from tqdm.auto import tqdm

from data.edit_masks import change_mask, mask_preview
from data.rows import FolderRows
from data.text_edits import TEXT_EDIT_FIELDS


def main(
    dataset: Path,
    threshold: float = 24.0,
    close: int = 3,
    open_: int = 1,
    dilate: int = 0,
    mask_dir_name: str = "text_masks",
    overwrite: bool = False,
) -> None:
    """Write a mask per row from where its target differs from its context.

    Args:
        dataset: instruction-edit folder (metadata.jsonl of context, target, prompt).
        threshold: RGB distance (0..441) above which a pixel counts as changed.
        close: radius in pixels of the closing that merges the strokes of a word.
        open_: radius of the opening that removes specks.
        dilate: radius of a margin added around the change.
        mask_dir_name: folder of the masks inside the dataset (seed 000's "text_masks").
        overwrite: replace masks that already exist (they are kept otherwise).
    """
    rows = FolderRows(dataset, TEXT_EDIT_FIELDS)
    masks = dataset / mask_dir_name
    previews = dataset / f"{mask_dir_name}_preview"
    masks.mkdir(exist_ok=True)
    previews.mkdir(exist_ok=True)
    written = kept = 0
    for index in tqdm(range(len(rows)), desc="masks"):
        row = rows[index]
        name = f"{Path(row.images['target'].source).stem}.png"
        if (masks / name).exists() and not overwrite:
            kept += 1
            continue
        target = row.images["target"].open("RGB")
        mask = change_mask(
            row.images["context"].open("RGB"),
            target,
            threshold=threshold,
            close=close,
            open_=open_,
            dilate=dilate,
        )
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / name)
        mask_preview(target, mask).save(previews / name)
        written += 1
    print(f"wrote {written} masks to {masks} ({kept} existing kept), previews in {previews}")


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
