"""LoRAs with random weights on tiny models, saved as the train scripts save theirs, and the
pipeline calls the export, merge and inference tests compare."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from diffusers import ModelMixin
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image

from training.inputs.flux import FLUX_LORA_LAYERS
from training.lora.adapters import save_lora_components

# Scale alpha / r = 1.5: an exported file that lost its alphas would load at 2/3 strength.
RANK, ALPHA = 4, 6.0
SIZE = 32  # pixels: a 2x2 token grid for FLUX, a 4x4 latent for SD1.5
PROMPT = "insert a red cat"
# FLUX's default LoRA layers in the double blocks only (a peft target regex).
DOUBLE_BLOCK_LAYERS = rf"transformer_blocks\.\d+\.({'|'.join(map(re.escape, FLUX_LORA_LAYERS))})"


def add_random_lora(model: torch.nn.Module, targets, seed: int, **config) -> None:
    """A LoRA named "default" on ``targets`` of ``model`` with random non-zero weights (peft
    starts ``lora_B`` at zero, which would make every export trivially right)."""
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian", **config
    )
    if isinstance(model, ModelMixin):
        model.add_adapter(config)
    else:  # a transformers text encoder, as training.lora.adapters.add_lora adapts it
        inject_adapter_in_model(config, model, adapter_name="default")
        model.peft_config = {"default": config}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def save_random_lora(pipeline_cls, models: dict, folder: Path) -> Path:
    """``models`` ({component: model with a LoRA}) saved with the train scripts' writer."""
    return save_lora_components(pipeline_cls, models, folder)


def sample_image(seed: int = 0, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def sample_mask(size: int = SIZE) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 8 : size // 2] = 255
    return Image.fromarray(mask).convert("RGB")


def pipeline_outputs(pipe, files: dict[str, Path], call) -> dict[str, np.ndarray]:
    """``call(pipe)`` with each LoRA file loaded by ``pipe.load_lora_weights`` (by name), and
    with none of them (``"base"``)."""
    for name, file in files.items():
        pipe.load_lora_weights(file, adapter_name=name)
    outputs = {}
    for name in files:
        pipe.set_adapters(name)
        outputs[name] = call(pipe)
    pipe.disable_lora()
    outputs["base"] = call(pipe)
    pipe.enable_lora()
    return outputs


def max_difference(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
