"""LoRA adapters with peft, saved and loaded in diffusers' LoRA format.

The saved file is what the family's pipeline loads with ``pipe.load_lora_weights(dir)``:
safetensors, diffusers key names, and the adapter's LoRA config as metadata. A warm start
(``--init_lora_weights``) takes its rank, alpha and target modules from that metadata, so a LoRA
resumes at the strength it was trained at; from a file in kohya's layout (ComfyUI's, kohya's
sd-scripts') it takes each module's rank and alpha from the file's own tensors, read with the
family's key mapping (:mod:`training.lora.export`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from training.config import TrainConfig
from training.lora.export import (
    DIFFUSERS,
    KOHYA,
    PIPELINE_FAMILIES,
    convert,
    families_of_modules,
    lora_file_path,
    lora_layout,
    peft_config,
    read_lora,
    save_lora_state_dicts,
)

logger = logging.getLogger(__name__)

DEFAULT_RANK = 16
# LoraConfig fields that shape an adapter and that a warm start takes from the file's metadata.
_SHAPE_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
_SHAPE_FIELDS += ("use_rslora", "use_dora")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read for one component: weights in peft's key names
    (``blocks.0.attn.to_q.lora_A.weight``) and the adapter's LoRA config (a diffusers file's
    metadata, empty when the file has none, as files of other trainers may; a kohya file's
    ranks and alphas as :func:`training.lora.export.peft_config` gives them)."""

    path: Path
    weights: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    def rank(self) -> int:
        """The rank of the first ``lora_A`` weight (``[r, in_features]``)."""
        return next(w.shape[0] for k, w in self.weights.items() if k.endswith("lora_A.weight"))

    def modules(self) -> list[str]:
        """Names of the modules the file adapts."""
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.weights if ".lora_" in k})


@dataclass(frozen=True)
class LoraFormat:
    """Where a family keeps its LoRA: the pipeline class whose ``save_lora_weights`` /
    ``lora_state_dict`` write and read the file, and the adapted component's attribute name
    ("transformer" or "unet")."""

    pipeline_cls: type
    component: str = "transformer"

    @property
    def family(self) -> str:
        """The model family of the pipeline ("flux", "qwen-image", "sd15"): whose kohya names
        a file in kohya's layout is read with."""
        return PIPELINE_FAMILIES[self.pipeline_cls.__name__]

    def save(self, model: torch.nn.Module, directory: str | Path) -> Path:
        """Write ``model``'s adapter to ``directory/pytorch_lora_weights.safetensors``."""
        return save_lora_components(self.pipeline_cls, {self.component: model}, directory)

    def read(self, path: str | Path) -> LoraFile:
        """The component's weights and LoRA config in a file (or a folder holding one), in
        diffusers' layout or kohya's.

        Raises ``ValueError`` naming the file when it does not exist, is not safetensors, is a
        kohya LoRA of another family or with modules the family's layout has no name for, or
        holds no weights for the component.
        """
        path = lora_file_path(path)
        if lora_layout(path) == KOHYA:
            return self._read_kohya(path)
        loaded = self.pipeline_cls.lora_state_dict(
            str(path), return_lora_metadata=True, use_safetensors=True
        )
        state_dict, metadata = loaded[0], loaded[-1] or {}
        weights = self._own(state_dict, path)
        prefix = f"{self.component}."
        own = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
        return LoraFile(path, convert_unet_state_dict_to_peft(weights), own)

    def _read_kohya(self, path: Path) -> LoraFile:
        """A kohya file's pairs of the component, mapped to diffusers' modules by the family's
        layout (fused projections split, each part keeping its rank and alpha), as peft weights
        and the config that gives every module its own rank and alpha."""
        lora = read_lora(path)
        theirs = families_of_modules(lora)
        if theirs and self.family not in theirs:
            raise ValueError(
                f"LoRA file {path} is a {' or '.join(theirs)} LoRA in kohya's layout (by its "
                f"module names); {self.pipeline_cls.__name__} is a {self.family} pipeline"
            )
        pairs = self._own(convert(lora, DIFFUSERS, self.family).pairs, path)
        weights = {}
        for module, pair in pairs.items():
            weights[f"{module}.lora_A.weight"] = pair.down
            weights[f"{module}.lora_B.weight"] = pair.up
        return LoraFile(path, weights, peft_config(pairs).to_dict())

    def _own(self, named: dict[str, Any], path: Path) -> dict[str, Any]:
        """The entries of ``named`` (keyed ``component.name``) of this component, keyed by
        ``name``. Raises ``ValueError`` naming the file when there are none."""
        prefix = f"{self.component}."
        own = {k[len(prefix) :]: v for k, v in named.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"LoRA file {path} holds no {self.component} weights")
        return own

    def load(self, model: torch.nn.Module, path: str | Path) -> None:
        """Load a file's weights into ``model``'s existing adapter.

        Raises ``ValueError`` naming the file when a key does not fit the adapter (another model
        or other --lora_layers) or shapes differ (another --rank).
        """
        self.apply(model, self.read(path))

    def apply(self, model: torch.nn.Module, lora_file: LoraFile) -> None:
        """Copy ``lora_file``'s weights into ``model``'s existing adapter (see :meth:`load`)."""
        try:
            result = set_peft_model_state_dict(model, lora_file.weights)
        except RuntimeError as error:
            raise ValueError(
                f"LoRA file {lora_file.path} does not fit the adapter: {error}"
            ) from error
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if unexpected:
            raise ValueError(
                f"LoRA file {lora_file.path} has {len(unexpected)} weights the adapter lacks, "
                f"e.g. {unexpected[0]}; check --lora_layers and the base model"
            )


SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cast_lora_file(path: Path, dtype: torch.dtype) -> None:
    """Rewrite the LoRA file ``path`` (one the suite wrote) with its floating weights in
    ``dtype``, scalars (kohya's alphas) and metadata (each component's LoRA config) as they
    are; the new file replaces the old in one rename."""
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    cast = {
        name: tensor.to(dtype) if tensor.is_floating_point() and tensor.dim() else tensor
        for name, tensor in tensors.items()
    }
    partial = path.with_name(f".{path.name}.partial")
    save_file(cast, partial, metadata=metadata)
    partial.replace(path)


def save_lora_components(
    pipeline_cls, models: dict[str, torch.nn.Module], directory: str | Path
) -> Path:
    """Write the adapters of several components of one pipeline (``{"unet": unet,
    "text_encoder": text_encoder}``) into one ``pytorch_lora_weights.safetensors``, each with
    its LoRA config as metadata, as ``pipeline_cls.save_lora_weights`` lays them out."""
    layers = {
        component: (get_peft_model_state_dict(model), model.peft_config["default"].to_dict())
        for component, model in models.items()
    }
    return save_lora_state_dicts(pipeline_cls, layers, directory)


def target_modules(config: TrainConfig, default: Sequence[str]) -> list[str]:
    """``--lora_layers`` as a list, or the family's ``default``."""
    if config.lora_layers:
        return [name.strip() for name in config.lora_layers.split(",") if name.strip()]
    return list(default)


def lora_config(
    config: TrainConfig, default_layers: Sequence[str], init: LoraFile | None = None
) -> LoraConfig:
    """The adapter's peft config: from the flags, or from ``init``'s file when warm-starting.

    A warm start takes rank, alpha and target modules from the file's metadata (rank and modules
    from its weights when it has none). A flag the user set (``--rank``, ``--lora_alpha``,
    ``--lora_layers``) that disagrees with the file is refused, naming both values.
    """
    flags = {
        "r": config.rank or DEFAULT_RANK,
        "lora_alpha": config.lora_alpha or config.rank or DEFAULT_RANK,
        "target_modules": target_modules(config, default_layers),
    }
    shape: dict[str, Any] = dict(flags)
    if init is not None:
        stored = {k: init.metadata[k] for k in _SHAPE_FIELDS if init.metadata.get(k) is not None}
        stored.setdefault("r", init.rank())
        stored.setdefault("target_modules", init.modules())
        if "lora_alpha" not in stored:
            stored["lora_alpha"] = config.lora_alpha or stored["r"]
            logger.warning(
                "%s has no LoRA metadata; assuming lora_alpha %s (pass --lora_alpha to set it)",
                init.path,
                stored["lora_alpha"],
            )
        explicit = {
            "r": ("--rank", config.rank),
            "lora_alpha": ("--lora_alpha", config.lora_alpha),
            "target_modules": ("--lora_layers", config.lora_layers and flags["target_modules"]),
        }
        conflicts = [
            f"{flag} {given} but the file has {stored[key]}"
            for key, (flag, given) in explicit.items()
            if given is not None and given != "" and _differs(given, stored[key])
        ]
        if conflicts:
            raise ValueError(
                f"--init_lora_weights {init.path}: {'; '.join(conflicts)}. Drop the flag to use "
                "the file's value, or start a fresh LoRA without --init_lora_weights."
            )
        shape = stored
    return LoraConfig(
        **shape,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
    )


def _differs(given: Any, stored: Any) -> bool:
    if isinstance(given, list | tuple) or isinstance(stored, list | tuple | set):
        return set(given) != set(stored)
    return float(given) != float(stored)


def add_lora(
    model: torch.nn.Module,
    config: TrainConfig,
    default_layers: Sequence[str],
    lora_format: LoraFormat,
) -> None:
    """Freeze ``model`` and add a trainable fp32 LoRA adapter named "default" to it.

    With ``--init_lora_weights`` the adapter is shaped like the file's (see :func:`lora_config`)
    and starts from its weights.
    """
    init = lora_format.read(config.init_lora_weights) if config.init_lora_weights else None
    adapter = lora_config(config, default_layers, init)
    names = [name for name, _ in model.named_modules()]
    unknown = [
        layer
        for layer in adapter.target_modules
        if not any(n == layer or n.endswith(f".{layer}") for n in names)
    ]
    if unknown:
        raise ValueError(f"--lora_layers names no module of the model: {', '.join(unknown)}")
    model.requires_grad_(False)
    if isinstance(model, ModelMixin):
        model.add_adapter(adapter)
    else:
        # transformers' add_adapter asks for a newer peft than diffusers needs; peft's own
        # injection, with the config where peft's state-dict helpers look for it, is the same.
        inject_adapter_in_model(adapter, model, adapter_name="default")
        model.peft_config = {"default": adapter}
    for param in model.parameters():
        if param.requires_grad:
            # LoRA weights train in fp32 even when the frozen base runs in half precision.
            param.data = param.data.float()
    if init is not None:
        lora_format.apply(model, init)
        logger.info("started from %s (rank %d, alpha %s)", init.path, adapter.r, adapter.lora_alpha)


@contextmanager
def lora_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` as its base model: every peft adapter layer in it bypassed with peft's own
    switch (``enable_adapters``), then switched back on with each parameter's ``requires_grad``
    as it was. The base model without a second copy in memory (GRPO's reference policy)."""
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    trainable = [(param, param.requires_grad) for param in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)
