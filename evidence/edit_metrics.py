"""Metrics of one edit against its known mask, from images alone.

An insertion edit should change the pixels inside its mask and nothing else. The *change mask*
of an output is where it differs from its context by more than a threshold; it is compared with
the known mask by IoU, relative area error and boundary F-score, and the untouched part by PSNR.
Images are ``[H, W, 3]`` arrays in [0, 255]; masks ``[H, W]`` bool (True = region of interest).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Smallest per-channel difference (0-255) that counts as an edit: above VAE reconstruction noise,
# below the contrast of every inserted object against its context.
CHANGE_THRESHOLD = 48.0
# An output whose change covers less than this fraction of the mask did not edit.
NO_EDIT_FRACTION = 0.1
# The synthetic objects are saturated (one channel at most 40, the spread at least 79, see
# data.synthetic); backgrounds (every channel >= 80) and grey placeholders never are.
OBJECT_MAX_LOW_CHANNEL = 60.0
OBJECT_MIN_SPREAD = 60.0


def change_mask(
    output: np.ndarray, context: np.ndarray, threshold: float = CHANGE_THRESHOLD
) -> np.ndarray:
    """``[H, W]`` bool: where any channel of ``output`` differs from ``context`` (both
    ``[H, W, 3]`` in [0, 255]) by more than ``threshold``."""
    difference = np.abs(output.astype(np.float64) - context.astype(np.float64))
    return difference.max(axis=-1) > threshold


def object_mask(
    image: np.ndarray,
    max_low_channel: float = OBJECT_MAX_LOW_CHANNEL,
    min_spread: float = OBJECT_MIN_SPREAD,
) -> np.ndarray:
    """``[H, W]`` bool: saturated pixels of ``image`` (``[H, W, 3]`` in [0, 255]), whose lowest
    channel is below ``max_low_channel`` and whose channel spread exceeds ``min_spread``: where
    a synthetic object is. Unlike the change mask, a washed-out output shows none."""
    pixels = image.astype(np.float64)
    low, high = pixels.min(axis=-1), pixels.max(axis=-1)
    return (low < max_low_channel) & (high - low > min_spread)


def iou(predicted: np.ndarray, mask: np.ndarray) -> float:
    """Intersection over union of two ``[H, W]`` bool masks; 1.0 when both are empty."""
    union = np.logical_or(predicted, mask).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(predicted, mask).sum() / union)


def area_error(predicted: np.ndarray, mask: np.ndarray) -> float:
    """Signed relative area error ``(|predicted| - |mask|) / |mask|`` of ``[H, W]`` bool masks:
    negative when the edit shrinks the object, positive when it grows; -1 means no change.

    Raises:
        ValueError: ``mask`` is empty (no area to compare with).
    """
    area = mask.sum()
    if area == 0:
        raise ValueError("area_error needs a non-empty mask")
    return float((predicted.sum() - area) / area)


def boundary(mask: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: pixels of ``mask`` with a 4-neighbour outside it (the image border
    counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels in Chebyshev distance (a square neighbourhood)."""
    if radius == 0:
        return mask
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(tensor, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0


def boundary_f_score(predicted: np.ndarray, mask: np.ndarray, tolerance: int = 2) -> float:
    """Boundary F-score of two ``[H, W]`` bool masks: precision is the fraction of the predicted
    boundary within ``tolerance`` pixels (Chebyshev) of the true boundary, recall the converse;
    F = 2PR / (P + R). 1.0 when both boundaries are empty, 0.0 when one is."""
    predicted_boundary, true_boundary = boundary(predicted), boundary(mask)
    if not predicted_boundary.any() and not true_boundary.any():
        return 1.0
    if not predicted_boundary.any() or not true_boundary.any():
        return 0.0
    precision = (predicted_boundary & _dilate(true_boundary, tolerance)).sum()
    precision = precision / predicted_boundary.sum()
    recall = (true_boundary & _dilate(predicted_boundary, tolerance)).sum() / true_boundary.sum()
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def psnr(
    output: np.ndarray, reference: np.ndarray, region: np.ndarray | None = None, peak: float = 255
) -> float:
    """PSNR in dB of ``output`` vs ``reference`` (``[H, W, C]``) over the ``[H, W]`` bool
    ``region`` (everywhere when None); ``inf`` for identical pixels.

    Raises:
        ValueError: ``region`` is empty.
    """
    squared = (output.astype(np.float64) - reference.astype(np.float64)) ** 2
    if region is not None:
        if not region.any():
            raise ValueError("psnr over an empty region")
        squared = squared[region]
    mse = float(squared.mean())
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))


def is_no_edit(predicted: np.ndarray, mask: np.ndarray, fraction: float = NO_EDIT_FRACTION) -> bool:
    """True when the change ``predicted`` covers less than ``fraction`` of ``mask`` (``[H, W]``
    bool each): the edit did not happen where it was asked for."""
    return bool(np.logical_and(predicted, mask).sum() < fraction * mask.sum())


def insertion_metrics(
    output: np.ndarray,
    context: np.ndarray,
    mask: np.ndarray,
    threshold: float = CHANGE_THRESHOLD,
) -> dict[str, float]:
    """Every metric of one insertion: ``output`` and ``context`` ``[H, W, 3]`` in [0, 255],
    ``mask`` ``[H, W]`` bool. IoU, area error, boundary F-score and no-edit use the change
    mask; ``object_iou`` and ``object_area_error`` the saturated pixels of the output
    (``object_mask``): the object drawn, without the halo of change a blurred edge leaves around
    it; background PSNR compares output and context outside the mask."""
    changed = change_mask(output, context, threshold)
    drawn = object_mask(output)
    return {
        "iou": iou(changed, mask),
        "object_iou": iou(drawn, mask),
        "area_error": area_error(changed, mask),
        "object_area_error": area_error(drawn, mask),
        "boundary_f": boundary_f_score(changed, mask),
        "background_psnr": min(psnr(output, context, ~mask), 99.0),
        "no_edit": float(is_no_edit(changed, mask)),
    }


def text_edit_metrics(
    output: np.ndarray, target: np.ndarray, context: np.ndarray, text_box: np.ndarray
) -> dict[str, float]:
    """Metrics of one text edit: ``output``, ``target`` and ``context`` ``[H, W, 3]`` in
    [0, 255], ``text_box`` ``[H, W]`` bool (the word's box). ``text_psnr`` and ``outside_psnr``
    compare output and target inside and outside the box; ``text_gain`` is ``text_psnr`` less
    the context's own PSNR inside the box (positive: closer to the written word than leaving the
    sign empty). Capped at 99 dB where images are identical."""
    inside = min(psnr(output, target, text_box), 99.0)
    return {
        "text_psnr": inside,
        "text_gain": inside - min(psnr(context, target, text_box), 99.0),
        "outside_psnr": min(psnr(output, target, ~text_box), 99.0),
    }
