"""Model code the suite adds to diffusers and transformers.

``models.tiny`` builds, from configs, complete tiny pipelines for every family the train scripts
cover (FLUX Kontext, FLUX Fill, Qwen-Image-Edit, SD1.5 inpainting) and the SD3 VAE, together with
their parts (tokenizers, text encoders, VAEs, transformers), for offline CPU tests;
``write_tiny_models`` saves them where ``from_pretrained`` loads them, and ``write_tiny_dinov2``
saves an image encoder for the embedding losses. ``models.multispectral`` holds
``AutoencoderKLMultispectralAdapter``, the SD3 VAE adapted to N-band images.
"""

from models.multispectral import AutoencoderKLMultispectralAdapter
from models.tiny import (
    TINY_MODEL_FACTORIES,
    tiny_autoencoder_kl,
    tiny_clip_text_model,
    tiny_clip_tokenizer,
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_flux_vae,
    tiny_qwen2_5_vl_text_encoder,
    tiny_qwen2_tokenizer,
    tiny_qwen2_vl_image_processor,
    tiny_qwen2_vl_processor,
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_edit_plus_pipeline,
    tiny_qwen_image_transformer,
    tiny_qwen_image_vae,
    tiny_sd3_vae,
    tiny_sd15_inpaint_pipeline,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    write_tiny_dinov2,
    write_tiny_models,
)

__all__ = [
    "TINY_MODEL_FACTORIES",
    "AutoencoderKLMultispectralAdapter",
    "tiny_autoencoder_kl",
    "tiny_clip_text_model",
    "tiny_clip_tokenizer",
    "tiny_flux_fill_pipeline",
    "tiny_flux_kontext_pipeline",
    "tiny_flux_vae",
    "tiny_qwen2_5_vl_text_encoder",
    "tiny_qwen2_tokenizer",
    "tiny_qwen2_vl_image_processor",
    "tiny_qwen2_vl_processor",
    "tiny_qwen_image_edit_pipeline",
    "tiny_qwen_image_edit_plus_pipeline",
    "tiny_qwen_image_transformer",
    "tiny_qwen_image_vae",
    "tiny_sd3_vae",
    "tiny_sd15_inpaint_pipeline",
    "tiny_t5_encoder",
    "tiny_t5_tokenizer",
    "write_tiny_dinov2",
    "write_tiny_models",
]
