"""Mask layout, area downsampling and pooling morphology against brute-force references."""

import pytest
import torch

from losses.mask_ops import (
    as_mask_4d,
    boundary_band,
    dilate,
    downsample_mask_area,
    erode,
    sure_background,
)


def naive_window(mask: torch.Tensor, radius: int, reduce) -> torch.Tensor:
    """[B, 1, H, W] -> reduce() over each clipped (2r+1)^2 window, with explicit loops."""
    out = torch.empty_like(mask)
    height, width = mask.shape[-2:]
    for b in range(mask.shape[0]):
        for y in range(height):
            for x in range(width):
                window = mask[
                    b, 0, max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1
                ]
                out[b, 0, y, x] = reduce(window)
    return out


class TestAsMask4d:
    @pytest.mark.parametrize("shape", [(6, 7), (2, 6, 7), (2, 1, 6, 7)])
    def test_layouts(self, shape):
        mask = torch.rand(shape)
        out = as_mask_4d(mask)
        assert out.shape[-3:] == (1, 6, 7) and out.ndim == 4
        torch.testing.assert_close(out.flatten(), mask.flatten())

    def test_bool_becomes_float(self):
        assert as_mask_4d(torch.ones(3, 3, dtype=torch.bool)).dtype == torch.float32

    def test_integer_refused(self):
        with pytest.raises(ValueError, match="mask must be bool or floating point"):
            as_mask_4d(torch.ones(3, 3, dtype=torch.int64))

    def test_multichannel_refused(self):
        with pytest.raises(ValueError, match="one channel"):
            as_mask_4d(torch.ones(1, 3, 4, 4))


class TestDownsampleMaskArea:
    def test_equals_average_pooling(self):
        mask = (torch.rand(2, 1, 64, 48) > 0.5).float()
        expected = torch.nn.functional.avg_pool2d(mask, 8)
        torch.testing.assert_close(downsample_mask_area(mask, (8, 6)), expected)

    def test_area_preserved(self):
        mask = (torch.rand(64, 64) > 0.3).float()
        down = downsample_mask_area(mask, (16, 16))
        assert down.shape == (1, 1, 16, 16)
        assert (down.sum() * 16).item() == pytest.approx(mask.sum().item())

    def test_known_cell(self):
        mask = torch.zeros(16, 16)
        mask[:4, :8] = 1  # half of the top-left 8x8 cell
        assert downsample_mask_area(mask, (2, 2))[0, 0].tolist() == [[0.5, 0.0], [0.0, 0.0]]


class TestMorphology:
    def test_single_pixel_dilates_to_square(self):
        mask = torch.zeros(1, 1, 7, 7)
        mask[0, 0, 3, 3] = 1
        expected = torch.zeros(1, 1, 7, 7)
        expected[0, 0, 1:6, 1:6] = 1
        torch.testing.assert_close(dilate(mask, 2), expected)

    def test_square_erodes(self):
        mask = torch.zeros(1, 1, 9, 9)
        mask[0, 0, 2:7, 2:7] = 1
        expected = torch.zeros(1, 1, 9, 9)
        expected[0, 0, 3:6, 3:6] = 1
        torch.testing.assert_close(erode(mask, 1), expected)

    def test_border_is_not_background(self):
        mask = torch.zeros(1, 1, 6, 6)
        mask[0, 0, :3, :] = 1  # touches the top border
        eroded = erode(mask, 1)
        assert eroded[0, 0, 0].tolist() == [1.0] * 6  # not eroded from the image border
        assert eroded[0, 0, 2].sum() == 0  # eroded from the background side

    @pytest.mark.parametrize("radius", [0, 1, 2])
    def test_match_naive(self, radius):
        mask = torch.rand(2, 1, 9, 11)
        torch.testing.assert_close(dilate(mask, radius), naive_window(mask, radius, torch.max))
        torch.testing.assert_close(erode(mask, radius), naive_window(mask, radius, torch.min))

    def test_negative_radius(self):
        with pytest.raises(ValueError, match="radius"):
            dilate(torch.zeros(1, 1, 3, 3), -1)
        with pytest.raises(ValueError, match="radius"):
            erode(torch.zeros(1, 1, 3, 3), -1)


class TestBoundaryBand:
    @pytest.mark.parametrize("radius", [1, 2])
    def test_is_where_both_labels_meet(self, radius):
        mask = (torch.rand(2, 1, 12, 10) > 0.5).float()
        both_labels = naive_window(mask, radius, lambda w: float(w.max() != w.min()))
        torch.testing.assert_close(boundary_band(mask, radius), both_labels)

    def test_square_band_width(self):
        mask = torch.zeros(1, 1, 10, 10)
        mask[0, 0, 3:7, 3:7] = 1
        band = boundary_band(mask, 1)
        # Rows 2..7 / cols 2..7 minus the untouched interior 4..5: a 6x6 ring of width 2.
        assert band.sum().item() == 36 - 4
        assert band[0, 0, 4:6, 4:6].sum() == 0

    @pytest.mark.parametrize("fill", [0.0, 1.0])
    def test_empty_and_full_have_no_band(self, fill):
        assert boundary_band(torch.full((1, 1, 8, 8), fill), 2).abs().sum() == 0


class TestSureBackground:
    def test_excludes_the_dilated_region(self):
        mask = torch.zeros(9, 9)
        mask[3:6, 3:6] = 0.6  # soft values above the threshold count as inside
        mask[4, 4] = 1.0
        expected = torch.ones(1, 1, 9, 9)
        expected[..., 2:7, 2:7] = 0
        torch.testing.assert_close(sure_background(mask, 1), expected)

    def test_soft_rim_below_threshold_is_background(self):
        mask = torch.zeros(1, 1, 5, 5)
        mask[..., 2, 2] = 0.4
        assert sure_background(mask, 1).sum() == 25

    def test_full_mask_has_none(self):
        assert sure_background(torch.ones(2, 8, 8), 0).sum() == 0
