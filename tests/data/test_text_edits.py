"""``data.text_edits``: seed 000's masks kept beside the data, found by the target's path."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data.images import DataError
from data.synthetic import write_text_edit_dataset
from data.text_edits import TextEditDataset

SIZE = 32


def two_targets_named_alike(root):
    """A set whose two rows' targets are ``a/sign.png`` and ``b/sign.png``."""
    write_text_edit_dataset(root, n=2, resolution=SIZE, seed=0)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    for row, folder in zip(rows, ("a", "b"), strict=True):
        (root / folder).mkdir()
        shutil.move(root / row["target"], root / folder / "sign.png")
        row["target"] = f"{folder}/sign.png"
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    shutil.rmtree(root / "text_masks")
    (root / "text_masks").mkdir()


def mask(root, relative, top):
    path = root / "text_masks" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((SIZE, SIZE), np.uint8)
    pixels[top : top + 8] = 255
    Image.fromarray(pixels).save(path)


def read(root):
    return TextEditDataset.from_folder(root, resolution=SIZE, use_text_mask=True)


def test_masks_by_the_targets_path(tmp_path):
    two_targets_named_alike(tmp_path)
    mask(tmp_path, "a/sign.png", top=0)
    mask(tmp_path, "b/sign.png", top=16)
    dataset = read(tmp_path)
    assert dataset[0]["mask"][0, :8].all() and not dataset[0]["mask"][0, 16:].any()
    assert dataset[1]["mask"][0, 16:24].all() and not dataset[1]["mask"][0, :8].any()


def test_a_stem_shared_by_two_targets_is_refused_naming_them(tmp_path):
    two_targets_named_alike(tmp_path)
    mask(tmp_path, "sign.png", top=0)
    with pytest.raises(DataError, match=r"could be any of the targets named 'sign' \(a/sign"):
        read(tmp_path)


def test_a_unique_stem_still_finds_its_mask(tmp_path):
    write_text_edit_dataset(tmp_path, n=2, resolution=SIZE, seed=0)  # text_masks/<stem>.png
    assert read(tmp_path)[0]["has_mask"]
