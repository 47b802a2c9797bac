"""Multispectral readers, leaf masks, the dataset, normalisation statistics, synthetic set."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import data.multispectral as multispectral
from data.images import DataError
from data.multispectral import (
    LEAF_SPECTRA,
    REFLECTANCE_SCALE,
    LeafImage,
    MultispectralDataset,
    band_statistics,
    crop_or_pad,
    find_leaf_images,
    parse_bands,
    synthetic_size,
    write_multispectral_dataset,
)
from data.synthetic import write_synthetic_dataset

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_synthetic_data.py"


def cube(bands: int = 5, height: int = 6, width: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 5000, (bands, height, width)).astype(np.float32)


def write_mask(path: Path, leaf: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(leaf.astype(np.uint8) * 255).save(path)
    return path


def write_band_folder(folder: Path, pixels: np.ndarray, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for band, name in zip(pixels, names, strict=True):
        Image.fromarray(band.astype(np.uint16)).save(folder / name)
    return folder


class TestParseBands:
    def test_values(self):
        assert parse_bands("9,18,32,42,55") == (9, 18, 32, 42, 55)
        assert parse_bands(" 3 , 0 ") == (3, 0)
        assert parse_bands(None) is None and parse_bands("") is None

    @pytest.mark.parametrize("text", ["1,-2", "a,b", "1.5", "1,,2", "2,2"])
    def test_bad_values(self, text):
        with pytest.raises(ValueError, match="--bands"):
            parse_bands(text)


class TestReaders:
    @pytest.mark.parametrize("layout", ["planar", "interleaved"])
    def test_tiff_layouts_give_bands_first(self, tmp_path, layout):
        pixels = cube()
        path = tmp_path / "leaf.tif"
        if layout == "planar":  # one page per band: axes QYX
            tifffile.imwrite(path, pixels, photometric="minisblack")
        else:  # samples per pixel: axes YXS
            tifffile.imwrite(
                path, np.moveaxis(pixels, 0, -1), photometric="minisblack", planarconfig="contig"
            )
        image = LeafImage(path)
        assert image.header() == (5, 6, 7)
        assert np.array_equal(image.read(), pixels)
        assert np.array_equal(image.read([4, 0, 2]), pixels[[4, 0, 2]])

    def test_single_band_tiff(self, tmp_path):
        pixels = cube()[0]
        tifffile.imwrite(tmp_path / "one.tif", pixels)
        assert LeafImage(tmp_path / "one.tif").header() == (1, 6, 7)
        assert np.array_equal(LeafImage(tmp_path / "one.tif").read(), pixels[None])

    def test_png_band_folder_in_natural_order_keeps_16_bit_values(self, tmp_path):
        pixels = np.stack([np.full((4, 5), value) for value in (1, 2, 3, 65535)])
        folder = write_band_folder(
            tmp_path / "leaf", pixels, ["b_10.png", "b_2.png", "b_1.png", "b_3.png"]
        )
        image = LeafImage(folder)
        assert image.header() == (4, 4, 5)
        # Natural order: b_1, b_2, b_3, b_10.
        assert image.read()[:, 0, 0].tolist() == [3, 2, 65535, 1]
        assert image.read([3]).dtype == np.float32

    def test_leaf_is_the_mask_where_every_band_is_finite(self, tmp_path):
        pixels = cube(height=4, width=4)
        pixels[2, 0, 0] = np.nan  # no-data inside the drawn mask
        pixels[0, 3, 3] = np.nan  # and outside it
        tifffile.imwrite(tmp_path / "leaf.tif", pixels, photometric="minisblack")
        drawn = np.zeros((4, 4), bool)
        drawn[:2, :2] = True
        masked = LeafImage(tmp_path / "leaf.tif", write_mask(tmp_path / "leaf.png", drawn))
        expected = drawn.copy()
        expected[0, 0] = False
        assert np.array_equal(masked.leaf(masked.read()), expected)
        unmasked = LeafImage(tmp_path / "leaf.tif")
        finite = np.ones((4, 4), bool)
        finite[0, 0] = finite[3, 3] = False
        assert np.array_equal(unmasked.leaf(unmasked.read()), finite)


class TestCropOrPad:
    def test_crop_is_centred_and_pad_is_no_data(self):
        pixels = np.arange(2 * 3 * 6, dtype=np.float32).reshape(2, 3, 6)
        leaf = np.ones((3, 6), bool)
        out, out_leaf = crop_or_pad(pixels, leaf, 4)
        # Rows 0..2 padded into 0..3 starting at row 0 ((4 - 3) // 2 = 0); columns 1..4 kept.
        assert np.array_equal(out[:, :3], pixels[:, :, 1:5])
        assert np.isnan(out[:, 3]).all()
        assert np.array_equal(out_leaf, np.array([[True] * 4] * 3 + [[False] * 4]))


def dataset_folder(root: Path) -> Path:
    """Two 5-band images: a TIFF with a mask, a PNG band folder without one."""
    pixels = cube(height=8, width=8)
    (root / "images").mkdir(parents=True)
    tifffile.imwrite(root / "images" / "a.tif", pixels, photometric="minisblack")
    leaf = np.zeros((8, 8), bool)
    leaf[2:6, 2:6] = True
    write_mask(root / "masks" / "a.png", leaf)
    write_band_folder(root / "images" / "b", pixels, [f"band_{i}.png" for i in range(5)])
    return root


class TestDataset:
    def test_folder_items(self, tmp_path):
        root = dataset_folder(tmp_path)
        images = find_leaf_images(root)
        assert [(i.image.name, i.mask and i.mask.name) for i in images] == [
            ("a.tif", "a.png"),
            ("b", None),
        ]
        dataset = MultispectralDataset(images, resolution=16, bands=[1, 3])
        assert len(dataset) == 2 and dataset.num_bands == 2 and dataset.bucket_of_items == [0, 0]
        item = dataset[0]
        assert item["image"].shape == (2, 16, 16) and item["mask"].shape == (1, 16, 16)
        assert item["mask"].sum() == 16 and item["index"] == 0
        assert np.array_equal(item["image"][:, 4:12, 4:12].numpy(), cube(height=8, width=8)[[1, 3]])
        assert dataset[1]["mask"].sum() == 64  # no mask file: every finite pixel

    @pytest.mark.parametrize(
        "problem,expected",
        [
            ("missing_folder", r"no images/ folder"),
            ("stray", r"'[^']*notes\.txt' are neither TIFF files"),
            ("unreadable", r"'[^']*a\.tif': cannot be read as a TIFF"),
            ("mask_size", r"mask '[^']*a\.png': size 3x3 differs from image '[^']*a\.tif'"),
            ("band_index", r"'[^']*a\.tif': has 5 bands; --bands asks for band 7"),
            ("band_count", r"'[^']*b': has 4 bands, but '[^']*a\.tif' has 5"),
            ("rgb_band", r"'[^']*band_0\.png': a band must be single-channel, got mode RGB"),
            ("empty_band_folder", r"'[^']*b': a band folder without PNG files"),
        ],
    )
    def test_one_clear_error_naming_the_file(self, tmp_path, problem, expected):
        root = dataset_folder(tmp_path / "set")
        bands = None
        if problem == "missing_folder":
            root = tmp_path
        elif problem == "stray":
            (root / "images" / "notes.txt").write_text("x")
        elif problem == "unreadable":
            (root / "images" / "a.tif").write_bytes(b"not a tiff")
        elif problem == "mask_size":
            write_mask(root / "masks" / "a.png", np.ones((3, 3), bool))
        elif problem == "band_index":
            bands = "0,7"
        elif problem == "band_count":
            (root / "images" / "b" / "band_4.png").unlink()
        elif problem == "rgb_band":
            Image.new("RGB", (8, 8)).save(root / "images" / "b" / "band_0.png")
        else:
            for band in (root / "images" / "b").iterdir():
                band.unlink()
        with pytest.raises(DataError, match=expected):
            MultispectralDataset.from_folder(root, resolution=16, bands=parse_bands(bands))

    def test_every_bad_image_is_listed_in_one_error(self, tmp_path):
        root = dataset_folder(tmp_path)
        (root / "images" / "a.tif").write_bytes(b"not a tiff")
        (root / "images" / "b" / "band_2.png").write_bytes(b"broken")
        with pytest.raises(DataError) as raised:
            MultispectralDataset.from_folder(root, resolution=16)
        assert "a.tif" in str(raised.value) and "band_2.png" in str(raised.value)

    def test_truncated_tiff_data_names_the_file(self, tmp_path):
        path = tmp_path / "images" / "cut.tif"
        path.parent.mkdir()
        tifffile.imwrite(path, cube(height=64, width=64), photometric="minisblack")
        path.write_bytes(path.read_bytes()[:2000])
        image = LeafImage(path)
        assert image.header() == (5, 64, 64)
        with pytest.raises(DataError, match=r"'[^']*cut\.tif': TIFF data cannot be read"):
            image.read()


def constant_leaf_set(root: Path, values: list[np.ndarray]) -> MultispectralDataset:
    """Images of 3 bands whose leaf pixels hold ``values`` (band b: value * (b + 1)) and whose
    background is 1e6 (mask) or NaN (no mask)."""
    (root / "images").mkdir(parents=True)
    for index, leaf_values in enumerate(values):
        pixels = np.full((3, 8, 8), 1e6, dtype=np.float32)
        leaf = np.zeros((8, 8), bool)
        leaf.flat[: len(leaf_values)] = True
        for band in range(3):
            pixels[band][leaf] = leaf_values * (band + 1)
        if index % 2:
            pixels[:, ~leaf] = np.nan
        else:
            write_mask(root / "masks" / f"{index}.png", leaf)
        tifffile.imwrite(root / "images" / f"{index}.tif", pixels, photometric="minisblack")
    return MultispectralDataset.from_folder(root, resolution=8)


class TestBandStatistics:
    def test_percentiles_and_range_over_leaf_pixels_only(self, tmp_path):
        values = [np.arange(0, 40, dtype=np.float32), np.arange(40, 64, dtype=np.float32)]
        stats = band_statistics(constant_leaf_set(tmp_path, values), 10, 90)
        pooled = np.concatenate(values).astype(np.float64)
        low, high = np.percentile(pooled, [10, 90])
        assert stats.low == pytest.approx([low, 2 * low, 3 * low], rel=1e-12)
        assert stats.high == pytest.approx([high, 2 * high, 3 * high], rel=1e-12)
        assert stats.minimum == [0.0, 0.0, 0.0] and stats.maximum == [63.0, 126.0, 189.0]

    def test_subsample_is_fixed_and_drawn_from_the_leaf(self, tmp_path, monkeypatch):
        dataset = constant_leaf_set(tmp_path, [np.arange(64, dtype=np.float32)] * 2)
        monkeypatch.setattr(multispectral, "STATISTICS_PIXELS_PER_IMAGE", 16)
        first, second = band_statistics(dataset, 0, 100), band_statistics(dataset, 0, 100)
        assert first == second
        assert first.minimum == [0.0, 0.0, 0.0] and first.maximum == [63.0, 126.0, 189.0]
        assert 0 <= first.low[0] < first.high[0] <= 63

    def test_flat_band_and_no_leaf_are_errors(self, tmp_path):
        flat = constant_leaf_set(tmp_path / "flat", [np.zeros(10, dtype=np.float32)])
        with pytest.raises(DataError, match=r"bands \[0, 1, 2\] have no spread"):
            band_statistics(flat)
        empty = constant_leaf_set(tmp_path / "empty", [np.zeros(0, dtype=np.float32)])
        with pytest.raises(DataError, match="no leaf pixels"):
            band_statistics(empty)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("leaves")
    write_multispectral_dataset(root, n=6, resolution=32, seed=5)
    return root


def spectral_angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return math.degrees(math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))


class TestSyntheticSet:
    def test_layout_formats_and_sizes(self, synthetic):
        names = sorted(p.name for p in (synthetic / "images").iterdir())
        assert names == ["0000.tif", "0001", "0002.tif", "0003.tif", "0004", "0005.tif"]
        assert sorted(p.name for p in (synthetic / "masks").iterdir()) == [
            "0000.png",
            "0001.png",
            "0003.png",
            "0004.png",
        ]
        for index, image in enumerate(find_leaf_images(synthetic)):
            assert image.header() == (5, *synthetic_size(index, 32))
        band = Image.open(synthetic / "images" / "0001" / "band_5_nir.png")
        assert band.mode == "I;16"

    def test_no_data_only_off_the_leaf_and_leaf_spectra_are_plausible(self, synthetic):
        dataset = MultispectralDataset.from_folder(synthetic, resolution=32)
        for index, image in enumerate(dataset.images):
            pixels = image.read()
            leaf = image.leaf(pixels)
            assert np.isnan(pixels).any() == (index % 3 == 2)
            assert np.isfinite(pixels[:, leaf]).all()
            coverage = dataset[index]["mask"].mean().item()
            assert 0.1 < coverage < 0.6  # inside the seed's warning thresholds
            nir, red = pixels[4][leaf].mean(), pixels[2][leaf].mean()
            assert nir > 1.5 * red  # vegetation: NIR well above red
            assert pixels[:, leaf].max() <= REFLECTANCE_SCALE

    def test_leaf_classes_differ_in_spectral_angle(self):
        spectra = list(LEAF_SPECTRA.values())
        angles = [spectral_angle(a, b) for i, a in enumerate(spectra) for b in spectra[i + 1 :]]
        assert min(angles) > 3

    def test_same_seed_same_files_and_no_overwrite(self, synthetic, tmp_path):
        write_synthetic_dataset("multispectral", tmp_path / "again", n=6, resolution=32, seed=5)
        for path in synthetic.rglob("*.*"):
            copy = tmp_path / "again" / path.relative_to(synthetic)
            assert copy.read_bytes() == path.read_bytes(), path
        with pytest.raises(FileExistsError, match="already exists"):
            write_multispectral_dataset(tmp_path / "again", n=1, resolution=32)

    def test_script_writes_the_family(self, tmp_path):
        result = subprocess.run(
            [
                *(sys.executable, str(SCRIPT), "--family", "multispectral"),
                *("--out", str(tmp_path), "--n", "2", "--resolution", "16"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "wrote 2 multispectral examples" in result.stdout
        assert len(find_leaf_images(tmp_path)) == 2
