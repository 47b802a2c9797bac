"""Reading images and masks, with errors that name the file and what is wrong with it.

An image source is a file path, the encoded bytes of an image file (how Hugging Face datasets
store an ``Image`` column) or an already decoded PIL image. EXIF orientation is applied, as
diffusers' ``load_image`` does, so a phone photo and a mask drawn on it as displayed line up;
the orientation is read from the file header, so :func:`image_size` (header only) and
:func:`open_image` (full decode) always agree.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

ImageSource = str | os.PathLike | bytes | Image.Image

MASK_THRESHOLD = 127.5
"""Mask pixels (0..255 grey) above this are inside: JPEG noise near 0 or 255 still binarises."""

# EXIF orientations 5-8 swap width and height.
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class DataError(ValueError):
    """Bad training data. The message names the file (or dataset row and column) and the fault."""


# Pixels (times bands) an image may declare in its header; checked before anything is decoded,
# so a small file declaring a huge image (a decompression bomb) never fills the memory.
_LIMIT = {"pixels": 100_000_000}


def set_max_image_pixels(pixels: int) -> None:
    """Set the limit :func:`check_pixels` applies (``--max_image_pixels``)."""
    _LIMIT["pixels"] = pixels


def check_pixels(label: str, width: int, height: int, bands: int = 1) -> None:
    """Raise :class:`DataError` naming ``label`` when an image declares more pixels (times
    bands) than the limit."""
    count = width * height * bands
    if count > _LIMIT["pixels"]:
        layers = f" x {bands} bands" if bands > 1 else ""
        raise DataError(
            f"{label}: declares {width}x{height}{layers} = {count:,} pixels, over "
            f"--max_image_pixels {_LIMIT['pixels']:,}. Training resizes it to about "
            "--resolution² pixels anyway: downscale the file, or raise the limit."
        )


def _describe(source: ImageSource, what: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"{what} '{source}'"
    return what


def _orientation_of(raw: bytes | None) -> int:
    if not raw:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw)
    except (OSError, ValueError, SyntaxError):
        return 1  # unreadable EXIF: use the pixels as stored, as other readers do
    return int(exif.get(ExifTags.Base.Orientation, 1))


def _png_trailing_exif(image: Image.Image) -> bytes | None:
    """A PNG's ``eXIf`` chunk when it comes after the image data (PIL reads it only while
    decoding, diffusers' ``load_image`` applies it): found by walking the chunk headers, seeking
    past their data, never decoding it."""
    stream = getattr(image, "fp", None)
    if image.format != "PNG" or stream is None:
        return None
    position = stream.tell()
    try:
        stream.seek(8)  # the signature
        while header := stream.read(8):
            if len(header) < 8:
                return None
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"eXIf":
                return stream.read(length)
            if kind == b"IEND":
                return None
            stream.seek(length + 4, io.SEEK_CUR)  # data and CRC
        return None
    finally:
        stream.seek(position)


def _header_orientation(image: Image.Image) -> int:
    """EXIF orientation (1 = as stored) from the header, or a PNG's ``eXIf`` chunk after its
    image data; never decodes the pixels."""
    return _orientation_of(image.info.get("exif") or _png_trailing_exif(image))


def _open_lazily(source: ImageSource, what: str) -> Image.Image:
    """Open ``source`` reading only its header; raise :class:`DataError` if that fails."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        stream = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{_describe(source, what)}: file does not exist")
        if path.is_dir():
            raise DataError(f"{_describe(source, what)}: is a directory, not an image file")
        if not path.is_file():  # a pipe or a device would block the reader, or never end
            raise DataError(f"{_describe(source, what)}: is not a regular file")
        stream = path
    try:
        image = Image.open(stream)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(
            f"{_describe(source, what)}: cannot be read as an image ({error})"
        ) from error
    check_pixels(_describe(source, what), *image.size)
    return image


def image_size(source: ImageSource, what: str) -> tuple[int, int]:
    """``(height, width)`` of an image as :func:`open_image` returns it, reading only the header.

    Args:
        source: path, encoded image bytes or PIL image.
        what: what the source is, for error messages ("mask of metadata.jsonl line 3").

    Raises:
        DataError: the file is missing, a directory, or not a readable image.
    """
    image = _open_lazily(source, what)
    width, height = image.size
    if _header_orientation(image) in (5, 6, 7, 8):
        return width, height
    return height, width


def open_image(source: ImageSource, what: str, mode: str = "RGB") -> Image.Image:
    """Decode an image fully and convert it to ``mode`` ("RGB" for images, "L" for masks).

    Args:
        source: path, encoded image bytes or PIL image.
        what: what the source is, for error messages; a path source is appended to it.
        mode: PIL mode of the result.

    Raises:
        DataError: the file is missing, a directory, unreadable, or truncated/corrupt.
    """
    return _to_8_bit(_decoded(source, what)).convert(mode)


def _decoded(source: ImageSource, what: str) -> Image.Image:
    """The fully decoded image, its EXIF orientation applied, in its stored mode."""
    image = _open_lazily(source, what)
    orientation = _header_orientation(image)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(
            f"{_describe(source, what)}: image data is corrupt or truncated ({error})"
        ) from error
    if orientation in _TRANSPOSE_FOR_ORIENTATION:
        image = image.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
    return image


def open_mask(source: ImageSource, what: str) -> Image.Image:
    """Decode a mask as users store it into 0..255 grey ("L") where above
    :data:`MASK_THRESHOLD` is inside:

    - drawn on a transparent canvas (an alpha channel that is not opaque everywhere): the alpha;
    - 0/1 label maps, 8- or 16-bit, and float masks in [0, 1]: 1 is inside;
    - 8-bit grey, or 16-bit holding 0..255: as stored; 16-bit spanning 0..65535: scaled;
    - colour: its grey level.

    Raises:
        DataError: as :func:`open_image`, or for values no such convention explains (a label map
            of several classes, say), naming the file and what it holds.
    """
    label = _describe(source, what)
    image = _decoded(source, what)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min(initial=255) < 255:
            return Image.fromarray(alpha, "L")
    if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
    else:
        values = np.asarray(image.convert("L"), dtype=np.float64)
    top = values.max(initial=0)
    lossy = image.format == "JPEG"  # its noise near black could pass for a 0/1 map
    if image.mode == "1" or (top <= 1 and not lossy):
        scale = 255.0
    elif top <= 255:
        if not lossy and 1 < top < MASK_THRESHOLD and len(np.unique(values)) <= 16:
            levels = ", ".join(f"{v:g}" for v in np.unique(values)[:8])
            raise DataError(
                f"{label}: holds only the values {levels}, a label map of several classes? "
                "Masks are 0/1, 0/255 (or grey, inside above half) or drawn in alpha."
            )
        scale = 1.0
    elif top <= 65535:
        scale = 1 / 257
    else:
        raise DataError(f"{label}: mask values up to {top:g}; expected 0/1, 0..255 or 16-bit")
    return _grey(values * scale)


def _to_8_bit(image: Image.Image) -> Image.Image:
    """``image`` with 16-bit or float grey levels scaled to 0..255 ("L"); PIL's own conversion
    clips them, turning a 16-bit image white. Other modes (RGB, CMYK, palette, ...) as they are:
    PIL converts those faithfully."""
    if image.mode not in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if pixels.max(initial=0) <= 1 else 1.0
    else:  # 16-bit grey, or 32-bit integers holding 16-bit values
        scale = 1 / 257 if pixels.max(initial=0) > 255 or image.mode.startswith("I;16") else 1.0
    return _grey(pixels * scale)


def _grey(levels: np.ndarray) -> Image.Image:
    """Grey levels on the 0..255 scale as an 8-bit ("L") image, rounded and clipped."""
    return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")


def mask_to_tensor(mask_image: Image.Image) -> torch.Tensor:
    """Binarise a mask image: ``[1, H, W]`` float32 in {0, 1}, 1 inside the region.

    The image is converted to grey ("L", 0..255) and thresholded at :data:`MASK_THRESHOLD`.
    """
    grey = np.asarray(mask_image.convert("L"), dtype=np.float32)
    return torch.from_numpy(grey > MASK_THRESHOLD).float()[None]


def to_model_range(image: Image.Image) -> torch.Tensor:
    """RGB image -> ``[3, H, W]`` float32 in [-1, 1], as diffusers' ``VaeImageProcessor`` does."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1) * 2.0 - 1.0


@dataclass(frozen=True, repr=False)
class ImageRef:
    """An image read on demand: a file path or encoded image bytes, and what it is for errors."""

    source: Path | bytes
    what: str

    def __repr__(self) -> str:
        shown = f"<{len(self.source)} bytes>" if isinstance(self.source, bytes) else self.source
        return f"ImageRef({shown!s}, {self.what!r})"

    @property
    def label(self) -> str:
        """``what`` followed by the path, for messages: "mask of row 3 'masks/3.png'"."""
        return _describe(self.source, self.what)

    def size(self) -> tuple[int, int]:
        """``(height, width)`` from the header; see :func:`image_size`."""
        return image_size(self.source, self.what)

    def open(self, mode: str = "RGB") -> Image.Image:
        """The decoded image in ``mode``; see :func:`open_image`."""
        return open_image(self.source, self.what, mode)

    def open_mask(self) -> Image.Image:
        """The decoded mask as 0..255 grey; see :func:`open_mask`."""
        return open_mask(self.source, self.what)

    def content(self) -> bytes:
        """The encoded bytes: the file's content, or the bytes themselves."""
        if isinstance(self.source, bytes):
            return self.source
        try:
            return self.source.read_bytes()
        except OSError as error:
            raise DataError(f"{self.label}: cannot be read ({error})") from error
