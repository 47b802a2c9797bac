"""masked_flow_matching_loss against seed 000's formula."""

import pytest
import torch
import torch.nn.functional as F

from losses.flow_matching import masked_flow_matching_loss


def naive_loss(pred, target, mask, alpha, fg, bg, weighting=None):
    """Seed 000's dual loss with explicit loops over b, l, d."""
    batch, length, dim = pred.shape
    plain, weighted = 0.0, 0.0
    for b in range(batch):
        w = 1.0 if weighting is None else float(weighting[b])
        for i in range(length):
            region = float(mask[b, i]) * fg + (1 - float(mask[b, i])) * bg
            for d in range(dim):
                err = w * float(pred[b, i, d] - target[b, i, d]) ** 2
                plain += err
                weighted += err * region
    n = batch * length * dim
    return (1 - alpha) * plain / n + alpha * weighted / n


class TestMaskedFlowMatchingLoss:
    def test_no_mask_is_plain_mse(self):
        pred, target = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
        torch.testing.assert_close(
            masked_flow_matching_loss(pred, target), F.mse_loss(pred, target)
        )

    def test_hand_computed(self):
        pred = torch.tensor([[[1.0], [3.0]]])
        target = torch.zeros(1, 2, 1)
        mask = torch.tensor([[1.0, 0.0]])
        # err = [1, 9]; plain = 5; region-weighted = mean(1*2, 9*1) = 5.5
        loss = masked_flow_matching_loss(pred, target, mask)
        assert loss.item() == pytest.approx(0.7 * 5 + 0.3 * 5.5)

    @pytest.mark.parametrize("alpha,fg,bg", [(0.3, 2.0, 1.0), (1.0, 5.0, 0.0), (0.5, 0.5, 1.5)])
    def test_matches_naive(self, alpha, fg, bg):
        pred, target = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
        mask = torch.rand(2, 6)
        got = masked_flow_matching_loss(pred, target, mask, alpha=alpha, fg_weight=fg, bg_weight=bg)
        assert got.item() == pytest.approx(naive_loss(pred, target, mask, alpha, fg, bg), rel=1e-5)

    def test_unit_region_weights_equal_plain(self):
        pred, target, mask = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.rand(3, 5)
        got = masked_flow_matching_loss(pred, target, mask, fg_weight=1.0, bg_weight=1.0)
        torch.testing.assert_close(got, F.mse_loss(pred, target))

    def test_empty_and_full_masks(self):
        pred, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
        plain = F.mse_loss(pred, target)
        empty = masked_flow_matching_loss(pred, target, torch.zeros(2, 5))
        full = masked_flow_matching_loss(pred, target, torch.ones(2, 5))
        torch.testing.assert_close(empty, 0.7 * plain + 0.3 * 1.0 * plain)
        torch.testing.assert_close(full, 0.7 * plain + 0.3 * 2.0 * plain)

    @pytest.mark.parametrize("shape", [(2,), (2, 1, 1)])
    def test_per_sample_weighting(self, shape):
        pred, target, mask = torch.randn(2, 6, 4), torch.randn(2, 6, 4), torch.rand(2, 6)
        weighting = torch.tensor([0.5, 2.0])
        got = masked_flow_matching_loss(pred, target, mask, weighting=weighting.reshape(shape))
        expected = naive_loss(pred, target, mask, 0.3, 2.0, 1.0, weighting)
        assert got.item() == pytest.approx(expected, rel=1e-5)

    def test_weighting_without_mask(self):
        pred, target = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
        weighting = torch.tensor([0.5, 2.0])
        expected = ((pred - target) ** 2 * weighting[:, None, None]).mean()
        torch.testing.assert_close(
            masked_flow_matching_loss(pred, target, weighting=weighting), expected
        )

    def test_half_precision_is_upcast(self):
        pred, target = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
        loss = masked_flow_matching_loss(pred.bfloat16(), target.bfloat16(), torch.rand(2, 4))
        assert loss.dtype == torch.float32

    def test_gradcheck(self):
        pred = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
        target = torch.randn(2, 5, 3, dtype=torch.float64)
        mask = torch.rand(2, 5, dtype=torch.float64)
        weighting = torch.rand(2, dtype=torch.float64)

        def fn(p):
            return masked_flow_matching_loss(p, target, mask, weighting=weighting)

        assert torch.autograd.gradcheck(fn, (pred,))

    def test_mask_shape_error(self):
        with pytest.raises(ValueError, match=r"mask must be \[B, L\] = \[2, 5\]"):
            masked_flow_matching_loss(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4), torch.zeros(2, 4))

    def test_shape_mismatch_error(self):
        with pytest.raises(ValueError, match=r"pred.*target"):
            masked_flow_matching_loss(torch.zeros(2, 5, 4), torch.zeros(2, 5, 3))

    def test_weighting_length_error(self):
        with pytest.raises(ValueError, match="weighting must be"):
            masked_flow_matching_loss(
                torch.zeros(2, 5, 4), torch.zeros(2, 5, 4), weighting=torch.ones(3)
            )

    def test_packed_rank_required(self):
        with pytest.raises(ValueError, match=r"pred must be \[B, L, D\]"):
            masked_flow_matching_loss(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))
