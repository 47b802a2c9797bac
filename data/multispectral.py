"""Multispectral leaf images: readers, leaf masks, a dataset, normalisation statistics and a
synthetic set.

A dataset folder holds ``images/`` and, optionally, ``masks/``::

    images/leaf_001.tif        a multi-band TIFF: [bands, H, W] or [H, W, bands] (tifffile)
    images/leaf_002/           a folder of single-band PNGs (8 or 16 bit), one per band, in
        band_01.png ...        natural name order (band_2 before band_10)
    masks/leaf_001.png         optional, same stem: white (> 127.5) = leaf

Without a mask file, the leaf is every pixel that is finite in every band (NaN is no-data); with
one, the leaf is the mask's white pixels that are finite in every band. Values are kept in the
file's units (reflectance, or digital numbers): per-image min-max scaling would destroy absolute
reflectance and band ratios, so normalisation is per band over the whole training set
(:func:`band_statistics`) and lives in the model.

Images are centre-cropped or padded (with no-data: NaN, background) to ``resolution`` square,
never resampled, so every pixel keeps its measured spectrum.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.images import DataError, check_pixels, image_size, mask_to_tensor, open_mask

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "F")
MAX_REPORTED_PROBLEMS = 20
# Leaf pixels per image drawn for the percentiles; a fixed-seed subsample keeps the statistics
# of large sets cheap and identical on every rank.
STATISTICS_PIXELS_PER_IMAGE = 65536


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """``"9,18,32"`` -> ``(9, 18, 32)`` (bands count from 0); None or empty -> None (every band).

    Raises:
        ValueError: a value that is not a non-negative integer, or a repeated band.
    """
    if text is None or not str(text).strip():
        return None
    values = [value.strip() for value in str(text).split(",")]
    if not all(value.isdigit() for value in values):
        raise ValueError(f"--bands must be comma-separated band indices from 0, got {text!r}")
    bands = tuple(int(value) for value in values)
    if len(set(bands)) != len(bands):
        raise ValueError(f"--bands repeats a band: {text!r}")
    return bands


def _tifffile():
    try:
        import tifffile
    except ImportError as error:
        raise ImportError(
            "reading multi-band TIFFs needs tifffile: pip install 'maskloom[multispectral]'"
        ) from error
    return tifffile


def _natural_key(path: Path) -> list:
    """Sort key reading digit runs as numbers: band_2 before band_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _tiff_layout(path: Path) -> tuple[int, int, int, str]:
    """``(bands, height, width, axes)`` of a TIFF's first series, from its header.

    The band axis is the one axis besides Y and X longer than 1 (none: one band).

    Raises:
        DataError: naming the file: unreadable, or not exactly one band axis besides Y and X.
    """
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            shape, axes = tuple(series.shape), series.axes
    except (OSError, ValueError, IndexError) as error:
        raise DataError(f"'{path}': cannot be read as a TIFF ({error})") from error
    others = [i for i, axis in enumerate(axes) if axis not in "YX" and shape[i] > 1]
    if "Y" not in axes or "X" not in axes or len(others) > 1:
        raise DataError(
            f"'{path}': expected Y, X and at most one band axis, got axes {axes} shape {shape}"
        )
    bands = shape[others[0]] if others else 1
    return bands, shape[axes.index("Y")], shape[axes.index("X")], axes


def _as_cube(pixels: np.ndarray, axes: str) -> np.ndarray:
    """A TIFF series' array with axes ``axes`` (e.g. ``QYX``, ``YXS``) as ``[bands, H, W]``."""
    band = [i for i, axis in enumerate(axes) if axis not in "YX" and pixels.shape[i] > 1]
    order = [*band, axes.index("Y"), axes.index("X")]
    height, width = pixels.shape[order[-2]], pixels.shape[order[-1]]
    # The axes left over all have length 1, so moving them last and reshaping drops them.
    return np.moveaxis(pixels, order, range(len(order))).reshape(-1, height, width)


def _png_band_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() == ".png"), key=_natural_key)


def _read_png_band(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as band:
            return np.asarray(band).astype(np.float32)
    except (OSError, ValueError) as error:
        raise DataError(f"'{path}': image data is corrupt or truncated ({error})") from error


@dataclass(frozen=True)
class LeafImage:
    """One multispectral image on disk, ``image`` (a TIFF file or a folder of single-band PNGs),
    and its optional leaf ``mask`` PNG."""

    image: Path
    mask: Path | None = None

    def header(self) -> tuple[int, int, int]:
        """``(bands, height, width)`` from the files' headers.

        Raises:
            DataError: naming the file: missing, unreadable, PNG bands that are not single-band
                or differ in size, or a mask of another size.
        """
        if not self.image.exists():
            raise DataError(f"'{self.image}': does not exist")
        if self.image.is_dir():
            bands, height, width = self._png_header()
        else:
            bands, height, width, _ = _tiff_layout(self.image)
        check_pixels(f"'{self.image}'", width, height, bands)
        if self.mask is not None:
            mask_height, mask_width = image_size(self.mask, "mask")
            if (mask_height, mask_width) != (height, width):
                raise DataError(
                    f"mask '{self.mask}': size {mask_width}x{mask_height} differs from image "
                    f"'{self.image}' size {width}x{height} (width x height)"
                )
        return bands, height, width

    def _png_header(self) -> tuple[int, int, int]:
        files = _png_band_files(self.image)
        if not files:
            raise DataError(f"'{self.image}': a band folder without PNG files")
        sizes = set()
        for path in files:
            try:
                with Image.open(path) as band:
                    mode, size = band.mode, band.size
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise DataError(f"'{path}': cannot be read as an image ({error})") from error
            if mode not in PNG_MODES:
                raise DataError(f"'{path}': a band must be single-channel, got mode {mode}")
            sizes.add(size)
        if len(sizes) > 1:
            raise DataError(f"'{self.image}': its band PNGs differ in size: {sorted(sizes)}")
        width, height = sizes.pop()
        return len(files), height, width

    def read(self, bands: Sequence[int] | None = None) -> np.ndarray:
        """The pixels ``[N, H, W]`` float32 in the file's units; ``bands`` picks (from 0).

        Raises:
            DataError: naming the file, when its data cannot be read.
        """
        if self.image.is_dir():
            files = _png_band_files(self.image)
            chosen = files if bands is None else [files[band] for band in bands]
            return np.stack([_read_png_band(path) for path in chosen])
        *_, axes = _tiff_layout(self.image)
        try:
            cube = _as_cube(_tifffile().imread(self.image), axes)
        except (OSError, ValueError) as error:
            raise DataError(f"'{self.image}': TIFF data cannot be read ({error})") from error
        return (cube if bands is None else cube[list(bands)]).astype(np.float32)

    def leaf(self, pixels: np.ndarray) -> np.ndarray:
        """``[H, W]`` bool: the mask's white pixels (every pixel without a mask file) where all
        bands of ``pixels: [N, H, W]`` are finite."""
        finite = np.isfinite(pixels).all(axis=0)
        if self.mask is None:
            return finite
        return mask_to_tensor(open_mask(self.mask, "mask"))[0].numpy().astype(bool) & finite


def find_leaf_images(root: str | Path) -> list[LeafImage]:
    """Every image in ``root/images`` (TIFF files and band folders, sorted by name) with its
    mask ``root/masks/<stem>.png`` where that exists.

    Raises:
        DataError: ``root/images`` is missing, holds no image, or holds a file that is neither
            a TIFF nor a band folder.
    """
    folder = Path(root) / "images"
    if not folder.is_dir():
        raise DataError(f"'{root}': no images/ folder (see the layout in data/multispectral.py)")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    strays = [f"'{p}'" for p in entries if not p.is_dir() and p.suffix.lower() not in TIFF_SUFFIXES]
    if strays:
        raise DataError(
            f"'{folder}': {', '.join(strays)} are neither TIFF files (.tif, .tiff) nor folders "
            "of band PNGs"
        )
    if not entries:
        raise DataError(f"'{folder}': no images")
    images = []
    for path in entries:
        mask = Path(root) / "masks" / f"{path.stem if path.is_file() else path.name}.png"
        images.append(LeafImage(path, mask if mask.is_file() else None))
    return images


def _validated_band_count(images: Sequence[LeafImage], bands: Sequence[int] | None) -> int:
    """The band count every item will have; one :class:`DataError` listing each bad image."""
    problems, counts = [], []
    for image in images:
        try:
            count, _, _ = image.header()
        except DataError as error:
            problems.append(str(error))
            continue
        counts.append((count, image.image))
        if bands is not None and max(bands) >= count:
            problems.append(
                f"'{image.image}': has {count} bands; --bands asks for band {max(bands)} "
                "(bands count from 0)"
            )
        elif bands is None and count != counts[0][0]:
            problems.append(
                f"'{image.image}': has {count} bands, but '{counts[0][1]}' has {counts[0][0]}; "
                "pick common bands with --bands"
            )
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            problems.append("(stopped; there may be more)")
            break
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        raise DataError(f"bad multispectral images; fix them and run again:\n{listed}")
    return len(bands) if bands is not None else counts[0][0]


def crop_or_pad(pixels: np.ndarray, leaf: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crop or pad ``pixels: [N, H, W]`` and ``leaf: [H, W]`` to ``size x size``; padding
    is no-data (NaN) and background. Nothing is resampled."""
    bands, height, width = pixels.shape
    out_pixels = np.full((bands, size, size), np.nan, dtype=pixels.dtype)
    out_leaf = np.zeros((size, size), dtype=bool)
    rows = _centred(height, size)
    cols = _centred(width, size)
    out_pixels[:, rows[1], cols[1]] = pixels[:, rows[0], cols[0]]
    out_leaf[rows[1], cols[1]] = leaf[rows[0], cols[0]]
    return out_pixels, out_leaf


def _centred(length: int, size: int) -> tuple[slice, slice]:
    """``(source, destination)`` slices centring ``length`` in ``size`` (cropping or padding)."""
    if length >= size:
        start = (length - size) // 2
        return slice(start, start + size), slice(0, size)
    start = (size - length) // 2
    return slice(0, length), slice(start, start + length)


class MultispectralDataset(Dataset):
    """Leaf images as ``resolution x resolution`` tensors, every file checked up front.

    Args:
        images: the images (see :func:`find_leaf_images`).
        resolution: side of every item; images are centre-cropped or padded, never resampled.
        bands: band indices (from 0) to keep, in that order; None keeps every band.

    Raises:
        DataError: one, listing every bad image by file: missing or unreadable files, a mask of
            another size, a band index out of range, differing band counts.

    Attributes:
        num_bands: bands per item.
        bucket_of_items: 0 for every item (one size), for ``BucketBatchSampler``.
    """

    def __init__(
        self, images: Sequence[LeafImage], *, resolution: int, bands: Sequence[int] | None = None
    ) -> None:
        if not images:
            raise DataError("no multispectral images")
        self.images = list(images)
        self.resolution = resolution
        self.bands = None if bands is None else tuple(bands)
        self.num_bands = _validated_band_count(self.images, self.bands)
        self.bucket_of_items = [0] * len(self.images)

    @classmethod
    def from_folder(
        cls, root: str | Path, *, resolution: int, bands: Sequence[int] | None = None
    ) -> MultispectralDataset:
        """Every image of a dataset folder (see the module doc for its layout)."""
        return cls(find_leaf_images(root), resolution=resolution, bands=bands)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        """``image: [N, R, R]`` float32 in the file's units (NaN where there is no data),
        ``mask: [1, R, R]`` float in {0, 1} (1 = leaf, finite in every band), ``index``."""
        image = self.images[index]
        pixels = image.read(self.bands)
        pixels, leaf = crop_or_pad(pixels, image.leaf(pixels), self.resolution)
        return {
            "image": torch.from_numpy(pixels),
            "mask": torch.from_numpy(leaf)[None].float(),
            "index": index,
        }


@dataclass(frozen=True)
class BandStatistics:
    """Per band (lists of N floats): ``low`` and ``high``, robust percentiles of the leaf pixels
    that normalisation maps to -1 and 1, and ``minimum`` and ``maximum``, the leaf pixels' range."""

    low: list[float]
    high: list[float]
    minimum: list[float]
    maximum: list[float]


def band_statistics(
    dataset: MultispectralDataset, low_percentile: float = 1.0, high_percentile: float = 99.0
) -> BandStatistics:
    """Normalisation statistics over the leaf pixels of every item of ``dataset``.

    Percentiles are taken over up to :data:`STATISTICS_PIXELS_PER_IMAGE` leaf pixels per image
    (a subsample fixed by the image's index, so every run and rank agrees); the range is exact.

    Raises:
        DataError: an image with a band that is NaN everywhere (naming the file), no leaf pixel
            at all, or a band without spread (high <= low) over them.
    """
    samples, minimum, maximum = [], None, None
    for index in range(len(dataset)):
        item = dataset[index]
        empty = [b for b, band in enumerate(item["image"].numpy()) if not np.isfinite(band).any()]
        if empty:
            empty = [dataset.bands[b] for b in empty] if dataset.bands else empty  # file's numbers
            raise DataError(
                f"'{dataset.images[index].image}': band(s) {empty} hold no finite value (no data "
                "everywhere); fix the file, or leave those bands out with --bands"
            )
        pixels = item["image"].numpy()[:, item["mask"][0].numpy() > 0.5]  # [N, P]
        if pixels.shape[1] == 0:
            continue
        low, high = pixels.min(axis=1), pixels.max(axis=1)
        minimum = low if minimum is None else np.minimum(minimum, low)
        maximum = high if maximum is None else np.maximum(maximum, high)
        if pixels.shape[1] > STATISTICS_PIXELS_PER_IMAGE:
            rng = np.random.default_rng(index)
            chosen = rng.choice(pixels.shape[1], STATISTICS_PIXELS_PER_IMAGE, replace=False)
            pixels = pixels[:, np.sort(chosen)]
        samples.append(pixels)
    if not samples:
        raise DataError("no leaf pixels in the training images: check the masks")
    pooled = np.concatenate(samples, axis=1).astype(np.float64)
    low, high = np.percentile(pooled, [low_percentile, high_percentile], axis=1)
    flat = [band for band in range(len(low)) if not high[band] > low[band]]
    if flat:
        raise DataError(
            f"bands {flat} have no spread over the training set's leaf pixels (percentile "
            f"{low_percentile} = percentile {high_percentile}); leave them out with --bands"
        )
    return BandStatistics(low.tolist(), high.tolist(), minimum.tolist(), maximum.tolist())


# The synthetic set: 5 bands (blue, green, red, red edge, NIR) as reflectance x 10000, the
# digital numbers 16-bit PNGs store. Leaf spectra differ in shape, not only in brightness, so
# that the spectral angle between them is not zero.
SYNTHETIC_BANDS = ("blue", "green", "red", "red_edge", "nir")
REFLECTANCE_SCALE = 10000.0
LEAF_SPECTRA = {
    "healthy": (0.04, 0.11, 0.05, 0.32, 0.52),
    "stressed": (0.06, 0.13, 0.11, 0.26, 0.40),
    "senescent": (0.09, 0.15, 0.19, 0.27, 0.33),
}
BACKGROUND_SPECTRA = {
    "soil": (0.10, 0.13, 0.17, 0.20, 0.25),
    "dark board": (0.04, 0.04, 0.045, 0.05, 0.05),
}
# Veins: brighter in the visible, darker in the NIR than the blade around them.
VEIN_FACTOR = (1.15, 1.10, 1.20, 0.95, 0.88)


def synthetic_size(index: int, resolution: int) -> tuple[int, int]:
    """``(height, width)`` of synthetic image ``index``: square, wider (cropped to the
    resolution) and shorter (padded) in turn."""
    return [
        (resolution, resolution),
        (resolution, resolution + resolution // 4),
        (resolution - resolution // 4, resolution),
    ][index % 3]


def synthetic_leaf(
    rng: np.random.Generator, height: int, width: int, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(pixels [5, H, W] reflectance, leaf [H, W] bool)``: a leaf of ``LEAF_SPECTRA[kind]`` with
    a midrib, shading and sensor noise on a uniform background; its shape, orientation and the
    background are drawn from ``rng``."""
    side = min(height, width)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    centre_y = height / 2 + rng.uniform(-0.05, 0.05) * side
    centre_x = width / 2 + rng.uniform(-0.05, 0.05) * side
    angle = rng.uniform(0, np.pi)
    along = (xx - centre_x) * np.cos(angle) + (yy - centre_y) * np.sin(angle)
    across = -(xx - centre_x) * np.sin(angle) + (yy - centre_y) * np.cos(angle)
    length, breadth = rng.uniform(0.32, 0.42) * side, rng.uniform(0.22, 0.3) * side
    wobble = 1 + 0.08 * np.sin(3 * np.arctan2(across, along) + rng.uniform(0, 2 * np.pi))
    leaf = (along / length) ** 2 + (across / breadth) ** 2 <= wobble**2
    spectrum = np.asarray(LEAF_SPECTRA[kind])[:, None, None]
    background = np.asarray(BACKGROUND_SPECTRA[rng.choice(list(BACKGROUND_SPECTRA))])
    vein = np.where(
        np.abs(across) < max(side / 40, 0.75), np.asarray(VEIN_FACTOR)[:, None, None], 1
    )
    shading = 1 + 0.12 * along / length
    blade = spectrum * vein * shading
    pixels = np.where(leaf, blade, background[:, None, None])
    pixels = pixels + rng.normal(0, 0.003, size=pixels.shape)
    return np.clip(pixels, 0.001, 1.0), leaf


def write_multispectral_dataset(
    out: str | Path, *, n: int = 9, resolution: int = 64, seed: int = 0
) -> Path:
    """Write ``n`` synthetic 5-band leaf images in the folder layout; the same seed gives the
    same files. Returns the ``images`` folder.

    Leaf kinds (healthy, stressed, senescent) take turns. Formats, in turn: a planar TIFF with
    a mask PNG; a folder of 16-bit band PNGs with a mask PNG; a TIFF
    whose background is NaN (no-data) and which has no mask file. Sizes cycle through square,
    wider and shorter than ``resolution`` (see :func:`synthetic_size`). Values are reflectance
    x 10000 (float32 in TIFFs, uint16 in PNGs).

    Raises:
        ValueError: ``n < 1`` or ``resolution`` not a positive multiple of 16.
        FileExistsError: ``out/images`` already exists (nothing is overwritten).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if resolution < 16 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, got {resolution}")
    out = Path(out)
    images = out / "images"
    if images.exists():
        raise FileExistsError(f"'{images}' already exists; choose another --out")
    tifffile = _tifffile()
    images.mkdir(parents=True)
    (out / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(n):
        # Every leaf kind in turn, shifted each round of three so that kinds and file formats
        # do not coincide.
        kind = list(LEAF_SPECTRA)[(index + index // 3) % len(LEAF_SPECTRA)]
        reflectance, leaf = synthetic_leaf(rng, *synthetic_size(index, resolution), kind)
        values = (reflectance * REFLECTANCE_SCALE).astype(np.float32)
        name = f"{index:04d}"
        if index % 3 == 1:
            (images / name).mkdir()
            for band, band_name in enumerate(SYNTHETIC_BANDS):
                pixels = np.rint(values[band]).astype(np.uint16)
                Image.fromarray(pixels).save(images / name / f"band_{band + 1}_{band_name}.png")
        else:
            if index % 3 == 2:
                values = np.where(leaf, values, np.float32(np.nan))
            tifffile.imwrite(images / f"{name}.tif", values, photometric="minisblack")
        if index % 3 != 2:
            Image.fromarray(leaf.astype(np.uint8) * 255).save(out / "masks" / f"{name}.png")
    return images
