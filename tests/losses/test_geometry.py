"""Seed 001 latent geometry losses: references, known values, gradients and guards."""

import math

import pytest
import torch

from losses.distance import signed_distance_map_from_mask
from losses.geometry import (
    ChangeMaskStats,
    GeometryLossWeights,
    area_ratio_loss,
    background_preservation_mse_latent,
    boundary_loss,
    dice_loss,
    geometry_starter_loss,
    soft_change_mask_from_latents,
    weighted_masked_mse_latent,
)
from losses.mask_ops import sure_background


def square_mask(batch=2, size=12, lo=3, hi=9, dtype=torch.float32):
    mask = torch.zeros(batch, 1, size, size, dtype=dtype)
    mask[:, :, lo:hi, lo:hi] = 1
    return mask


def naive_labels(mask: torch.Tensor, radius: int):
    """Per pixel of a binary [H, W] mask: 'band' if a pixel of the other label lies within the
    clipped Chebyshev window, else 'in' or 'out'."""
    height, width = mask.shape
    labels = {}
    for y in range(height):
        for x in range(width):
            window = mask[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1]
            if window.max() != window.min():
                labels[y, x] = "band"
            else:
                labels[y, x] = "in" if mask[y, x] > 0.5 else "out"
    return labels


def naive_weighted_mse(z_pred, z_tgt, mask, band_r, w_in, w_band, w_out):
    per_sample = []
    for b in range(z_pred.shape[0]):
        labels = naive_labels((mask[b, 0] > 0.5).float(), band_r)
        weight = {"in": w_in, "band": w_band, "out": w_out}
        num = den = 0.0
        for (y, x), label in labels.items():
            err = float(((z_pred[b, :, y, x] - z_tgt[b, :, y, x]) ** 2).mean())
            num += weight[label] * err
            den += weight[label]
        per_sample.append(num / den)
    return sum(per_sample) / len(per_sample)


class TestWeightedMaskedMse:
    @pytest.mark.parametrize("band_r", [1, 2])
    def test_matches_naive(self, band_r):
        z_pred, z_tgt = torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)
        mask = torch.rand(2, 1, 12, 12)
        got = weighted_masked_mse_latent(z_pred, z_tgt, mask, band_r=band_r)
        expected = naive_weighted_mse(z_pred, z_tgt, mask, band_r, 1.0, 6.0, 0.2)
        assert got.item() == pytest.approx(expected, rel=1e-5)

    @pytest.mark.parametrize("fill", [0.0, 1.0])
    def test_empty_and_full_masks_give_plain_mse(self, fill):
        z_pred, z_tgt = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        got = weighted_masked_mse_latent(z_pred, z_tgt, torch.full((2, 1, 8, 8), fill))
        torch.testing.assert_close(got, ((z_pred - z_tgt) ** 2).mean())

    def test_equal_weights_give_plain_mse(self):
        z_pred, z_tgt = torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)
        got = weighted_masked_mse_latent(
            z_pred, z_tgt, square_mask(), w_in=3.0, w_band=3.0, w_out=3.0
        )
        torch.testing.assert_close(got, ((z_pred - z_tgt) ** 2).mean())

    def test_error_on_band_costs_more_than_outside(self):
        z_tgt = torch.zeros(1, 1, 12, 12)
        on_band, far_out = z_tgt.clone(), z_tgt.clone()
        on_band[0, 0, 3, 5] = 1.0  # on the contour of the 3..8 square
        far_out[0, 0, 0, 11] = 1.0
        mask = square_mask(batch=1)
        band_loss = weighted_masked_mse_latent(on_band, z_tgt, mask)
        out_loss = weighted_masked_mse_latent(far_out, z_tgt, mask)
        assert band_loss.item() == pytest.approx(30 * out_loss.item())  # 6.0 / 0.2

    def test_channel_sum(self):
        z_pred, z_tgt = torch.randn(2, 4, 12, 12), torch.randn(2, 4, 12, 12)
        mean = weighted_masked_mse_latent(z_pred, z_tgt, square_mask())
        total = weighted_masked_mse_latent(z_pred, z_tgt, square_mask(), channel_reduce="sum")
        torch.testing.assert_close(total, 4 * mean)

    def test_gradcheck(self):
        z_pred = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
        z_tgt = torch.randn(2, 3, 12, 12, dtype=torch.float64)
        mask = square_mask(dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda z: weighted_masked_mse_latent(z, z_tgt, mask), (z_pred,)
        )

    def test_errors(self):
        with pytest.raises(ValueError, match=r"z_pred.*z_tgt"):
            weighted_masked_mse_latent(
                torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8)
            )
        with pytest.raises(ValueError, match="mask_latent"):
            weighted_masked_mse_latent(
                torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(1, 1, 4, 4)
            )
        with pytest.raises(ValueError, match="channel_reduce"):
            weighted_masked_mse_latent(
                torch.zeros(1, 4, 8, 8),
                torch.zeros(1, 4, 8, 8),
                torch.zeros(1, 1, 8, 8),
                channel_reduce="max",
            )


class TestBackgroundPreservation:
    def test_inside_edits_are_free(self):
        z_ctx = torch.randn(2, 4, 12, 12)
        z_pred = z_ctx.clone()
        z_pred[:, :, 2:10, 2:10] += 5.0  # inside the mask dilated by 1
        assert background_preservation_mse_latent(z_pred, z_ctx, square_mask()).item() == 0

    def test_known_value(self):
        z_ctx = torch.zeros(1, 2, 12, 12)
        z_pred = z_ctx.clone()
        z_pred[0, :, 0, 0] = 2.0  # one outside pixel, squared error 4 in both channels
        outside_pixels = 144 - 8 * 8  # 12x12 minus the 3..8 square dilated by 1
        loss = background_preservation_mse_latent(z_pred, z_ctx, square_mask(batch=1))
        assert loss.item() == pytest.approx(4.0 / outside_pixels)

    def test_full_mask_has_no_background(self):
        z_pred = torch.randn(1, 4, 8, 8, requires_grad=True)
        loss = background_preservation_mse_latent(
            z_pred, torch.zeros(1, 4, 8, 8), torch.ones(1, 1, 8, 8)
        )
        loss.backward()
        assert (
            loss.item() == 0 and torch.isfinite(z_pred.grad).all() and z_pred.grad.abs().sum() == 0
        )

    def test_gradcheck(self):
        z_pred = torch.randn(1, 3, 12, 12, dtype=torch.float64, requires_grad=True)
        z_ctx = torch.randn(1, 3, 12, 12, dtype=torch.float64)
        mask = square_mask(batch=1, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda z: background_preservation_mse_latent(z, z_ctx, mask), (z_pred,)
        )


class TestSoftChangeMask:
    def test_fixed_threshold_formula(self):
        z_pred, z_ctx = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
        soft, stats, dist = soft_change_mask_from_latents(z_pred, z_ctx, tau=1.5, s=0.25)
        expected_dist = ((z_pred - z_ctx) ** 2).sum(1, keepdim=True).sqrt()
        torch.testing.assert_close(dist, expected_dist)
        torch.testing.assert_close(soft, torch.sigmoid((expected_dist - 1.5) / 0.25))
        assert stats.tau.shape == stats.s.shape == (2, 1, 1, 1)

    def test_estimated_from_sure_background(self):
        z_ctx = torch.zeros(1, 1, 12, 12)
        z_pred = torch.rand(1, 1, 12, 12)
        mask = square_mask(batch=1)
        _, stats, _ = soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=mask, k_sigma=2.0)
        background = [
            float(z_pred[0, 0, y, x])
            for y in range(12)
            for x in range(12)
            if not (2 <= y < 10 and 2 <= x < 10)
        ]
        mean = sum(background) / len(background)
        std = math.sqrt(sum((v - mean) ** 2 for v in background) / len(background))
        assert stats.s.item() == pytest.approx(std, rel=1e-5)
        assert stats.tau.item() == pytest.approx(mean + 2.0 * std, rel=1e-5)

    def test_without_mask_uses_all_pixels(self):
        z_pred, z_ctx = torch.randn(2, 3, 5, 5), torch.zeros(2, 3, 5, 5)
        _, stats, dist = soft_change_mask_from_latents(z_pred, z_ctx, k_sigma=1.0)
        flat = dist.flatten(1)
        std = flat.std(dim=1, unbiased=False)
        torch.testing.assert_close(stats.s.flatten(), std)
        torch.testing.assert_close(stats.tau.flatten(), flat.mean(1) + std)

    def test_full_mask_falls_back_to_all_pixels(self):
        z_pred, z_ctx = torch.randn(1, 3, 6, 6), torch.zeros(1, 3, 6, 6)
        with_mask = soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=torch.ones(1, 1, 6, 6))
        without = soft_change_mask_from_latents(z_pred, z_ctx)
        torch.testing.assert_close(with_mask[1].tau, without[1].tau)

    def test_zero_spread_background_is_finite(self):
        z_ctx = torch.zeros(1, 4, 12, 12)
        z_pred = z_ctx.clone()
        z_pred[:, :, 4:8, 4:8] = 1.0
        z_pred.requires_grad_(True)
        soft, stats, _ = soft_change_mask_from_latents(
            z_pred, z_ctx, mask_latent=square_mask(batch=1)
        )
        soft.sum().backward()
        assert torch.isfinite(soft).all() and torch.isfinite(z_pred.grad).all()
        assert stats.s.item() == pytest.approx(1e-4)
        # The constant background reads sigmoid(-k_sigma), as background at its mean always does.
        assert soft[0, 0, 0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(-2.0)).item())
        assert soft[0, 0, 5, 5].item() == pytest.approx(1.0)

    def test_zero_temperature_is_floored(self):
        z_pred = torch.randn(1, 2, 4, 4, requires_grad=True)
        z_ctx = z_pred.detach().clone()
        soft, stats, _ = soft_change_mask_from_latents(z_pred, z_ctx, tau=0.0, s=0.0)
        soft.sum().backward()
        assert stats.s.item() == pytest.approx(1e-4)
        assert torch.isfinite(soft).all() and torch.isfinite(z_pred.grad).all()

    def test_statistics_carry_no_gradient(self):
        z_pred = torch.randn(1, 2, 8, 8, requires_grad=True)
        soft, stats, _ = soft_change_mask_from_latents(z_pred, torch.zeros(1, 2, 8, 8))
        assert not stats.tau.requires_grad and not stats.s.requires_grad and soft.requires_grad

    def test_gradcheck(self):
        z_pred = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        z_ctx = torch.randn(1, 3, 8, 8, dtype=torch.float64)
        assert torch.autograd.gradcheck(
            lambda z: soft_change_mask_from_latents(z, z_ctx, tau=1.0, s=0.5)[0], (z_pred,)
        )

    def test_estimated_statistics_act_as_constants(self):
        z_pred = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
        z_ctx = torch.randn(1, 3, 8, 8, dtype=torch.float64)
        mask = square_mask(batch=1, size=8, lo=2, hi=6, dtype=torch.float64)
        soft, stats, _ = soft_change_mask_from_latents(z_pred, z_ctx, mask_latent=mask)
        (grad_estimated,) = torch.autograd.grad(soft.sum(), z_pred)
        fixed, _, _ = soft_change_mask_from_latents(z_pred, z_ctx, tau=stats.tau, s=stats.s)
        (grad_fixed,) = torch.autograd.grad(fixed.sum(), z_pred)
        torch.testing.assert_close(soft, fixed)
        torch.testing.assert_close(grad_estimated, grad_fixed)

    def test_returns_stats_dataclass(self):
        _, stats, _ = soft_change_mask_from_latents(
            torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
        )
        assert isinstance(stats, ChangeMaskStats)


class TestDice:
    def test_identical_binary_masks(self):
        mask = square_mask()
        assert dice_loss(mask, mask).item() == pytest.approx(0.0, abs=1e-6)

    def test_disjoint(self):
        a, b = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
        a[..., :2, :], b[..., 2:, :] = 1, 1
        assert dice_loss(a, b).item() == pytest.approx(1.0, abs=1e-6)

    def test_hand_computed_soft(self):
        pred = torch.full((1, 1, 2, 2), 0.5)
        target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
        # 2 * (0.5 + 0.5) / (2 + 2) = 0.5
        assert dice_loss(pred, target).item() == pytest.approx(0.5, abs=1e-6)

    def test_both_empty_is_perfect(self):
        assert dice_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)).item() == 0

    def test_batch_mean(self):
        mask = square_mask(batch=1)
        pred = torch.cat([mask, 1 - mask])
        assert dice_loss(pred, torch.cat([mask, mask])).item() == pytest.approx(0.5, abs=1e-6)

    def test_gradcheck(self):
        pred = torch.rand(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
        target = torch.rand(2, 1, 5, 5, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda p: dice_loss(p, target), (pred,))

    def test_shape_error(self):
        with pytest.raises(ValueError, match=r"pred_mask.*target_mask"):
            dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


class TestAreaRatio:
    def test_equal_area_is_zero(self):
        a = square_mask(batch=1)
        b = torch.roll(a, shifts=2, dims=-1)
        assert area_ratio_loss(a, b).item() == 0

    def test_hand_computed(self):
        pred, target = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
        pred[..., :1, :] = 1  # area 4
        target[..., :2, :] = 1  # area 8
        assert area_ratio_loss(pred, target).item() == pytest.approx(math.log(5 / 9) ** 2)

    def test_zero_area_prediction_is_finite(self):
        pred = torch.zeros(1, 1, 8, 8, requires_grad=True)
        target = square_mask(batch=1, size=8, lo=0, hi=8)
        loss = area_ratio_loss(pred, target)
        loss.backward()
        assert loss.item() == pytest.approx(math.log(1 / 65) ** 2)
        assert torch.isfinite(pred.grad).all()
        assert pred.grad[0, 0, 0, 0].item() == pytest.approx(2 * math.log(1 / 65))

    def test_background_reading_is_removed(self):
        pred = torch.full((1, 1, 4, 4), 0.2)
        pred[..., :2, :2] = 1.0  # 4 changed pixels on a background reading 0.2
        target = torch.zeros(1, 1, 4, 4)
        target[..., :2, :2] = 1.0
        background = 1 - target
        # b = 0.2; (4 * 1.0 + 12 * 0.2 - 16 * 0.2) / 0.8 = 4: the object's own area.
        got = area_ratio_loss(pred, target, background_mask=background)
        assert got.item() == pytest.approx(0.0, abs=1e-10)
        assert area_ratio_loss(pred, target).item() == pytest.approx(math.log(7.4 / 5) ** 2)

    def test_uniform_shift_only_rescales(self):
        # Raising every pixel by d raises the reading b by d too: the change above it,
        # sum(p) - N b, stays put and only its normalisation 1 / (1 - b) moves.
        pred = 0.1 + 0.4 * torch.rand(1, 1, 6, 6, dtype=torch.float64)
        target = square_mask(batch=1, size=6, lo=1, hi=4, dtype=torch.float64)
        background = sure_background(target, 1)
        reading = pred[background.bool()].mean().item()
        change = pred.sum().item() - 36 * reading
        for shift in (0.0, 0.1):
            area = change / (1 - reading - shift)
            expected = math.log((area + 1) / (9 + 1)) ** 2
            got = area_ratio_loss(pred + shift, target, background_mask=background)
            assert got.item() == pytest.approx(expected, rel=1e-9)

    def test_reading_above_every_pixel_is_zero_area(self):
        pred = torch.full((1, 1, 3, 3), 0.1, requires_grad=True)
        background = torch.zeros(1, 1, 3, 3)
        background[..., 0, 0] = 1
        with torch.no_grad():
            pred[..., 0, 0] = 0.3
        loss = area_ratio_loss(pred, torch.ones(1, 1, 3, 3), background_mask=background)
        loss.backward()
        assert loss.item() == pytest.approx(math.log(1 / 10) ** 2)
        assert torch.isfinite(pred.grad).all()

    def test_empty_background_reads_zero(self):
        pred, target = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)
        got = area_ratio_loss(pred, target, background_mask=torch.zeros(1, 1, 4, 4))
        torch.testing.assert_close(got, area_ratio_loss(pred, target))

    def test_gradcheck_with_background(self):
        pred = (0.2 + 0.6 * torch.rand(2, 1, 5, 5, dtype=torch.float64)).requires_grad_(True)
        target = square_mask(batch=2, size=5, lo=1, hi=3, dtype=torch.float64)
        background = sure_background(target, 1)
        assert torch.autograd.gradcheck(
            lambda p: area_ratio_loss(p, target, background_mask=background), (pred,)
        )

    def test_both_empty(self):
        assert area_ratio_loss(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3)).item() == 0

    def test_gradcheck(self):
        pred = torch.rand(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
        target = torch.rand(2, 1, 5, 5, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda p: area_ratio_loss(p, target), (pred,))


class TestBoundaryLoss:
    def test_hand_computed(self):
        pred = torch.tensor([[[[1.0, 0.5]]]])
        phi = torch.tensor([[[[-2.0, 3.0]]]])
        assert boundary_loss(pred, phi).item() == pytest.approx((-2.0 + 1.5) / 2)

    def test_exact_mask_beats_shifted_mask(self):
        target = square_mask(batch=1)
        phi = signed_distance_map_from_mask(target)
        exact = boundary_loss(target, phi)
        shifted = boundary_loss(torch.roll(target, shifts=2, dims=-1), phi)
        # The inner contour has phi = 0, so only a shrink deeper than one pixel costs anything.
        shrunk = boundary_loss(square_mask(batch=1, lo=5, hi=7), phi)
        assert exact < shrunk and exact < shifted

    def test_gradient_is_the_distance_map(self):
        pred = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
        phi = torch.randn(1, 1, 6, 6, dtype=torch.float64)
        boundary_loss(pred, phi).backward()
        torch.testing.assert_close(pred.grad, phi / 36)

    def test_zero_mean_hand_computed(self):
        pred = torch.tensor([[[[0.9, 0.3, 0.3]]]])
        phi = torch.tensor([[[[-1.0, 1.0, 3.0]]]])
        # phi - mean(phi) = (-2, 0, 2): mean((-1.8, 0, 0.6)) = -0.4
        assert boundary_loss(pred, phi, zero_mean=True).item() == pytest.approx(-0.4)

    def test_zero_mean_ignores_a_uniform_level(self):
        pred = torch.rand(2, 1, 6, 6, dtype=torch.float64) * 0.5
        target = square_mask(batch=2, size=6, lo=1, hi=4, dtype=torch.float64)
        phi = signed_distance_map_from_mask(target).double()
        base = boundary_loss(pred, phi, zero_mean=True)
        assert boundary_loss(pred + 0.2, phi, zero_mean=True).item() == pytest.approx(
            base.item(), abs=1e-12
        )
        assert boundary_loss(pred + 0.2, phi).item() > boundary_loss(pred, phi).item()

    def test_zero_mean_gradient(self):
        pred = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
        phi = torch.randn(1, 1, 6, 6, dtype=torch.float64)
        boundary_loss(pred, phi, zero_mean=True).backward()
        torch.testing.assert_close(pred.grad, (phi - phi.mean()) / 36)

    def test_shape_error(self):
        with pytest.raises(ValueError, match=r"pred_soft_mask.*signed_distance_map"):
            boundary_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 4))


class TestStarterLoss:
    def setup_method(self):
        self.z_tgt = torch.randn(2, 4, 12, 12)
        self.z_ctx = torch.randn(2, 4, 12, 12)
        self.z_pred = torch.randn(2, 4, 12, 12)
        self.mask = square_mask()

    def test_seed_defaults(self):
        weights = GeometryLossWeights()
        assert (weights.mse, weights.bg, weights.dice, weights.area, weights.bnd) == (
            1.0,
            0.6,
            0.9,
            0.2,
            0.4,
        )

    def test_total_is_weighted_sum_of_components(self):
        total, parts = geometry_starter_loss(self.z_pred, self.z_tgt, self.z_ctx, self.mask)
        soft, _, _ = soft_change_mask_from_latents(self.z_pred, self.z_ctx, mask_latent=self.mask)
        phi = signed_distance_map_from_mask(self.mask, normalize=True)
        background = sure_background(self.mask, 1)
        expected = {
            "mse": weighted_masked_mse_latent(self.z_pred, self.z_tgt, self.mask),
            "bg": background_preservation_mse_latent(self.z_pred, self.z_ctx, self.mask),
            "dice": dice_loss(soft, self.mask),
            "area": area_ratio_loss(soft, self.mask, background_mask=background),
            "bnd": boundary_loss(soft, phi, zero_mean=True),
        }
        assert parts.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(parts[name], value)
        weighted = 1.0 * expected["mse"] + 0.6 * expected["bg"] + 0.9 * expected["dice"]
        weighted = weighted + 0.2 * expected["area"] + 0.4 * expected["bnd"]
        torch.testing.assert_close(total, weighted)

    def test_zero_weights_are_skipped(self):
        weights = GeometryLossWeights(bg=0.0, bnd=0.0)
        total, parts = geometry_starter_loss(
            self.z_pred, self.z_tgt, self.z_ctx, self.mask, weights=weights
        )
        assert set(parts) == {"mse", "dice", "area"}
        torch.testing.assert_close(total, parts["mse"] + 0.9 * parts["dice"] + 0.2 * parts["area"])

    def test_precomputed_distance_map_is_used(self):
        phi = torch.randn(2, 1, 12, 12)
        weights = GeometryLossWeights(mse=0, bg=0, dice=0, area=0, bnd=1.0)
        _, parts = geometry_starter_loss(
            self.z_pred, self.z_tgt, self.z_ctx, self.mask, weights=weights, signed_distance_map=phi
        )
        soft, _, _ = soft_change_mask_from_latents(self.z_pred, self.z_ctx, mask_latent=self.mask)
        torch.testing.assert_close(parts["bnd"], boundary_loss(soft, phi, zero_mean=True))

    def test_all_zero_weights_cost_nothing(self):
        total, parts = geometry_starter_loss(
            self.z_pred,
            self.z_tgt,
            self.z_ctx,
            self.mask,
            weights=GeometryLossWeights(0, 0, 0, 0, 0),
        )
        assert parts == {} and total.item() == 0

    def test_backward_is_finite(self):
        z_pred = self.z_pred.clone().requires_grad_(True)
        total, _ = geometry_starter_loss(z_pred, self.z_tgt, self.z_ctx, self.mask)
        total.backward()
        assert torch.isfinite(z_pred.grad).all()


@pytest.fixture(scope="module")
def scores():
    """The table of docs/losses.md: an object inserted into a 32x32 latent, then candidates grown,
    shrunk and shifted, each with prediction noise, scored against the exact insertion."""
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, 16, 32, 32, generator=generator)
    obj = 3 + torch.randn(1, 16, 32, 32, generator=generator)
    mask = square_mask(batch=1, size=32, lo=10, hi=22)
    phi = signed_distance_map_from_mask(mask, normalize=True)
    background = sure_background(mask, 1)
    candidates = {
        "exact": (10, 22, 0),
        "grown": (8, 24, 0),
        "shrunk": (12, 20, 0),
        "shifted": (10, 22, 3),
    }
    scores = {}
    for name, (lo, hi, shift) in candidates.items():
        z_pred = context.clone()
        z_pred[..., lo + shift : hi + shift, lo + shift : hi + shift] = obj[
            ..., : hi - lo, : hi - lo
        ]
        z_pred = z_pred + 0.3 * torch.randn(z_pred.shape, generator=generator)
        soft, _, _ = soft_change_mask_from_latents(z_pred, context, mask_latent=mask)
        scores[name] = {
            "dice": dice_loss(soft, mask).item(),
            "area": area_ratio_loss(soft, mask, background_mask=background).item(),
            "area_plain": area_ratio_loss(soft, mask).item(),
            "bnd": boundary_loss(soft, phi).item(),
        }
    return scores


class TestCandidateRanking:
    @pytest.mark.parametrize("term", ["dice", "area"])
    def test_exact_insertion_scores_best(self, scores, term):
        others = [scores[name][term] for name in ("grown", "shrunk", "shifted")]
        assert scores["exact"][term] < min(others)

    def test_plain_area_rewards_shrinking(self, scores):
        # Why the area term measures the change above the background's reading.
        assert scores["shrunk"]["area_plain"] < scores["exact"]["area_plain"]
        assert scores["shrunk"]["area"] > scores["exact"]["area"]

    def test_boundary_term_prefers_growth(self, scores):
        # A known limitation stated in docs/losses.md: spill-over into the sure background inflates
        # the change mask's statistics, and the boundary term then favours a grown object.
        assert scores["grown"]["bnd"] < scores["exact"]["bnd"] < scores["shrunk"]["bnd"]
