from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from losses.spectral import (
    HIGH_COVERAGE,
    LOW_COVERAGE,
    coverage_warning,
    mask_coverage_stats,
    masked_mse_per_channel,
    masked_sam_loss,
)


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _rand_mask(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Soft mask in [0, 1]; the losses binarise it at 0.5."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=dtype)


def _pixel(spectrum: list[float]) -> torch.Tensor:
    """One-pixel image ``[1, C, 1, 1]`` holding ``spectrum``."""
    return torch.tensor(spectrum, dtype=torch.float64).view(1, -1, 1, 1)


def _mask_value(mask: list, b: int, c: int, h: int, w: int) -> float:
    """Binarised mask value of band ``c``; a one-band mask is shared by every band."""
    return 1.0 if mask[b][c if len(mask[b]) > 1 else 0][h][w] > 0.5 else 0.0


def naive_mse_per_channel(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> list:
    """The formula as written in the spec, one pixel at a time on Python floats."""
    p, t, mk = pred.tolist(), target.tolist(), mask.tolist()
    n_b, n_c, n_h, n_w = pred.shape
    out = []
    for c in range(n_c):
        num = den = 0.0
        for b in range(n_b):
            for h in range(n_h):
                for w in range(n_w):
                    m = _mask_value(mk, b, c, h, w)
                    num += (p[b][c][h][w] * m - t[b][c][h][w] * m) ** 2 * m
                    den += m
        out.append(num / (den + 1e-8))
    return out


def naive_sam(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean acos of the cosine over masked pixels with a non-zero masked target spectrum."""
    p, t, mk = pred.tolist(), target.tolist(), mask.tolist()
    n_b, n_c, n_h, n_w = pred.shape
    angles = []
    for b in range(n_b):
        for h in range(n_h):
            for w in range(n_w):
                ms = [_mask_value(mk, b, c, h, w) for c in range(n_c)]
                ps = [p[b][c][h][w] * ms[c] for c in range(n_c)]
                ts = [t[b][c][h][w] * ms[c] for c in range(n_c)]
                t_norm = math.sqrt(sum(x * x for x in ts))
                if t_norm <= 1e-6:
                    continue
                p_norm = math.sqrt(sum(x * x for x in ps))
                if p_norm == 0.0:
                    angles.append(math.pi / 2)
                    continue
                cos = sum(x * y for x, y in zip(ps, ts, strict=True)) / (p_norm * t_norm)
                angles.append(math.acos(max(-1.0, min(1.0, cos))))
    return sum(angles) / len(angles) if angles else 0.0


_IMG = (2, 3, 4, 4)


class _MaskHandlingTests:
    """Mask and shape handling both losses share; subclasses set ``loss``."""

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def test_empty_mask_gives_zero_with_zero_gradient(self) -> None:
        pred = _rand(2, 5, 4, 4, seed=20).requires_grad_()
        target = _rand(2, 5, 4, 4, seed=21).requires_grad_()
        loss = self.loss(pred, target, torch.zeros(2, 1, 4, 4, dtype=torch.float64))
        assert torch.equal(loss.detach(), torch.zeros_like(loss))
        loss.sum().backward()
        for grad in (pred.grad, target.grad):
            assert torch.isfinite(grad).all()
            assert torch.equal(grad, torch.zeros_like(grad))

    def test_non_binary_mask_is_binarised(self) -> None:
        pred, target = _rand(2, 3, 4, 4, seed=22), _rand(2, 3, 4, 4, seed=23)
        binary = (_rand_mask(2, 1, 4, 4, seed=24) > 0.5).double()
        soft = torch.where(binary > 0.5, 0.7, 0.3)
        torch.testing.assert_close(
            self.loss(pred, target, soft), self.loss(pred, target, binary), rtol=0, atol=0
        )
        # 0.5 itself is background.
        torch.testing.assert_close(
            self.loss(pred, target, torch.where(binary > 0.5, 1.0, 0.5)),
            self.loss(pred, target, binary),
            rtol=0,
            atol=0,
        )

    def test_broadcast_mask_equals_expanded_mask(self) -> None:
        pred, target = _rand(2, 5, 4, 4, seed=25), _rand(2, 5, 4, 4, seed=26)
        mask = _rand_mask(2, 1, 4, 4, seed=27)
        expanded = mask.expand(-1, 5, -1, -1).contiguous()
        torch.testing.assert_close(
            self.loss(pred, target, mask), self.loss(pred, target, expanded), rtol=0, atol=0
        )

    def test_background_nan_is_ignored(self) -> None:
        mask = _rand_mask(2, 1, 4, 4, seed=28)
        background = (mask <= 0.5).expand(-1, 3, -1, -1)
        pred = _rand(2, 3, 4, 4, seed=29)
        target = _rand(2, 3, 4, 4, seed=30)
        clean = self.loss(pred, target, mask)
        pred = pred.masked_fill(background, float("nan")).requires_grad_()
        target = target.masked_fill(background, float("inf")).requires_grad_()
        loss = self.loss(pred, target, mask)
        torch.testing.assert_close(loss, clean)
        loss.sum().backward()
        assert torch.isfinite(pred.grad).all()
        assert torch.isfinite(target.grad).all()

    @pytest.mark.parametrize(
        ("pred_shape", "target_shape", "mask_shape", "match"),
        [
            (_IMG, (2, 3, 4, 5), (2, 1, 4, 4), r"pred \[2, 3, 4, 4\], target \[2, 3, 4, 5\]"),
            (_IMG, _IMG, (2, 2, 4, 4), r"mask.*pred \[2, 3, 4, 4\].*mask \[2, 2, 4, 4\]"),
            (_IMG, _IMG, (2, 1, 4, 5), r"mask.*pred \[2, 3, 4, 4\].*mask \[2, 1, 4, 5\]"),
            (_IMG, _IMG, (1, 1, 4, 4), r"mask.*pred \[2, 3, 4, 4\].*mask \[1, 1, 4, 4\]"),
            (_IMG, _IMG, (2, 4, 4), r"mask.*pred \[2, 3, 4, 4\].*mask \[2, 4, 4\]"),
            (
                (3, 4, 4),
                (3, 4, 4),
                (1, 4, 4),
                r"pred must be \[B, C, H, W\], got shape \[3, 4, 4\]",
            ),
        ],
        ids=["target", "mask_bands", "mask_width", "mask_batch", "mask_3d", "pred_3d"],
    )
    def test_shape_errors(self, pred_shape, target_shape, mask_shape, match) -> None:
        with pytest.raises(ValueError, match=match):
            self.loss(torch.zeros(pred_shape), torch.zeros(target_shape), torch.ones(mask_shape))


class TestMaskedMsePerChannel(_MaskHandlingTests):
    loss = staticmethod(masked_mse_per_channel)

    @pytest.mark.parametrize("per_channel_mask", [False, True], ids=["mask_b1hw", "mask_bchw"])
    @pytest.mark.parametrize("channels", [1, 3, 5])
    def test_matches_naive_reference(self, channels: int, per_channel_mask: bool) -> None:
        pred = _rand(2, channels, 4, 5, seed=1)
        target = _rand(2, channels, 4, 5, seed=2)
        mask = _rand_mask(2, channels if per_channel_mask else 1, 4, 5, seed=3)
        got = masked_mse_per_channel(pred, target, mask)
        assert got.shape == (channels,)
        expected = torch.tensor(naive_mse_per_channel(pred, target, mask), dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)

    def test_known_region(self) -> None:
        # Band 0 of the target is 1, band 1 is 0..15 row by row; pred is 0 inside the mask and
        # 100 outside, where it must not count.
        target = torch.stack([torch.ones(4, 4), torch.arange(16.0).view(4, 4)]).unsqueeze(0)
        mask = torch.zeros(1, 1, 4, 4)
        mask[..., :2, :2] = 1.0
        pred = torch.where(mask > 0.5, 0.0, 100.0).expand(1, 2, 4, 4)
        got = masked_mse_per_channel(pred, target, mask)
        # Band 1 inside the mask holds 0, 1, 4, 5: (0 + 1 + 16 + 25) / 4.
        torch.testing.assert_close(got, torch.tensor([1.0, 10.5]))

    def test_pools_pixels_over_batch(self) -> None:
        # Sample 0 keeps one pixel with error 1, sample 1 keeps three with error 0: the pooled
        # mean is 1 / 4, not the mean of per-sample means (1 / 2).
        pred = torch.zeros(2, 1, 2, 2)
        pred[0, 0, 0, 0] = 1.0
        target = torch.zeros(2, 1, 2, 2)
        mask = torch.zeros(2, 1, 2, 2)
        mask[0, 0, 0, 0] = 1.0
        mask[1, 0, :, :] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
        torch.testing.assert_close(masked_mse_per_channel(pred, target, mask), torch.tensor([0.25]))

    def test_full_mask_equals_unmasked_mse(self) -> None:
        pred, target = _rand(3, 5, 6, 6, seed=4), _rand(3, 5, 6, 6, seed=5)
        got = masked_mse_per_channel(pred, target, torch.ones(3, 1, 6, 6, dtype=torch.float64))
        torch.testing.assert_close(got, (pred - target).square().mean(dim=(0, 2, 3)))

    def test_band_without_masked_pixels_is_zero(self) -> None:
        pred, target = _rand(2, 3, 4, 4, seed=6), _rand(2, 3, 4, 4, seed=7)
        mask = torch.ones(2, 3, 4, 4, dtype=torch.float64)
        mask[:, 1] = 0.0
        got = masked_mse_per_channel(pred, target, mask)
        assert got[1].item() == 0.0
        torch.testing.assert_close(
            got[[0, 2]], (pred - target).square().mean(dim=(0, 2, 3))[[0, 2]]
        )

    def test_gradcheck(self) -> None:
        pred = _rand(2, 3, 3, 4, seed=8).requires_grad_()
        target = _rand(2, 3, 3, 4, seed=9).requires_grad_()
        mask = _rand_mask(2, 1, 3, 4, seed=10)
        assert torch.autograd.gradcheck(
            lambda p, t: masked_mse_per_channel(p, t, mask), (pred, target)
        )


class TestMaskedSamLoss(_MaskHandlingTests):
    loss = staticmethod(masked_sam_loss)

    @pytest.mark.parametrize("per_channel_mask", [False, True], ids=["mask_b1hw", "mask_bchw"])
    @pytest.mark.parametrize("channels", [1, 3, 5])
    def test_matches_naive_reference(self, channels: int, per_channel_mask: bool) -> None:
        pred = _rand(2, channels, 4, 5, seed=11)
        target = _rand(2, channels, 4, 5, seed=12)
        target[0, :, 0, 0] = 0.0
        pred[1, :, 2, 3] = 0.0
        mask = _rand_mask(2, channels if per_channel_mask else 1, 4, 5, seed=13)
        got = masked_sam_loss(pred, target, mask)
        assert got.shape == ()
        assert got.item() == pytest.approx(naive_sam(pred, target, mask), rel=1e-9, abs=1e-12)

    @pytest.mark.parametrize(
        ("pred", "target", "expected"),
        [
            ([1, 0, 0, 0, 0], [0, 1, 0, 0, 0], math.pi / 2),
            ([0.2, 0.4, 0.1, 0.7, 0.5], [0.2, 0.4, 0.1, 0.7, 0.5], 0.0),
            ([0.6, 1.5, 0.9, 2.1, 0.3], [0.2, 0.5, 0.3, 0.7, 0.1], 0.0),
            ([1, 0], [0.5, math.sqrt(3) / 2], math.pi / 3),
            ([1, 2, 3], [-1, -2, -3], math.pi),
            ([0, 0, 0], [1, 2, 3], math.pi / 2),
        ],
        ids=["orthogonal", "identical", "scaled_3x", "60_degrees", "anti_parallel", "zero_pred"],
    )
    def test_known_angles(self, pred: list, target: list, expected: float) -> None:
        got = masked_sam_loss(_pixel(pred), _pixel(target), torch.ones(1, 1, 1, 1))
        assert got.item() == pytest.approx(expected, abs=1e-12)

    def test_mean_over_valid_pixels(self) -> None:
        # Two pixels at pi/2 and 0 in one sample, one at pi/3 in another; a third masked-out
        # pixel at pi must not count.
        pred = torch.zeros(2, 2, 1, 3)
        pred[:, 0] = 1.0
        target = torch.zeros(2, 2, 1, 3)
        target[0, :, 0, 0] = torch.tensor([0.0, 1.0])
        target[0, :, 0, 1] = torch.tensor([2.0, 0.0])
        target[0, :, 0, 2] = torch.tensor([-1.0, 0.0])
        target[1, :, 0, 0] = torch.tensor([0.5, math.sqrt(3) / 2])
        mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).view(2, 1, 1, 3)
        expected = (math.pi / 2 + 0.0 + math.pi / 3) / 3
        assert masked_sam_loss(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)

    def test_small_angle_is_accurate_in_float32(self) -> None:
        # The float32 cosine of this pair rounds to exactly 1, so acos would report 0.
        pred = torch.tensor([1.0, 1e-4]).view(1, 2, 1, 1)
        target = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
        got = masked_sam_loss(pred, target, torch.ones(1, 1, 1, 1))
        assert got.item() == pytest.approx(math.atan(1e-4), rel=1e-5)

    @pytest.mark.parametrize(
        ("scale", "expected"),
        [(1.0, 0.0), (3.0, 0.0), (-1.0, math.pi)],
        ids=["identical", "scaled_3x", "anti_parallel"],
    )
    def test_degenerate_pairs_have_finite_gradient(self, scale: float, expected: float) -> None:
        target = _rand(2, 5, 3, 3, seed=14).requires_grad_()
        pred = (scale * target.detach()).requires_grad_()
        loss = masked_sam_loss(pred, target, torch.ones(2, 1, 3, 3, dtype=torch.float64))
        assert loss.item() == pytest.approx(expected, abs=1e-7)
        loss.backward()
        assert torch.isfinite(pred.grad).all()
        assert torch.isfinite(target.grad).all()

    def test_zero_pred_spectrum_has_zero_gradient(self) -> None:
        pred = torch.zeros(1, 5, 2, 2, dtype=torch.float64, requires_grad=True)
        target = _rand(1, 5, 2, 2, seed=15)
        loss = masked_sam_loss(pred, target, torch.ones(1, 1, 2, 2))
        assert loss.item() == pytest.approx(math.pi / 2, abs=1e-12)
        loss.backward()
        assert torch.equal(pred.grad, torch.zeros_like(pred))

    @pytest.mark.parametrize(
        ("target_scale", "expected"),
        [(0.0, math.pi / 2), (1e-7, math.pi / 2), (1e-5, math.pi / 4)],
        ids=["zero", "below_threshold", "above_threshold"],
    )
    def test_zero_target_spectrum_is_excluded(self, target_scale: float, expected: float) -> None:
        # Pixel 0 is at pi/2; pixel 1 is at 0 and counts only if its target is not ~zero.
        pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64).view(1, 2, 1, 2)
        target = torch.tensor([[0.0, target_scale], [1.0, 0.0]], dtype=torch.float64)
        target = target.view(1, 2, 1, 2)
        got = masked_sam_loss(pred, target, torch.ones(1, 1, 1, 2))
        assert got.item() == pytest.approx(expected, abs=1e-12)

    def test_all_zero_targets_give_zero_with_zero_gradient(self) -> None:
        pred = _rand(2, 3, 4, 4, seed=16).requires_grad_()
        target = torch.zeros(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        loss = masked_sam_loss(pred, target, torch.ones(2, 1, 4, 4))
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(pred.grad, torch.zeros_like(pred))
        assert torch.equal(target.grad, torch.zeros_like(target))

    def test_per_band_mask_restricts_the_spectrum(self) -> None:
        # Only the masked bands form the spectrum: band 2 would otherwise flip the angle, and a
        # pixel whose band 0 is unmasked still counts through its other bands.
        pred = torch.tensor([[1.0, 9.0], [0.0, 1.0], [5.0, 0.0]]).view(1, 3, 1, 2)
        target = torch.tensor([[1.0, 4.0], [0.0, 0.0], [-7.0, 1.0]]).view(1, 3, 1, 2)
        mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]).view(1, 3, 1, 2)
        got = masked_sam_loss(pred, target, mask)
        assert got.item() == pytest.approx((0.0 + math.pi / 2) / 2, abs=1e-6)

    def test_gradcheck(self) -> None:
        pred = _rand(2, 5, 3, 4, seed=17).requires_grad_()
        target = _rand(2, 5, 3, 4, seed=18).requires_grad_()
        mask = _rand_mask(2, 1, 3, 4, seed=19)
        assert torch.autograd.gradcheck(lambda p, t: masked_sam_loss(p, t, mask), (pred, target))


def _pattern_mask() -> torch.Tensor:
    """``[3, 4]`` mask keeping 3 pixels: 0.5 itself and anything below are background."""
    return torch.tensor(
        [[1.0, 0.51, 0.5, 0.0], [0.49, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.9]], dtype=torch.float32
    )


class TestMaskCoverageStats:
    @pytest.mark.parametrize(
        ("mask", "valid", "total"),
        [
            (_pattern_mask().expand(2, 1, 3, 4), 6, 24),
            (_pattern_mask().expand(2, 3, 4), 6, 24),
            (_pattern_mask(), 3, 12),
        ],
        ids=["b1hw", "bhw", "hw"],
    )
    def test_known_mask(self, mask: torch.Tensor, valid: int, total: int) -> None:
        stats = mask_coverage_stats(mask)
        assert stats == {"coverage": valid / total, "valid_pixels": valid, "total_pixels": total}
        assert type(stats["coverage"]) is float
        assert type(stats["valid_pixels"]) is int
        assert type(stats["total_pixels"]) is int

    @pytest.mark.parametrize(
        ("mask", "coverage"),
        [
            (torch.zeros(2, 1, 3, 3), 0.0),
            (torch.ones(2, 1, 3, 3), 1.0),
            (torch.zeros(0, 3, 3), 0.0),
        ],
        ids=["all_background", "all_kept", "no_pixels"],
    )
    def test_extremes(self, mask: torch.Tensor, coverage: float) -> None:
        assert mask_coverage_stats(mask)["coverage"] == coverage

    def test_ignores_autograd(self) -> None:
        mask = _pattern_mask().requires_grad_()
        assert mask_coverage_stats(mask)["valid_pixels"] == 3

    @pytest.mark.parametrize(
        ("shape", "match"),
        [
            ((2, 3, 4, 4), r"mask must have one channel, got shape \[2, 3, 4, 4\]"),
            ((4,), r"mask must be .*got shape \[4\]"),
            ((1, 1, 1, 4, 4), r"mask must be .*got shape \[1, 1, 1, 4, 4\]"),
        ],
        ids=["bands", "1d", "5d"],
    )
    def test_shape_errors(self, shape: tuple, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            mask_coverage_stats(torch.ones(shape))


class TestCoverageWarning:
    def test_default_thresholds(self) -> None:
        assert (LOW_COVERAGE, HIGH_COVERAGE) == (0.1, 0.99)

    @pytest.mark.parametrize(
        ("coverage", "prefix"),
        [
            (0.0, "Low mask coverage (0.0000): "),
            (0.0312, "Low mask coverage (0.0312): "),
            (0.0999, "Low mask coverage (0.0999): "),
            (0.1, None),
            (0.5, None),
            (0.99, None),
            (0.9901, "Very high mask coverage (0.9901): "),
            (1.0, "Very high mask coverage (1.0000): "),
        ],
    )
    def test_defaults(self, coverage: float, prefix: str | None) -> None:
        message = coverage_warning(coverage)
        if prefix is None:
            assert message is None
        else:
            assert message is not None
            assert message.startswith(prefix)

    @pytest.mark.parametrize(
        ("coverage", "kind"),
        [(0.29, "Low"), (0.3, None), (0.6, None), (0.61, "Very high")],
    )
    def test_custom_thresholds(self, coverage: float, kind: str | None) -> None:
        message = coverage_warning(coverage, low=0.3, high=0.6)
        assert (message.split(" mask")[0] if message else None) == kind

    def test_from_stats(self) -> None:
        mask = torch.zeros(2, 1, 4, 4)
        mask[0, 0, 1, 2] = 1.0
        message = coverage_warning(mask_coverage_stats(mask)["coverage"])
        assert message is not None
        assert message.startswith("Low mask coverage (0.0312): ")

    def test_low_above_high_raises(self) -> None:
        with pytest.raises(ValueError, match=r"low must not exceed high, got low=0.5, high=0.4"):
            coverage_warning(0.45, low=0.5, high=0.4)
