"""Several training sizes in one run (``--resolution 512,768,1024``): how the flag is read,
every row once per size in that size's buckets, batches of one size, a run that trains and
resumes exactly."""

import math

import pytest
import torch
import yaml
from script_runs import (
    TrainScript,
    assert_same_tensors,
    lora_tensors,
    model_card,
    reset_accelerate,
)

import train_kontext_lora as kontext
import train_multispectral_vae as multispectral
import train_sd15_inpaint as sd15
from data.buckets import BucketBatchSampler
from data.synthetic import write_inpainting_dataset, write_kontext_dataset
from training.config import parse_config
from training.datasets import edit_pair_dataset, inpainting_dataset
from training.metrics import read_metrics
from worlds.tiny_models import tiny_flux_kontext_pipeline

SIZES = [48, 32]
ROWS = 3


def parsed(*flags: str) -> kontext.KontextConfig:
    return parse_config(
        kontext.KontextConfig,
        ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags],
    )


class TestFlag:
    @pytest.mark.parametrize(
        "flags",
        [
            ("--resolution", "512,768,1024"),
            ("--resolution", "512", "768", "1024"),
            ("--resolution=1024,512,768",),
            ("--resolution", "[768, 512, 1024]"),
            ("--resolution", "512, 768,1024,512"),
        ],
    )
    def test_several_sizes_largest_first(self, flags):
        config = parsed(*flags)
        assert config.resolutions == [1024, 768, 512]
        assert config.largest_resolution == 1024

    def test_one_size_stays_a_number(self):
        config = parsed("--resolution", "768")
        assert config.resolution == 768 and config.resolutions == [768]
        assert parsed().resolution == 1024  # the pipeline's own size by default

    def test_a_yaml_list(self, tmp_path):
        file = tmp_path / "run.yaml"
        file.write_text(yaml.safe_dump({"resolution": [512, 1024]}))
        assert parsed("--config", str(file)).resolutions == [1024, 512]
        # The command line wins over the file.
        assert parsed("--config", str(file), "--resolution", "768").resolutions == [768]

    @pytest.mark.parametrize(
        "value,message",
        [
            ("512,520", "multiple of 16, got 520"),
            ("0,512", ">= 16, got 0"),
            ("512,x", "resolution"),
        ],
    )
    def test_a_bad_size_is_named(self, value, message, capsys):
        with pytest.raises(SystemExit) as stopped:
            parsed("--resolution", value)
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err

    def test_the_multispectral_adapter_takes_one_size(self, capsys):
        # Its images are cropped to a square, not bucketed.
        with pytest.raises(SystemExit):
            parse_config(
                multispectral.MultispectralConfig,
                ["--pretrained_model_name_or_path=m", "--train_data_dir=d", "--resolution=256,512"],
            )
        assert "resolution" in capsys.readouterr().err


def assert_in_its_size_buckets(dataset, index: int, size: int, image) -> None:
    """Item ``index`` is fitted to a bucket of area just under ``size**2`` (within one 16-wide
    strip) with sides multiples of 16, and its image has that bucket's shape."""
    height, width = dataset.bucket_size(index)
    assert height % 16 == 0 and width % 16 == 0
    assert size * size * (1 - 16 / size) < height * width <= size * size
    assert tuple(image.shape[-2:]) == (height, width)


@pytest.fixture(scope="module")
def edit_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    write_kontext_dataset(root / "data", n=ROWS, resolution=32, seed=0)
    return root / "data"


def edit_config(folder, resolution, **flags):
    return kontext.KontextConfig(
        pretrained_model_name_or_path="m",
        train_data_dir=str(folder),
        resolution=resolution,
        **flags,
    )


class TestItems:
    def test_every_row_once_per_size_largest_first(self, edit_data):
        dataset = edit_pair_dataset(edit_config(edit_data, SIZES), latent_factor=8)
        single = {size: edit_pair_dataset(edit_config(edit_data, size), 8) for size in SIZES}
        assert len(dataset) == ROWS * len(SIZES) and dataset.row_count == ROWS
        for tile, size in enumerate(SIZES):
            for row in range(ROWS):
                index = tile * ROWS + row
                item, alone = dataset[index], single[size][row]
                assert_in_its_size_buckets(dataset, index, size, item["target"])
                # The same example as a run at that one size sees, pixel for pixel.
                assert item["prompt"] == alone["prompt"] and item["index"] == index
                for name in ("context", "target", "mask", "mask_latent", "signed_distance_map"):
                    torch.testing.assert_close(item[name], alone[name], rtol=0, atol=0)
        # Each copy is its own latent-cache entry.
        assert len({dataset.key(i) for i in range(len(dataset))}) == len(dataset)

    def test_repeats_and_trigger_word_hold_at_every_size(self, edit_data, tmp_path):
        sets = tmp_path / "sets.yaml"
        sets.write_text(yaml.safe_dump([{"train_data_dir": str(edit_data), "repeats": 3}]))
        config = kontext.KontextConfig(
            pretrained_model_name_or_path="m",
            dataset_config=str(sets),
            resolution=SIZES,
            trigger_word="zxq",
        )
        dataset = edit_pair_dataset(config, latent_factor=8)
        assert dataset.repeats_of_items == [3] * (ROWS * len(SIZES))
        assert all(dataset[i]["prompt"].startswith("zxq ") for i in range(len(dataset)))

    def test_inpainting_items_once_per_size(self, tmp_path):
        write_inpainting_dataset(tmp_path / "data", n=2, resolution=32, seed=0)
        config = sd15.SD15InpaintConfig(
            pretrained_model_name_or_path="m",
            train_data_dir=str(tmp_path / "data"),
            resolution=SIZES,
        )
        dataset = inpainting_dataset(config)
        assert len(dataset) == 4
        for index in range(4):
            item = dataset[index]
            assert_in_its_size_buckets(dataset, index, SIZES[index // 2], item["image"])
            assert item["mask"].shape[-2:] == item["image"].shape[-2:]

    def test_a_batch_holds_one_size(self, edit_data):
        dataset = edit_pair_dataset(edit_config(edit_data, [64, 48, 32]), latent_factor=8)
        sampler = BucketBatchSampler(dataset.bucket_of_items, 2, seed=0)
        sampler.set_epoch(0)
        batches = list(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
        for batch in batches:
            areas = {math.prod(dataset.bucket_size(i)) for i in batch}
            assert len(areas) == 1, batch


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes-run")
    tiny_flux_kontext_pipeline(seed=0).save_pretrained(root / "model")
    write_kontext_dataset(root / "data", n=2, resolution=32, seed=0)
    return root


def test_a_run_at_two_sizes_trains_each_example_at_both_and_resumes_exactly(assets, tmp_path):
    script = TrainScript(kontext, kontext.KontextConfig, SIZES, seed=1)
    flags = {"cache_latents": "true", "checkpointing_steps": 2}
    reset_accelerate()
    straight = script.run(assets, tmp_path / "straight", **flags)
    resumed = script.run(assets, tmp_path / "resumed", **{**flags, "max_train_steps": 2})
    script.run(assets, resumed, resume_from_checkpoint="latest", **flags)
    reset_accelerate()
    # 2 examples x 2 sizes: one epoch is the 4 steps, each example cached once per size.
    assert len(list((straight / "cache").glob("*/*.safetensors"))) == 4
    assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
    assert read_metrics(straight) == read_metrics(resumed)
    text = model_card(straight).text
    assert "2 examples from" in text and "each at 2 sizes (`--resolution 32,48`)" in text
