"""The bad-input matrix: every kind of broken or unusual input each script's data can hold, and
what happens (a clear error naming the file and the fix, or a documented handling).

``docs/reliability.md`` lists the same cases with these tests' names.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_flux_fill as fill
import train_kontext_lora as kontext
import train_qwen_edit_mask as qwen
import train_sd15_inpaint as sd15
from data.edit_pairs import EditPairDataset
from data.images import DataError
from data.inpainting import InpaintingDataset
from data.multispectral import MultispectralDataset, band_statistics
from data.synthetic import (
    write_inpainting_dataset,
    write_kontext_dataset,
    write_multispectral_dataset,
    write_text_edit_dataset,
)
from data.text_edits import TextEditDataset
from training.config import parse_config

SIZE = 64
BASE = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]

# Each data kind: (writer, reader, the image field of its first row, the mask file of row 0).
KINDS = {
    "kontext": (
        write_kontext_dataset,
        lambda root: EditPairDataset.from_folder(root, resolution=SIZE),
        "context",
        "masks/0000.png",
    ),
    "qwen-edit": (
        write_text_edit_dataset,
        lambda root: TextEditDataset.from_folder(root, resolution=SIZE, use_text_mask=True),
        "context",
        "text_masks/0000_target.png",
    ),
    "inpainting": (
        write_inpainting_dataset,
        lambda root: InpaintingDataset.from_folder(root, resolution=SIZE),
        "image",
        "masks/0000.png",
    ),
}


def write(kind: str, root: Path, n: int = 2) -> dict:
    KINDS[kind][0](root, n=n, resolution=SIZE, seed=0)
    return json.loads((root / "metadata.jsonl").read_text().splitlines()[0])


def read(kind: str, root: Path):
    return KINDS[kind][1](root)


@pytest.mark.parametrize("kind", list(KINDS))
class TestImages:
    def test_unreadable_image(self, kind, tmp_path):
        row = write(kind, tmp_path)
        (tmp_path / row[KINDS[kind][2]]).write_text("not an image")
        with pytest.raises(DataError, match=r"0000.*\.png'?: cannot be read as an image"):
            read(kind, tmp_path)

    def test_truncated_image_fails_on_read_naming_the_file(self, kind, tmp_path):
        """The header is intact, so the data set builds; the first read of the item (when the
        cache is filled, or at its first step without --cache_latents) names the file."""
        row = write(kind, tmp_path)
        path = tmp_path / row[KINDS[kind][2]]
        path.write_bytes(path.read_bytes()[:200])
        dataset = read(kind, tmp_path)
        with pytest.raises(
            DataError, match=re.escape(f"{path}': image data is corrupt or truncated")
        ):
            dataset[0]

    @pytest.mark.parametrize("where", ["parent", "absolute"])
    def test_a_path_leaving_the_data_folder_is_refused_unless_allowed(self, kind, tmp_path, where):
        root = tmp_path / "data"
        row = write(kind, root)
        field = KINDS[kind][2]
        outside = tmp_path / "elsewhere.png"
        (root / row[field]).rename(outside)
        rows = (root / "metadata.jsonl").read_text().splitlines()
        value = "../elsewhere.png" if where == "parent" else str(outside)
        rows[0] = json.dumps({**row, field: value})
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
        with pytest.raises(DataError, match=r"line 1: '\w+' .* leaves the data folder; pass"):
            read(kind, root)
        dataset = {
            "kontext": EditPairDataset,
            "qwen-edit": TextEditDataset,
            "inpainting": InpaintingDataset,
        }[kind].from_folder(root, resolution=SIZE, allow_paths_outside=True)
        assert dataset[0][field].shape[0] == 3

    def test_mask_of_another_size(self, kind, tmp_path):
        write(kind, tmp_path)
        Image.new("L", (20, 12)).save(tmp_path / KINDS[kind][3])
        with pytest.raises(DataError, match=r"size 20x12 differs"):
            read(kind, tmp_path)

    def test_grey_mask_levels_are_thresholded_at_half(self, kind, tmp_path):
        write(kind, tmp_path)
        grey = np.tile(np.array([0, 100, 127, 128, 200, 255], np.uint8), (SIZE, 11))[:, :SIZE]
        Image.fromarray(grey).save(tmp_path / KINDS[kind][3])
        mask = read(kind, tmp_path)[0]["mask"][0]
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(mask, torch.from_numpy(grey > 127.5).float())

    @pytest.mark.parametrize(
        "stored",
        ["0/1 8-bit", "0/1 16-bit", "0/255 16-bit", "alpha"],
    )
    def test_masks_are_read_as_users_store_them(self, kind, tmp_path, stored):
        write(kind, tmp_path)
        inside = np.zeros((SIZE, SIZE), bool)
        inside[16:48, 8:40] = True
        levels = {
            "0/1 8-bit": inside.astype(np.uint8),
            "0/1 16-bit": inside.astype(np.uint16),
            "0/255 16-bit": inside.astype(np.uint16) * 255,
            "alpha": np.dstack([np.zeros((SIZE, SIZE, 3)), inside * 255]).astype(np.uint8),
        }
        Image.fromarray(levels[stored]).save(tmp_path / KINDS[kind][3])
        mask = read(kind, tmp_path)[0]["mask"][0]
        assert torch.equal(mask, torch.from_numpy(inside).float())

    @pytest.mark.parametrize("value,what", [(0, "empty"), (255, "full")])
    def test_a_data_set_whose_masks_are_all_empty_or_all_full_warns(
        self, kind, tmp_path, caplog, value, what
    ):
        write(kind, tmp_path, n=3)
        rows = (tmp_path / "metadata.jsonl").read_text().splitlines()
        masks = [json.loads(line).get("mask") for line in rows]
        for index, name in enumerate(masks):
            mask = tmp_path / (name or f"text_masks/{index:04d}_target.png")
            Image.new("L", Image.open(mask).size, value).save(mask)
        read(kind, tmp_path)
        assert f"all 3 masks checked are {what}" in caplog.text
        caplog.clear()
        Image.new("L", Image.open(tmp_path / KINDS[kind][3]).size, 255 - value).save(
            tmp_path / KINDS[kind][3]
        )
        read(kind, tmp_path)
        assert "masks checked are" not in caplog.text

    @pytest.mark.parametrize("value", [0, 255])
    def test_empty_and_full_masks_are_items(self, kind, tmp_path, value):
        write(kind, tmp_path)
        Image.new("L", (SIZE, SIZE), value).save(tmp_path / KINDS[kind][3])
        assert read(kind, tmp_path)[0]["mask"].mean() == value / 255

    @pytest.mark.parametrize("size", [(24, 40), (50, 70)])
    def test_small_or_odd_sized_images_fill_their_bucket(self, kind, tmp_path, size):
        """Smaller than --resolution, or sides not multiples of 16: scaled to cover the nearest
        bucket (multiples of 16, about --resolution² pixels) and centre-cropped."""
        row = write(kind, tmp_path, n=1)
        for field in ("context", "target", "image"):
            if field in row:
                Image.new("RGB", size[::-1], (10, 20, 30)).save(tmp_path / row[field])
        Image.new("L", size[::-1], 255).save(tmp_path / KINDS[kind][3])
        item = read(kind, tmp_path)[0]
        height, width = item["mask"].shape[-2:]
        assert height % 16 == 0 and width % 16 == 0
        assert abs(height * width - SIZE**2) <= 16 * max(height, width)
        assert item["mask"].min() == 1

    def test_prompt_less_row(self, kind, tmp_path):
        write(kind, tmp_path)
        rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
        rows[1]["prompt"] = " "
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=r"line 2: prompt-less row"):
            read(kind, tmp_path)

    def test_duplicate_rows_are_trained_as_listed_with_a_warning(self, kind, tmp_path, caplog):
        write(kind, tmp_path)
        lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
        (tmp_path / "metadata.jsonl").write_text("\n".join([*lines, lines[0]]) + "\n")
        with caplog.at_level(logging.WARNING):
            dataset = read(kind, tmp_path)
        assert len(dataset) == 3
        assert "1 row(s) repeat an earlier row (rows 0 and 2)" in caplog.text


class TestImageModes:
    """CMYK, 16-bit, palette and EXIF-rotated files read as the RGB image they show."""

    @pytest.fixture
    def folder(self, tmp_path):
        row = write("inpainting", tmp_path, n=1)
        return tmp_path, tmp_path / row["image"]

    def rgb(self, root):
        return read("inpainting", root)[0]["image"]

    def test_cmyk_and_palette(self, folder):
        root, path = folder
        expected = self.rgb(root)
        rgb = Image.open(path).convert("RGB")
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(path)
        palette = self.rgb(root)
        assert (palette - expected).abs().max() < 0.25  # 256 colours of a smooth image
        rgb.save(path.with_suffix(".jpg"))
        Image.open(path.with_suffix(".jpg")).convert("CMYK").save(path.with_suffix(".tiff"))
        cmyk = Image.open(path.with_suffix(".tiff"))
        assert cmyk.mode == "CMYK"
        cmyk.save(path, format="TIFF")  # a CMYK file under the row's name
        assert (self.rgb(root) - expected).abs().mean() < 0.1

    def test_sixteen_bit_grey_is_scaled_not_clipped(self, folder):
        root, path = folder
        ramp = np.linspace(0, 65535, SIZE * SIZE).reshape(SIZE, SIZE).astype(np.uint16)
        Image.fromarray(ramp).save(path)
        assert Image.open(path).mode == "I;16"
        image = self.rgb(root)
        expected = torch.from_numpy(np.rint(ramp / 257).astype(np.float32) / 127.5 - 1)
        torch.testing.assert_close(image[0], expected, rtol=0, atol=1e-6)
        assert torch.equal(image[0], image[2])  # grey

    def test_exif_rotation_is_applied_to_image_and_size(self, folder):
        root, path = folder
        tall = Image.new("RGB", (SIZE, SIZE * 2), (200, 0, 0))
        tall.paste((0, 0, 200), (0, 0, SIZE, SIZE))  # top half blue as stored
        exif = Image.Exif()
        exif[0x0112] = 6  # shown rotated 90 degrees clockwise: wide, blue on the right
        tall.save(path, exif=exif)
        Image.new("L", (SIZE * 2, SIZE), 255).save(root / "masks" / "0000.png")
        image = self.rgb(root)
        assert image.shape[-1] > image.shape[-2]  # as displayed: wider than tall
        assert image[2, :, -1].mean() > 0.5 and image[0, :, 0].mean() > 0.5


class TestPrecomputedAndMultispectral:
    def test_nan_band_names_the_file_and_the_fix(self, tmp_path):
        tifffile = pytest.importorskip("tifffile")
        write_multispectral_dataset(tmp_path, n=2, resolution=32, seed=0)
        image = sorted((tmp_path / "images").iterdir())[0]
        if image.suffix == ".tif":
            cube = tifffile.imread(image).astype(np.float32)
            cube[2] = np.nan
            tifffile.imwrite(image, cube)
        else:  # a folder of band PNGs cannot hold NaN: use a TIFF for this image
            cube = np.stack(
                [np.asarray(Image.open(p), np.float32) for p in sorted(image.iterdir())]
            )
            cube[2] = np.nan
            for band in image.iterdir():
                band.unlink()
            image.rmdir()
            image = image.with_suffix(".tif")
            tifffile.imwrite(image, cube)
        dataset = MultispectralDataset.from_folder(tmp_path, resolution=32)
        with pytest.raises(
            DataError, match=rf"{re.escape(image.name)}': band\(s\) \[2\] hold no finite"
        ):
            band_statistics(dataset)


@pytest.mark.parametrize(
    "script,argv,message",
    [
        (kontext.KontextConfig, ["--no_such_flag", "1"], "no_such_flag"),
        (qwen.QwenEditConfig, ["--mask_loss.weight", "heavy"], "mask_loss.weight"),
        (fill.FillConfig, ["--resolution", "100"], "--resolution must be a multiple of 16"),
        (sd15.SD15InpaintConfig, ["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
        # Values that used to train on nonsense (a loss of 0 or below, a no-op LoRA).
        (sd15.SD15InpaintConfig, ["--snr_gamma", "0"], "--snr_gamma must be > 0"),
        (sd15.SD15InpaintConfig, ["--snr_gamma", "-5"], "--snr_gamma must be > 0"),
        (kontext.KontextConfig, ["--dice_weight", "-1"], "--dice_weight must be >= 0"),
        (qwen.QwenEditConfig, ["--timestep_shift", "0"], "--timestep_shift must be > 0"),
        (fill.FillConfig, ["--max_sequence_length", "0"], "--max_sequence_length must be >= 1"),
    ],
)
def test_bad_flags_name_the_flag(script, argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_config(
            script, ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *argv]
        )
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_config_file_with_an_unknown_key_names_it(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("resolution: 64\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        parse_config(
            kontext.KontextConfig,
            [
                "--config",
                str(path),
                "--pretrained_model_name_or_path",
                "m",
                "--train_data_dir",
                "d",
            ],
        )
    assert "learning_rat" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, 255])
def test_kontext_losses_stay_finite_on_empty_and_full_masks(tmp_path, value):
    """Every geometry and embedding term is defined for a mask covering nothing or everything
    (the guards of `losses`), so such a row trains instead of poisoning the run with NaN."""
    from diffusers import FluxKontextPipeline

    from data.rows import collate_items
    from worlds.tiny_models import tiny_flux_kontext_pipeline

    write("kontext", tmp_path)
    Image.new("L", (SIZE, SIZE), value).save(tmp_path / "masks" / "0000.png")
    tiny_flux_kontext_pipeline(seed=0).save_pretrained(tmp_path / "model")
    pipe = FluxKontextPipeline.from_pretrained(tmp_path / "model")
    config = kontext.KontextConfig(
        pretrained_model_name_or_path=str(tmp_path / "model"),
        train_data_dir=str(tmp_path),
        resolution=SIZE,
        geometry_match_weight=0.5,
    )
    loss_fn = kontext.KontextLoss(
        pipe, config, kontext.KontextEncoder(pipe, config, None), None, False
    )
    batch = collate_items([read("kontext", tmp_path)[0]])
    with torch.no_grad():
        loss, parts = loss_fn(pipe.transformer, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
