"""signed_distance_map_from_mask against a brute-force distance computation."""

import math

import pytest
import torch

from losses.distance import signed_distance_map_from_mask


def naive_sdm(mask: torch.Tensor) -> torch.Tensor:
    """[H, W] bool with both labels -> Kervadec SDM by comparing every pair of pixels."""
    height, width = mask.shape
    coords = [(y, x) for y in range(height) for x in range(width)]
    out = torch.zeros(height, width)
    for y, x in coords:
        other = [(v, u) for v, u in coords if bool(mask[v, u]) != bool(mask[y, x])]
        nearest = min(math.hypot(y - v, x - u) for v, u in other)
        out[y, x] = -(nearest - 1) if mask[y, x] else nearest
    return out


class TestSignedDistanceMap:
    def test_matches_brute_force(self):
        mask = torch.rand(3, 1, 9, 12) > 0.6
        mask[:, :, 0, 0] = True
        mask[:, :, -1, -1] = False
        sdm = signed_distance_map_from_mask(mask)
        for b in range(3):
            torch.testing.assert_close(sdm[b, 0], naive_sdm(mask[b, 0]))

    def test_sign_convention(self):
        mask = torch.zeros(1, 1, 11, 11)
        mask[0, 0, 3:8, 3:8] = 1
        sdm = signed_distance_map_from_mask(mask)[0, 0]
        assert sdm[0, 0].item() == pytest.approx(math.hypot(3, 3))  # outside: positive
        assert sdm[3, 5].item() == 0  # inner contour: zero
        assert sdm[5, 5].item() == -2  # centre: negative, 3 pixels from background
        assert (sdm[mask[0, 0] > 0] <= 0).all() and (sdm[mask[0, 0] == 0] >= 1).all()

    def test_normalize_scales_each_sample(self):
        mask = torch.zeros(2, 1, 8, 8)
        mask[0, 0, 2:4, 2:4] = 1
        mask[1, 0, 1:7, 1:7] = 1
        raw = signed_distance_map_from_mask(mask)
        norm = signed_distance_map_from_mask(mask, normalize=True)
        for b in range(2):
            assert norm[b].abs().max().item() == pytest.approx(1.0)
            torch.testing.assert_close(norm[b], raw[b] / raw[b].abs().max())

    @pytest.mark.parametrize("fill,sign", [(0.0, 1.0), (1.0, -1.0)])
    def test_degenerate_masks_are_constant(self, fill, sign):
        sdm = signed_distance_map_from_mask(torch.full((2, 1, 6, 8), fill))
        torch.testing.assert_close(sdm, torch.full((2, 1, 6, 8), sign * math.hypot(6, 8)))
        normalized = signed_distance_map_from_mask(torch.full((1, 1, 6, 8), fill), normalize=True)
        torch.testing.assert_close(normalized, torch.full((1, 1, 6, 8), sign))

    def test_mixed_batch_keeps_regular_samples_exact(self):
        mask = torch.zeros(3, 1, 7, 7)
        mask[1] = 1
        mask[2, 0, 2:5, 2:5] = 1
        sdm = signed_distance_map_from_mask(mask)
        assert torch.isfinite(sdm).all()
        torch.testing.assert_close(sdm[2, 0], naive_sdm(mask[2, 0] > 0))

    @pytest.mark.parametrize("layout", ["hw", "bhw"])
    def test_layouts(self, layout):
        mask = torch.zeros(6, 6, dtype=torch.bool)
        mask[2:4, 2:4] = True
        given = mask if layout == "hw" else mask[None]
        sdm = signed_distance_map_from_mask(given)
        assert sdm.shape == (1, 1, 6, 6) and sdm.dtype == torch.float32
        torch.testing.assert_close(sdm[0, 0], naive_sdm(mask))

    def test_threshold_and_no_gradient(self):
        soft = torch.zeros(1, 1, 6, 6, requires_grad=True)
        with torch.no_grad():
            soft[0, 0, 2:4, 2:4] = 0.7
        sdm = signed_distance_map_from_mask(soft)
        assert not sdm.requires_grad
        torch.testing.assert_close(sdm[0, 0], naive_sdm(soft[0, 0].detach() > 0.5))
