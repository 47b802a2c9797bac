"""Image and mask reading: modes, value ranges, EXIF orientation, and errors naming the file."""

import io
import os
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from data.images import (
    DataError,
    ImageRef,
    image_size,
    mask_to_tensor,
    open_image,
    open_mask,
    set_max_image_pixels,
    to_model_range,
)


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


class TestOpenImage:
    @pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
    def test_converts_to_rgb(self, tmp_path, mode):
        path = _save(tmp_path / "x.png", Image.new(mode, (20, 10)))
        image = open_image(path, "context image")
        assert image.mode == "RGB" and image.size == (20, 10)

    def test_mask_mode(self, tmp_path):
        path = _save(tmp_path / "m.png", Image.new("RGB", (4, 3), (255, 255, 255)))
        mask = open_image(path, "mask", mode="L")
        assert mask.mode == "L" and np.asarray(mask).min() == 255

    def test_accepts_pil_and_bytes(self, tmp_path):
        image = Image.new("RGB", (5, 7), (10, 20, 30))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        from_bytes = open_image(buffer.getvalue(), "row 0")
        assert np.array_equal(np.asarray(from_bytes), np.asarray(image))
        assert open_image(image.convert("L"), "row 0").mode == "RGB"

    def test_missing_file(self, tmp_path):
        with pytest.raises(DataError, match=r"context image '.*absent\.png': file does not exist"):
            open_image(tmp_path / "absent.png", "context image")

    def test_directory(self, tmp_path):
        with pytest.raises(DataError, match="is a directory"):
            open_image(tmp_path, "context image")

    def test_text_file_named_png(self, tmp_path):
        path = tmp_path / "notes.png"
        path.write_text("not an image")
        for read in (open_image, image_size):
            with pytest.raises(DataError, match=r"notes\.png.*cannot be read as an image"):
                read(path, "mask")

    def test_truncated_png(self, tmp_path):
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        path = _save(tmp_path / "cut.png", Image.fromarray(noise))
        path.write_bytes(path.read_bytes()[:400])
        assert image_size(path, "target") == (64, 64)  # the header is intact
        with pytest.raises(DataError, match=r"cut\.png.*corrupt or truncated"):
            open_image(path, "target")

    def test_corrupt_bytes_name_the_row(self):
        with pytest.raises(DataError, match=r"^dataset row 3, column 'mask': cannot be read"):
            open_image(b"garbage", "dataset row 3, column 'mask'")


class TestExifOrientation:
    def test_rotated_jpeg_size_and_pixels_agree(self, tmp_path):
        stored = Image.new("RGB", (40, 20), (0, 0, 0))
        stored.paste((255, 255, 255), (0, 0, 10, 20))  # left quarter white
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = 6  # displayed rotated 90 degrees clockwise
        path = _save(tmp_path / "phone.jpg", stored, exif=exif, quality=95)
        assert image_size(path, "context") == (40, 20)
        shown = open_image(path, "context")
        assert shown.size == (20, 40)
        # Rotated clockwise, the stored left strip becomes the top strip.
        grey = np.asarray(shown.convert("L"), dtype=float)
        assert grey[:8].mean() > 200 and grey[12:].mean() < 50

    def test_corrupt_exif_is_ignored(self, tmp_path):
        path = _save(tmp_path / "odd.jpg", Image.new("RGB", (8, 6)), exif=b"Exif\x00\x00junk")
        assert image_size(path, "context") == (6, 8)
        assert open_image(path, "context").size == (8, 6)


class TestMaskToTensor:
    def test_threshold_at_half(self):
        grey = np.array([[0, 127, 128, 255]], dtype=np.uint8)
        mask = mask_to_tensor(Image.fromarray(grey))
        assert mask.shape == (1, 1, 4) and mask.dtype == torch.float32
        assert mask.tolist() == [[[0.0, 0.0, 1.0, 1.0]]]

    def test_jpeg_noise_binarises(self, tmp_path):
        grey = np.zeros((32, 32), dtype=np.uint8)
        grey[8:24, 8:24] = 255
        path = _save(tmp_path / "m.jpg", Image.fromarray(grey), quality=70)
        assert set(np.unique(np.asarray(Image.open(path)))) - {0, 255}  # JPEG did add noise
        mask = mask_to_tensor(open_image(path, "mask", mode="L"))
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(mask[0], torch.from_numpy(grey > 127).float())

    def test_rgb_mask_is_greyed(self):
        mask = mask_to_tensor(Image.new("RGB", (3, 2), (255, 255, 255)))
        assert mask.shape == (1, 2, 3) and bool(mask.eq(1).all())


REGION = (slice(8, 24), slice(4, 12))


def region_mask() -> np.ndarray:
    """``[32, 32]`` bool: the region every stored mask below marks."""
    inside = np.zeros((32, 32), dtype=bool)
    inside[REGION] = True
    return inside


class TestMasksAsUsersStoreThem:
    """Each convention read into the same region; what no convention explains is refused."""

    @pytest.mark.parametrize(
        "name,stored",
        [
            ("0/255 8-bit", lambda m: Image.fromarray(m.astype(np.uint8) * 255)),
            ("0/1 8-bit label map", lambda m: Image.fromarray(m.astype(np.uint8))),
            ("0/1 16-bit label map", lambda m: Image.fromarray(m.astype(np.uint16))),
            ("0/255 in 16 bits", lambda m: Image.fromarray(m.astype(np.uint16) * 255)),
            ("0/65535 16-bit", lambda m: Image.fromarray(m.astype(np.uint16) * 65535)),
            ("1-bit", lambda m: Image.fromarray(m).convert("1")),
            (
                "drawn in alpha on black",
                lambda m: Image.fromarray(
                    np.dstack([np.zeros((32, 32, 3), np.uint8), m.astype(np.uint8) * 255])
                ),
            ),
            (
                "white on black, opaque RGBA",
                lambda m: Image.fromarray(
                    np.dstack([np.repeat(m[..., None] * 255, 3, 2), np.full((32, 32), 255)]).astype(
                        np.uint8
                    )
                ),
            ),
        ],
    )
    def test_the_same_region(self, tmp_path, name, stored):
        path = _save(tmp_path / "mask.png", stored(region_mask()))
        mask = mask_to_tensor(open_mask(path, "mask"))[0].numpy().astype(bool)
        assert np.array_equal(mask, region_mask()), name

    def test_a_label_map_of_several_classes_is_refused_naming_the_file(self, tmp_path):
        labels = region_mask().astype(np.uint8)
        labels[0:4] = 2
        path = _save(tmp_path / "labels.png", Image.fromarray(labels))
        with pytest.raises(DataError, match=r"labels\.png': holds only the values 0, 1, 2"):
            open_mask(path, "mask")

    def test_jpeg_noise_near_black_is_not_a_label_map(self, tmp_path):
        grey = np.zeros((32, 32), dtype=np.uint8)
        grey[0, 0] = 1  # what a lossy encoder leaves near black
        path = _save(tmp_path / "empty.jpg", Image.fromarray(grey), quality=95)
        assert not mask_to_tensor(open_mask(path, "mask")).any()

    def test_a_pipe_is_not_read(self, tmp_path):
        fifo = tmp_path / "mask.png"
        os.mkfifo(fifo)
        with pytest.raises(DataError, match="is not a regular file"):
            open_mask(fifo, "mask")
        with pytest.raises(DataError, match="is not a regular file"):
            image_size(fifo, "image")


def test_to_model_range_values_and_layout():
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 128)
    tensor = to_model_range(Image.fromarray(pixels))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 255 * 2 - 1], abs=1e-6)
    assert bool(tensor[:, 1].eq(-1).all())


def test_image_ref(tmp_path):
    path = _save(tmp_path / "c.png", Image.new("RGB", (6, 4)))
    ref = ImageRef(path, "metadata line 1: context")
    assert ref.size() == (4, 6)
    assert ref.open().size == (6, 4)
    assert ref.content() == path.read_bytes()
    assert ref.label == f"metadata line 1: context '{path}'"
    assert repr(ImageRef(b"1234", "row 0")) == "ImageRef(<4 bytes>, 'row 0')"
    path.unlink()
    with pytest.raises(DataError, match=r"c\.png"):
        ref.content()


class TestDeclaredSize:
    @pytest.fixture
    def limit(self):
        set_max_image_pixels(1000)
        yield
        set_max_image_pixels(100_000_000)

    def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(self, tmp_path, limit):
        path = _save(tmp_path / "big.png", Image.new("L", (40, 30)))
        for read in (lambda: image_size(path, "image"), lambda: open_image(path, "image")):
            with pytest.raises(DataError, match=r"big\.png': declares 40x30 = 1,200 pixels"):
                read()
        small = _save(tmp_path / "small.png", Image.new("L", (20, 20)))
        assert image_size(small, "image") == (20, 20)

    def test_a_multispectral_cube_counts_its_bands(self, tmp_path, limit):
        from data.multispectral import LeafImage

        tifffile = pytest.importorskip("tifffile")
        path = tmp_path / "leaf.tif"
        tifffile.imwrite(path, np.zeros((5, 16, 16), np.uint16), photometric="minisblack")
        with pytest.raises(DataError, match=r"declares 16x16 x 5 bands = 1,280 pixels"):
            LeafImage(path).header()


def png_with_trailing_exif(path, image: Image.Image, orientation: int):
    """``image`` as a PNG whose ``eXIf`` chunk comes after the image data, as some tools write
    it (PIL reads such a chunk only while decoding)."""
    image.save(path)
    content = path.read_bytes()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    data = exif.tobytes()
    chunk = len(data).to_bytes(4, "big") + b"eXIf" + data
    chunk += zlib.crc32(b"eXIf" + data).to_bytes(4, "big")
    end = content.rindex(b"IEND") - 4  # IEND's length field
    path.write_bytes(content[:end] + chunk + content[end:])
    return path


class TestTrailingPngExif:
    def test_size_and_pixels_follow_it_as_diffusers_load_image_does(self, tmp_path):
        from diffusers.utils import load_image

        pixels = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
        path = png_with_trailing_exif(tmp_path / "photo.png", Image.fromarray(pixels), 6)
        assert "exif" not in Image.open(path).info  # not in the header
        assert image_size(path, "image") == (10, 6)  # rotated: height 10, width 6
        ours = np.asarray(open_image(path, "image"))
        theirs = np.asarray(load_image(str(path)).convert("RGB"))
        assert ours.shape == (10, 6, 3) and np.array_equal(ours, theirs)

    def test_a_mask_turns_with_its_image(self, tmp_path):
        mask = np.zeros((6, 10), np.uint8)
        mask[:, :3] = 255
        path = png_with_trailing_exif(tmp_path / "mask.png", Image.fromarray(mask), 3)
        turned = np.asarray(open_mask(path, "mask"))
        assert np.array_equal(turned, mask[::-1, ::-1])
