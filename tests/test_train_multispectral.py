"""train_multispectral_vae.py end to end on a tiny random SD3 VAE and the synthetic leaf set."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from script_runs import ROOT, TrainScript, listed, model_card, script_args
from script_runs import help_text as script_help

import train_multispectral_vae as script
from data.images import DataError
from data.multispectral import (
    MultispectralDataset,
    band_statistics,
    find_leaf_images,
    write_multispectral_dataset,
)
from data.rows import collate_items
from models.multispectral import ADAPTER_WEIGHTS_NAME, AutoencoderKLMultispectralAdapter
from training.config import parse_config
from training.metrics import read_metrics
from worlds.tiny_models import tiny_sd3_vae

RESOLUTION = 32
N_IMAGES = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multispectral")
    tiny_sd3_vae(seed=0).save_pretrained(root / "sd3-vae")
    write_multispectral_dataset(root / "data", n=N_IMAGES, resolution=RESOLUTION, seed=0)
    return root


@pytest.fixture(scope="module")
def help_text() -> str:
    return script_help("train_multispectral_vae.py")


SCRIPT = TrainScript(
    script,
    script.MultispectralConfig,
    RESOLUTION,
    model="sd3-vae",
    train_batch_size=2,
    learning_rate=3e-3,
    seed=7,
)
run = SCRIPT.run
config_for = SCRIPT.config


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / script.ADAPTER_FOLDER / ADAPTER_WEIGHTS_NAME)


def training_batch(assets: Path) -> dict:
    """Every training image (the last one is held out by default) as one batch."""
    images = find_leaf_images(assets / "data")[:-1]
    dataset = MultispectralDataset(images, resolution=RESOLUTION)
    return collate_items([dataset[index] for index in range(len(dataset))])


def evaluate(model: AutoencoderKLMultispectralAdapter, batch: dict) -> tuple[float, float]:
    """Masked MSE (normalised units) and SAM (degrees) over the leaf pixels of ``batch``."""
    with torch.no_grad():
        _, losses = model(batch["image"], batch["mask"])
    return losses["mse"].item(), math.degrees(losses["sam"].item())


class TestTrainingSteps:
    @pytest.mark.parametrize("decoder_lora", [False, True])
    def test_only_adapter_and_lora_weights_change(self, assets, decoder_lora):
        config = config_for(assets, decoder_lora=decoder_lora, rank=2)
        train_set, _ = script.build_datasets(config)
        model = script.build_model(config, train_set)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        vae_file = AutoencoderKL.from_pretrained(assets / "sd3-vae").state_dict()
        loss_fn = script.MultispectralLoss(script.band_labels(config, 5))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batch = training_batch(assets)
        for _ in range(3):
            loss, components = loss_fn(model, batch, torch.Generator())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == set(model.adapter_state_dict())
        assert any(".lora_" in name for name in changed) == decoder_lora
        base = {
            name.replace(".base_layer", ""): p
            for name, p in model.vae.state_dict().items()
            if ".lora_" not in name
        }
        assert base.keys() == vae_file.keys()
        for name, value in vae_file.items():
            assert torch.equal(base[name], value), name
        expected = {"mse", "sam", "coverage"}
        expected |= {f"{kind}{b}" for kind in ("mse_band", "band_weight_") for b in range(5)}
        assert set(components) == expected


class TestTrainingRun:
    def test_outputs_validation_and_reload(self, assets, tmp_path, fresh_accelerate):
        out = run(
            assets,
            tmp_path / "out",
            max_train_steps=4,
            checkpointing_steps=2,
            checkpoints_total_limit=1,
            validation_steps=2,
            num_validation_images=1,
        )
        records = read_metrics(out)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        for record in records:
            assert {"loss", "lr", "mse", "sam", "mse_band4", "band_weight_0", "coverage"} <= set(
                record
            )
        validated = [r for r in records if "val_sam_deg" in r]
        assert [r["step"] for r in validated] == [2, 4]
        for record in validated:
            psnr = [record[f"val_psnr_{band}"] for band in range(5)]
            assert record["val_psnr"] == pytest.approx(sum(psnr) / 5)
            assert 0 < record["val_sam_deg"] < 90
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
        grid = Image.open(out / "validation" / "step-000004.png")
        assert grid.size == (7 * RESOLUTION, 14 + RESOLUTION)  # input, reconstruction, 5 errors

        model = AutoencoderKLMultispectralAdapter.from_pretrained(out / script.ADAPTER_FOLDER)
        training_images = find_leaf_images(assets / "data")[:-1]  # the last one is held out
        stats = band_statistics(MultispectralDataset(training_images, resolution=RESOLUTION))
        assert model.config.band_low == stats.low and model.config.band_high == stats.high
        assert model.config.band_min == stats.minimum and model.config.band_max == stats.maximum
        card = model_card(out)
        assert "multispectral" in card.data.tags and card.data.pipeline_tag is None
        assert f'subfolder="{script.ADAPTER_FOLDER}"' in card.text  # the snippet's loading:
        model = AutoencoderKLMultispectralAdapter.from_pretrained(
            out, subfolder=script.ADAPTER_FOLDER
        )
        resumable = AutoencoderKLMultispectralAdapter.from_pretrained(
            out / "checkpoint-4" / script.ADAPTER_FOLDER
        )
        batch = training_batch(assets)
        with torch.no_grad():
            assert torch.equal(model(batch["image"])[0], resumable(batch["image"])[0])

    def test_a_short_run_lowers_masked_mse_and_sam(self, assets, tmp_path, fresh_accelerate):
        out = run(assets, tmp_path / "out", max_train_steps=40, learning_rate=1e-2)
        trained = AutoencoderKLMultispectralAdapter.from_pretrained(out / script.ADAPTER_FOLDER)
        untrained = AutoencoderKLMultispectralAdapter.from_vae(
            trained.vae,
            num_bands=5,
            band_low=trained.config.band_low,
            band_high=trained.config.band_high,
        )
        batch = training_batch(assets)
        mse_before, sam_before = evaluate(untrained, batch)
        mse_after, sam_after = evaluate(trained, batch)
        assert mse_after < 0.8 * mse_before
        assert sam_after < 0.85 * sam_before

    def test_exact_resume(self, assets, tmp_path, fresh_accelerate):
        common = {"gradient_accumulation_steps": 2, "checkpointing_steps": 3, "validation_steps": 3}
        straight = run(assets, tmp_path / "straight", max_train_steps=6, **common)
        resumed = run(assets, tmp_path / "resumed", max_train_steps=3, **common)
        run(assets, resumed, max_train_steps=6, resume_from_checkpoint="latest", **common)
        expected, got = adapter_tensors(straight), adapter_tensors(resumed)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), name
        assert read_metrics(straight) == read_metrics(resumed)
        assert "val_psnr" in read_metrics(resumed)[2]

    def test_warm_start_from_a_saved_adapter(self, assets, tmp_path, fresh_accelerate):
        first = run(assets, tmp_path / "first", max_train_steps=2, decoder_lora="true", rank=2)
        saved = first / script.ADAPTER_FOLDER
        # One step of a negligible learning rate: the adapter is the file's.
        again = run(
            assets,
            tmp_path / "again",
            max_train_steps=1,
            learning_rate=1e-30,
            decoder_lora="true",
            rank=2,
            init_lora_weights=saved / ADAPTER_WEIGHTS_NAME,
        )
        for name, value in adapter_tensors(first).items():
            torch.testing.assert_close(adapter_tensors(again)[name], value, rtol=0, atol=1e-20)
        with pytest.raises(ValueError, match=r"decoder_lora_rank=2 \(this model: 0\)"):
            run(assets, tmp_path / "other", init_lora_weights=saved)

    def test_validation_data_dir_holds_out_nothing_from_training(
        self, assets, tmp_path, fresh_accelerate
    ):
        held_out = tmp_path / "held_out"
        write_multispectral_dataset(held_out, n=2, resolution=RESOLUTION, seed=9)
        out = run(
            assets,
            tmp_path / "out",
            validation_data_dir=held_out,
            train_batch_size=1,
            max_train_steps=N_IMAGES,
            validation_steps=N_IMAGES,
        )
        records = read_metrics(out)
        assert [r["epoch"] for r in records] == [0] * N_IMAGES  # all six images train
        assert "val_sam_deg" in records[-1]

    def test_bands_from_a_hyperspectral_cube(self, assets, tmp_path, fresh_accelerate):
        data = tmp_path / "cubes"
        (data / "images").mkdir(parents=True)
        rng = np.random.default_rng(0)
        for index in range(3):
            cube = rng.uniform(100, 6000, (12, RESOLUTION, RESOLUTION)).astype(np.float32)
            cube[:, :4] = np.nan  # no-data rows, and no mask files
            tifffile.imwrite(data / "images" / f"{index}.tif", cube, photometric="minisblack")
        out = run(
            assets,
            tmp_path / "out",
            train_data_dir=data,
            bands="9,3,5",
            max_train_steps=2,
            holdout_images=0,
        )
        records = read_metrics(out)
        assert {"mse_band9", "mse_band3", "mse_band5"} <= set(records[-1])
        assert records[-1]["coverage"] == pytest.approx(1 - 4 / RESOLUTION)
        saved = AutoencoderKLMultispectralAdapter.from_pretrained(out / script.ADAPTER_FOLDER)
        assert saved.config.num_bands == 3


class TestBadInput:
    @pytest.mark.parametrize(
        "problem,expected",
        [
            ("mask_size", r"mask '[^']*masks/0000\.png': size 8x8 differs"),
            ("unreadable", r"'[^']*images/0002\.tif': cannot be read as a TIFF"),
            ("band_index", r"'[^']*images/0000\.tif': has 5 bands; --bands asks for band 7"),
            ("empty", r"'[^']*images/0001/band_3_red\.png': cannot be read"),
            ("missing", r"'[^']*images/0001': has 4 bands, but '[^']*images/0000\.tif' has 5"),
        ],
    )
    def test_clear_error_before_the_first_step(
        self, assets, tmp_path, fresh_accelerate, problem, expected
    ):
        data = tmp_path / "data"
        write_multispectral_dataset(data, n=4, resolution=RESOLUTION, seed=0)
        bands = None
        if problem == "mask_size":
            Image.new("L", (8, 8)).save(data / "masks" / "0000.png")
        elif problem == "unreadable":
            (data / "images" / "0002.tif").write_text("not a TIFF")
        elif problem == "band_index":
            bands = "0,7"
        elif problem == "empty":
            (data / "images" / "0001" / "band_3_red.png").write_bytes(b"")
        else:
            (data / "images" / "0001" / "band_3_red.png").unlink()
        out = tmp_path / "out"
        (out / "checkpoint-7").mkdir(parents=True)
        (out / "checkpoint-7" / "training_state.json").write_text("{}")
        with pytest.raises(DataError, match=expected):
            run(assets, out, train_data_dir=data, bands=bands, resume_from_checkpoint="latest")
        assert listed(out) == ["checkpoint-7"]

    def test_truncated_tiff_stops_a_fresh_run_before_training(
        self, assets, tmp_path, fresh_accelerate
    ):
        data = tmp_path / "data"
        write_multispectral_dataset(data, n=4, resolution=RESOLUTION, seed=0)
        path = data / "images" / "0002.tif"
        path.write_bytes(path.read_bytes()[:1000])
        with pytest.raises(DataError, match=r"'[^']*images/0002\.tif': TIFF data cannot be read"):
            run(assets, tmp_path / "out", train_data_dir=data, holdout_images=0)
        assert not (tmp_path / "out" / "metrics.jsonl").exists()

    @pytest.mark.parametrize(
        "flags,message",
        [
            (["--cache_latents"], "--cache_latents does not apply"),
            (["--validation_prompt", "a leaf"], "--validation_prompt does not apply"),
            (["--holdout_images", "0", "--validation_steps", "5"], "validation needs held-out"),
            (["--bands", "1,x"], "--bands must be comma-separated band indices"),
            (["--false_colour_bands", "1,2"], "--false_colour_bands needs 3 bands"),
            (["--norm_low_percentile", "60", "--norm_high_percentile", "40"], "percentile"),
            (["--dataset_name", "leaves"], "--dataset_name is not supported"),
        ],
    )
    def test_config_errors_exit_before_anything_runs(
        self, assets, tmp_path, flags, message, capsys
    ):
        with pytest.raises(SystemExit) as stopped:
            parse_config(
                script.MultispectralConfig,
                script_args(SCRIPT.values(assets, tmp_path)) + flags,
            )
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err


class TestCommandLine:
    def test_help_documents_every_flag(self, help_text):
        for field in fields(script.MultispectralConfig):
            assert f"--{field.name}" in help_text, field.name

    @pytest.mark.parametrize("name", ["multispectral_tiny.yaml", "multispectral.yaml"])
    def test_shipped_configs_parse(self, name):
        config = parse_config(
            script.MultispectralConfig,
            ["--config", str(ROOT / "configs" / name), "--train_data_dir", "data"],
        )
        assert config.resolution % 16 == 0 and config.max_train_steps > 0

    def test_two_process_cpu_run(self, assets, tmp_path):
        out = tmp_path / "ddp"
        result = SCRIPT.launch(
            assets, out, max_train_steps=4, checkpointing_steps=2, train_batch_size=1
        )
        assert "2 ranks" in result.stderr and "identical on all 2 ranks" in result.stderr
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
        for step in (2, 4):
            names = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
            assert {"rng-0.safetensors", "rng-1.safetensors", script.ADAPTER_FOLDER} <= names
        AutoencoderKLMultispectralAdapter.from_pretrained(out / script.ADAPTER_FOLDER)
