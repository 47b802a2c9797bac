"""train_sd15_inpaint.py end to end on a tiny random SD1.5 inpainting pipeline."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionInpaintPipeline
from PIL import Image
from script_runs import (
    ROOT,
    TrainScript,
    assert_same_tensors,
    first_call,
    first_inpainting_batch,
    help_text,
    lora_tensors,
    quiet_pipeline,
    write_assets,
)

import train_sd15_inpaint as sd15
from data.synthetic import write_inpainting_dataset
from models.tiny import tiny_sd15_inpaint_pipeline
from training.config import parse_config
from training.metrics import read_metrics
from training.validation import to_pil

RESOLUTION = 64


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    return write_assets(
        root, tiny_sd15_inpaint_pipeline(seed=0), write_inpainting_dataset, RESOLUTION
    )


SCRIPT = TrainScript(sd15, sd15.SD15InpaintConfig, RESOLUTION, seed=3)
run = SCRIPT.run
config = SCRIPT.config


def first_batch(assets: Path) -> dict:
    return first_inpainting_batch(assets, RESOLUTION)


@pytest.fixture(scope="module")
def pipe(assets):
    return quiet_pipeline(StableDiffusionInpaintPipeline, assets)


class TestSameInputsAsThePipeline:
    def test_first_unet_call(self, assets, pipe):
        batch = first_batch(assets)
        mask = batch["mask"][0, 0]
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        with first_call(pipe.unet) as seen:
            pipe(
                prompt=batch["prompt"][0],
                image=to_pil(batch["image"][0]),
                mask_image=Image.fromarray((mask.numpy() * 255).astype(np.uint8)),
                latents=noise,
                height=RESOLUTION,
                width=RESOLUTION,
                num_inference_steps=2,
                guidance_scale=1.0,  # no classifier-free guidance: one conditional call
                generator=torch.Generator().manual_seed(5),
                output_type="latent",
            )
        (sample, timestep), kwargs = seen["args"], seen["kwargs"]

        sd_config = config(assets)
        encoder = sd15.SD15Encoder(pipe, sd_config)
        loss = sd15.SD15Loss(pipe, sd_config, encoder, encoded=False)
        encoded = encoder(batch)
        masked = loss.sample_latents(encoded, "masked_latents", torch.Generator().manual_seed(5))
        built = sd15.unet_inputs(noise, encoded["mask"], masked)
        assert built.shape == sample.shape == (1, 9, 8, 8)
        # Nearest resizing of an ellipse that cuts through latent cells, as the pipeline does.
        assert torch.equal(built[:, 4:5], sample[:, 4:5])
        assert torch.equal(built[:, 4:5], F.interpolate(batch["mask"], size=(8, 8)))
        torch.testing.assert_close(built[:, 5:], sample[:, 5:], rtol=0, atol=1e-5)
        assert torch.equal(encoded["prompt_embeds"], kwargs["encoder_hidden_states"])
        assert encoded["prompt_embeds"].shape[1] == 77
        # Integer timesteps on the 1000-step training scale.
        assert not torch.is_floating_point(torch.as_tensor(timestep))
        assert 0 <= int(timestep) < loss.noise_scheduler.config.num_train_timesteps


def one_loss(pipe, sd_config, batch, seed=0):
    encoder = sd15.SD15Encoder(pipe, sd_config)
    loss_fn = sd15.SD15Loss(pipe, sd_config, encoder, encoded=False)
    model = sd15.InpaintDenoiser(pipe.unet, None)
    with torch.no_grad():
        return loss_fn(model, batch, torch.Generator().manual_seed(seed))[0]


class TestLoss:
    def test_mask_loss_disabled_is_plain(self, assets, pipe):
        batch = first_batch(assets)
        weighted = config(assets)
        weighted.mask_loss.weight = 0.9
        assert torch.equal(one_loss(pipe, weighted, batch), one_loss(pipe, config(assets), batch))

    def test_full_mask_region_weighting(self, assets, pipe):
        batch = first_batch(assets)
        batch["mask"] = torch.ones_like(batch["mask"])
        batch["masked_image"] = torch.zeros_like(batch["image"])
        enabled = config(assets)
        enabled.mask_loss.enabled = True
        plain = one_loss(pipe, config(assets), batch)
        torch.testing.assert_close(one_loss(pipe, enabled, batch), 1.3 * plain, rtol=1e-6, atol=0)

    def test_min_snr_weights(self, assets, pipe):
        loss = sd15.SD15Loss(pipe, config(assets, snr_gamma=5.0), None, encoded=True)
        timesteps = torch.tensor([0, 10, 500, 999])
        alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[timesteps]
        snr = alphas / (1 - alphas)
        expected = torch.minimum(snr, torch.tensor(5.0)) / snr
        torch.testing.assert_close(loss.snr_weights(timesteps), expected.float())
        assert loss.snr_weights(timesteps)[-1] == 1.0  # low SNR: weight 1
        assert sd15.SD15Loss(pipe, config(assets), None, True).snr_weights(timesteps) is None

    @pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
    def test_target_of_the_prediction_type(self, assets, prediction_type):
        """The loss against a reference written here: the same draws in the same order, and
        v = sqrt(a) * noise - sqrt(1 - a) * x0 for v-prediction."""
        model_pipe = StableDiffusionInpaintPipeline.from_pretrained(assets / "model")
        model_pipe.scheduler.register_to_config(prediction_type=prediction_type)
        sd_config = config(assets)
        encoder = sd15.SD15Encoder(model_pipe, sd_config)
        loss_fn = sd15.SD15Loss(model_pipe, sd_config, encoder, encoded=True)
        encoded = encoder(first_batch(assets))
        denoiser = sd15.InpaintDenoiser(model_pipe.unet, None)
        with torch.no_grad():
            loss = loss_fn(denoiser, encoded, torch.Generator().manual_seed(4))[0]
        generator = torch.Generator().manual_seed(4)
        scale = model_pipe.vae.config.scaling_factor
        draws = [
            (
                encoded[f"{name}_mean"]
                + encoded[f"{name}_std"]
                * torch.randn(encoded[f"{name}_mean"].shape, generator=generator)
            )
            * scale
            for name in ("masked_latents", "latents")
        ]
        masked, x0 = draws
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (1,), generator=generator)
        alpha = DDPMScheduler.from_config(model_pipe.scheduler.config).alphas_cumprod[t]
        noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        inputs = torch.cat([noisy, F.interpolate(encoded["mask"], size=(8, 8)), masked], dim=1)
        with torch.no_grad():
            prediction = denoiser(inputs, t, encoded["prompt_embeds"])
        if prediction_type == "v_prediction":
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
        else:
            target = noise
        torch.testing.assert_close(loss, ((prediction - target) ** 2).mean(), rtol=1e-5, atol=0)


class TestTrainingRun:
    def test_lora_with_text_encoder_loads_into_the_pipeline(self, assets, tmp_path):
        out = run(
            assets,
            tmp_path / "out",
            train_text_encoder="true",
            snr_gamma=5.0,
            validation_steps=4,
            validation_inference_steps=2,
            **{"mask_loss.enabled": "true"},
        )
        assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
        assert (out / "validation" / "step-000004.png").is_file()
        state = StableDiffusionInpaintPipeline.lora_state_dict(str(out))[0]
        assert any(k.startswith("unet.") for k in state)
        assert any(k.startswith("text_encoder.") for k in state)
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
        pipe = StableDiffusionInpaintPipeline.from_pretrained(assets / "model")
        plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        pipe.load_lora_weights(out)
        adapted = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        assert not np.allclose(plain, adapted)

    def test_exact_resume_with_text_encoder(self, assets, tmp_path):
        common = {"checkpointing_steps": 2, "train_text_encoder": "true", "cache_latents": "true"}
        straight = run(assets, tmp_path / "straight", max_train_steps=4, **common)
        resumed = run(assets, tmp_path / "resumed", max_train_steps=2, **common)
        run(assets, resumed, max_train_steps=4, resume_from_checkpoint="latest", **common)
        assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
        assert read_metrics(straight) == read_metrics(resumed)

    def test_two_process_cpu_run(self, assets, tmp_path):
        out = tmp_path / "ddp"
        result = SCRIPT.launch(assets, out, max_train_steps=2)
        assert "identical on all 2 ranks" in result.stderr
        assert [r["step"] for r in read_metrics(out)] == [1, 2]


class TestCommandLine:
    def test_help_documents_every_flag(self):
        text = help_text("train_sd15_inpaint.py")
        for field in fields(sd15.SD15InpaintConfig):
            assert f"--{field.name}" in text, field.name

    @pytest.mark.parametrize("name", ["sd15_inpaint_tiny.yaml", "sd15_inpaint.yaml"])
    def test_shipped_configs_parse(self, name):
        parsed = parse_config(
            sd15.SD15InpaintConfig,
            ["--config", str(ROOT / "configs" / name), "--train_data_dir", "data"],
        )
        assert parsed.snr_gamma == 5.0 and parsed.max_train_steps > 0
