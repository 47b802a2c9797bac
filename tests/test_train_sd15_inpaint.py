"""train_sd15_inpaint.py end to end on a tiny random SD1.5 inpainting pipeline."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
)
from grpo_checks import assert_ratios_are_one_on_policy
from PIL import Image
from script_runs import (
    ROOT,
    TrainScript,
    assert_int8_run_resumes_exactly,
    assert_same_tensors,
    first_call,
    first_inpainting_batch,
    help_text,
    inpainting_call,
    lora_tensors,
    model_card,
    quiet_pipeline,
    write_assets,
)
from torch.distributions import Normal

import train_sd15_inpaint as sd15
from data.inpainting import InpaintingDataset
from data.rows import collate_items
from data.synthetic import write_inpainting_dataset
from training.config import parse_config
from training.grpo.policy import sample_rollout, transition
from training.grpo.rewards import RewardOptions, Rewards
from training.grpo.sde import ddim_step
from training.lora.adapters import add_lora
from training.metrics import read_metrics
from training.validation import to_pil
from worlds.tiny_models import tiny_sd15_inpaint_pipeline

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
    def test_int8_unet_trains_and_resumes_exactly(self, assets, tmp_path):
        out = assert_int8_run_resumes_exactly(SCRIPT, assets, tmp_path)
        pipe = quiet_pipeline(StableDiffusionInpaintPipeline, assets)
        pipe.load_lora_weights(out)
        assert pipe.get_list_adapters() == {"unet": ["default_0"]}

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
        card = model_card(out)
        assert "stable-diffusion" in card.data.tags and "| min-SNR gamma | 5 |" in card.text
        assert "StableDiffusionInpaintPipeline.from_pretrained" in card.text
        call = inpainting_call(assets, RESOLUTION)
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
        assert parsed.objective == "sft"

    def test_shipped_grpo_config_parses(self):
        flags = ["--config", str(ROOT / "configs" / "sd15_inpaint_grpo.yaml")]
        parsed = parse_config(sd15.SD15InpaintConfig, [*flags, "--train_data_dir", "data"])
        assert parsed.objective == "grpo" and parsed.mixed_precision == "fp16"
        assert parsed.eta == 1.0 and parsed.guidance_scale == 7.5
        assert parsed.num_generations == 8 and parsed.reward == "background:1,seam:0.5,fill:1"


GRPO_RESOLUTION = 32
GRPO = {
    "objective": "grpo",
    "resolution": GRPO_RESOLUTION,
    "num_generations": 2,
    "sampling_steps": 3,
}


@pytest.fixture(scope="module")
def grpo(assets):
    """A pipeline of its own with random (non-zero) LoRAs on the UNet and the text encoder, its
    GRPO config, the denoiser GRPO trains and the policy."""
    pipe = quiet_pipeline(StableDiffusionInpaintPipeline, assets)
    grpo_config = sd15.SD15InpaintConfig(
        pretrained_model_name_or_path=str(assets / "model"),
        train_data_dir=str(assets / "data"),
        rank=4,
        train_text_encoder=True,
        **GRPO,
    )
    add_lora(pipe.unet, grpo_config, sd15.UNET_LORA_LAYERS, sd15.UNET_LORA)
    sd15.add_text_encoder_lora(pipe.text_encoder, grpo_config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05, generator=generator)
    denoiser = sd15.InpaintDenoiser(pipe.unet, pipe.text_encoder)
    encoder = sd15.SD15Encoder(pipe, grpo_config)
    return (
        pipe,
        grpo_config,
        denoiser,
        sd15.SD15Policy(pipe, grpo_config, encoder, False, pipe.unet.device),
    )


def grpo_batch(assets, count: int = 2) -> dict:
    dataset = InpaintingDataset.from_folder(assets / "data", resolution=GRPO_RESOLUTION)
    return collate_items([dataset[index] for index in range(count)])


class TestGRPOPolicy:
    def test_noise_free_sampling_is_the_pipelines(self, assets, grpo):
        """Four eta = 0 steps (with guidance 7.5, the text encoder's LoRA in both prompts) and
        the decode give what the pipeline gives with a DDIM scheduler."""
        pipe, _, denoiser, policy = grpo
        batch = first_inpainting_batch(assets, GRPO_RESOLUTION)
        noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
        conditioning, _ = policy.start(batch, 1, 4, torch.Generator().manual_seed(5))
        latents = noise.clone()
        with torch.no_grad():
            for step in range(4):
                latents = policy.step_distribution(
                    denoiser, latents, step, conditioning, stochastic=False
                )[0]
            images = policy.decode(latents, conditioning)
            # DDIM as the pipeline's own scheduler treats x0: never clipped in latent space.
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
            expected = pipe(
                prompt=batch["prompt"][0],
                image=to_pil(batch["image"][0]),
                mask_image=to_pil(batch["mask"][0].expand(3, -1, -1) * 2 - 1),
                latents=noise,
                height=GRPO_RESOLUTION,
                width=GRPO_RESOLUTION,
                num_inference_steps=4,
                guidance_scale=7.5,
                eta=0.0,
                generator=torch.Generator().manual_seed(5),
                output_type="pt",
            ).images
        assert expected.shape == images.shape == (1, 3, GRPO_RESOLUTION, GRPO_RESOLUTION)
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-4)

    def test_the_sampler_clips_x0_only_where_the_pipeline_does(self, assets):
        """The tiny pipeline's PNDM config has no clip_sample (DDIM's default would clip to
        [-1, 1]): a step whose x0 lies far outside is DDIM's formula, unclipped."""
        pndm = PNDMScheduler.from_pretrained(assets / "model", subfolder="scheduler")
        assert "clip_sample" not in pndm.config
        scheduler = sd15.sampling_scheduler(pndm)
        scheduler.set_timesteps(4)
        t = scheduler.timesteps[0]
        latents, eps = torch.full((1, 4, 2, 2), 3.0), torch.full((1, 4, 2, 2), -2.0)
        mean, std = ddim_step(scheduler, eps, t, latents, eta=1.0)
        a, a_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t - 250]
        variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        x0 = (latents - (1 - a) ** 0.5 * eps) / a**0.5
        assert x0.min() > 3  # far outside [-1, 1]
        expected = a_prev**0.5 * x0 + (1 - a_prev - variance) ** 0.5 * eps
        torch.testing.assert_close(mean, expected)
        torch.testing.assert_close(std, variance**0.5)
        clipping = DDIMScheduler.from_config(pndm.config)  # what a bare from_config gives
        clipping.set_timesteps(4)
        assert not torch.allclose(ddim_step(clipping, eps, t, latents, eta=1.0)[0], mean)
        asked = sd15.sampling_scheduler(DDIMScheduler(clip_sample=True, thresholding=False))
        assert asked.config.clip_sample

    def test_the_empty_prompt_lives_where_training_runs(self, assets, grpo):
        """Encoded where the text encoder is, kept on the training device: with
        --offload_encoders the encoder is on the CPU while the batch is on the GPU."""
        pipe, grpo_config, _, _ = grpo
        config = dataclasses.replace(grpo_config, train_text_encoder=False)
        policy = sd15.SD15Policy(pipe, config, None, True, torch.device("meta"))
        assert policy.unconditional["encoder_hidden_states"].device.type == "meta"
        with_encoder = sd15.SD15Policy(pipe, grpo_config, None, True, torch.device("meta"))
        assert with_encoder.unconditional["input_ids"].device.type == "meta"

    def test_step_log_density_is_the_gaussian_of_the_ddim_step(self, assets, grpo):
        """The guided prediction on the 9-channel input, diffusers' DDIM step and variance, and
        torch's Normal."""
        pipe, grpo_config, denoiser, policy = grpo
        conditioning, latents = policy.start(
            grpo_batch(assets), 2, 3, torch.Generator().manual_seed(2)
        )
        timestep = policy.scheduler.timesteps[1]
        with torch.no_grad():
            generator = torch.Generator().manual_seed(3)
            result = transition(policy, denoiser, latents, 1, conditioning, generator=generator)
            both = sd15.unet_inputs(
                torch.cat([latents, latents]), conditioning["mask"], conditioning["masked"]
            )
            unconditional, conditional = denoiser(
                both, timestep.expand(8), **conditioning["text"]
            ).chunk(2)
        guided = unconditional + 7.5 * (conditional - unconditional)
        reference = DDIMScheduler.from_config(pipe.scheduler.config)
        reference.set_timesteps(3)
        mean = reference.step(
            guided, timestep, latents, eta=1.0, variance_noise=torch.zeros_like(latents)
        ).prev_sample
        std = reference._get_variance(timestep, timestep - 1000 // 3) ** 0.5
        expected = Normal(mean, std).log_prob(result.next_latents).flatten(1).mean(dim=1)
        torch.testing.assert_close(result.log_prob, expected, rtol=1e-5, atol=1e-5)
        assert grpo_config.eta == 1.0 and result.std.item() == pytest.approx(std.item())

    def test_ratio_is_one_before_the_first_update(self, assets, grpo):
        _, grpo_config, denoiser, policy = grpo
        rollout = sample_rollout(
            policy,
            denoiser,
            grpo_batch(assets),
            grpo_config,
            torch.Generator().manual_seed(4),
            Rewards("background", RewardOptions(), "cpu"),
        )
        assert sorted(rollout.trained) == [0, 1, 2]
        assert_ratios_are_one_on_policy(policy, denoiser, rollout, samples=4)


class TestGRPORun:
    def test_inner_epochs_kl_and_exact_resume(self, assets, tmp_path):
        """Two updates per set of samples, accumulation 2, the text encoder's LoRA, latents
        from the cache, and the KL to the base model."""
        common = {
            **GRPO,
            "train_text_encoder": "true",
            "cache_latents": "true",
            "kl_beta": 0.1,
            "num_inner_epochs": 2,
            "gradient_accumulation_steps": 2,
            "checkpointing_steps": 2,
            "clip_range": 1e-5,
        }
        straight = run(assets, tmp_path / "straight", max_train_steps=4, **common)
        resumed = run(assets, tmp_path / "resumed", max_train_steps=2, **common)
        run(assets, resumed, max_train_steps=4, resume_from_checkpoint="latest", **common)
        assert_same_tensors(lora_tensors(straight), lora_tensors(resumed))
        records = read_metrics(straight)
        assert read_metrics(resumed) == records
        first, second, third = records[:3]
        # Update 1: on-policy, and the fresh LoRA (B = 0) is the base model: ratio 1, KL 0.
        assert first["ratio_min"] == first["ratio_max"] == 1.0 and first["kl"] == 0.0
        # Update 2 reuses the samples: off-policy, clipped, away from the base model.
        assert second["reward"] == first["reward"]
        assert second["clip_fraction"] > 0 and second["kl"] > 0
        assert second["ratio_min"] < 1 or second["ratio_max"] > 1
        assert third["reward"] != first["reward"]

    def test_eta_must_be_positive(self):
        with pytest.raises(SystemExit):
            parse_config(
                sd15.SD15InpaintConfig,
                ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--eta", "0"],
            )
