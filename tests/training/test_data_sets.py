"""Several data sets in one run (``--dataset_config``), each drawn its own number of times an
epoch: the YAML's checks, the rows one after another, the sampler's repeats, a real run."""

from collections import Counter

import pytest
import torch
import yaml
from diffusers import QwenImageEditPipeline
from script_runs import TrainScript, reset_accelerate

import train_flux_fill as fill
import train_kontext_lora as kontext
import train_qwen_edit_mask as qwen
from data.buckets import BucketBatchSampler
from data.images import DataError
from data.synthetic import (
    write_inpainting_dataset,
    write_kontext_dataset,
    write_text_edit_dataset,
)
from training.datasets import data_sets, edit_pair_dataset, inpainting_dataset
from training.metrics import read_metrics
from training.runtime import build_accelerator
from worlds.tiny_models import tiny_flux_kontext_pipeline

RESOLUTION = 32


def drawn(sampler: BucketBatchSampler, epoch: int) -> Counter:
    sampler.set_epoch(epoch)
    return Counter(index for batch in sampler for index in batch)


class TestSamplerRepeats:
    def test_each_item_is_drawn_its_count_every_epoch(self):
        sampler = BucketBatchSampler([0, 0, 1, 1, 1], 2, seed=0, repeats=[3, 1, 2, 1, 1])
        for epoch in range(3):
            assert drawn(sampler, epoch) == {0: 3, 1: 1, 2: 2, 3: 1, 4: 1}
        # bucket 0 holds 4 draws (2 batches), bucket 1 holds 4 (2 batches)
        assert sampler.batches_per_epoch == 4

    def test_without_repeats_once_each(self):
        sampler = BucketBatchSampler([0, 1, 0], 1, seed=0)
        assert drawn(sampler, 0) == {0: 1, 1: 1, 2: 1}

    def test_a_count_for_every_item(self):
        with pytest.raises(ValueError, match="a count >= 1 for every item"):
            BucketBatchSampler([0, 0], 1, seed=0, repeats=[1])
        with pytest.raises(ValueError, match="a count >= 1 for every item"):
            BucketBatchSampler([0, 0], 1, seed=0, repeats=[1, 0])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-sets")
    tiny_flux_kontext_pipeline(seed=0).save_pretrained(root / "model")
    write_kontext_dataset(root / "chairs", n=2, resolution=RESOLUTION, seed=0)
    write_kontext_dataset(root / "lamps", n=3, resolution=RESOLUTION, seed=1)
    return root


def write_sets(path, sets) -> str:
    path.write_text(yaml.safe_dump(sets))
    return str(path)


def config(assets, sets_file):
    return kontext.KontextConfig(
        pretrained_model_name_or_path=str(assets / "model"),
        dataset_config=sets_file,
        resolution=RESOLUTION,
    )


def test_rows_follow_each_other_with_their_repeats(assets):
    # Paths in the file are relative to its folder.
    sets = write_sets(
        assets / "sets.yaml",
        [{"train_data_dir": "chairs", "repeats": 2}, {"train_data_dir": "lamps"}],
    )
    dataset = edit_pair_dataset(config(assets, sets), latent_factor=8)
    chairs = edit_pair_dataset(
        kontext.KontextConfig(
            pretrained_model_name_or_path="m", train_data_dir=str(assets / "chairs")
        ),
        latent_factor=8,
    )
    assert len(dataset) == 5 and dataset.repeats_of_items == [2, 2, 1, 1, 1]
    assert dataset[1]["prompt"] == chairs[1]["prompt"]
    assert dataset.describe(3).startswith(f"'{assets / 'lamps'}")


@pytest.mark.parametrize(
    "sets,message",
    [
        ({"train_data_dir": "chairs"}, "expected a list of data sets"),
        ([{"train_data_dir": "chairs", "repeat": 2}], r"data set 1: unknown key\(s\) repeat"),
        ([{"train_data_dir": "chairs", "repeats": 0}], "data set 1: repeats 0"),
        ([{"train_data_dir": "chairs"}, {"caption": "x"}], "data set 2: give exactly one of"),
        ([{"train_data_dir": "chairs", "text_mask_dir": "m"}], "unknown key"),
    ],
)
def test_a_bad_file_is_named_with_the_data_set(assets, tmp_path, sets, message):
    with pytest.raises(DataError, match=message):
        data_sets(config(assets, write_sets(tmp_path / "sets.yaml", sets)))


def test_a_run_draws_every_data_set_its_count(assets, tmp_path):
    sets = write_sets(
        tmp_path / "sets.yaml",
        [
            {"train_data_dir": str(assets / "chairs"), "repeats": 3},
            {"train_data_dir": str(assets / "lamps")},
        ],
    )
    script = TrainScript(kontext, kontext.KontextConfig, RESOLUTION, seed=2)
    reset_accelerate()
    out = script.run(
        assets,
        tmp_path / "out",
        train_data_dir=None,
        dataset_config=sets,
        max_train_steps=None,
        num_train_epochs=1,
    )
    reset_accelerate()
    # 2 chairs x 3 + 3 lamps = 9 draws at batch 1: one epoch is 9 steps.
    assert [record["step"] for record in read_metrics(out)] == list(range(1, 10))


def test_qwen_reads_each_data_sets_masks_beside_its_folder(tmp_path):
    for name, seed in (("signs", 0), ("posters", 1)):
        write_text_edit_dataset(tmp_path / name, n=2, resolution=RESOLUTION, seed=seed)
    sets = write_sets(
        tmp_path / "sets.yaml",
        [{"train_data_dir": "signs"}, {"train_data_dir": "posters", "repeats": 2}],
    )
    settings = qwen.QwenEditConfig(
        pretrained_model_name_or_path="m", dataset_config=sets, resolution=RESOLUTION
    )
    settings.data.use_text_mask = True
    dataset = qwen.text_edit_dataset(settings, QwenImageEditPipeline)
    assert len(dataset) == 4 and dataset.repeats_of_items == [1, 1, 2, 2]
    assert all("mask" in dataset.rows[i].images for i in range(4))


def test_inpainting_data_sets_follow_each_other_with_their_repeats(tmp_path):
    write_inpainting_dataset(tmp_path / "walls", n=2, resolution=RESOLUTION, seed=0)
    write_inpainting_dataset(tmp_path / "floors", n=1, resolution=RESOLUTION, seed=1)
    sets = write_sets(
        tmp_path / "sets.yaml",
        [{"train_data_dir": "walls", "repeats": 2}, {"train_data_dir": "floors"}],
    )
    settings = fill.FillConfig(
        pretrained_model_name_or_path="m", dataset_config=sets, resolution=RESOLUTION
    )
    dataset = inpainting_dataset(settings)
    floors = inpainting_dataset(
        fill.FillConfig(
            pretrained_model_name_or_path="m",
            train_data_dir=str(tmp_path / "floors"),
            resolution=RESOLUTION,
        )
    )
    assert len(dataset) == 3 and dataset.repeats_of_items == [2, 2, 1]
    assert dataset[2]["prompt"] == floors[0]["prompt"]
    torch.testing.assert_close(dataset[2]["image"], floors[0]["image"])
    bad = write_sets(tmp_path / "bad.yaml", [{"train_data_dir": "walls", "control_dirs": ["x"]}])
    with pytest.raises(
        DataError, match=r"unknown key\(s\) control_dirs; a data set takes train_data_dir"
    ):
        inpainting_dataset(fill.FillConfig(pretrained_model_name_or_path="m", dataset_config=bad))


def test_the_output_folder_cannot_be_a_data_sets_folder(assets, tmp_path, capsys):
    sets = write_sets(
        tmp_path / "sets.yaml",
        [{"train_data_dir": str(assets / "chairs")}, {"train_data_dir": str(assets / "lamps")}],
    )
    settings = kontext.KontextConfig(
        pretrained_model_name_or_path=str(assets / "model"),
        dataset_config=sets,
        output_dir=str(assets / "lamps"),
    )
    reset_accelerate()
    with pytest.raises(SystemExit) as stopped:
        build_accelerator(settings)
    reset_accelerate()
    assert stopped.value.code == 2
    assert "is the training data folder" in capsys.readouterr().err
