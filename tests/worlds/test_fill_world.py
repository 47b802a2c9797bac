"""The tiny pretrained FLUX.1 Fill world: its pretraining examples, and (very short) builds that
load as a pipeline, repeat exactly, and hold data the Fill script reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from PIL import Image
from safetensors.torch import load_file

import train_flux_fill as fill
from data.synthetic import OBJECT_COLOURS
from training.config import parse_config
from training.datasets import fill_dataset
from worlds.fill_world import FillWorldSettings, build_fill_world, pretraining_examples
from worlds.fitting import WORLD_FILE

# Builds on one thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = FillWorldSettings(
    resolution=32, n_train=4, n_heldout=3, scenes=18, vae_steps=2, base_steps=2, base_batch_size=4
)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("fill-world")
    return out, build_fill_world(out, TINY)


def test_pretraining_holes_hide_background_only():
    examples = pretraining_examples(TINY)
    assert examples.images.shape == (2 * TINY.scenes, 3, 32, 32)
    assert examples.masks.shape == (2 * TINY.scenes, 1, 32, 32)
    assert set(examples.masks.unique().tolist()) == {0.0, 1.0}
    # Every hole hides something, and the grey of the masked image is exactly 0 there.
    assert (examples.masks.flatten(1).sum(1) > 0).all()
    assert (examples.masked_images()[examples.masks.expand(-1, 3, -1, -1) > 0] == 0).all()
    # No hole covers an object: the saturated pixels of data.synthetic's objects (a channel at
    # most 40 of 255, so below -0.68 in [-1, 1]) never lie under a mask.
    objects = examples.images.amin(dim=1, keepdim=True) < -0.6
    assert objects.any()
    assert not (objects & (examples.masks > 0)).any()
    # Every prompt names an object of the world ("a red ball"), drawn or not.
    assert all(prompt.split()[1] in OBJECT_COLOURS for prompt in examples.prompts)


def test_world_is_a_fill_pipeline_with_an_8x_vae(world):
    out, record = world
    pipe = FluxFillPipeline.from_pretrained(out / "model")
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == 384
    posterior = pipe.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist
    assert posterior.mode().shape == (1, 16, 4, 4)
    # Narrow: the pipeline and the script sample latents from it.
    assert posterior.std.max() < 1e-2
    assert record["settings"] == json.loads((out / WORLD_FILE).read_text())["settings"]
    assert np.isfinite(record["vae_reconstruction_psnr_db"])
    # The saved pipeline fills a hole end to end.
    mask = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12))
    image = pipe(
        prompt="a red ball",
        image=Image.new("RGB", (32, 32), (120, 130, 140)),
        mask_image=mask,
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)


def test_the_same_settings_build_the_same_weights(world, tmp_path):
    out, record = world
    again = build_fill_world(tmp_path / "again", TINY)
    assert again["vae_loss_first_last"] == record["vae_loss_first_last"]
    for component in ("vae", "transformer"):
        for weights in sorted((out / "model" / component).glob("*.safetensors")):
            first = load_file(weights)
            second = load_file(tmp_path / "again" / "model" / component / weights.name)
            assert first.keys() == second.keys()
            assert all(torch.equal(first[key], second[key]) for key in first)
    # A built world is reused as it is.
    stamp = (out / WORLD_FILE).stat().st_mtime_ns
    assert build_fill_world(out, TINY) == record
    assert (out / WORLD_FILE).stat().st_mtime_ns == stamp


def test_the_fill_script_reads_the_training_rows(world, tmp_path):
    out, _ = world
    config = parse_config(
        fill.FillConfig,
        [
            "--pretrained_model_name_or_path",
            str(out / "model"),
            "--train_data_dir",
            str(out / "train"),
            "--output_dir",
            str(tmp_path / "run"),
            "--resolution",
            "32",
        ],
    )
    vae_config = FluxFillPipeline.from_pretrained(out / "model").vae.config
    dataset = fill_dataset(config, vae_config)
    assert len(dataset) == TINY.n_train
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape[0] == 3 and item["mask"].shape[0] == 1
        # The mask is the object: the image under it is saturated colour, the hole non-empty.
        assert item["mask"].sum() > 0
        assert item["prompt"].split()[1] in OBJECT_COLOURS


def test_the_heldout_set_is_disjoint_from_the_training_set(world):
    out, _ = world

    def images(folder: str) -> list[bytes]:
        rows = (out / folder / "metadata.jsonl").read_text().splitlines()
        return [
            np.asarray(Image.open(out / folder / json.loads(row)["image"])).tobytes()
            for row in rows
        ]

    train, heldout = images("train"), images("heldout")
    assert len(train) == TINY.n_train and len(heldout) == TINY.n_heldout
    assert not set(train) & set(heldout)
