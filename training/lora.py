"""LoRA adapters with peft, saved and loaded in diffusers' LoRA format.

The saved file is what the family's pipeline loads with ``pipe.load_lora_weights(dir)``:
safetensors, diffusers key names, and the adapter's LoRA config as metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from training.config import TrainConfig

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def target_modules(config: TrainConfig, default: Sequence[str]) -> list[str]:
    """``--lora_layers`` as a list, or the family's ``default``."""
    if config.lora_layers:
        return [name.strip() for name in config.lora_layers.split(",") if name.strip()]
    return list(default)


def add_lora(model: torch.nn.Module, config: TrainConfig, default_layers: Sequence[str]) -> None:
    """Freeze ``model`` and add a trainable fp32 LoRA adapter named "default" to it."""
    layers = target_modules(config, default_layers)
    names = [name for name, _ in model.named_modules()]
    unknown = [
        layer for layer in layers if not any(n == layer or n.endswith(f".{layer}") for n in names)
    ]
    if unknown:
        raise ValueError(f"--lora_layers names no module of the model: {', '.join(unknown)}")
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha or config.rank,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=layers,
    )
    model.requires_grad_(False)
    model.add_adapter(lora_config)
    for param in model.parameters():
        if param.requires_grad:
            # LoRA weights train in fp32 even when the frozen base runs in half precision.
            param.data = param.data.float()


def save_lora(pipeline_cls, model: torch.nn.Module, directory: str | Path, component: str) -> Path:
    """Write ``model``'s adapter with ``pipeline_cls.save_lora_weights``; returns the file.

    ``component`` is the pipeline attribute the adapter belongs to ("transformer" or "unet").
    """
    pipeline_cls.save_lora_weights(
        str(directory),
        **{
            f"{component}_lora_layers": get_peft_model_state_dict(model),
            f"{component}_lora_adapter_metadata": model.peft_config["default"].to_dict(),
        },
        safe_serialization=True,
    )
    return Path(directory) / LORA_WEIGHTS_NAME


def load_lora(pipeline_cls, model: torch.nn.Module, path: str | Path, component: str) -> None:
    """Load a diffusers-format LoRA file (or a folder holding one) into ``model``'s adapter.

    Raises ``ValueError`` naming the file when it holds no weights for ``component``, when a key
    does not fit the adapter (another model or other --lora_layers), or when shapes differ
    (another --rank).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"LoRA file {path} does not exist")
    state_dict = pipeline_cls.lora_state_dict(str(path))
    if isinstance(state_dict, tuple):  # some families also return network alphas
        state_dict = state_dict[0]
    prefix = f"{component}."
    weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"LoRA file {path} holds no {component} weights")
    try:
        result = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(weights))
    except RuntimeError as error:
        raise ValueError(f"LoRA file {path} does not fit the adapter: {error}") from error
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise ValueError(
            f"LoRA file {path} has {len(unexpected)} weights the adapter lacks, "
            f"e.g. {unexpected[0]}; check --lora_layers and the base model"
        )
