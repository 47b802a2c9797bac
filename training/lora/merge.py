"""A LoRA merged into its base model's weights, for deployments without adapters.

The adapted components (the transformer or UNet, and SD1.5's text encoder when the LoRA has one)
are loaded from the base pipeline folder alone, the LoRA is fused into them with diffusers'
``fuse_lora`` at a chosen scale, and each is written with ``save_pretrained`` in safetensors,
sharded as diffusers shards (``diffusion_pytorch_model-0000i-of-0000n.safetensors`` and an
index). Nothing else of the base model is loaded or copied: load the result with
``<ModelClass>.from_pretrained(out, subfolder=component)`` and hand it to the pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import torch
from safetensors import safe_open

from training.lora.export import (
    DIFFUSERS_LOAD_ERRORS,
    describe_load_error,
    detect_family,
    diffusers_modules,
    families_of_modules,
    model_index,
    read_lora,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' save_pretrained default
ADAPTER_NAME = "merged"


def stored_dtype(model: str | Path, component: str) -> torch.dtype:
    """The dtype a base component's weights are stored in (its first safetensors tensor)."""
    files = sorted((Path(model) / component).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model}/{component}: no safetensors weights to merge into")
    with safe_open(files[0], "pt") as file:
        return file.get_tensor(next(iter(file.keys()))).dtype


def _check_out(out: Path, model: Path) -> None:
    """Refuse an ``--out`` that is (or holds, or lies in) the base model's folder, or holds
    files already: a merge writes into an empty or new folder, never over weights."""
    out_path, model_path = out.resolve(), model.resolve()
    if model.exists() and (
        out_path == model_path or model_path in out_path.parents or out_path in model_path.parents
    ):
        raise ValueError(
            f"--out {out} is, holds or lies in the base model's folder {model}: merging would "
            "overwrite its weights. Choose a new folder."
        )
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} already holds files; choose an empty or new folder")


def _has_module(pipe, name: str) -> bool:
    component, _, path = name.partition(".")
    try:
        getattr(pipe, component).get_submodule(path)
    except AttributeError:
        return False
    return True


def merge_lora(
    lora: str | Path,
    model: str | Path,
    out: str | Path,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    family: str | None = None,
) -> dict[str, Path]:
    """Fuse ``lora`` (either key layout) at ``scale`` into the components of the pipeline folder
    ``model`` it adapts and save them under ``out/<component>``; returns the folders.

    ``dtype`` defaults to the one the first adapted component is stored in; ``family`` to the
    one ``model`` belongs to.
    """
    _check_out(Path(out), Path(model))
    lora_file = read_lora(lora)
    family = detect_family(lora_file, family, model)
    by_modules = families_of_modules(lora_file)
    if by_modules and family not in by_modules:
        raise ValueError(
            f"{lora_file.path} is a {' or '.join(by_modules)} LoRA (by its module names); "
            f"{model} is a {family} model: nothing of it would merge as trained"
        )
    modules = diffusers_modules(lora_file, family)
    components = sorted({name.split(".", 1)[0] for name in modules})
    index = model_index(model)
    missing = [component for component in components if component not in index]
    if missing:
        raise ValueError(f"{model} has no {', '.join(missing)} for the LoRA {lora_file.path}")
    # Every other component (text encoders of billions of weights, the VAE) stays unloaded.
    skipped = {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and name not in components
    }
    pipeline_cls = getattr(diffusers, index["_class_name"])
    dtype = dtype or stored_dtype(model, components[0])
    pipe = pipeline_cls.from_pretrained(model, dtype=dtype, **skipped)
    absent = [name for name in modules if not _has_module(pipe, name)]
    if absent:
        raise ValueError(
            f"{len(absent)} of the {len(modules)} modules of {lora_file.path} are not in {model} "
            f"(e.g. {absent[0]}): another model's LoRA? Nothing was written."
        )
    # Loaded as a state dict, a LoRA carries no alphas: each scale goes into its down weights,
    # so diffusers' scale-1 default gives every module its own (alpha / r).
    baked = {}
    for name, pair in modules.items():
        baked[f"{name}.lora_A.weight"] = pair.down * pair.scale
        baked[f"{name}.lora_B.weight"] = pair.up
    try:
        pipe.load_lora_weights(baked, adapter_name=ADAPTER_NAME)
    except DIFFUSERS_LOAD_ERRORS as error:  # shapes of another model: a traceback says less
        raise ValueError(
            f"{lora_file.path}: diffusers cannot load it into {model} "
            f"({describe_load_error(error)}). Nothing was written."
        ) from error
    pipe.fuse_lora(components=components, lora_scale=scale, adapter_names=[ADAPTER_NAME])
    pipe.unload_lora_weights()
    folders = {}
    for component in components:
        folders[component] = Path(out) / component
        getattr(pipe, component).save_pretrained(
            folders[component], safe_serialization=True, max_shard_size=max_shard_size
        )
        logger.info("merged %s saved to %s", component, folders[component])
    return folders
