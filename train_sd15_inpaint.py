"""Train a Stable Diffusion 1.5 inpainting LoRA (UNet, optionally the text encoder too).

Each example is (image, mask, prompt): a folder with a metadata.jsonl or a Hugging Face
dataset. The UNet sees exactly what ``StableDiffusionInpaintPipeline`` feeds it: 9 channels,
``cat([noisy latents, mask, masked-image latents])`` with the mask resized to the latent grid
as the pipeline resizes it (nearest) and the masked image's latents sampled from the VAE and
scaled; CLIP text embeddings at the tokenizer's 77 tokens; integer timesteps. The noise schedule
and the prediction type (epsilon or v_prediction) come from the model's scheduler config; min-SNR
weighting (--snr_gamma) and the mask-region weighting are available.

``--objective grpo`` fine-tunes the LoRA on a reward instead (``training.grpo.policy``): groups of
images sampled with DDIM at --eta > 0 (as DDPO samples), the same 9-channel input and
classifier-free guidance at sampling and training, scored by ``--reward``.

    accelerate launch train_sd15_inpaint.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-inpainting \\
        --train_data_dir my_inpainting --output_dir out --mixed_precision fp16 \\
        --resolution 512 --max_train_steps 4000 --validation_steps 500

then ``StableDiffusionInpaintPipeline.from_pretrained(...).load_lora_weights("out")``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from jsonargparse.typing import PositiveFloat

from training.config import (
    InpaintingDataConfig,
    LoraFileConfig,
    LowMemoryConfig,
    RegionLossConfig,
    TrainConfig,
    bounded,
    exit_after_help,
    parse_config,
)
from training.grpo.config import GRPOConfig


# RegionLossConfig first: jsonargparse resolves the annotations in the modules of the first
# bases (training.config's names, such as MaskLossSettings).
@dataclass(kw_only=True)
class SD15InpaintConfig(
    RegionLossConfig, GRPOConfig, InpaintingDataConfig, LoraFileConfig, LowMemoryConfig, TrainConfig
):
    """Train a Stable Diffusion 1.5 inpainting LoRA: supervised, with optional min-SNR and region
    weighting, or with GRPO on a reward."""

    shipped_configs: ClassVar[str] = "sd15_inpaint"
    """Prefix of this script's files in configs/, which --help lists."""
    base_model_id: ClassVar[str] = "stable-diffusion-v1-5/stable-diffusion-inpainting"
    """The Hub id a single-file denoiser's pipeline comes from without --base_model_folder."""
    snr_gamma: float | None = bounded(None, low=0, low_open=True)
    """Min-SNR weighting gamma (5.0 is the paper's choice); None: unweighted MSE."""
    train_text_encoder: bool = False
    """Also train a LoRA on the CLIP text encoder's attention (its own default layers)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the validation pipeline (the pipeline's default), and of GRPO
    sampling and training alike."""
    eta: PositiveFloat = 1.0
    """GRPO: DDIM's noise weight eta (> 0; 1 is DDPM's posterior variance, DDPO's choice)."""


# --help answers here, before torch, diffusers and the models load.
exit_after_help(__name__, SD15InpaintConfig, __doc__)

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionInpaintPipeline
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor

from data.cache import fingerprint
from data.rows import collate_items
from losses import downsample_mask_area, masked_flow_matching_loss
from training.datasets import bucket_sampler, inpainting_dataset
from training.grpo.loop import train_objective
from training.grpo.sde import ddim_step
from training.inputs.caching import encoded_items, encoder_weights, offload_after_caching
from training.inputs.captions import caption_dropout
from training.inputs.latents import latent_distribution, sample_scaled_latents
from training.loop import TrainingParts
from training.lora.adapters import LoraFormat, add_lora, save_lora_components
from training.memory.offload import place_denoiser
from training.memory.plan import FamilyPlan, log_memory_plan, meta_tensor
from training.model_card import (
    ModelCardInfo,
    grpo_terms,
    inpainting_call,
    lora_usage,
    region_weighted,
)
from training.runtime import build_accelerator, load_pipeline, run_main, weight_dtype
from training.validation import InpaintingValidation

UNET_LORA = LoraFormat(StableDiffusionInpaintPipeline, "unet")
TEXT_ENCODER_LORA = LoraFormat(StableDiffusionInpaintPipeline, "text_encoder")
# diffusers' SD LoRA examples: the attention projections of the UNet and of CLIP.
UNET_LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj")


class InpaintDenoiser(torch.nn.Module):
    """What the loop trains (and DDP wraps): the UNet, and the text encoder when it trains."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sample: [B, 9, h, w]``, ``timestep: [B]`` integers; text as embeddings ``[B, 77,
        D]`` or, with a trained text encoder, as token ids ``[B, 77]`` -> ``[B, 4, h, w]``."""
        if self.text_encoder is not None:
            encoder_hidden_states = self.text_encoder(input_ids)[0]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def unet_inputs(
    noisy: torch.Tensor, mask: torch.Tensor, masked_latents: torch.Tensor
) -> torch.Tensor:
    """``[B, 9, h, w]`` = ``cat([noisy [B, 4, h, w], mask, masked_latents [B, 4, h, w]])`` with
    the pixel mask ``[B, 1, H, W]`` resized to ``(h, w)`` as the pipeline resizes it."""
    latent_mask = F.interpolate(mask, size=noisy.shape[-2:]).to(noisy)
    return torch.cat([noisy, latent_mask, masked_latents.to(noisy)], dim=1)


def tokenize(pipe: StableDiffusionInpaintPipeline, prompts: list[str]) -> torch.Tensor:
    """Token ids ``[B, 77]`` as the pipeline's ``encode_prompt`` makes them."""
    tokenizer = pipe.tokenizer
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)


class SD15Encoder:
    """A batch of pixels and prompts -> what the loss needs: the prompt (CLIP embeddings, or
    token ids when the text encoder trains), the VAE distributions of the image and of the masked
    image, and the pixel mask."""

    def __init__(self, pipe: StableDiffusionInpaintPipeline, config: SD15InpaintConfig) -> None:
        self.pipe = pipe
        self.config = config

    def fingerprint(self) -> str:
        pipe = self.pipe
        return fingerprint(
            model=self.config.pipeline_source,
            weights=encoder_weights(self.config.pipeline_source, ("vae", "text_encoder")),
            vae=dict(pipe.vae.config),
            text_encoder=pipe.text_encoder.config.to_dict(),
            dtype=str(pipe.vae.dtype),
            token_ids=self.config.train_text_encoder,
            form="sd15-inpaint/distribution/v1",
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids when the text encoder trains (it encodes them in the loss), else its
        embeddings."""
        pipe = self.pipe
        if self.config.train_text_encoder:
            return {"input_ids": tokenize(pipe, prompts)}
        return {"prompt_embeds": pipe.encode_prompt(prompts, pipe.text_encoder.device, 1, False)[0]}

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        image = latent_distribution(pipe.vae, batch["image"])
        masked = latent_distribution(pipe.vae, batch["masked_image"])
        return {
            **self.encode_prompts(batch["prompt"]),
            "latents_mean": image["mean"],
            "latents_std": image["std"],
            "masked_latents_mean": masked["mean"],
            "masked_latents_std": masked["std"],
            "mask": batch["mask"],
        }


class SD15Loss:
    """Epsilon or v-prediction MSE (+ min-SNR, + region weighting) for one batch."""

    def __init__(
        self,
        pipe: StableDiffusionInpaintPipeline,
        config: SD15InpaintConfig,
        encoder: SD15Encoder,
        encoded: bool,
    ) -> None:
        self.pipe = pipe
        self.config = config
        self.encoder = encoder
        self.batches_are_encoded = encoded
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def sample_latents(self, encoded: dict, name: str, generator: torch.Generator):
        return sample_scaled_latents(
            encoded[f"{name}_mean"],
            encoded[f"{name}_std"],
            generator,
            self.pipe.vae.config.scaling_factor,
        )

    def __call__(
        self, model: torch.nn.Module, batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        encoded = batch if self.batches_are_encoded else self.encoder(batch)
        config, scheduler = self.config, self.noise_scheduler
        # The masked image is drawn first, as the pipeline draws it from its generator.
        masked = self.sample_latents(encoded, "masked_latents", generator)
        x0 = self.sample_latents(encoded, "latents", generator)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        timesteps = torch.randint(
            0,
            scheduler.config.num_train_timesteps,
            (x0.shape[0],),
            generator=generator,
            device=x0.device,
        )
        noisy = scheduler.add_noise(x0, noise, timesteps)
        prediction = model(
            unet_inputs(noisy, encoded["mask"], masked),
            timesteps,
            encoder_hidden_states=encoded.get("prompt_embeds"),
            input_ids=encoded.get("input_ids"),
        ).float()
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, timesteps)
        else:
            target = noise
        region = None
        if config.mask_loss.enabled:
            region = downsample_mask_area(encoded["mask"], x0.shape[-2:]).flatten(1)
        loss = masked_flow_matching_loss(
            as_tokens(prediction),
            as_tokens(target.float()),
            region,
            weighting=self.snr_weights(timesteps),
            **config.region_loss_weights(),
        )
        return loss, {"mse": loss.detach()}

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma weights ``[B]`` as diffusers' examples compute them, or None."""
        gamma = self.config.snr_gamma
        if gamma is None:
            return None
        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=gamma)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return weights / (snr + 1)
        return weights / snr


def sampling_scheduler(scheduler) -> DDIMScheduler:
    """DDIM on the pipeline's noise schedule that treats the predicted x0 as the pipeline's own
    ``scheduler`` does: clipped or thresholded only where that scheduler's config says so
    (``DDIMScheduler`` alone would clip to [-1, 1] whenever the key is missing, and latents are
    not images)."""
    config = scheduler.config
    return DDIMScheduler.from_config(
        config,
        clip_sample=config.get("clip_sample", False),
        thresholding=config.get("thresholding", False),
    )


class SD15Policy:
    """SD1.5 inpainting as a GRPO policy (``training.grpo.policy.GRPOPolicy``): DDIM at --eta on the
    model's noise schedule, the pipeline's 9-channel input, classifier-free guidance at
    --guidance_scale (unconditional = the empty prompt, first, as the pipeline batches it). The
    state is the latents ``[N, 4, h, w]`` in fp32."""

    def __init__(
        self,
        pipe: StableDiffusionInpaintPipeline,
        config: SD15InpaintConfig,
        encoder: SD15Encoder,
        encoded: bool,
        device: torch.device,
    ) -> None:
        self.pipe = pipe
        self.config = config
        self.encoder = encoder
        self.batches_are_encoded = encoded
        self.dtype = weight_dtype(config)
        self.scheduler = sampling_scheduler(pipe.scheduler)
        self.guided = config.guidance_scale > 1
        # Built where the text encoder is now, kept where training runs: with
        # --offload_encoders the encoder leaves for the CPU after caching.
        if config.train_text_encoder:
            self.unconditional = {"input_ids": tokenize(pipe, [""]).to(device)}
        else:
            with torch.no_grad():
                embeds = pipe.encode_prompt([""], pipe.text_encoder.device, 1, True)[1]
            self.unconditional = {"encoder_hidden_states": embeds.to(device)}

    def start(self, batch: dict, generations: int, steps: int, generator: torch.Generator):
        encoded = batch if self.batches_are_encoded else self.encoder(batch)
        masked = sample_scaled_latents(
            encoded["masked_latents_mean"],
            encoded["masked_latents_std"],
            generator,
            self.pipe.vae.config.scaling_factor,
        )
        count = masked.shape[0] * generations
        noise = randn_tensor(
            (count, *masked.shape[1:]),
            generator=generator,
            device=generator.device,
            dtype=torch.float32,
        )
        self.scheduler.set_timesteps(steps, device=generator.device)
        text = (
            {"input_ids": encoded["input_ids"]}
            if self.config.train_text_encoder
            else {"encoder_hidden_states": encoded["prompt_embeds"]}
        )
        text = {name: value.repeat_interleave(generations, dim=0) for name, value in text.items()}
        mask = encoded["mask"].repeat_interleave(generations, dim=0)
        masked = masked.to(self.dtype).repeat_interleave(generations, dim=0)
        if self.guided:
            text = {
                name: torch.cat([self.unconditional[name].expand_as(value), value])
                for name, value in text.items()
            }
            mask, masked = torch.cat([mask, mask]), torch.cat([masked, masked])
        conditioning = {"text": text, "mask": mask, "masked": masked}
        return conditioning, noise * self.scheduler.init_noise_sigma

    def step_distribution(self, model, latents, step, conditioning, stochastic):
        timestep = self.scheduler.timesteps[step]
        sample = latents.to(self.dtype)
        if self.guided:
            sample = torch.cat([sample, sample])
        sample = unet_inputs(sample, conditioning["mask"], conditioning["masked"])
        prediction = model(sample, timestep.expand(sample.shape[0]), **conditioning["text"]).float()
        if self.guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + self.config.guidance_scale * (conditional - unconditional)
        eta = self.config.eta if stochastic else 0.0
        return ddim_step(self.scheduler, prediction, timestep, latents, eta)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, conditioning: dict) -> torch.Tensor:
        vae = self.pipe.vae
        scaled = (latents / vae.config.scaling_factor).to(vae.dtype)
        images = vae.decode(scaled, return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)


def as_tokens(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B, h * w, C]``, row-major, so latent pixels weigh as tokens do."""
    return latents.flatten(2).transpose(1, 2)


def add_text_encoder_lora(text_encoder: torch.nn.Module, config: SD15InpaintConfig) -> None:
    """A LoRA on CLIP's attention; from --init_lora_weights when that file has one."""
    init = config.init_lora_weights
    if init is not None:
        try:
            TEXT_ENCODER_LORA.read(init)
        except ValueError:
            init = None  # a UNet-only file: the text encoder starts fresh
    own = dataclasses.replace(config, lora_layers=None, init_lora_weights=init)
    add_lora(text_encoder, own, TEXT_ENCODER_LORA_LAYERS, TEXT_ENCODER_LORA)


def save_sd15_lora(model: InpaintDenoiser, folder: Path) -> None:
    components = {"unet": model.unet}
    if model.text_encoder is not None:
        components["text_encoder"] = model.text_encoder
    save_lora_components(StableDiffusionInpaintPipeline, components, folder)


def load_sd15_lora(model: InpaintDenoiser, folder: Path) -> None:
    UNET_LORA.load(model.unet, folder)
    if model.text_encoder is not None:
        TEXT_ENCODER_LORA.load(model.text_encoder, folder)


def planned_step_inputs(unet, config: SD15InpaintConfig, batch_size: int) -> dict:
    """The UNet's inputs in one step at the largest --resolution, on the meta device: the
    9-channel latents, the timestep and CLIP's 77 token embeddings."""
    latent = config.largest_resolution // 8
    return {
        "sample": meta_tensor(unet, batch_size, unet.config.in_channels, latent, latent),
        "timestep": torch.zeros(batch_size, device="meta", dtype=torch.long),
        "encoder_hidden_states": meta_tensor(unet, batch_size, 77, unet.config.cross_attention_dim),
        "return_dict": False,
    }


MEMORY_PLAN = FamilyPlan(
    "sd15-inpaint", "unet", UNET_LORA_LAYERS, UNET_LORA, ("text_encoder",), planned_step_inputs
)


def card_info(config: SD15InpaintConfig) -> ModelCardInfo:
    """The model card's family part; the loss terms by their metrics.jsonl names."""
    losses = grpo_terms(config)
    if config.objective == "sft":
        losses = {**region_weighted(config, "mse"), "min-SNR gamma": config.snr_gamma or "off"}
    return ModelCardInfo(
        title="Stable Diffusion 1.5 inpainting LoRA",
        tags=("stable-diffusion", "sd15-inpainting", "inpainting"),
        losses=losses,
        usage=lora_usage(
            "StableDiffusionInpaintPipeline", inpainting_call(config.validation_prompt)
        ),
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_config(SD15InpaintConfig, argv, description=__doc__)
    accelerator = build_accelerator(config)
    log_memory_plan(config, MEMORY_PLAN, accelerator)
    pipe = load_pipeline(
        StableDiffusionInpaintPipeline, config, accelerator, ("vae", "text_encoder"), "unet"
    )
    add_lora(pipe.unet, config, UNET_LORA_LAYERS, UNET_LORA)
    text_encoder = None
    if config.train_text_encoder:
        text_encoder = pipe.text_encoder
        add_text_encoder_lora(text_encoder, config)
        text_encoder.train()
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if text_encoder is not None:
            text_encoder.gradient_checkpointing_enable()

    dataset = inpainting_dataset(config)
    encoder = SD15Encoder(pipe, config)
    dropout = caption_dropout(config, encoder.encode_prompts)
    items = encoded_items(accelerator, config, dataset, encoder, collate_items)
    place_denoiser(pipe.unet, config, accelerator.device)
    # Before the encoders may leave for the CPU: the empty prompt is encoded where they are.
    policy = SD15Policy(pipe, config, encoder, config.cache_latents, accelerator.device)
    parts = TrainingParts(
        model=InpaintDenoiser(pipe.unet, text_encoder),
        dataset=items,
        sampler=bucket_sampler(
            config, accelerator, dataset.bucket_of_items, dataset.repeats_of_items
        ),
        caption_dropout=dropout,
        collate_fn=collate_items,
        compute_loss=SD15Loss(pipe, config, encoder, config.cache_latents),
        save_lora=save_sd15_lora,
        load_lora=load_sd15_lora,
        card=card_info(config),
        validate=offload_after_caching(
            config,
            # A trained text encoder is part of the model; GRPO decodes its samples with the VAE.
            ([pipe.vae] if config.objective == "sft" else [])
            + ([] if config.train_text_encoder else [pipe.text_encoder]),
            accelerator.device,
            InpaintingValidation(
                pipe, dataset, config, accelerator, {"guidance_scale": config.guidance_scale}
            ),
        ),
    )
    train_objective(accelerator, config, parts, dataset, policy)


if __name__ == "__main__":
    run_main(main)
