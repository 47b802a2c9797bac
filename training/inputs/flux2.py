"""What the FLUX.2 pipelines ([klein] and [dev]) feed their transformer, built the same way here.

FLUX.2's VAE gives 32 latent channels; the pipelines patchify them 2x2 into 128 channels,
normalise each with the VAE's batch-norm statistics and pack the ``h/16 x w/16`` grid into
tokens. The noisy target's tokens come first, then the tokens of each reference in order, with
4-axis position ids ``(t, h, w, l)``: t = 0 for the target, 10, 20, ... for the references. The
prompt is the text encoder's hidden states of three layers side by side, with ids ``(0, 0, 0,
l)``; the timestep is sigma; [dev] adds the guidance embedding, [klein] passes none.
"""

from __future__ import annotations

import math

import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image

from data.cache import fingerprint
from training.inputs.caching import encoder_weights
from training.inputs.flux import FLUX_LORA_LAYERS

FLUX2_ENCODERS = ("vae", "text_encoder")
# The attention projections of the double-stream blocks (as for FLUX.1) and the fused input
# projection of the single-stream ones (their output projection shares its name, attn.to_out,
# with the double-stream blocks' list of output layers, which a LoRA cannot wrap).
FLUX2_LORA_LAYERS = (*FLUX_LORA_LAYERS, "attn.to_qkv_mlp_proj")
# The pipelines scale a larger reference down to this area before encoding it.
REFERENCE_AREA = 1024 * 1024
# Pixels per token side: the VAE's 8x and the 2x2 patch.
TOKEN_PIXELS = 16


def reference_size(size: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` at which the pipelines VAE-encode a reference of ``size``: scaled
    (truncating) to :data:`REFERENCE_AREA` when larger, then cropped to multiples of 16."""
    height, width = size
    if height * width > REFERENCE_AREA:
        scale = math.sqrt(REFERENCE_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return height // TOKEN_PIXELS * TOKEN_PIXELS, width // TOKEN_PIXELS * TOKEN_PIXELS


def reference_grid(size: tuple[int, int]) -> tuple[int, int]:
    """The token grid of a reference of ``size`` in the transformer's input."""
    height, width = reference_size(size)
    return height // TOKEN_PIXELS, width // TOKEN_PIXELS


def reference_pixels(pipe, image: Image.Image) -> torch.Tensor:
    """``image`` as the pipeline hands a reference to its VAE, by its own image processor:
    ``[1, 3, H, W]`` in [-1, 1] at :func:`reference_size`."""
    processor = pipe.image_processor
    if image.width * image.height > REFERENCE_AREA:
        image = processor._resize_to_target_area(image, REFERENCE_AREA)
    height, width = reference_size((image.height, image.width))
    return processor.preprocess(image, height=height, width=width, resize_mode="crop")


def normalised_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [-1, 1] -> ``[B, 128, H/16, W/16]``: the VAE's mode, patchified 2x2
    and batch-norm normalised, as the pipelines encode a reference."""
    return pipe._encode_vae_image(pixels.to(pipe.vae.device, pipe.vae.dtype), generator=None)


def reference_tokens(pipe, latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The references' normalised latents ``[B, 128, h_i, w_i]`` each -> their tokens
    ``[B, sum_i h_i * w_i, 128]`` one after another, and position ids ``[B, L, 4]`` (t = 10,
    20, ... by reference)."""
    batch = latents[0].shape[0]
    ids = pipe._prepare_image_ids([latent[:1] for latent in latents])
    tokens = torch.cat([pipe._pack_latents(latent) for latent in latents], dim=1)
    return tokens, ids.to(tokens.device).repeat(batch, 1, 1)


def latent_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed tokens ``[B, height * width, C]`` back to their grid ``[B, C, height, width]``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def flux2_prompt_encoding(pipe, prompts: list[str], max_sequence_length: int) -> dict:
    """``{"prompt_embeds": [B, max_sequence_length, 3 x text width]}`` from the pipeline's own
    ``encode_prompt`` (its chat template and hidden-state layers)."""
    prompt_embeds, _ = pipe.encode_prompt(
        prompt=prompts, device=pipe.vae.device, max_sequence_length=max_sequence_length
    )
    return {"prompt_embeds": prompt_embeds}


def flux2_encoder_fingerprint(pipe, config) -> str:
    """A cache fingerprint of what a FLUX.2 pipeline's VAE and text encoder produce."""
    return fingerprint(
        model=config.pipeline_source,
        pipeline=type(pipe).__name__,
        weights=encoder_weights(config.pipeline_source, FLUX2_ENCODERS),
        vae=dict(pipe.vae.config),
        text_encoder=pipe.text_encoder.config.to_dict(),
        max_sequence_length=config.max_sequence_length,
        dtype=str(pipe.vae.dtype),
    )


def flux2_transformer_inputs(
    pipe,
    noisy_target: torch.Tensor,
    references: torch.Tensor | None,
    reference_ids: torch.Tensor | None,
    prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float,
) -> dict:
    """Transformer kwargs as the FLUX.2 pipelines build them for one denoising step.

    ``noisy_target: [B, 128, h, w]`` is packed and followed along the sequence by the
    references' tokens ``[B, L, 128]`` (None: no reference) with their ids ``[B, L, 4]``;
    ``prompt_embeds: [B, T, D]``; ``sigmas: [B]`` is the timestep (the pipeline's ``t /
    1000``); the guidance embedding is ``guidance_scale`` where the model has one ([dev]).
    """
    hidden_states = pipe._pack_latents(noisy_target)
    img_ids = pipe._prepare_latent_ids(noisy_target).to(hidden_states.device)
    if references is not None:
        hidden_states = torch.cat([hidden_states, references.to(hidden_states.dtype)], dim=1)
        img_ids = torch.cat([img_ids, reference_ids], dim=1)
    batch, device = hidden_states.shape[0], hidden_states.device
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([batch], guidance_scale, device=device, dtype=torch.float32)
    return {
        "hidden_states": hidden_states,
        "timestep": sigmas.to(hidden_states.dtype),
        "guidance": guidance,
        "encoder_hidden_states": prompt_embeds,
        "txt_ids": pipe._prepare_text_ids(prompt_embeds).to(device),
        "img_ids": img_ids,
        "return_dict": False,
    }


def sampling_shift(image_seq_len: int, steps: int) -> float:
    """The shift ``exp(mu)`` the FLUX.2 pipelines sample ``image_seq_len`` target tokens with in
    ``steps`` steps (their empirical mu)."""
    return math.exp(compute_empirical_mu(image_seq_len, steps))


def sampling_guidance(pipe, guidance_scale: float | None) -> float | None:
    """The ``guidance_scale`` to call ``pipe`` with: 1.0 for a step-distilled FLUX.2 [klein],
    which ignores guidance (and warns on every call above 1), else ``guidance_scale`` (None:
    the pipeline's own default)."""
    return 1.0 if getattr(pipe.config, "is_distilled", False) else guidance_scale
