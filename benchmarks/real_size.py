"""Real-size denoisers from their published configurations, random weights, and what a training
step of each feeds them.

Speed and memory do not depend on the weights, so ``benchmarks/gpu.py`` times these instead of
downloading checkpoints. Every builder also takes ``tiny=True`` (the suite's tiny models), so the
same code runs on a CPU in the tests; ``torch.device("meta")`` builds the real sizes without
memory, which is how their parameter counts and FLOPs are checked on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from torch.utils.flop_counter import FlopCounterMode

import train_flux2_edit_lora as flux2
import train_flux_fill as fill
import train_kontext_lora as kontext
import train_qwen_edit_mask as qwen
import train_sd15_inpaint as sd15
from benchmarks.inpaint_step import random_encoding
from data.fill_latents import mask_latents_from_pixels
from losses import downsample_mask_area, map_mask_to_latent, signed_distance_map_from_mask
from models.published import (
    FLUX2_KLEIN_4B_TRANSFORMER,
    FLUX_FILL_TRANSFORMER,
    FLUX_TRANSFORMER,
    QWEN_IMAGE_TRANSFORMER,
    SD15_INPAINT_UNET,
    SD15_SCHEDULER,
)
from training.config import MaskLossSettings
from training.inputs.flux import FLUX_LORA_LAYERS
from training.inputs.flux2 import FLUX2_LORA_LAYERS, reference_tokens
from training.lora.adapters import LoraFormat, add_lora
from training.memory.plan import built_on, pipeline_holding
from worlds.tiny_flux2 import FLUX2_SCHEDULER, tiny_flux2_klein_pipeline
from worlds.tiny_models import (
    FLUX_DEV_SCHEDULER,
    QWEN_IMAGE_SCHEDULER,
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_qwen_image_edit_pipeline,
    tiny_sd15_inpaint_pipeline,
)

T5_TOKENS = 512  # the FLUX pipelines' max_sequence_length
# The instruction and the condition image as the vision-language model reads them.
QWEN_PROMPT_TOKENS = qwen.PLANNED_PROMPT_TOKENS
CLIP_TOKENS = 77


def denoiser_only(pipeline_cls, transformer: torch.nn.Module, scheduler: dict):
    """A ``pipeline_cls`` holding ``transformer`` and a flow-matching scheduler built from
    ``scheduler`` (its config), every other component None: what a loss needs of it."""
    return pipeline_holding(pipeline_cls, transformer, FlowMatchEulerDiscreteScheduler(**scheduler))


def flow_case_pipeline(family: str, tiny: bool, device, dtype, prepare=None):
    """``family``'s tiny pipeline, or its pipeline class holding only a real-size denoiser
    (built on ``device`` in ``dtype``) and its scheduler (``FLOW_FAMILIES``); the transformer
    moved to ``device`` and ``dtype`` either way, then handed to ``prepare`` (quantization, say)
    before any LoRA is added."""
    tiny_pipeline, pipeline_cls, build_denoiser, scheduler = FLOW_FAMILIES[family]
    if tiny:
        pipe = tiny_pipeline(seed=0)
    else:
        with built_on(device, dtype):
            denoiser = build_denoiser()
        pipe = denoiser_only(pipeline_cls, denoiser, scheduler)
    pipe.transformer.to(device, dtype)
    if prepare is not None:
        prepare(pipe.transformer)
    return pipe


def flux_transformer(fill_model: bool = False) -> FluxTransformer2DModel:
    """FLUX.1 [dev]/Kontext's transformer (Fill's with ``fill_model``), on the default device."""
    return FluxTransformer2DModel(**(FLUX_FILL_TRANSFORMER if fill_model else FLUX_TRANSFORMER))


def flux2_klein_transformer() -> Flux2Transformer2DModel:
    """FLUX.2 [klein] 4B's transformer, on the default device."""
    return Flux2Transformer2DModel(**FLUX2_KLEIN_4B_TRANSFORMER)


def qwen_image_transformer() -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER)


def sd15_inpaint_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**SD15_INPAINT_UNET)


@dataclass
class Case:
    """One family's training step: ``model`` (LoRA-adapted; what the loop trains and the bare
    forward/backward calls), ``loss`` (the script's ``compute_loss``, every mask term on) and
    ``batch``, encoded as ``--cache_latents`` feeds the loop."""

    name: str
    resolution: int
    model: torch.nn.Module
    loss: Callable
    batch: dict
    denoiser: torch.nn.Module  # the transformer or UNet inside ``model``


def _flags(resolution: int) -> dict:
    return {
        "pretrained_model_name_or_path": "-",
        "train_data_dir": "-",
        "resolution": resolution,
        "rank": 16,
    }


def _to(batch: dict, device, dtype) -> dict:
    """Floating tensors of ``batch`` to ``dtype``, every tensor (and list of them) to ``device``."""

    def move(value):
        if isinstance(value, list):
            return [move(item) for item in value]
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(device, dtype if value.is_floating_point() else None)

    return {name: move(value) for name, value in batch.items()}


def kontext_encoded_batch(
    pipe, batch: int, resolution: int, device, dtype
) -> dict[str, torch.Tensor]:
    """Random latents and prompt embeddings shaped as the encoder produces them, and a square
    insertion mask with its signed distance map."""
    latent = resolution // 8
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator).to(device, dtype)

    mask = torch.zeros(batch, resolution, resolution)
    mask[:, resolution // 4 : resolution * 3 // 4, resolution // 3 : resolution * 2 // 3] = 1
    mask_latent = downsample_mask_area(mask, (latent, latent))
    return {
        "target_latents": randn(batch, 16, latent, latent),
        "context_latents": randn(batch, 16, latent, latent),
        "overlay_tokens": randn(batch, (latent // 2) ** 2, 64),
        "prompt_embeds": randn(batch, 512, config.joint_attention_dim),
        "pooled_prompt_embeds": randn(batch, config.pooled_projection_dim),
        "mask_latent": mask_latent.to(device),
        "signed_distance_map": signed_distance_map_from_mask(mask_latent > 0.5, normalize=True).to(
            device
        ),
        "has_mask": torch.ones(batch, dtype=torch.bool, device=device),
    }


# Per flow-matching family: tiny pipeline factory, pipeline class, real-size denoiser builder,
# scheduler config.
FLOW_FAMILIES = {
    "kontext": (
        tiny_flux_kontext_pipeline,
        FluxKontextPipeline,
        flux_transformer,
        FLUX_DEV_SCHEDULER,
    ),
    "fill": (
        tiny_flux_fill_pipeline,
        FluxFillPipeline,
        lambda: flux_transformer(fill_model=True),
        FLUX_DEV_SCHEDULER,
    ),
    "flux2": (
        tiny_flux2_klein_pipeline,
        Flux2KleinPipeline,
        flux2_klein_transformer,
        FLUX2_SCHEDULER,
    ),
    "qwen": (
        tiny_qwen_image_edit_pipeline,
        QwenImageEditPipeline,
        qwen_image_transformer,
        QWEN_IMAGE_SCHEDULER,
    ),
}


def kontext_case(tiny: bool, batch: int, resolution: int, device, dtype, prepare=None) -> Case:
    pipe = flow_case_pipeline("kontext", tiny, device, dtype, prepare)
    config = kontext.KontextConfig(**_flags(resolution), geometry_match_weight=0.5)
    add_lora(pipe.transformer, config, FLUX_LORA_LAYERS, kontext.KONTEXT_LORA)
    encoded = kontext_encoded_batch(pipe, batch, resolution, device, dtype)
    loss = kontext.KontextLoss(pipe, config, None, None, batches_are_encoded=True)
    return Case("FLUX.1 Kontext", resolution, pipe.transformer, loss, encoded, pipe.transformer)


def fill_case(tiny: bool, batch: int, resolution: int, device, dtype, prepare=None) -> Case:
    pipe = flow_case_pipeline("fill", tiny, device, dtype, prepare)
    config = fill.FillConfig(**_flags(resolution))
    config = dataclasses.replace(
        config, mask_loss=MaskLossSettings(enabled=True), background_preservation_weight=0.5
    )
    add_lora(pipe.transformer, config, FLUX_LORA_LAYERS, fill.FILL_LORA)
    encoded = random_encoding(batch, resolution, 16)
    encoded["mask_latents"] = mask_latents_from_pixels(encoded.pop("mask"))
    width = pipe.transformer.config
    encoded["prompt_embeds"] = torch.randn(batch, T5_TOKENS, width.joint_attention_dim)
    encoded["pooled_prompt_embeds"] = torch.randn(batch, width.pooled_projection_dim)
    loss = fill.FillLoss(pipe, config, None, True)
    encoded = _to(encoded, device, dtype)
    return Case("FLUX.1 Fill", resolution, pipe.transformer, loss, encoded, pipe.transformer)


def flux2_case(tiny: bool, batch: int, resolution: int, device, dtype, prepare=None) -> Case:
    """A FLUX.2 [klein] step: the target and one reference of its size, a square mask."""
    pipe = flow_case_pipeline("flux2", tiny, device, dtype, prepare)
    config = flux2.Flux2EditConfig(**_flags(resolution))
    add_lora(pipe.transformer, config, FLUX2_LORA_LAYERS, LoraFormat(type(pipe)))
    grid = resolution // 16
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 1, resolution, resolution)
    mask[..., resolution // 4 : resolution * 3 // 4, resolution // 3 : resolution * 2 // 3] = 1
    mask_latent = downsample_mask_area(mask, (grid, grid))
    context = torch.randn(batch, 128, grid, grid, generator=generator)
    tokens, ids = reference_tokens(pipe, [context])
    width = pipe.transformer.config.joint_attention_dim
    encoded = {
        "target_latents": torch.randn(batch, 128, grid, grid, generator=generator),
        "context_latents": context,
        "reference_tokens": tokens,
        "reference_ids": ids,
        "prompt_embeds": torch.randn(batch, T5_TOKENS, width, generator=generator),
        "mask_latent": mask_latent,
        "signed_distance_map": signed_distance_map_from_mask(mask_latent > 0.5, normalize=True),
        "has_mask": torch.ones(batch, dtype=torch.bool),
    }
    loss = flux2.Flux2Loss(pipe, config, None, True)
    encoded = _to(encoded, device, dtype)
    return Case("FLUX.2 [klein] 4B", resolution, pipe.transformer, loss, encoded, pipe.transformer)


def qwen_case(tiny: bool, batch: int, resolution: int, device, dtype, prepare=None) -> Case:
    pipe = flow_case_pipeline("qwen", tiny, device, dtype, prepare)
    config = qwen.QwenEditConfig(**_flags(resolution), mask_loss=MaskLossSettings(enabled=True))
    add_lora(pipe.transformer, config, qwen.LORA_LAYERS, LoraFormat(type(pipe)))
    latent = resolution // 8
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, resolution, resolution)
    mask[:, resolution // 3 : resolution // 2, resolution // 4 : resolution * 3 // 4] = 1
    tokens = CLIP_TOKENS if tiny else QWEN_PROMPT_TOKENS
    width = pipe.transformer.config.joint_attention_dim
    encoded = {
        "prompt_embeds": [torch.randn(tokens, width, generator=generator) for _ in range(batch)],
        "target_latents": torch.randn(batch, 16, latent, latent, generator=generator),
        "mask_tokens": map_mask_to_latent(mask),
        "has_mask": torch.ones(batch, dtype=torch.bool),
    }
    condition = torch.randn(batch, 16, latent, latent, generator=generator)
    encoded["condition_tokens"], encoded["condition_shapes"] = qwen.reference_tokens(
        pipe, [condition]
    )
    loss = qwen.QwenEditLoss(pipe, config, None, True)
    encoded = _to(encoded, device, dtype)
    return Case("Qwen-Image-Edit", resolution, pipe.transformer, loss, encoded, pipe.transformer)


def sd15_case(tiny: bool, batch: int, resolution: int, device, dtype) -> Case:
    if tiny:
        pipe = tiny_sd15_inpaint_pipeline(seed=0)
        width = pipe.text_encoder.config.hidden_size
    else:
        with built_on(device, dtype):
            denoiser = sd15_inpaint_unet()
        pipe = StableDiffusionInpaintPipeline(
            vae=None,
            text_encoder=None,
            tokenizer=None,
            unet=denoiser,
            scheduler=PNDMScheduler(**SD15_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        width = SD15_INPAINT_UNET["cross_attention_dim"]
    pipe.unet.to(device, dtype)
    config = sd15.SD15InpaintConfig(**_flags(resolution), mask_loss=MaskLossSettings(enabled=True))
    add_lora(pipe.unet, config, sd15.UNET_LORA_LAYERS, sd15.UNET_LORA)
    encoded = random_encoding(batch, resolution, 4)
    encoded["prompt_embeds"] = torch.randn(batch, CLIP_TOKENS, width)
    model = sd15.InpaintDenoiser(pipe.unet, None)
    loss = sd15.SD15Loss(pipe, config, None, True)
    encoded = _to(encoded, device, dtype)
    return Case("SD1.5 inpainting", resolution, model, loss, encoded, pipe.unet)


# Family -> (builder, resolution the issue asks for, published parameter count).
CASES = {
    "kontext": (kontext_case, 1024, 11.9e9),
    "flux-fill": (fill_case, 1024, 11.9e9),
    "qwen-edit": (qwen_case, 1024, 20.4e9),
    "flux2-klein": (flux2_case, 1024, 3.88e9),
    "sd15-inpaint": (sd15_case, 512, 0.86e9),
}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


def mmdit_forward_flops(
    width: int, stream_blocks: int, single_blocks: int, image_tokens: int, text_tokens: int
) -> float:
    """Matmul FLOPs of one forward pass of a FLUX-style transformer (batch 1), per block:

    - a two-stream block applies 12·d² of weights per token of its stream (q, k, v and output
      projections 4·d², a 4x MLP 8·d²) and attends over the joint sequence;
    - a single-stream block applies 12·d² per token (q, k, v 3·d², MLP in 4·d², output 5·d²);
    - attention costs 4·L²·d (scores and weighted sum, 2 FLOPs per multiply-add).

    The modulation layers see one token (the timestep embedding) and the patch/prompt embedders
    and the output projection are a few per mille: left out, so the figure is a slight
    undercount, as model FLOPs should be. ``L = image_tokens + text_tokens``.
    """
    tokens = image_tokens + text_tokens
    linear = 2 * 12 * width**2 * tokens * (stream_blocks + single_blocks)
    attention = 4 * tokens**2 * width * (stream_blocks + single_blocks)
    return float(linear + attention)


def counted_flops(step: Callable[[], None]) -> int:
    """FLOPs of the matmuls and attention ``step`` runs, counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()
