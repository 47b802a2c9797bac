"""The tiny pretrained world: its pretraining pairs, and a (very short) build the Kontext script
trains on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from safetensors.torch import load_file
from script_runs import run_in_process

import train_kontext_lora as kontext
from data.synthetic import OBJECT_COLOURS
from evidence.ablation import METRICS, heldout_pairs, reconstruction_reference
from worlds.fitting import WORLD_FILE
from worlds.kontext_world import (
    WorldSettings,
    build_tiny_world,
    heldout_reconstruction_psnr,
    pretraining_pairs,
    ship_world,
    split_pretraining_pairs,
)

TINY = WorldSettings(
    resolution=32, n_train=3, n_heldout=3, scenes=18, vae_steps=2, base_steps=2, base_batch_size=4
)


def test_pretraining_pairs_copy_or_recolour_and_never_insert():
    pairs = pretraining_pairs(TINY)
    assert pairs.contexts.shape == pairs.targets.shape == (4 * TINY.scenes, 3, 32, 32)
    colours = {name: torch.tensor(rgb) / 127.5 - 1 for name, rgb in OBJECT_COLOURS.items()}
    for scene in range(TINY.scenes):
        identities = slice(4 * scene, 4 * scene + 3)
        assert torch.equal(pairs.contexts[identities], pairs.targets[identities])
        context, target = pairs.contexts[4 * scene + 3], pairs.targets[4 * scene + 3]
        changed = (context != target).any(0)
        # Recolouring changes the object only: a fifth of the image at most, never nothing.
        assert 0 < changed.float().mean() < 0.25
        # The prompt names the new colour: the changed pixels are (striped) shades of it.
        named = pairs.prompts[4 * scene + 3].split()[2]
        pixel = (target[:, changed] + 1) * 127.5
        ratio = pixel / ((colours[named][:, None] + 1) * 127.5)
        assert ratio.min() > 0.68 and ratio.max() < 1.02


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    record = build_tiny_world(out, TINY)
    return out, record


def test_world_is_a_kontext_pipeline_with_a_4x_vae_and_a_record(world):
    out, record = world
    pipe = FluxKontextPipeline.from_pretrained(out / "model")
    assert pipe.vae_scale_factor == 4
    latents = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert latents.shape == (1, 16, 8, 8)
    assert record["settings"]["scenes"] == TINY.scenes
    assert np.isfinite(record["vae_reconstruction_psnr_db"])
    assert len(list((out / "train" / "masks").iterdir())) == TINY.n_train
    assert len(list((out / "heldout" / "masks").iterdir())) == TINY.n_heldout


def test_a_built_world_is_reused_and_other_settings_rebuild_it(world, tmp_path):
    out, record = world
    stamp = (out / WORLD_FILE).stat().st_mtime_ns
    assert build_tiny_world(out, TINY) == record
    assert (out / WORLD_FILE).stat().st_mtime_ns == stamp
    # A record of other settings is a stale world: rebuilt from nothing.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / WORLD_FILE).write_text(json.dumps({"settings": {"seed": 9}}))
    (stale / "leftover.txt").write_text("old")
    build_tiny_world(stale, TINY)
    assert not (stale / "leftover.txt").exists()
    assert json.loads((stale / WORLD_FILE).read_text())["settings"]["vae_steps"] == 2


def test_the_kontext_script_trains_on_the_world(world, tmp_path):
    # Its masks must follow the world's 4x VAE (8x would not match the latents).
    out, _ = world
    run = run_in_process(
        kontext.main,
        {
            "pretrained_model_name_or_path": out / "model",
            "train_data_dir": out / "train",
            "output_dir": tmp_path / "run",
            "resolution": 32,
            "max_sequence_length": 16,
            "train_batch_size": 1,
            "max_train_steps": 2,
        },
    )
    assert (run / "pytorch_lora_weights.safetensors").exists()


def test_the_ablation_scores_the_vaes_reconstruction_of_the_held_out_targets(world):
    out, _ = world
    pipe = FluxKontextPipeline.from_pretrained(out / "model")
    pairs = heldout_pairs(out / "heldout", 2)
    reference = reconstruction_reference(pipe, pairs)
    assert set(reference) == set(METRICS)
    # A two-step VAE reconstructs nothing: far from the targets, but a finite, scored image.
    assert 0 <= reference["iou"] <= 1 and 0 <= reference["object_iou"] <= 1
    assert 0 < reference["background_psnr"] < 99


def test_a_shipped_world_is_the_built_one_with_float16_weights(world, tmp_path):
    out, record = world
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / WORLD_FILE).write_text("{}")
    (shipped / "stale.txt").write_text("old")
    assert ship_world(out, shipped) == {
        **record,
        "stored_dtypes": {"vae": "float16", "transformer": "float16"},
    }
    assert json.loads((shipped / WORLD_FILE).read_text())["stored_dtypes"]["vae"] == "float16"
    assert not (shipped / "stale.txt").exists()
    for folder in ("train", "heldout", "model/tokenizer", "model/text_encoder"):
        for path in (out / folder).rglob("*.*"):
            assert path.read_bytes() == (shipped / path.relative_to(out)).read_bytes(), path
    for name in ("vae", "transformer"):
        built = load_file(out / "model" / name / "diffusion_pytorch_model.safetensors")
        half = load_file(shipped / "model" / name / "diffusion_pytorch_model.safetensors")
        assert built.keys() == half.keys()
        for key, value in built.items():
            assert half[key].dtype == torch.float16
            assert torch.equal(half[key], value.half()), key
    # Loaded back in float32, the float16 VAE reconstructs as the built one did.
    pipe = FluxKontextPipeline.from_pretrained(shipped / "model")
    assert pipe.vae.dtype == pipe.transformer.dtype == torch.float32
    _, heldout = split_pretraining_pairs(pretraining_pairs(TINY))
    psnr = heldout_reconstruction_psnr(pipe.vae, heldout)
    assert psnr == pytest.approx(record["vae_reconstruction_psnr_db"], abs=0.01)


def test_a_world_is_not_shipped_over_itself_or_over_other_files(world, tmp_path):
    out, _ = world
    with pytest.raises(ValueError, match="not to itself"):
        ship_world(out, out)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other than a world"):
        ship_world(out, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
