"""Validation on the user's own images and prompts, and the step-0 look at the model as it
starts: the flags' checks, the files fitted like training images, and a real Kontext run."""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from script_runs import TrainScript, resume_copy

import train_flux_fill as fill
import train_kontext_lora as kontext
import train_multispectral_vae as multispectral
from data.synthetic import write_kontext_dataset
from training.validation import image_grid, validation_file_items
from worlds.tiny_models import tiny_flux_kontext_pipeline

RESOLUTION = 64
HEADER = 14  # image_grid's label row


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation-inputs")
    tiny_flux_kontext_pipeline(seed=0).save_pretrained(root / "model")
    write_kontext_dataset(root / "data", n=4, resolution=RESOLUTION, seed=0)
    rng = np.random.default_rng(0)
    for name, size in (("wide.png", (96, 48)), ("square.png", (40, 40))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / name
        )
    mask = np.zeros((48, 96), dtype=np.uint8)
    mask[:, :48] = 255  # the left half
    Image.fromarray(mask).save(root / "wide_mask.png")
    return root


SCRIPT = TrainScript(kontext, kontext.KontextConfig, RESOLUTION, seed=5)


class TestFlags:
    def test_missing_files_are_named_before_anything_loads(self, assets):
        with pytest.raises(ValueError, match=r"not found: .*nowhere\.png"):
            SCRIPT.config(assets, validation_images=[str(assets / "nowhere.png")])

    def test_masks_and_prompts_pair_with_the_images(self, assets):
        images = [str(assets / "wide.png"), str(assets / "square.png")]
        with pytest.raises(ValueError, match="one mask per --validation_images entry: got 1"):
            SCRIPT.config(
                assets, validation_images=images, validation_masks=[str(assets / "wide_mask.png")]
            )
        with pytest.raises(ValueError, match=r"one prompt per validation image: got 1 for 2"):
            SCRIPT.config(assets, validation_images=images, validation_prompts=["a"])
        with pytest.raises(ValueError, match=r"got 3 for 2 \(--num_validation_images\)"):
            SCRIPT.config(assets, validation_prompts=["a", "b", "c"])
        config = SCRIPT.config(assets, validation_images=images, validation_prompts=["a", "b"])
        assert config.validation_prompts == ["a", "b"]

    def test_an_inpainting_model_needs_the_masks(self, assets):
        with pytest.raises(ValueError, match="need --validation_masks"):
            fill.FillConfig(
                pretrained_model_name_or_path="m",
                train_data_dir=str(assets / "data"),
                validation_images=[str(assets / "wide.png")],
            )

    def test_a_vae_refuses_them(self, assets):
        with pytest.raises(ValueError, match="--validation_images does not apply to a VAE"):
            multispectral.MultispectralConfig(
                pretrained_model_name_or_path="m",
                train_data_dir=str(assets / "data"),
                validation_images=[str(assets / "wide.png")],
            )


class TestFileItems:
    def test_fitted_to_their_bucket_like_training_images(self, assets):
        config = SCRIPT.config(
            assets,
            validation_images=[str(assets / "wide.png")],
            validation_masks=[str(assets / "wide_mask.png")],
        )
        (item,) = validation_file_items(config)
        # A 2:1 image at 64 px keeps about 64**2 pixels in multiples of 16: 48 x 80 (aspect 1.67)
        # is the bucket nearest to 2:1 whose area stays under 64**2 (96 x 48 would exceed it).
        assert item["image"].shape == (3, 48, 80)
        assert item["image"].min() >= -1 and item["image"].max() <= 1
        mask = item["mask"]
        assert mask.shape == (1, 48, 80) and set(mask.unique().tolist()) == {0.0, 1.0}
        # The 96-wide source is centre-cropped to 80 (no scaling: 48 rows already fit), so the
        # crop's columns 0..39 are the source's 8..47, inside its left half; 40..79 are outside.
        assert mask[0, :, :38].min() == 1 and mask[0, :, 42:].max() == 0


def test_a_run_validates_the_given_images_at_step_0_and_later(assets, tmp_path, fresh_accelerate):
    images = [str(assets / "wide.png"), str(assets / "square.png")]
    prompts = ["insert a red ball", "insert a blue box"]
    flags = {
        "validation_images": images,
        "validation_prompts": prompts,
        "validation_steps": 2,
        "validation_inference_steps": 2,
        "max_train_steps": 4,
        "checkpointing_steps": 2,
    }
    SCRIPT.run(assets, tmp_path / "out", **flags)
    out = tmp_path / "out" / "validation"
    assert sorted(path.name for path in out.iterdir()) == [
        "step-000000.png",
        "step-000002.png",
        "step-000004.png",
    ]
    start = np.asarray(Image.open(out / "step-000000.png"))
    end = np.asarray(Image.open(out / "step-000004.png"))
    height, width = 48, 80  # the first file's bucket sets every cell's size
    assert start.shape == (HEADER + 2 * height, 4 * width, 3)
    prediction = start[HEADER : HEADER + height, 2 * width : 3 * width]
    # Step 0 is the model as it starts: a fresh LoRA changes nothing, so the base pipeline on
    # the fitted file and its prompt, with the validation's seed, draws the same image.
    base = FluxKontextPipeline.from_pretrained(assets / "model")
    config = SCRIPT.config(assets, **flags)
    (item,) = validation_file_items(config)[:1]
    expected = base(
        prompt=prompts[0],
        image=Image.fromarray(
            ((item["image"].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        ),
        height=height,
        width=width,
        max_area=height * width,  # as the script's validation: the bucket's size, no resize
        _auto_resize=False,
        num_inference_steps=2,
        guidance_scale=config.guidance_scale,
        max_sequence_length=config.max_sequence_length,
        generator=torch.Generator().manual_seed(SCRIPT.defaults["seed"]),
    ).images[0]
    np.testing.assert_array_equal(prediction, np.asarray(expected))
    # Training moved the LoRA, so the last look differs from the first.
    assert not np.array_equal(prediction, end[HEADER : HEADER + height, 2 * width : 3 * width])

    resumed = resume_copy(tmp_path / "out", 2, tmp_path / "resumed")
    SCRIPT.run(assets, resumed, resume_from_checkpoint="latest", **flags)
    # A resumed run does not look at its start again.
    assert sorted(path.name for path in (resumed / "validation").iterdir()) == ["step-000004.png"]


def test_validation_at_start_can_be_turned_off(assets, tmp_path, fresh_accelerate):
    out = SCRIPT.run(
        assets,
        tmp_path / "out",
        validation_steps=2,
        validation_inference_steps=2,
        num_validation_images=1,
        max_train_steps=2,
        validation_at_start="false",
    )
    assert [path.name for path in (out / "validation").iterdir()] == ["step-000002.png"]


def test_grid_cells_take_the_first_images_size():
    rows = [[Image.new("RGB", (8, 4), "red")], [Image.new("RGB", (2, 2), "blue")]]
    grid = image_grid(rows, ["a"])
    assert grid.size == (8, HEADER + 2 * 4)
