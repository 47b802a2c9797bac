"""The tiny pretrained Qwen-Image-Edit world: its pretraining pairs, and a (very short) build
that the Qwen script trains on and the text ablation scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline

from data.synthetic import TEXT_COLOURS
from evidence.text_ablation import (
    METRICS,
    denoised_outputs,
    encode_edits,
    heldout_edits,
    reconstruction_reference,
    score,
)
from evidence.text_ablation import main as text_ablation
from models.qwen_processor import load_image_only_processor
from worlds.qwen_world import (
    WORLD_RESOLUTION,
    QwenWorldSettings,
    build_qwen_world,
    text_pretraining,
)

TINY = QwenWorldSettings(
    n_train=2,
    n_heldout=2,
    scenes=2,
    heldout_scenes=1,
    vae_steps=2,
    vae_crop=64,
    base_steps=2,
    base_batch_size=2,
)


def test_pretraining_copies_or_recolours_words_and_never_writes_on_an_empty_sign():
    pretraining = text_pretraining(TINY)
    assert len(pretraining.images) == 3 * TINY.scenes
    assert pretraining.text_boxes.shape == (3 * TINY.scenes, WORLD_RESOLUTION, WORLD_RESOLUTION)
    for scene in range(TINY.scenes):
        empty, written, rewritten = (3 * scene + k for k in range(3))
        pairs = list(zip(pretraining.contexts, pretraining.targets, strict=True))[3 * scene :]
        assert pairs[:3] == [(empty, empty), (written, written), (written, rewritten)]
        before = np.asarray(pretraining.images[written], dtype=float)
        after = np.asarray(pretraining.images[rewritten], dtype=float)
        changed = np.any(before != after, axis=-1)
        # Recolouring changes the letters only: inside the word's box, never nothing.
        box = pretraining.text_boxes[written]
        assert changed.any() and not changed[~box].any()
        # The prompt names the new colour: the letters' solid pixels are exactly it.
        prompt = pretraining.prompts[3 * scene + 2]
        named = next(colour for colour in TEXT_COLOURS if f" in {colour} " in prompt)
        assert (after[changed] == TEXT_COLOURS[named]).all(-1).any()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_world")
    return out, build_qwen_world(out, TINY)


def test_world_is_a_qwen_edit_pipeline_with_a_32x_vae_and_fitted_latent_statistics(world):
    out, record = world
    pipe = QwenImageEditPipeline.from_pretrained(
        out / "model", processor=load_image_only_processor(out / "model")
    )
    assert pipe.vae_scale_factor == 32
    latents = pipe.vae.encode(torch.zeros(1, 3, 1, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 16, 1, 2, 2)
    assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == 16
    assert all(std > 0 for std in pipe.vae.config.latents_std)
    assert np.isfinite(record["vae_reconstruction_psnr_db"])
    assert np.isfinite(record["vae_text_box_psnr_db"])
    assert len(list((out / "train" / "text_masks").iterdir())) == TINY.n_train
    assert len(list((out / "heldout" / "text_masks").iterdir())) == TINY.n_heldout
    assert build_qwen_world(out, TINY) == record


def test_the_text_ablation_trains_the_script_on_the_world_and_scores_it(world, tmp_path):
    # The script's text masks must follow the world's 32x VAE (8x would not match the tokens).
    out, _ = world
    text_ablation(world=out, world_settings=TINY, out=tmp_path, quick=True)
    record = json.loads((tmp_path / "results.json").read_text())
    assert set(record["results"]) == {"alpha=0", "alpha=0.3"}
    assert record["configs"]["alpha=0"] == {"mask_loss.enabled": False}
    for runs in record["results"].values():
        assert set(runs["0"]["2"]) == set(METRICS)
        assert all(np.isfinite(value) for value in runs["0"]["2"].values())
    assert set(record["reference"]) == set(METRICS)
    assert (tmp_path / "alpha=0.3" / "seed0" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "examples.png").exists()


def test_denoised_scores_from_sigma_zero_are_the_vae_reconstructions_of_the_targets(world):
    # At sigma 0 the estimate x0 = x - 0 * v is the target's latents, whatever the transformer
    # says: its scores, and the ceiling's, must be those of the target through the VAE (raw
    # latents, no normalisation, decoded here), through the unpacking and un-normalising path.
    out, _ = world
    pipe = QwenImageEditPipeline.from_pretrained(
        out / "model", processor=load_image_only_processor(out / "model")
    )
    edits = heldout_edits(out / "heldout", 1)
    encoded = encode_edits(pipe, edits)
    assert encoded.target.shape == (1, 16, 32, 32)
    target = torch.from_numpy(np.asarray(edits[0]["target"])).permute(2, 0, 1)
    pixels = (target.float() / 127.5 - 1)[None, :, None]
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample
    image = ((decoded[0, :, 0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
    expected = score([image.numpy()], edits)
    ceiling = reconstruction_reference(pipe, edits, encoded)
    assert ceiling == pytest.approx(
        {**expected, **{f"denoised_{k}": v for k, v in expected.items()}}, abs=0.05
    )
    clean = score(denoised_outputs(pipe, encoded, 0.0, seed=0), edits, "denoised_")
    assert clean == pytest.approx({k: v for k, v in ceiling.items() if k in clean}, abs=0.05)
    # From pure noise the estimate is the transformer's alone.
    noised = score(denoised_outputs(pipe, encoded, 1.0, seed=0), edits, "denoised_")
    assert all(abs(noised[name] - clean[name]) > 1e-3 for name in clean)
