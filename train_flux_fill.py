"""Train a FLUX.1 Fill LoRA that fills a masked region as the prompt describes.

Each example is (image, mask, prompt): a folder with a metadata.jsonl, a Hugging Face
dataset, or a folder of precomputed latents (``manifest.json``, see ``data.fill_latents``). The
transformer sees exactly what ``FluxFillPipeline`` feeds it: the noisy target tokens (64
channels), the masked image's latents (sampled from the VAE, shifted and scaled, 64 channels)
and the pixel mask under each token (8x8 x 2x2 = 256 channels), 384 in all; plain image ids; T5
and pooled CLIP prompt embeddings; the guidance embedding at the pipeline's default 30; sigma as
the timestep. The loss is flow matching on the target tokens, with the mask-region
weighting and the background-preservation term available (both off by default).

``--objective grpo`` fine-tunes the LoRA on a reward instead (``training.grpo.policy``): groups of
images sampled with Flow-GRPO's SDE over the pipeline's own schedule and inputs, scored by
``--reward``, and the clipped GRPO objective.

    accelerate launch train_flux_fill.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-Fill-dev \\
        --train_data_dir my_inpainting --output_dir out --mixed_precision bf16 \\
        --resolution 1024 --max_train_steps 2000 --validation_steps 250

then ``FluxFillPipeline.from_pretrained(...).load_lora_weights("out")``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

from jsonargparse.typing import PositiveFloat

from training.config import (
    FlowMatchingConfig,
    FluxConfig,
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
class FillConfig(
    RegionLossConfig,
    GRPOConfig,
    InpaintingDataConfig,
    FlowMatchingConfig,
    FluxConfig,
    LoraFileConfig,
    LowMemoryConfig,
    TrainConfig,
):
    """Train a FLUX.1 Fill LoRA: supervised, with optional mask-region weighting and background
    preservation, or with GRPO on a reward."""

    shipped_configs: ClassVar[str] = "flux_fill"
    """Prefix of this script's files in configs/, which --help lists."""
    base_model_id: ClassVar[str] = "black-forest-labs/FLUX.1-Fill-dev"
    """The Hub id a single-file denoiser's pipeline comes from without --base_model_folder."""
    resolution: int | list[int] = bounded(1024, low=16)
    """Target side length in pixels (FLUX.1 Fill's native 1024); buckets keep about
    resolution**2 pixels. A multiple of 16. Several (512,768,1024) train each item once at each
    size."""
    guidance_scale: float = 30.0
    """Guidance embedding value (FluxFillPipeline's default guidance_scale)."""
    background_preservation_weight: float = bounded(0.0, low=0)
    """Background preservation: weight of the MSE of x0_hat vs the image outside the dilated mask
    (0: off). On latents it is a sigma**2-weighted velocity error outside the mask."""
    band_r: int = 1
    """Dilation of the mask, in latent pixels, before the background term."""
    noise_level: PositiveFloat = 0.7
    """GRPO: a in Flow-GRPO's SDE step noise s_t = a * sqrt(sigma / (1 - sigma))."""
    validation_data_dir: str | None = None
    """Raw examples (a metadata.jsonl folder) to draw the validation images from (default: the
    first training examples). A precomputed --train_data_dir holds no pixels: give one here."""


# --help answers here, before torch, diffusers and the models load.
exit_after_help(__name__, FillConfig, __doc__)

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline
from diffusers.utils.torch_utils import randn_tensor

from data.fill_latents import (
    FillLatentDataset,
    mask_latents_from_pixels,
    pixels_from_mask_latents,
)
from data.rows import collate_items
from losses import background_preservation_mse_latent, map_mask_to_latent, masked_flow_matching_loss
from training.datasets import (
    bucket_sampler,
    fill_dataset,
    inpainting_validation_examples,
)
from training.grpo.loop import train_objective
from training.grpo.sde import flow_sde_step
from training.inputs.caching import encoded_items, offload_after_caching
from training.inputs.captions import caption_dropout
from training.inputs.flow_matching import (
    loss_weighting,
    noisy_latents,
    predicted_x0,
    resolution_shift,
    sample_sigmas,
)
from training.inputs.flux import (
    FLUX_ENCODERS,
    FLUX_LORA_LAYERS,
    flux_encoder_fingerprint,
    flux_image_ids,
    flux_prompt_encoding,
    flux_transformer_inputs,
    pack,
    planned_flux_conditioning,
)
from training.inputs.latents import latent_distribution, sample_scaled_latents
from training.loop import TrainingParts
from training.lora.adapters import LoraFormat, add_lora
from training.memory.offload import place_denoiser
from training.memory.plan import FamilyPlan, log_memory_plan, meta_tensor, pipeline_holding
from training.model_card import (
    ModelCardInfo,
    grpo_terms,
    inpainting_call,
    lora_usage,
    region_weighted,
)
from training.runtime import build_accelerator, load_pipeline, run_main, weight_dtype
from training.validation import InpaintingValidation

logger = logging.getLogger(__name__)

FILL_LORA = LoraFormat(FluxFillPipeline, "transformer")


def fill_conditioning(
    pipe: FluxFillPipeline, masked_latents: torch.Tensor, mask_latents: torch.Tensor
) -> torch.Tensor:
    """``[B, L, 320]``: the packed masked-image latents (``[B, 16, h, w]``, scaled) followed by
    the packed pixel mask (``[B, 64, h, w]``), as ``FluxFillPipeline`` concatenates them."""
    return torch.cat([pack(pipe, masked_latents), pack(pipe, mask_latents)], dim=-1)


def fill_transformer_inputs(
    pipe: FluxFillPipeline,
    noisy: torch.Tensor,
    conditioning: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float,
) -> dict:
    """Transformer kwargs of one ``FluxFillPipeline`` step: ``noisy: [B, 16, h, w]`` packed to
    64 channels and followed by ``conditioning: [B, L, 320]`` along the features."""
    return flux_transformer_inputs(
        pipe,
        torch.cat([pack(pipe, noisy), conditioning.to(noisy)], dim=-1),
        flux_image_ids(pipe, *noisy.shape[-2:], noisy),
        prompt_embeds,
        pooled_prompt_embeds,
        sigmas,
        guidance_scale,
    )


def sample_fill_conditioning(
    pipe: FluxFillPipeline, encoded: dict, generator: torch.Generator
) -> torch.Tensor:
    """``[B, L, 320]``: the masked image's latents drawn from their VAE distribution (shifted and
    scaled, as the pipeline draws them) with the pixel mask of ``encoded``."""
    vae = pipe.vae.config
    masked = sample_scaled_latents(
        encoded["masked_latents_mean"],
        encoded["masked_latents_std"],
        generator,
        vae.scaling_factor,
        vae.shift_factor,
    )
    return fill_conditioning(pipe, masked, encoded["mask_latents"])


class FillEncoder:
    """A batch of pixels and prompts -> what the loss needs, with the pipeline's own encoders:
    T5 and pooled CLIP embeddings, the VAE distributions of the image and of the masked image,
    and the 64-channel pixel mask (``[B, 64, h, w]``)."""

    def __init__(self, pipe: FluxFillPipeline, config: FillConfig) -> None:
        self.pipe = pipe
        self.config = config

    def fingerprint(self) -> str:
        return flux_encoder_fingerprint(self.pipe, self.config, form="fill/distribution/v1")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return flux_prompt_encoding(self.pipe, prompts, self.config.max_sequence_length)

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
            "mask_latents": mask_latents_from_pixels(batch["mask"]).to(pipe.vae.dtype),
        }


class FillLoss:
    """Flow matching on the target tokens (+ region weighting, + background preservation) for
    one batch: the loop's ``compute_loss``."""

    def __init__(
        self, pipe: FluxFillPipeline, config: FillConfig, encoder: FillEncoder, encoded: bool
    ):
        self.pipe = pipe
        self.config = config
        self.encoder = encoder
        self.batches_are_encoded = encoded

    def sample_conditioning(self, encoded: dict, generator: torch.Generator) -> torch.Tensor:
        """``[B, L, 320]``; draws the masked image's latents first, as the pipeline does."""
        return sample_fill_conditioning(self.pipe, encoded, generator)

    def __call__(
        self, model: torch.nn.Module, batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        encoded = batch if self.batches_are_encoded else self.encoder(batch)
        pipe, config = self.pipe, self.config
        vae = pipe.vae.config
        conditioning = self.sample_conditioning(encoded, generator)
        x0 = sample_scaled_latents(
            encoded["latents_mean"],
            encoded["latents_std"],
            generator,
            vae.scaling_factor,
            vae.shift_factor,
        )
        batch_size, _, height, width = x0.shape
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sigmas = sample_sigmas(
            config, batch_size, (height // 2) * (width // 2), pipe.scheduler.config, generator
        )
        x_t = noisy_latents(x0, noise, sigmas)
        inputs = fill_transformer_inputs(
            pipe,
            x_t,
            conditioning,
            encoded["prompt_embeds"],
            encoded["pooled_prompt_embeds"],
            sigmas,
            config.guidance_scale,
        )
        velocity = model(**inputs)[0].float()
        target = pack(pipe, noise - x0).float()
        pixel_mask = pixels_from_mask_latents(encoded["mask_latents"].float())
        region = map_mask_to_latent(pixel_mask[:, 0]) if config.mask_loss.enabled else None
        flow_matching = masked_flow_matching_loss(
            velocity,
            target,
            region,
            weighting=loss_weighting(config, sigmas),
            **config.region_loss_weights(),
        )
        components = {"fm": flow_matching.detach()}
        total = flow_matching
        if config.background_preservation_weight:
            scale = pipe.vae_scale_factor
            x0_hat = pipe._unpack_latents(
                predicted_x0(inputs["hidden_states"][..., :64].float(), velocity, sigmas),
                height * scale,
                width * scale,
                scale,
            )
            background = background_preservation_mse_latent(
                x0_hat,
                x0.float(),
                encoded["mask_latents"].float().mean(dim=1, keepdim=True),
                band_r=config.band_r,
            )
            components["bg"] = background.detach()
            total = total + config.background_preservation_weight * background
        return total, components


class FillPolicy:
    """FLUX.1 Fill as a GRPO policy (``training.grpo.policy.GRPOPolicy``): ``FluxFillPipeline``'s
    sigma schedule (``linspace(1, 1/n, n)`` shifted for the image size), its 384-channel input and
    the guidance embedding at --guidance_scale, with Flow-GRPO's SDE step at --noise_level. The
    state is the packed latents ``[N, L, 64]`` in fp32."""

    def __init__(
        self, pipe: FluxFillPipeline, config: FillConfig, encoder: FillEncoder, encoded: bool
    ) -> None:
        self.pipe = pipe
        self.config = config
        self.encoder = encoder
        self.batches_are_encoded = encoded
        self.dtype = weight_dtype(config)

    def schedule(
        self, steps: int, height: int, width: int, device
    ) -> FlowMatchEulerDiscreteScheduler:
        """The pipeline's scheduler set for ``steps`` steps at ``height x width`` latents."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        mu = math.log(resolution_shift((height // 2) * (width // 2), scheduler.config))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
        return scheduler

    def start(self, batch: dict, generations: int, steps: int, generator: torch.Generator):
        encoded = batch if self.batches_are_encoded else self.encoder(batch)
        pipe, device = self.pipe, generator.device
        conditioning = sample_fill_conditioning(pipe, encoded, generator).to(self.dtype)
        height, width = encoded["mask_latents"].shape[-2:]
        count = conditioning.shape[0] * generations
        shape = (count, pipe.vae.config.latent_channels, height, width)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        scheduler = self.schedule(steps, height, width, device)
        return {
            "conditioning": conditioning.repeat_interleave(generations, dim=0),
            "prompt_embeds": encoded["prompt_embeds"].repeat_interleave(generations, dim=0),
            "pooled": encoded["pooled_prompt_embeds"].repeat_interleave(generations, dim=0),
            "img_ids": flux_image_ids(pipe, height, width, noise.to(self.dtype)),
            "sigmas": scheduler.sigmas.tolist(),
            "timesteps": scheduler.timesteps.to(device),
            "latent_size": (height, width),
        }, pack(pipe, noise)

    def step_distribution(self, model, latents, step, conditioning, stochastic):
        sigmas = conditioning["sigmas"]
        timestep = conditioning["timesteps"][step].expand(latents.shape[0]).float() / 1000
        inputs = flux_transformer_inputs(
            self.pipe,
            torch.cat([latents.to(self.dtype), conditioning["conditioning"]], dim=-1),
            conditioning["img_ids"],
            conditioning["prompt_embeds"],
            conditioning["pooled"],
            timestep,
            self.config.guidance_scale,
        )
        velocity = model(**inputs)[0].float()
        noise_level = self.config.noise_level if stochastic else 0.0
        return flow_sde_step(
            latents, velocity, sigmas[step], sigmas[step + 1], sigmas[1], noise_level
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, conditioning: dict) -> torch.Tensor:
        pipe, vae = self.pipe, self.pipe.vae
        height, width = (side * pipe.vae_scale_factor for side in conditioning["latent_size"])
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)


def planned_step_inputs(transformer, config: FillConfig, batch_size: int) -> dict:
    """The transformer's inputs in one step at the largest --resolution, on the meta device:
    noisy tokens with the masked image's and the mask's channels, T5 at --max_sequence_length."""
    latent = config.largest_resolution // 8
    channels = transformer.config.in_channels - 64
    return fill_transformer_inputs(
        pipeline_holding(FluxFillPipeline, transformer),
        meta_tensor(transformer, batch_size, 16, latent, latent),
        meta_tensor(transformer, batch_size, (latent // 2) ** 2, channels),
        *planned_flux_conditioning(transformer, config, batch_size),
    )


MEMORY_PLAN = FamilyPlan(
    "flux-fill",
    "transformer",
    FLUX_LORA_LAYERS,
    FILL_LORA,
    ("text_encoder", "text_encoder_2"),
    planned_step_inputs,
)


def card_info(config: FillConfig) -> ModelCardInfo:
    """The model card's family part; the loss terms by their metrics.jsonl names."""
    losses = grpo_terms(config)
    if config.objective == "sft":
        losses = {**region_weighted(config, "fm"), "bg": config.background_preservation_weight}
    return ModelCardInfo(
        title="FLUX.1 Fill LoRA",
        tags=("flux", "flux-fill", "inpainting"),
        losses=losses,
        usage=lora_usage("FluxFillPipeline", inpainting_call(config.validation_prompt)),
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_config(FillConfig, argv, description=__doc__)
    accelerator = build_accelerator(config)
    log_memory_plan(config, MEMORY_PLAN, accelerator)
    pipe = load_pipeline(FluxFillPipeline, config, accelerator, FLUX_ENCODERS)
    transformer = pipe.transformer
    add_lora(transformer, config, FLUX_LORA_LAYERS, FILL_LORA)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    dataset = fill_dataset(config, pipe.vae.config)
    encoder = FillEncoder(pipe, config)
    dropout = caption_dropout(config, encoder.encode_prompts)
    precomputed = isinstance(dataset, FillLatentDataset)
    items = (
        dataset
        if precomputed
        else encoded_items(accelerator, config, dataset, encoder, collate_items)
    )
    place_denoiser(transformer, config, accelerator.device)
    validate = None
    examples = inpainting_validation_examples(config, dataset)
    if examples is None:
        logger.warning(
            "validation images need raw images, which the precomputed folder %s lacks: give "
            "--validation_data_dir",
            config.train_data_dir,
        )
    else:
        validate = InpaintingValidation(
            pipe,
            examples,
            config,
            accelerator,
            {
                "guidance_scale": config.guidance_scale,
                "max_sequence_length": config.max_sequence_length,
            },
        )
    # GRPO decodes its samples for the rewards: the VAE stays.
    offloaded = ("text_encoder", "text_encoder_2") + (("vae",) if config.objective == "sft" else ())
    validate = offload_after_caching(
        config, [getattr(pipe, name) for name in offloaded], accelerator.device, validate
    )
    encoded = precomputed or config.cache_latents
    parts = TrainingParts(
        model=transformer,
        dataset=items,
        sampler=bucket_sampler(
            config, accelerator, dataset.bucket_of_items, dataset.repeats_of_items
        ),
        caption_dropout=dropout,
        collate_fn=collate_items,
        compute_loss=FillLoss(pipe, config, encoder, encoded),
        save_lora=FILL_LORA.save,
        load_lora=FILL_LORA.load,
        card=card_info(config),
        validate=validate,
    )
    train_objective(accelerator, config, parts, dataset, FillPolicy(pipe, config, encoder, encoded))


if __name__ == "__main__":
    run_main(main)
