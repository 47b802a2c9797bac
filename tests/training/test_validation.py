"""``training.validation``: tensors to images, mask overlays, labelled grids, file names."""

import numpy as np
import pytest
import torch
from PIL import Image

from training.validation import VALIDATION_DIR, image_grid, mask_overlay, save_grid, to_pil


def solid(width: int, height: int, color) -> Image.Image:
    return Image.new("RGB", (width, height), color)


class TestToPil:
    def test_end_points_and_middle(self):
        image = torch.zeros(3, 2, 3)
        image[:, 0, 0] = -1
        image[:, 0, 1] = 1
        image[:, 0, 2] = 0  # 127.5 rounds (half to even) to 128
        image[0, 1, 0], image[1, 1, 0], image[2, 1, 0] = -1, 0.5, 1
        image[:, 1, 1] = 5  # clamped
        image[:, 1, 2] = -5
        pil = to_pil(image)
        assert pil.mode == "RGB"
        assert pil.size == (3, 2)  # (W, H)
        array = np.asarray(pil)
        assert array.dtype == np.uint8
        assert array[0, 0].tolist() == [0, 0, 0]
        assert array[0, 1].tolist() == [255, 255, 255]
        assert array[0, 2].tolist() == [128, 128, 128]
        assert array[1, 0].tolist() == [0, 191, 255]  # 0.5 -> 191.25 -> 191
        assert array[1, 1].tolist() == [255, 255, 255]
        assert array[1, 2].tolist() == [0, 0, 0]

    def test_inverts_uint8_to_signed(self):
        array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
        image = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
        assert np.array_equal(np.asarray(to_pil(image)), array)

    def test_accepts_grad_and_half(self):
        image = torch.zeros(3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
        assert np.asarray(to_pil(image)).tolist() == np.full((4, 4, 3), 128).tolist()


class TestMaskOverlay:
    def test_tints_exactly_the_masked_pixels(self):
        array = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
        image = Image.fromarray(array)
        mask = torch.zeros(1, 6, 9)
        mask[0, 1:4, 2:7] = 1
        out = np.asarray(mask_overlay(image, mask, alpha=0.5)).astype(int)
        inside = mask[0].numpy() > 0
        assert np.array_equal(out[~inside], array[~inside])
        for y, x in zip(*np.nonzero(inside), strict=True):
            r, g, b = (int(v) for v in array[y, x])
            expected = [round(0.5 * r + 127.5), round(0.5 * g), round(0.5 * b)]
            assert out[y, x].tolist() == expected, (y, x)

    def test_known_values(self):
        image = Image.fromarray(np.array([[[11, 200, 32], [11, 200, 32], [11, 200, 32]]], np.uint8))
        mask = torch.tensor([[[0.0, 0.5, 1.0]]])
        out = np.asarray(mask_overlay(image, mask, alpha=0.5))
        assert out[0, 0].tolist() == [11, 200, 32]
        # weight 0.25: 11*0.75 + 255*0.25 = 72, 200*0.75 = 150, 32*0.75 = 24
        assert out[0, 1].tolist() == [72, 150, 24]
        # weight 0.5: 5.5 + 127.5 = 133, 100, 16
        assert out[0, 2].tolist() == [133, 100, 16]

    def test_alpha_one_is_pure_red(self):
        image = solid(4, 3, (10, 20, 30))
        mask = torch.ones(1, 3, 4)
        out = np.asarray(mask_overlay(image, mask, alpha=1.0))
        assert (out == np.array([255, 0, 0])).all()

    def test_orientation_on_a_non_square_image(self):
        image = solid(5, 2, (0, 0, 0))  # W=5, H=2
        mask = torch.zeros(1, 2, 5)
        mask[0, 1, 4] = 1
        out = np.asarray(mask_overlay(image, mask))
        assert out.shape == (2, 5, 3)
        assert out[1, 4].tolist() == [128, 0, 0]  # 127.5 -> 128
        assert out.sum() == 128


class TestImageGrid:
    def test_size_and_content(self):
        width, height = 8, 6
        rows = [
            [solid(width, height, (255, 0, 0)), solid(width, height, (0, 255, 0))],
            [solid(width, height, (0, 0, 255)), solid(width, height, (9, 9, 9))],
            [solid(width, height, (1, 2, 3)), solid(width, height, (200, 100, 50))],
        ]
        grid = image_grid(rows, ["context", "prediction"])
        header = 14
        assert grid.size == (2 * width, header + 3 * height)
        array = np.asarray(grid)
        for r, row in enumerate(rows):
            for c, image in enumerate(row):
                top, left = header + r * height, c * width
                cell = array[top : top + height, left : left + width]
                assert np.array_equal(cell, np.asarray(image)), (r, c)

    def test_header_labels_each_column(self):
        grid = image_grid([[solid(40, 10, "black"), solid(40, 10, "black")]], ["left", "right"])
        header = np.asarray(grid)[:14]
        for column in range(2):
            cell = header[:, column * 40 : (column + 1) * 40]
            assert (cell < 128).any()  # some text
            assert (cell == 255).mean() > 0.5  # on white

    def test_images_are_resized_to_the_first(self):
        rows = [[solid(8, 6, (10, 20, 30)), solid(16, 3, (40, 50, 60))]]
        grid = image_grid(rows, ["a", "b"])
        assert grid.size == (16, 14 + 6)
        assert np.asarray(grid)[14:, 8:].reshape(-1, 3).tolist() == [[40, 50, 60]] * 48


class TestSaveGrid:
    def test_path_and_content(self, tmp_path):
        grid = image_grid([[solid(8, 6, (1, 2, 3))]], ["x"])
        path = save_grid(grid, tmp_path / "out", 42)
        assert path == tmp_path / "out" / VALIDATION_DIR / "step-000042.png"
        assert VALIDATION_DIR == "validation"
        with Image.open(path) as saved:
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(grid))

    def test_names_sort_by_step(self, tmp_path):
        grid = solid(2, 2, "white")
        paths = [save_grid(grid, tmp_path, step) for step in (100, 9, 10, 1000)]
        assert sorted(p.name for p in paths) == [
            "step-000009.png",
            "step-000010.png",
            "step-000100.png",
            "step-001000.png",
        ]
        assert len(list((tmp_path / VALIDATION_DIR).iterdir())) == 4

    @pytest.mark.parametrize("step", [0, 7])
    def test_same_step_overwrites(self, tmp_path, step):
        save_grid(solid(2, 2, "white"), tmp_path, step)
        path = save_grid(solid(2, 2, "black"), tmp_path, step)
        with Image.open(path) as saved:
            assert np.asarray(saved).max() == 0
        assert len(list((tmp_path / VALIDATION_DIR).iterdir())) == 1
