"""train_flux_fill.py end to end on a tiny random FLUX.1 Fill and the synthetic inpainting set."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline
from PIL import Image
from safetensors.torch import save_file
from script_runs import (
    ROOT,
    TrainScript,
    assert_same_tensors,
    first_call,
    first_inpainting_batch,
    help_text,
    lora_tensors,
    quiet_pipeline,
    resume_copy,
    write_assets,
)

import train_flux_fill as fill
from data.fill_latents import MANIFEST_FILE, FillLatentDataset, VaeScaling
from data.images import DataError
from data.inpainting import InpaintingDataset
from data.rows import collate_items
from data.synthetic import write_inpainting_dataset
from models.tiny import tiny_flux_fill_pipeline
from training.config import parse_config
from training.metrics import read_metrics
from training.validation import to_pil

RESOLUTION = 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill")
    return write_assets(root, tiny_flux_fill_pipeline(seed=0), write_inpainting_dataset, RESOLUTION)


SCRIPT = TrainScript(fill, fill.FillConfig, RESOLUTION, seed=3)
run = SCRIPT.run
config = SCRIPT.config


def first_batch(assets: Path) -> dict:
    return first_inpainting_batch(assets, RESOLUTION)


@pytest.fixture(scope="module")
def pipe(assets):
    return quiet_pipeline(FluxFillPipeline, assets)


class TestSameInputsAsThePipeline:
    def test_first_denoising_step(self, assets, pipe):
        batch = first_batch(assets)
        mask = batch["mask"][0, 0]
        # The synthetic mask is an ellipse: its edge cuts through 8x8 latent cells.
        cells = mask.reshape(RESOLUTION // 8, 8, RESOLUTION // 8, 8).mean(dim=(1, 3))
        assert ((cells > 0) & (cells < 1)).any()
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        with first_call(pipe.transformer) as seen:
            pipe(
                prompt=batch["prompt"][0],
                image=to_pil(batch["image"][0]),
                mask_image=Image.fromarray((mask.numpy() * 255).astype(np.uint8)),
                latents=pipe._pack_latents(noise, 1, 16, 8, 8),
                height=RESOLUTION,
                width=RESOLUTION,
                num_inference_steps=1,
                generator=torch.Generator().manual_seed(5),
                output_type="latent",
            )
        expected = seen["kwargs"]

        fill_config = config(assets)
        encoder = fill.FillEncoder(pipe, fill_config)
        loss = fill.FillLoss(pipe, fill_config, encoder, encoded=False)
        encoded = encoder(batch)
        conditioning = loss.sample_conditioning(encoded, torch.Generator().manual_seed(5))
        built = fill.fill_transformer_inputs(
            pipe,
            noise,
            conditioning,
            encoded["prompt_embeds"],
            encoded["pooled_prompt_embeds"],
            torch.ones(1),
            fill_config.guidance_scale,
        )
        assert built["hidden_states"].shape == expected["hidden_states"].shape == (1, 16, 384)
        assert torch.equal(built["hidden_states"][..., :64], expected["hidden_states"][..., :64])
        # The masked image's latents: the same VAE draw; the pipeline's image is channels-last in
        # memory, which changes the convolution kernels' rounding (1e-6), not the values.
        torch.testing.assert_close(
            built["hidden_states"][..., 64:128],
            expected["hidden_states"][..., 64:128],
            rtol=0,
            atol=1e-5,
        )
        assert torch.equal(built["hidden_states"][..., 128:], expected["hidden_states"][..., 128:])
        assert expected["guidance"].tolist() == [30.0] and expected["timestep"].tolist() == [1.0]
        assert expected["encoder_hidden_states"].shape[1] == 512
        for name in (
            "timestep",
            "guidance",
            "pooled_projections",
            "encoder_hidden_states",
            "txt_ids",
            "img_ids",
        ):
            assert torch.equal(built[name], expected[name]), name


def one_loss(pipe, fill_config, batch, encoded=False, seed=0):
    encoder = fill.FillEncoder(pipe, fill_config)
    loss_fn = fill.FillLoss(pipe, fill_config, encoder, encoded)
    with torch.no_grad():
        return loss_fn(pipe.transformer, batch, torch.Generator().manual_seed(seed))


class TestLoss:
    def test_mask_loss_disabled_is_plain_flow_matching(self, assets, pipe):
        batch = first_batch(assets)
        plain, _ = one_loss(pipe, config(assets), batch)
        # Any weights: disabled means the plain loss, bit for bit.
        weighted = config(assets)
        weighted.mask_loss.weight = 0.9
        weighted.mask_loss.text_region_weight = 7.0
        assert torch.equal(one_loss(pipe, weighted, batch)[0], plain)

    def test_empty_and_full_masks(self, assets, pipe):
        """An empty mask inpaints nothing: the region term weighs every token by the background
        weight (1), i.e. plain flow matching. An all-white mask regenerates the whole image:
        every token gets the region weight, (1 - a) + a * fg times the plain loss."""
        batch = first_batch(assets)
        enabled = config(assets)
        enabled.mask_loss.enabled = True
        for fill_value, factor in ((0.0, 1.0), (1.0, 0.7 + 0.3 * 2.0)):
            batch["mask"] = torch.full_like(batch["mask"], fill_value)
            batch["masked_image"] = batch["image"] * (1 - batch["mask"])
            plain, _ = one_loss(pipe, config(assets), batch)
            weighted, _ = one_loss(pipe, enabled, batch)
            assert torch.isfinite(weighted)
            torch.testing.assert_close(weighted, factor * plain, rtol=1e-6, atol=0)

    def test_precomputed_folder_gives_the_same_loss(self, assets, pipe, tmp_path):
        encoded = tmp_path / "encoded"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "precompute_flux_fill.py"),
                "--pretrained_model_name_or_path",
                str(assets / "model"),
                "--train_data_dir",
                str(assets / "data"),
                "--out",
                str(encoded),
                "--resolution",
                str(RESOLUTION),
            ],
            check=True,
            capture_output=True,
        )
        scaling = VaeScaling(pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor)
        precomputed = FillLatentDataset(encoded, scaling, require_latents=True)
        raw = InpaintingDataset.from_folder(assets / "data", resolution=RESOLUTION)
        assert len(precomputed) == len(raw) == 4
        fill_config = config(assets, background_preservation_weight=0.5)
        fill_config.mask_loss.enabled = True
        for index in range(4):
            from_raw = one_loss(pipe, fill_config, collate_items([raw[index]]), seed=index)
            from_disk = one_loss(
                pipe, fill_config, collate_items([precomputed[index]]), encoded=True, seed=index
            )
            assert torch.equal(from_raw[0], from_disk[0])
            assert from_raw[1].keys() == from_disk[1].keys() == {"fm", "bg"}


class TestTrainingRun:
    def test_outputs_and_pipeline_loads_the_lora(self, assets, tmp_path):
        out = run(
            assets,
            tmp_path / "out",
            validation_steps=4,
            validation_inference_steps=2,
            background_preservation_weight=0.5,
            **{"mask_loss.enabled": "true"},
        )
        records = read_metrics(out)
        assert [r["step"] for r in records] == [1, 2, 3, 4]
        assert all({"loss", "fm", "bg", "lr"} <= r.keys() for r in records)
        assert (out / "validation" / "step-000004.png").is_file()
        batch = first_batch(assets)
        call = {
            "prompt": batch["prompt"][0],
            "image": to_pil(batch["image"][0]),
            "mask_image": to_pil(batch["mask"][0].expand(3, -1, -1) * 2 - 1),
            "height": RESOLUTION,
            "width": RESOLUTION,
            "num_inference_steps": 2,
            "output_type": "np",
        }
        pipe = FluxFillPipeline.from_pretrained(assets / "model")
        plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(out)
        adapted = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        assert not np.allclose(plain, adapted)

    def test_exact_resume(self, assets, tmp_path):
        common = {"gradient_accumulation_steps": 2, "checkpointing_steps": 2}
        straight = run(assets, tmp_path / "straight", max_train_steps=4, **common)
        resumed = run(assets, tmp_path / "resumed", max_train_steps=2, **common)
        run(assets, resumed, max_train_steps=4, resume_from_checkpoint="latest", **common)
        assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
        assert read_metrics(straight) == read_metrics(resumed)

    def test_two_processes_then_resume_on_one(self, assets, tmp_path):
        two = tmp_path / "two"
        SCRIPT.launch(assets, two, max_train_steps=2, checkpointing_steps=1)
        assert [r["step"] for r in read_metrics(two)] == [1, 2]
        resumed = resume_copy(two, 1, tmp_path / "resumed")
        run(
            assets,
            resumed,
            max_train_steps=2,
            gradient_accumulation_steps=2,
            resume_from_checkpoint="latest",
        )
        for name, value in lora_tensors(two).items():
            torch.testing.assert_close(lora_tensors(resumed)[name], value, rtol=1e-4, atol=1e-6)

    def test_random_masks(self, assets, tmp_path):
        data = tmp_path / "data"
        write_inpainting_dataset(data, n=4, resolution=RESOLUTION, seed=0)
        rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
        lines = [json.dumps({k: v for k, v in row.items() if k != "mask"}) for row in rows]
        (data / "metadata.jsonl").write_text("\n".join(lines))
        with pytest.raises(DataError, match="missing key 'mask'"):
            run(assets, tmp_path / "refused", train_data_dir=data)
        out = run(
            assets, tmp_path / "out", train_data_dir=data, random_masks="true", cache_latents="true"
        )
        assert len(list((out / "cache").glob("*/*.safetensors"))) == 4


class TestBadInput:
    @pytest.fixture
    def encoded(self, assets, tmp_path):
        """A two-record precomputed folder in the seed's .pt form."""
        root = tmp_path / "encoded"
        records = []
        for index in range(2):
            name = f"fill_{index}.pt"
            tensors = {
                "prompt_embed": torch.zeros(8, 32),
                "pooled_prompt_embeds": torch.zeros(32),
                "text_ids": torch.zeros(8, 3),
                "masked_latents": torch.zeros(16, 8, 8),
                "mask_latents": torch.zeros(1, 8, 8),
                "latents": torch.zeros(16, 8, 8),
            }
            for folder, tensor in tensors.items():
                (root / folder).mkdir(parents=True, exist_ok=True)
                torch.save(tensor, root / folder / name)
            records.append(
                {
                    "caption": "a ball",
                    "prompt_embed_path": name,
                    "pooled_prompt_embeds_path": name,
                    "text_ids": name,
                    "masked_latents_path": name,
                    "mask_latents_path": name,
                    "latents_path": name,
                }
            )
        (root / MANIFEST_FILE).write_text(json.dumps(records))
        return root, records

    def read(self, root):
        return FillLatentDataset(root, VaeScaling(0.3611, 0.1159), require_latents=True)

    def test_seed_pt_files_are_read(self, encoded):
        root, _ = encoded
        item = self.read(root)[1]
        assert item["mask_latents"].shape == (64, 8, 8)
        assert torch.equal(item["masked_latents_std"], torch.zeros(16, 8, 8))
        torch.testing.assert_close(item["masked_latents_mean"], torch.full((16, 8, 8), 0.1159))

    def test_path_outside_the_folder_is_refused(self, encoded):
        root, records = encoded
        records[1]["latents_path"] = "../../secret.pt"
        (root / MANIFEST_FILE).write_text(json.dumps(records))
        with pytest.raises(
            DataError, match=r"record 1: 'latents_path' '\.\./\.\./secret\.pt' leaves"
        ):
            self.read(root)

    @pytest.mark.filterwarnings("ignore:Detected pickle protocol")
    def test_pickle_with_code_is_refused_and_never_runs(self, encoded, tmp_path):
        root, _ = encoded
        marker = tmp_path / "ran"

        class Payload:
            def __reduce__(self):
                return (Path.touch, (marker,))

        (root / "mask_latents" / "fill_0.pt").write_bytes(pickle.dumps(Payload()))
        with pytest.raises(DataError, match=r"mask_latents/fill_0\.pt': refused"):
            self.read(root)
        assert not marker.exists()

    def test_non_tensor_is_refused(self, encoded):
        root, _ = encoded
        torch.save({"a": 1}, root / "latents" / "fill_1.pt")
        with pytest.raises(DataError, match=r"fill_1\.pt': holds a dict, not a tensor"):
            self.read(root)

    def test_mask_of_another_size(self, encoded):
        root, _ = encoded
        save_file({"data": torch.zeros(64, 4, 4)}, root / "mask_latents" / "m.safetensors")
        records = json.loads((root / MANIFEST_FILE).read_text())
        records[0]["mask_latents_path"] = "m.safetensors"
        (root / MANIFEST_FILE).write_text(json.dumps(records))
        with pytest.raises(DataError, match=r"record 0: mask latents \[64, 4, 4\] vs latents"):
            self.read(root)

    def test_raw_mask_of_another_size(self, assets, tmp_path):
        data = tmp_path / "data"
        write_inpainting_dataset(data, n=2, resolution=RESOLUTION, seed=0)
        Image.new("L", (20, 20)).save(data / "masks" / "0001.png")
        with pytest.raises(
            DataError, match=r"masks/0001\.png'?: size 20x20 differs from the image"
        ):
            run(assets, tmp_path / "out", train_data_dir=data)


class TestCommandLine:
    def test_help_documents_every_flag(self):
        text = help_text("train_flux_fill.py")
        for field in fields(fill.FillConfig):
            assert f"--{field.name}" in text, field.name
        for name in ("enabled", "weight", "text_region_weight", "background_weight"):
            assert f"--mask_loss.{name}" in text

    @pytest.mark.parametrize("name", ["flux_fill_tiny.yaml", "flux_fill.yaml"])
    def test_shipped_configs_parse(self, name):
        parsed = parse_config(
            fill.FillConfig,
            ["--config", str(ROOT / "configs" / name), "--train_data_dir", "data"],
        )
        assert parsed.guidance_scale == 30.0 and parsed.max_train_steps > 0
