"""The edit data layouts: control folders, musubi-tuner JSON Lines, lists of references."""

import json
import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data.edit_pairs import EDIT_PAIR_FIELDS
from data.edit_sources import ControlFolderRows, MusubiJsonlRows, edit_rows
from data.images import DataError
from data.rows import validated_sizes
from data.text_edits import TEXT_EDIT_FIELDS, TextEditDataset


def write_image(path, size=(32, 24), value=0):
    """An RGB image of ``size`` (W x H) whose pixels all hold ``value`` (its identity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


@pytest.fixture
def folders(tmp_path):
    """ai-toolkit style: targets/ with .txt captions, two control folders, masks/."""
    for i, stem in enumerate(("cat", "dog")):
        write_image(tmp_path / "targets" / f"{stem}.png", value=10 + i)
        (tmp_path / "targets" / f"{stem}.txt").write_text(f"a {stem} in a hat\n")
        write_image(tmp_path / "person" / f"{stem}.jpg", value=20 + i)
        write_image(tmp_path / "product" / f"{stem}.png", size=(16, 16), value=30 + i)
        write_image(tmp_path / "masks" / f"{stem}.png", value=255)
    return tmp_path


def rows_of(folder, **options):
    return ControlFolderRows(
        folder / "targets", [folder / "person", folder / "product"], TEXT_EDIT_FIELDS, **options
    )


def error_of(rows) -> str:
    with pytest.raises(DataError) as caught:
        validated_sizes(rows)
    return str(caught.value)


class TestControlFolders:
    def test_rows_by_stem_in_control_order(self, folders):
        rows = rows_of(folders, mask_dir=folders / "masks")
        assert len(rows) == 2 and validated_sizes(rows) == [(24, 32), (24, 32)]
        row = rows[1]
        assert row.prompt == "a dog in a hat"
        assert [ref.source for ref in row.several(TEXT_EDIT_FIELDS)] == [
            folders / "person" / "dog.jpg",
            folders / "product" / "dog.png",
        ]
        assert row.images["target"].source == folders / "targets" / "dog.png"
        assert row.images["mask"].source == folders / "masks" / "dog.png"

    def test_one_caption_for_all(self, folders):
        (folders / "targets" / "cat.txt").unlink()
        assert rows_of(folders, caption="[trigger] hat")[0].prompt == "[trigger] hat"

    def test_every_fault_in_one_error(self, folders):
        (folders / "person" / "cat.jpg").unlink()
        (folders / "targets" / "dog.txt").unlink()
        write_image(folders / "product" / "bird.png")
        (folders / "masks" / "dog.png").unlink()
        write_image(folders / "targets" / "eel.png")
        (folders / "targets" / "eel.txt").write_text("   ")
        message = error_of(rows_of(folders, mask_dir=folders / "masks"))
        assert "cat.png': no image named 'cat' in" in message and "person' (control 1)" in message
        assert "no caption file 'dog.txt'" in message and "--caption" in message
        assert "image(s) with no target of the same name" in message and "bird" in message
        assert "dog.png': no image named 'dog'" in message and "masks' (masks)" in message
        assert "product' (control 2)" in message and "prompt-less" in message
        assert message.count("\n  - ") == 8  # eel lacks both controls and a mask too

    def test_two_files_of_one_stem_and_missing_folders(self, folders):
        write_image(folders / "person" / "cat.png")
        assert "two images named 'cat'" in error_of(rows_of(folders))
        with pytest.raises(DataError, match=r"not a directory: .*/nowhere' \(control 2\)"):
            ControlFolderRows(folders / "targets", [folders, folders / "nowhere"], TEXT_EDIT_FIELDS)

    def test_references_of_their_own_size_reach_the_dataset(self, folders):
        dataset = TextEditDataset(rows_of(folders, mask_dir=folders / "masks"), resolution=32)
        item = dataset[0]
        assert [r.shape for r in item["references"]] == [(3, 32, 32), (3, 16, 16)]
        # A reference of the target's size is fitted to its bucket; another is kept as it is.
        assert item["target"].shape == (3, 32, 32)
        torch.testing.assert_close(item["references"][1], torch.full((3, 16, 16), 30 / 127.5 - 1))


class TestMusubiJsonl:
    def write(self, root, records):
        path = root / "train.jsonl"
        path.write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in records))
        return path

    def test_numbered_controls_in_order_relative_to_the_file(self, folders):
        path = self.write(
            folders,
            [
                {
                    "image_path": "targets/cat.png",
                    "control_path_1": "product/cat.png",
                    "control_path_0": "person/cat.jpg",
                    "caption": "a cat",
                    "mask_path": "masks/cat.png",
                },
                {"image_path": "targets/dog.png", "control_path": "person/dog.jpg", "caption": "d"},
            ],
        )
        rows = MusubiJsonlRows(path, TEXT_EDIT_FIELDS)
        first, second = rows[0], rows[1]
        assert [r.source.name for r in first.several(TEXT_EDIT_FIELDS)] == ["cat.jpg", "cat.png"]
        assert first.images["mask"].source == folders / "masks" / "cat.png"
        assert len(second.several(TEXT_EDIT_FIELDS)) == 1 and "mask" not in second.images
        assert validated_sizes(rows) == [(24, 32), (24, 32)]

    def test_unknown_keys_are_warned_about_once(self, folders, caplog):
        record = {"image_path": "targets/cat.png", "control_path": "person/cat.jpg"}
        record |= {"caption": "c", "negative": "blurry"}
        path = self.write(folders, [record, record])
        with caplog.at_level(logging.WARNING):
            MusubiJsonlRows(path, TEXT_EDIT_FIELDS)
        warnings = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
        assert len(warnings) == 1 and "'negative' (first on line 1)" in warnings[0]

    def test_every_fault_in_one_error(self, folders):
        path = self.write(
            folders,
            [
                {"image_path": "targets/cat.png", "caption": "no control"},
                {"image_path": "targets/cat.png", "control_path": "gone.png", "caption": "c"},
                {"image_path": "/abs/cat.png", "control_path": "person/cat.jpg", "caption": ""},
                "{broken",
            ],
        )
        message = error_of(MusubiJsonlRows(path, TEXT_EDIT_FIELDS))
        assert "line 1: no 'control_path'" in message
        assert "gone.png" in message and "does not exist" in message
        assert "line 3: 'image_path' '/abs/cat.png' leaves" in message
        assert "line 3: prompt-less row" in message and "line 4: malformed JSON" in message

    def test_missing_file_names_the_layout(self, tmp_path):
        with pytest.raises(DataError, match=r"train.jsonl': file does not exist.*control_path"):
            edit_rows(TEXT_EDIT_FIELDS, train_data_file=str(tmp_path / "train.jsonl"))


class TestMetadataLists:
    def test_a_list_of_contexts_becomes_numbered_references(self, folders):
        record = {
            "context": ["person/cat.jpg", "product/cat.png"],
            "target": "targets/cat.png",
            "prompt": "p",
        }
        (folders / "metadata.jsonl").write_text(json.dumps(record))
        row = edit_rows(TEXT_EDIT_FIELDS, train_data_dir=str(folders))[0]
        assert [r.source.name for r in row.several(TEXT_EDIT_FIELDS)] == ["cat.jpg", "cat.png"]
        assert row.images["context_2"].what.endswith("context[1]")

    def test_a_folder_without_metadata_names_the_other_layouts(self, folders):
        with pytest.raises(DataError, match=r"--control_dirs.*--train_data_file"):
            edit_rows(EDIT_PAIR_FIELDS, train_data_dir=str(folders / "targets"))

    def test_control_folder_flags_without_control_folders(self, folders):
        with pytest.raises(DataError, match="--caption read control folders"):
            edit_rows(EDIT_PAIR_FIELDS, train_data_dir=str(folders), caption="x")

    def test_hf_list_column(self, folders, tmp_path):
        image = datasets.Image()
        table = datasets.Dataset.from_dict(
            {
                "context": [[str(folders / "person/cat.jpg"), str(folders / "product/cat.png")]],
                "target": [str(folders / "targets/cat.png")],
                "prompt": ["p"],
            },
            features=datasets.Features(
                {
                    "context": datasets.Sequence(image),
                    "target": image,
                    "prompt": datasets.Value("string"),
                }
            ),
        )
        table.save_to_disk(tmp_path / "hf")
        dataset = TextEditDataset.from_hf(tmp_path / "hf", resolution=32)
        assert [r.shape for r in dataset[0]["references"]] == [(3, 32, 32), (3, 16, 16)]


class TestBatchGroups:
    def test_items_group_by_bucket_and_reference_grids(self, folders):
        for stem, size in (("eel", (16, 8)), ("fox", (16, 16))):
            write_image(folders / "targets" / f"{stem}.png")
            (folders / "targets" / f"{stem}.txt").write_text(stem)
            write_image(folders / "person" / f"{stem}.jpg")
            write_image(folders / "product" / f"{stem}.png", size=size)
        dataset = TextEditDataset(rows_of(folders), resolution=32)
        # cat, dog: a 16x16 second reference; eel: 16x8; fox: 16x16 again.
        assert dataset.batch_group_of_items == [0, 0, 1, 0]
        by_area = TextEditDataset(
            rows_of(folders), resolution=32, reference_grid=lambda size: size[0] * size[1] > 0
        )
        assert by_area.batch_group_of_items == [0, 0, 0, 0]
        assert np.unique(dataset.bucket_of_items).size == 1
