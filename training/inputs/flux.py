"""What the FLUX.1 pipelines (Kontext, Fill) feed their transformer, built the same way here.

Prompt embeddings (T5 at ``max_sequence_length`` and pooled CLIP), text ids, image ids, the
guidance embedding and sigma as the timestep are common to every FLUX pipeline; a script adds
what its family concatenates (Kontext: context tokens along the sequence; Fill: masked-image and
mask channels along the features).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from data.cache import fingerprint
from training.config import FluxConfig, TrainConfig
from training.inputs.caching import encoder_weights
from training.memory.plan import meta_tensor

FLUX_ENCODERS = ("vae", "text_encoder", "text_encoder_2")
# The attention projections of both stream types, as diffusers' FLUX LoRA examples adapt them.
FLUX_LORA_LAYERS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


def encode_flux_prompt(
    pipe, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [B, max_sequence_length, 4096], pooled [B, 768])`` (real FLUX sizes)
    from the pipeline's own ``encode_prompt``."""
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        device=pipe.vae.device,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled


def flux_prompt_encoding(pipe, prompts: list[str], max_sequence_length: int) -> dict:
    """:func:`encode_flux_prompt` by name: ``prompt_embeds`` and ``pooled_prompt_embeds``."""
    prompt_embeds, pooled = encode_flux_prompt(pipe, prompts, max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def flux_encoder_fingerprint(pipe, config: TrainConfig | FluxConfig, **settings) -> str:
    """A cache fingerprint of what a FLUX pipeline's VAE and text encoders produce: model path,
    their configs and weight files, prompt length, dtype, and the script's ``settings``."""
    return fingerprint(
        model=config.pipeline_source,
        weights=encoder_weights(config.pipeline_source, FLUX_ENCODERS),
        vae=dict(pipe.vae.config),
        text_encoders=[pipe.text_encoder.config.to_dict(), pipe.text_encoder_2.config.to_dict()],
        max_sequence_length=config.max_sequence_length,
        dtype=str(pipe.vae.dtype),
        **settings,
    )


def flux_transformer_inputs(
    pipe,
    hidden_states: torch.Tensor,
    img_ids: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float,
) -> dict:
    """Transformer kwargs as the FLUX pipelines build them for one denoising step.

    ``hidden_states: [B, L, D]`` packed tokens (whatever the family concatenates),
    ``img_ids: [L, 3]``, ``prompt_embeds: [B, T, 4096]``, ``pooled_prompt_embeds: [B, 768]``,
    ``sigmas: [B]`` in [0, 1] (the timestep the pipeline passes, ``t / 1000``). Text ids are
    zeros; the guidance embedding is ``guidance_scale`` when the model has one.
    """
    batch = hidden_states.shape[0]
    device, dtype = hidden_states.device, hidden_states.dtype
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([batch], guidance_scale, device=device, dtype=torch.float32)
    return {
        "hidden_states": hidden_states,
        "timestep": sigmas.to(dtype),
        "guidance": guidance,
        "pooled_projections": pooled_prompt_embeds,
        "encoder_hidden_states": prompt_embeds,
        "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        "img_ids": img_ids,
        "return_dict": False,
    }


def planned_flux_conditioning(
    transformer, config: TrainConfig | FluxConfig, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """A FLUX step's prompt embeddings ``[B, max_sequence_length, joint width]``, pooled
    ``[B, pooled width]``, sigmas ``[B]`` (meta tensors) and guidance, for a memory plan."""
    width = transformer.config
    return (
        meta_tensor(transformer, batch_size, config.max_sequence_length, width.joint_attention_dim),
        meta_tensor(transformer, batch_size, width.pooled_projection_dim),
        meta_tensor(transformer, batch_size),
        config.guidance_scale,
    )


def flux_image_ids(pipe, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Image ids ``[(height/2) * (width/2), 3]`` of a ``[B, 16, height, width]`` latent grid."""
    return pipe._prepare_latent_image_ids(
        like.shape[0], height // 2, width // 2, like.device, like.dtype
    )


def vae_scale_factor(name_or_path: str) -> int:
    """Pixels per latent cell of the pipeline's VAE, from its config alone (no weights load):
    ``2 ** (len(block_out_channels) - 1)``, as the FLUX pipelines compute it."""
    config = AutoencoderKL.load_config(name_or_path, subfolder="vae")
    return 2 ** (len(config["block_out_channels"]) - 1)


def pack(pipe, latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2) * (w/2), 4C]``, diffusers' own 2x2 packing."""
    return pipe._pack_latents(latents, *latents.shape)
