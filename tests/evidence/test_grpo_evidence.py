"""The GRPO-against-supervised evidence: its checks on constructed fills, the matched compute,
and a run at the tiniest settings that records every number."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from data.synthetic import OBJECT_COLOURS
from evidence.grpo_evidence import (
    ARMS,
    METRICS,
    OBJECT_SHADE,
    EvidenceSettings,
    interior_energy_ratio,
    is_grey_hole,
    main,
    matched_grpo_steps,
    named_object_mask,
    prompted_colour,
)


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, masked image, mask)``: a grey-blue background with a striped red box in the
    mask, and the same with the hole grey, as the pipeline masks it."""
    image = np.full((32, 32, 3), (110, 130, 150), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    stripes = 0.7 + 0.3 * (np.arange(32) // 3 % 2)[None, :, None]
    red = np.asarray(OBJECT_COLOURS["red"]) * stripes
    image[mask] = np.broadcast_to(red, (32, 32, 3))[mask].astype(np.uint8)
    masked = np.where(mask[..., None], 127.5, image).astype(np.uint8)
    return image, masked, mask


def test_prompted_colour_ranks_the_named_colour_first():
    image, masked, mask = scene()
    shade = (OBJECT_SHADE * np.asarray(OBJECT_COLOURS["red"])).astype(np.uint8)
    flat_red = np.where(mask[..., None], shade, image).astype(np.uint8)
    blue = np.where(mask[..., None], np.asarray(OBJECT_COLOURS["blue"]), image).astype(np.uint8)
    images = torch.from_numpy(np.stack([flat_red, image, masked, blue])).permute(0, 3, 1, 2)
    masks = torch.from_numpy(mask)[None, None].float().expand(4, -1, -1, -1)
    scores = prompted_colour(images / 255, ["a red box"] * 4, masks, images / 255)
    assert scores.shape == (4,)
    assert scores[0] == pytest.approx(0.0, abs=1e-5)
    # The striped object, then the grey hole, then the wrong colour.
    assert scores[0] > scores[1] > scores[2] > scores[3]


def test_the_checks_tell_noise_and_grey_holes_from_the_true_fill():
    image, masked, mask = scene()
    noise = np.random.default_rng(0).integers(-60, 61, size=image.shape)
    noisy = np.where(mask[..., None], np.clip(image + noise, 0, 255), image).astype(np.uint8)
    # The same pixels twice: equal but for the float summation order of two reductions.
    assert interior_energy_ratio(image, image, mask) == pytest.approx(1.0, rel=1e-4)
    assert interior_energy_ratio(noisy, image, mask) > 1.5
    # Only the forward differences across the mask's edge are left of a grey hole.
    assert interior_energy_ratio(masked, image, mask) < 0.1
    assert is_grey_hole(masked, masked, mask)
    assert not is_grey_hole(image, masked, mask)


def test_the_named_object_is_the_object_in_the_colour_the_prompt_names():
    image, masked, mask = scene()
    assert named_object_mask(image, "a red box").sum() == mask.sum()
    assert not named_object_mask(image, "a blue box").any()
    assert not named_object_mask(masked, "a red box").any()


def test_grpo_gets_the_passes_of_the_extra_supervised_steps():
    settings = EvidenceSettings(extra_steps=100, sft_batch_size=8, generations=8, sampling_steps=4)
    assert matched_grpo_steps(settings) == 100 * 8 // (8 * 4)
    with pytest.raises(ValueError, match="whole number"):
        matched_grpo_steps(EvidenceSettings(extra_steps=3, sft_batch_size=2, sampling_steps=4))


def test_a_quick_run_records_every_number(tmp_path, fresh_accelerate, one_thread):
    main(["--out", str(tmp_path), "--quick"])
    results = json.loads((tmp_path / "results.json").read_text())
    models = ("base", "sft", *ARMS)
    assert list(results["summary"]) == list(models)
    assert list(results["runs"]) == ["0"]
    run = results["runs"]["0"]
    assert set(run["train_seconds"]) == {"sft", *ARMS}
    assert all(seconds > 0 for seconds in run["train_seconds"].values())
    for model in models:
        assert set(run["metrics"][model]) == set(METRICS)
        assert all(math.isfinite(value) for value in run["metrics"][model].values())
        for mean, spread in results["summary"][model].values():
            assert math.isfinite(mean) and spread == 0.0
    assert set(results["vae_reference"]) == set(METRICS)
    assert all(math.isfinite(value) for value in results["vae_reference"].values())
    # Shares and IoUs are fractions; every arm had as many passes.
    for model in models:
        assert 0 <= run["metrics"][model]["object_iou"] <= 1
        assert 0 <= run["metrics"][model]["grey_hole_share"] <= 1
    assert len({results["passes"][arm] for arm in ARMS}) == 1
    assert results["grpo_steps"] == 1
    # GRPO trained with its rewards: the user reward is logged beside the built-in one.
    metrics = (tmp_path / "seed0" / "grpo+colour" / "metrics.jsonl").read_text().splitlines()
    assert {"reward_prompted_colour", "reward_background"} <= set(json.loads(metrics[-1]))
    for name in ("table.md", "object_iou.png", "background_psnr.png"):
        assert (tmp_path / name).stat().st_size > 0
    # A run recorded before a metric existed is scored again from its LoRAs, not retrained.
    for metrics in (results["base"], *run["metrics"].values()):
        del metrics["named_object_iou"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    lora = tmp_path / "seed0" / "grpo" / "pytorch_lora_weights.safetensors"
    stamp = lora.stat().st_mtime_ns
    main(["--out", str(tmp_path), "--quick"])
    rescored = json.loads((tmp_path / "results.json").read_text())
    assert lora.stat().st_mtime_ns == stamp
    assert rescored["runs"]["0"]["train_seconds"] == run["train_seconds"]
    again = rescored["runs"]["0"]["metrics"]["grpo"]
    assert set(again) == set(METRICS) and set(rescored["base"]) == set(METRICS)
    # Sampling is seeded: the other metrics come out as before, to the last digit.
    assert {name: value for name, value in again.items() if name != "named_object_iou"} == (
        run["metrics"]["grpo"]
    )
