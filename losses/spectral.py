"""Mask-aware reconstruction losses for multispectral images.

Built for adapting a VAE to multi-band (e.g. 5-band) leaf images, where a binary mask marks the
leaf and everything else is background that must not shape the loss:

- :func:`masked_mse_per_channel`: squared error per band, averaged over masked pixels only.
- :func:`masked_sam_loss`: Spectral Angle Mapper, the mean angle between predicted and target
  spectra over masked pixels whose target spectrum is not zero.
- :func:`mask_coverage_stats` and :func:`coverage_warning`: how much of the image a mask keeps,
  and a message when that is suspiciously little or nearly everything.

Masks are binarised with ``mask > 0.5``.
"""

from __future__ import annotations

import torch

from losses._common import check_ndim, check_same_shape, masked_mean, safe_normalize, vector_norm
from losses.mask_ops import as_mask_4d

LOW_COVERAGE = 0.1
HIGH_COVERAGE = 0.99

# A masked target spectrum with a smaller L2 norm over bands has no direction to compare against.
_MIN_TARGET_NORM = 1e-6


def _binary_mask(mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Check ``mask`` against ``pred: [B, C, H, W]``; return ``mask > 0.5`` expanded to ``pred``."""
    b, c, h, w = pred.shape
    if tuple(mask.shape) not in {(b, 1, h, w), (b, c, h, w)}:
        raise ValueError(
            f"mask must be [B, 1, H, W] or [B, C, H, W] matching pred {list(pred.shape)}, "
            f"got mask {list(mask.shape)}"
        )
    return (mask > 0.5).expand_as(pred)


def _check_inputs(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Validate the three shapes; return the binary mask expanded to ``pred``."""
    check_ndim(pred, "pred", (4,), "[B, C, H, W]")
    check_same_shape(pred=pred, target=target)
    return _binary_mask(mask, pred)


def masked_mse_per_channel(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared error of each band over the masked pixels of the whole batch.

    ``pred, target: [B, C, H, W]``; ``mask: [B, 1, H, W]`` (shared by all bands) or
    ``[B, C, H, W]``, in ``[0, 1]`` and binarised as ``m = mask > 0.5``. Returns ``[C]``::

        mse[c] = sum_{b,h,w} m * (pred - target)^2 / sum_{b,h,w} m

    Pixels are pooled over the batch, so a sample with a larger leaf weighs more. A band with no
    masked pixel gets 0 with zero gradient; that case is handled explicitly rather than with an
    epsilon in the denominator, so the quotient is exact otherwise.
    """
    m = _check_inputs(pred, target, mask)
    # Select instead of multiplying by the mask: background may hold NaN/inf no-data values,
    # and 0 * NaN would leak them into the loss and its gradient.
    diff = torch.where(m, pred - target, torch.zeros_like(pred))
    return masked_mean(diff.square(), m.to(pred.dtype), dim=(0, 2, 3))


def masked_sam_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spectral Angle Mapper: mean angle, in radians, between predicted and target spectra.

    ``pred, target: [B, C, H, W]``, the spectrum of a pixel running along ``C``;
    ``mask: [B, 1, H, W]`` or ``[B, C, H, W]``, in ``[0, 1]`` and binarised as ``m = mask > 0.5``.
    Returns a scalar::

        sam = mean over valid (b, h, w) of angle(pred[b, :, h, w] * m, target[b, :, h, w] * m)

    A pixel is valid when ``||target * m||`` over ``C`` exceeds ``1e-6``; a zero target spectrum
    has no direction. With a ``[B, C, H, W]`` mask the angle is taken over the masked bands of the
    pixel only. The angle lies in ``[0, pi]``; a zero predicted spectrum counts as ``pi / 2``.
    Without any valid pixel the loss is 0 with zero gradient.
    """
    m = _check_inputs(pred, target, mask)
    zeros = torch.zeros_like(pred)
    # Select instead of multiplying by the mask so background NaN/inf cannot leak in.
    pred_m = torch.where(m, pred, zeros)
    target_m = torch.where(m, target, zeros)
    valid = vector_norm(target_m.detach(), dim=1) > _MIN_TARGET_NORM

    u = safe_normalize(pred_m, dim=1)
    v = safe_normalize(target_m, dim=1)
    # Kahan's angle formula instead of acos(u . v): acos has an infinite derivative at +-1, so
    # identical or anti-parallel spectra would give inf/NaN gradients, and acos of a rounded
    # cosine loses small angles entirely (in float32 angles below about 2e-4 rad read as 0). The
    # atan2 form is accurate across [0, pi] and its gradient stays finite (at u = v autograd takes
    # the norm's subgradient, 0). A zero pred (u = 0) gives 2 * atan2(1, 1) = pi / 2, with zero
    # gradient through safe_normalize.
    angle = 2.0 * torch.atan2(vector_norm(u - v, dim=1), vector_norm(u + v, dim=1))
    return masked_mean(angle, valid.to(pred.dtype), dim=(0, 1, 2))


def mask_coverage_stats(mask: torch.Tensor) -> dict[str, float | int]:
    """Fraction of spatial pixels a mask keeps.

    ``mask: [B, 1, H, W]``, ``[B, H, W]`` or ``[H, W]``, bool or in ``[0, 1]``; a pixel counts
    as kept when ``mask > 0.5``. Returns
    ``{"coverage": float, "valid_pixels": int, "total_pixels": int}`` with
    ``coverage = valid_pixels / total_pixels`` (0.0 for an empty mask).
    """
    mask = as_mask_4d(mask.detach())
    valid = int((mask > 0.5).sum().item())
    total = mask.numel()
    return {
        "coverage": valid / total if total else 0.0,
        "valid_pixels": valid,
        "total_pixels": total,
    }


def coverage_warning(
    coverage: float, *, low: float = LOW_COVERAGE, high: float = HIGH_COVERAGE
) -> str | None:
    """Message for a mask coverage below ``low`` or above ``high``; ``None`` inside ``[low, high]``.

    ``coverage`` is the fraction from :func:`mask_coverage_stats`. Nothing is logged here.
    """
    if low > high:
        raise ValueError(f"low must not exceed high, got low={low}, high={high}")
    if coverage < low:
        return (
            f"Low mask coverage ({coverage:.4f}): under {low} of the pixels are kept, "
            "so the masked losses rest on few pixels and will be noisy"
        )
    if coverage > high:
        return (
            f"Very high mask coverage ({coverage:.4f}): over {high} of the pixels are kept, "
            "so the mask barely excludes any background; check that it is not all ones"
        )
    return None
