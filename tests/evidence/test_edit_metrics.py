"""Edit metrics on masks and images with answers known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evidence.edit_metrics import (
    area_error,
    boundary,
    boundary_f_score,
    change_mask,
    insertion_metrics,
    iou,
    is_no_edit,
    object_mask,
    psnr,
    text_edit_metrics,
)


def square(top: int, left: int, side: int, size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_iou_of_half_overlapping_squares_is_one_third():
    # 10x10 squares offset by 5 columns: 50 shared pixels of 150.
    assert iou(square(0, 0, 10), square(0, 5, 10)) == pytest.approx(1 / 3)


def test_iou_identical_disjoint_and_empty():
    assert iou(square(2, 2, 6), square(2, 2, 6)) == 1.0
    assert iou(square(0, 0, 4), square(10, 10, 4)) == 0.0
    assert iou(square(0, 0, 0), square(0, 0, 0)) == 1.0


def test_area_error_signs_shrink_and_growth():
    mask = square(0, 0, 10)
    half = np.zeros_like(mask)
    half[:5, :10] = True
    assert area_error(half, mask) == pytest.approx(-0.5)
    assert area_error(square(0, 0, 20), mask) == pytest.approx(3.0)
    assert area_error(np.zeros_like(mask), mask) == -1.0
    with pytest.raises(ValueError, match="non-empty"):
        area_error(mask, np.zeros_like(mask))


def test_boundary_of_a_square_is_its_ring():
    ring = boundary(square(2, 2, 4, size=8))
    assert ring.sum() == 12  # 4 * 4 - 2 * 2 interior pixels
    assert not ring[3:5, 3:5].any()
    # The image border counts as outside: a full image has its frame as boundary.
    assert boundary(np.ones((5, 5), dtype=bool)).sum() == 16


def test_boundary_f_score_known_values():
    mask = square(2, 2, 8)
    assert boundary_f_score(mask, mask) == 1.0
    # A one-pixel shift is within a two-pixel tolerance, not within zero.
    assert boundary_f_score(square(3, 3, 8), mask, tolerance=2) == 1.0
    assert boundary_f_score(square(3, 3, 8), mask, tolerance=0) < 1.0
    # Far apart: no boundary pixel near the other.
    assert boundary_f_score(square(20, 20, 8), mask) == 0.0
    # The true square plus an equal far one: precision 1/2, recall 1, F = 2/3.
    both = mask | square(20, 20, 8)
    assert boundary_f_score(both, mask) == pytest.approx(2 / 3)
    empty = np.zeros_like(mask)
    assert boundary_f_score(empty, empty) == 1.0
    assert boundary_f_score(empty, mask) == 0.0


def test_psnr_known_values():
    reference = np.full((8, 8, 3), 100.0)
    assert psnr(reference + 1, reference) == pytest.approx(20 * math.log10(255))
    assert psnr(reference, reference) == math.inf
    # Error 10 outside a region, none inside: the region's PSNR is infinite, the rest 28.13 dB.
    region = square(0, 0, 4, size=8)
    output = reference + 10 * (~region)[..., None]
    assert psnr(output, reference, region) == math.inf
    assert psnr(output, reference, ~region) == pytest.approx(20 * math.log10(25.5))
    with pytest.raises(ValueError, match="empty region"):
        psnr(output, reference, np.zeros_like(region))


def test_change_mask_thresholds_the_largest_channel_difference():
    context = np.full((2, 2, 3), 100.0)
    output = context.copy()
    output[0, 0, 2] = 160  # one channel by 60
    output[1, 1] = 140  # every channel by 40
    assert change_mask(output, context, threshold=48).tolist() == [[True, False], [False, False]]


def test_no_edit_below_a_tenth_of_the_mask():
    mask = square(0, 0, 10)
    assert is_no_edit(np.zeros_like(mask), mask)
    assert is_no_edit(square(0, 0, 3), mask)  # 9 of 100 pixels
    assert not is_no_edit(square(0, 0, 4), mask)  # 16 of 100
    assert is_no_edit(square(20, 20, 10), mask)  # a change, but elsewhere


def test_insertion_metrics_of_a_perfect_and_an_empty_edit():
    mask = square(4, 4, 8, size=16)
    context = np.full((16, 16, 3), 120.0)
    target = np.where(mask[..., None], np.array([220.0, 40.0, 40.0]), context)
    perfect = insertion_metrics(target, context, mask)
    assert perfect == {
        "iou": 1.0,
        "object_iou": 1.0,
        "area_error": 0.0,
        "object_area_error": 0.0,
        "boundary_f": 1.0,
        "background_psnr": 99.0,
        "no_edit": 0.0,
    }
    nothing = insertion_metrics(context, context, mask)
    assert nothing["iou"] == 0.0
    assert nothing["object_iou"] == 0.0
    assert nothing["area_error"] == -1.0
    assert nothing["object_area_error"] == -1.0
    assert nothing["no_edit"] == 1.0


def test_object_area_error_ignores_the_halo_of_change_around_a_shrunken_object():
    # A 4x4 red object drawn in an 8x8 mask, inside a ring of changed (pale) pixels: the change
    # mask covers the whole 10x10 neighbourhood, the object only a quarter of the mask.
    mask = square(4, 4, 8, size=16)
    context = np.full((16, 16, 3), 120.0)
    output = np.where(square(3, 3, 10, size=16)[..., None], 200.0, context)
    output = np.where(square(6, 6, 4, size=16)[..., None], np.array([220.0, 40.0, 40.0]), output)
    metrics = insertion_metrics(output, context, mask)
    assert metrics["area_error"] == pytest.approx((100 - 64) / 64)
    assert metrics["object_area_error"] == pytest.approx((16 - 64) / 64)
    assert metrics["object_iou"] == pytest.approx(16 / 64)


def test_object_mask_finds_saturated_pixels_only():
    image = np.array(
        [
            [[220, 40, 40], [40, 170, 60], [150, 40, 200]],  # red, green, purple objects
            [[215, 215, 215], [180, 80, 80], [130, 130, 130]],  # placeholder, background, grey
        ],
        dtype=np.float64,
    )
    # A washed-out red (spread 40) is no object either.
    assert object_mask(image).tolist() == [[True, True, True], [False, False, False]]
    assert not object_mask(np.array([[[90.0, 50.0, 50.0]]])).any()


def test_a_grey_output_changes_the_placeholder_but_inserts_no_object():
    mask = square(4, 4, 8, size=16)
    context = np.where(mask[..., None], 215.0, 120.0) * np.ones(3)
    grey = np.full((16, 16, 3), 125.0)
    metrics = insertion_metrics(grey, context, mask)
    assert metrics["iou"] == 1.0  # the change mask is fooled: the placeholder was erased
    assert metrics["object_iou"] == 0.0


def test_text_edit_metrics_inside_outside_and_gain_over_the_empty_sign():
    # Target: a sign (200) with a word (0) in a 4x8 box; the context is the empty sign.
    target = np.full((16, 16, 3), 200.0)
    box = np.zeros((16, 16), dtype=bool)
    box[6:10, 4:12] = True
    target[box] = 0.0
    context = np.full((16, 16, 3), 200.0)
    # Output: the word at half contrast (error 100 inside), the background off by 10.
    output = np.full((16, 16, 3), 210.0)
    output[box] = 100.0
    metrics = text_edit_metrics(output, target, context, box)
    assert metrics["text_psnr"] == pytest.approx(10 * math.log10(255**2 / 100**2))
    assert metrics["outside_psnr"] == pytest.approx(10 * math.log10(255**2 / 10**2))
    # The empty sign is 200 off inside: half the error is 20 log10(2) dB better.
    assert metrics["text_gain"] == pytest.approx(20 * math.log10(2))
    # Writing the target exactly scores the cap inside and outside.
    exact = text_edit_metrics(target, target, context, box)
    assert exact["text_psnr"] == exact["outside_psnr"] == 99.0
