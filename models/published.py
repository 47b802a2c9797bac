"""The published configurations of the models each family trains on, to build them at real size
without their weights: on the meta device for a memory plan (``training.memory.plan``), with
random weights for the GPU benchmarks (``benchmarks/real_size.py``).

Values are those of each checkpoint's ``config.json``; arguments a class's defaults already hold
are left out.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

# black-forest-labs/FLUX.1-dev (and -Kontext-dev) transformer/config.json.
FLUX_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# black-forest-labs/FLUX.1-Fill-dev: 384 input channels (noisy 64 + masked image 64 + mask 256).
FLUX_FILL_TRANSFORMER = {**FLUX_TRANSFORMER, "in_channels": 384, "out_channels": 64}
# Qwen/Qwen-Image (and -Edit) transformer/config.json.
QWEN_IMAGE_TRANSFORMER = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# stable-diffusion-v1-5/stable-diffusion-inpainting unet/config.json (diffusers' defaults fill
# in the rest: 2 layers per block, the standard down and up block types).
SD15_INPAINT_UNET = {
    "sample_size": 64,
    "in_channels": 9,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# stable-diffusion-v1-5 scheduler/scheduler_config.json.
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

_KL_BLOCKS = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
}
# FLUX.1's vae/config.json: 16 latent channels, no quant convolutions.
FLUX_VAE = {**_KL_BLOCKS, "latent_channels": 16, "use_quant_conv": False}
FLUX_VAE["use_post_quant_conv"] = False
# stable-diffusion-v1-5's vae/config.json.
SD15_VAE = {**_KL_BLOCKS, "latent_channels": 4}
# openai/clip-vit-large-patch14's text model (FLUX's text_encoder, SD1.5's).
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}
# google/t5-v1_1-xxl's encoder (FLUX's text_encoder_2).
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}
# Qwen/Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder).
QWEN25_VL_7B = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "tie_word_embeddings": False,
}

# black-forest-labs/FLUX.2-klein-4B (and -base-4B) transformer/config.json: 5 double-stream and
# 20 single-stream blocks of 24 heads of 128, the prompt as 3 layers of Qwen3-4B side by side.
FLUX2_KLEIN_4B_TRANSFORMER = {
    "num_layers": 5,
    "num_single_layers": 20,
    "num_attention_heads": 24,
    "joint_attention_dim": 3 * 2560,
    "guidance_embeds": False,
}
# Qwen/Qwen3-4B (FLUX.2 [klein] 4B's text_encoder).
QWEN3_4B = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}


def _t5(config: dict) -> T5EncoderModel:
    return T5EncoderModel(T5Config(**config))


def _clip(config: dict) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(**config))


def _qwen_vl(config: dict) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))


def _qwen3(config: dict) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(**config))


# Per family, each component's class (or builder) and published configuration.
PUBLISHED = {
    "kontext": {
        "transformer": (FluxTransformer2DModel, FLUX_TRANSFORMER),
        "vae": (AutoencoderKL, FLUX_VAE),
        "text_encoder": (_clip, CLIP_L_TEXT),
        "text_encoder_2": (_t5, T5_XXL),
    },
    "flux-fill": {
        "transformer": (FluxTransformer2DModel, FLUX_FILL_TRANSFORMER),
        "vae": (AutoencoderKL, FLUX_VAE),
        "text_encoder": (_clip, CLIP_L_TEXT),
        "text_encoder_2": (_t5, T5_XXL),
    },
    "qwen-edit": {
        "transformer": (QwenImageTransformer2DModel, QWEN_IMAGE_TRANSFORMER),
        # diffusers' defaults are Qwen-Image's VAE.
        "vae": (AutoencoderKLQwenImage, {}),
        "text_encoder": (_qwen_vl, QWEN25_VL_7B),
    },
    "flux2-klein": {
        "transformer": (Flux2Transformer2DModel, FLUX2_KLEIN_4B_TRANSFORMER),
        # diffusers' defaults are FLUX.2's VAE.
        "vae": (AutoencoderKLFlux2, {}),
        "text_encoder": (_qwen3, QWEN3_4B),
    },
    "sd15-inpaint": {
        "unet": (UNet2DConditionModel, SD15_INPAINT_UNET),
        "vae": (AutoencoderKL, SD15_VAE),
        "text_encoder": (_clip, CLIP_L_TEXT),
    },
}


def published_model(family: str, component: str):
    """``family``'s ``component`` at its published size, on the default device and dtype (build
    it under ``torch.device("meta")`` to allocate nothing)."""
    build, config = PUBLISHED[family][component]
    return build(**config) if isinstance(build, type) else build(config)
