"""A run's memory plan: the bytes a training step holds on the device, by what holds them.

Weights, the LoRA, its gradients and the optimizer state are exact counts, from the parameters
of models built on the meta device (a 20B model costs nothing there) and the formats the
quantizers and optimizers store them in; each formula is checked against the library itself in
the tests. Activations are an estimate: the tensors autograd keeps for the backward pass,
recorded by running the denoiser's forward pass on the meta device, with attention keeping what
flash attention keeps (its inputs, output and a log-sum-exp per query, not the score matrix),
counted with and without gradient checkpointing. They stay estimates until a GPU measures a step.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from models.published import published_model
from training.lora.adapters import LoraFormat, add_lora
from training.memory.offload import denoiser_blocks, offloaded_blocks, tensor_bytes
from training.runtime import weight_dtype

logger = logging.getLogger(__name__)

# Each mode's bytes for a frozen linear weight [out, in]: torchao's int8 weight-only tensor
# keeps int8 values with an fp32 scale and an int8 zero point per output row; its float8 one
# e4m3 values with an fp32 scale per row; bitsandbytes' nf4 two 4-bit values per byte, an fp32
# absmax per block of 64 and its 16-entry fp32 code.
NF4_BLOCK = 64
_NF4_CODE_BYTES = 16 * 4
# bitsandbytes' 8-bit optimizers: tensors under this many elements keep fp32 state; the others
# two uint8 moments with an fp32 absmax per block of 256, and two 256-entry fp32 maps shared by
# every tensor.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
_BNB_QMAPS_BYTES = 2 * 256 * 4


def quantized_linear_bytes(mode: str, out_features: int, in_features: int) -> int:
    """Bytes of one linear weight ``[out_features, in_features]`` quantized by ``mode``."""
    n = out_features * in_features
    if mode == "int8":
        return n + out_features * (4 + 1)
    if mode == "fp8":
        return n + out_features * 4
    if mode == "nf4":
        return math.ceil(n / 2) + 4 * math.ceil(n / NF4_BLOCK) + _NF4_CODE_BYTES
    raise ValueError(f"no quantized format {mode!r}")


def _is_quantized(module_name: str, module: torch.nn.Module, mode: str, skip: Sequence[str]):
    return (
        mode != "none"
        and isinstance(module, torch.nn.Linear)
        and "lora_" not in module_name
        and not any(part in skip for part in module_name.split("."))
    )


def frozen_bytes(model: torch.nn.Module, mode: str = "none", skip: Sequence[str] = ()) -> int:
    """Bytes of ``model``'s frozen parameters and buffers with its linear weights quantized by
    ``mode`` ("none" keeps every tensor's dtype); modules named in ``skip`` and
    ``model._keep_in_fp32_modules`` stay unquantized, as the quantizers leave them."""
    skip = [*skip, *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    total = 0
    seen: set[int] = set()  # tied weights (T5's shared embedding) are held once
    for name, module in model.named_modules():
        quantized = _is_quantized(name, module, mode, skip)
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if quantized and param_name == "weight":
                total += quantized_linear_bytes(mode, *param.shape)
            else:
                total += param.numel() * param.element_size()
        total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total


def trainable_shapes(model: torch.nn.Module) -> list[torch.Size]:
    return [param.shape for param in model.parameters() if param.requires_grad]


def optimizer_state_bytes(optimizer: str, shapes: Iterable[torch.Size]) -> int:
    """Bytes of ``optimizer``'s state (``training.optimizers``) for fp32 trainable tensors of
    ``shapes``: AdamW and schedule-free AdamW two fp32 moments, Prodigy four fp32 tensors (its
    moments, the initial weights and its step-size accumulator), Adafactor an fp32 row and
    column second moment per matrix, bitsandbytes' 8-bit AdamW as above."""
    total, blockwise = 0, False
    for shape in shapes:
        n = math.prod(shape)
        if optimizer in ("adamw", "schedulefree_adamw"):
            total += 8 * n
        elif optimizer == "prodigy":
            total += 16 * n
        elif optimizer == "adafactor":
            factored = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
            total += 4 * (factored if len(shape) >= 2 else n)
        elif optimizer in ("adamw8bit", "paged_adamw8bit"):
            if n < BNB_MIN_8BIT_SIZE:
                total += 8 * n
            else:
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
                blockwise = True
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
    return total + (_BNB_QMAPS_BYTES if blockwise else 0)


class _FlashAttentionLike(torch.autograd.Function):
    """What flash attention keeps for backward: q, k, v, the output and an fp32 log-sum-exp per
    query (``[B, H, L]``), never the ``L x L`` scores."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        return output


class _AttentionAsFlash(torch.overrides.TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as flash attention, which GPUs run in bf16: on the
    meta device it would take the math path, which keeps the whole score matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            given = dict(zip(("query", "key", "value"), args, strict=False)) | kwargs
            return _FlashAttentionLike.apply(given["query"], given["key"], given["value"])
        return func(*args, **kwargs)


def _tensors(values) -> Iterable[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            yield from _tensors(value)
        elif isinstance(value, dict):
            yield from _tensors(value.values())


@dataclass
class ActivationTrace:
    """Bytes autograd keeps for backward in one forward pass: ``outside`` the blocks, in each
    block (``per_block``), the tensors the blocks are called with (``block_inputs``, each
    counted once: what gradient checkpointing keeps), and each block's frozen linear weights
    in elements (``block_linear_elements``: what a weight-only quantized linear keeps
    dequantized for its backward)."""

    outside: int
    per_block: list[int]
    block_inputs: int
    block_linear_elements: list[int] = field(default_factory=list)

    def bytes(self, checkpointing: bool, dequantized_itemsize: int = 0) -> int:
        """The estimate: every block's tensors at once, or with checkpointing the blocks'
        inputs plus one block recomputed; ``dequantized_itemsize`` bytes per weight of a
        block's linears when each is dequantized for backward (torchao's weight-only modes)."""
        blocks = [
            saved + dequantized_itemsize * weights
            for saved, weights in zip(self.per_block, self.block_linear_elements, strict=True)
        ]
        if checkpointing:
            return self.outside + self.block_inputs + max(blocks, default=0)
        return self.outside + sum(blocks)


def trace_activations(
    model: torch.nn.Module, blocks: Sequence[torch.nn.Module], forward: Callable[[], object]
) -> ActivationTrace:
    """Run ``forward()`` (``model`` on the meta device) and record the tensors autograd keeps,
    by block of ``blocks``; parameters are weights, counted elsewhere."""
    parameters = {id(param) for param in model.parameters()}
    # Tensors are told apart by id: each is held until the trace ends, so no id is reused.
    held: list[torch.Tensor] = []
    seen: set[int] = set()
    state = {"block": None, "outside": 0, "inputs": 0}
    per_block = {block: 0 for block in blocks}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters and id(tensor) not in seen:
            seen.add(id(tensor))
            held.append(tensor)
            if state["block"] is None:
                state["outside"] += tensor_bytes(tensor)
            else:
                per_block[state["block"]] += tensor_bytes(tensor)
        return tensor

    inputs_seen: set[int] = set()

    def enter(block, args, kwargs):
        state["block"] = block
        for tensor in _tensors([args, kwargs]):
            if id(tensor) not in inputs_seen:
                inputs_seen.add(id(tensor))
                held.append(tensor)
                state["inputs"] += tensor_bytes(tensor)

    def leave(block, args, output):
        state["block"] = None

    hooks = [b.register_forward_pre_hook(enter, with_kwargs=True) for b in blocks]
    hooks += [b.register_forward_hook(leave) for b in blocks]
    try:
        with (
            torch.enable_grad(),
            _AttentionAsFlash(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        ):
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    linear_elements = [
        sum(
            module.weight.numel()
            for name, module in block.named_modules()
            if isinstance(module, torch.nn.Linear) and "lora_" not in name
        )
        for block in blocks
    ]
    return ActivationTrace(
        state["outside"], list(per_block.values()), state["inputs"], linear_elements
    )


@dataclass
class MemoryPlan:
    """Bytes on the training device during a step, by what holds them. ``activations`` is an
    estimate (see the module docstring); every other figure is an exact count."""

    denoiser_weights: int
    lora: int
    gradients: int
    optimizer_state: int
    encoders: int
    activations: int
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    offloaded_to_cpu: int = 0

    @property
    def total(self) -> int:
        return (
            self.denoiser_weights
            + self.lora
            + self.gradients
            + self.optimizer_state
            + self.encoders
            + self.activations
        )

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def describe(self, device_bytes: int | None = None) -> str:
        """The plan as lines of text, with a warning when ``total`` exceeds ``device_bytes``."""
        rows = [
            ("denoiser weights", self.denoiser_weights, ""),
            ("LoRA (fp32)", self.lora, ""),
            ("LoRA gradients (fp32)", self.gradients, ""),
            ("optimizer state", self.optimizer_state, ""),
            ("encoders kept on the device", self.encoders, ""),
            ("activations", self.activations, "estimate"),
            ("total", self.total, "estimate" if self.activations else ""),
        ]
        lines = [
            f"  {name:<30}{readable(value):>10}  {note}".rstrip() for name, value, note in rows
        ]
        lines.append(
            f"  (activations {readable(self.activations_without_checkpointing)} without "
            f"gradient checkpointing, {readable(self.activations_with_checkpointing)} with it: "
            "estimates from a meta-device trace until a GPU measures them)"
        )
        if self.offloaded_to_cpu:
            lines.append(f"  (--offload_blocks keeps {readable(self.offloaded_to_cpu)} on the CPU)")
        if device_bytes is not None:
            lines.append(f"  device memory {readable(device_bytes)}")
            if self.total > device_bytes:
                lines.append(
                    "  WARNING: the plan exceeds the device's memory; see the low-memory flags "
                    "(--quantize_base, --offload_blocks, --gradient_checkpointing, "
                    "--optimizer adamw8bit, --cache_latents --offload_encoders)"
                )
        return "\n".join(lines)


def readable(count: int) -> str:
    """``count`` bytes in decimal units (GB = 10**9 bytes, as parameter counts read)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


@contextlib.contextmanager
def built_on(device, dtype: torch.dtype):
    """Create parameters directly on ``device`` in ``dtype``: a 20B model built in fp32 on the
    CPU first would take minutes and twice its memory; on ``"meta"`` it takes nothing."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def pipeline_holding(pipeline_cls, transformer: torch.nn.Module, scheduler=None):
    """A ``pipeline_cls`` holding ``transformer`` (and ``scheduler``), every other component
    None: what packing latents and building ids need of it."""
    others = {
        name: None
        for name in inspect.signature(pipeline_cls.__init__).parameters
        if name not in ("self", "transformer", "scheduler")
    }
    return pipeline_cls(**others, scheduler=scheduler, transformer=transformer)


def meta_tensor(model: torch.nn.Module, *shape: int) -> torch.Tensor:
    """An input of ``shape`` for ``model`` on the meta device, in its dtype."""
    return torch.empty(*shape, device="meta", dtype=model.dtype)


@dataclass(frozen=True)
class FamilyPlan:
    """What planning a family's run takes, declared by its train script: its key in
    ``models.published.PUBLISHED``, the adapted component (``denoiser``: "transformer" or
    "unet") with its default LoRA layers and format, the text encoders, and ``step_inputs``:
    ``(denoiser, config, batch_size) -> kwargs`` of the denoiser's call in one training step,
    as meta tensors at the largest --resolution (square)."""

    family: str
    denoiser: str
    lora_layers: Sequence[str]
    lora_format: LoraFormat
    text_encoders: Sequence[str]
    step_inputs: Callable[[torch.nn.Module, object, int], dict]


def meta_component(config, family: str, name: str, dtype: torch.dtype) -> torch.nn.Module:
    """Component ``name`` of --pretrained_model_name_or_path on the meta device in ``dtype``:
    from its own config when the checkpoint is a local folder, else at the family's published
    size."""
    root = Path(config.pipeline_source)
    folder = root / name
    with built_on("meta", dtype):
        if not (folder / "config.json").is_file():
            return published_model(family, name)
        library, class_name = json.loads((root / "model_index.json").read_text())[name]
        cls = getattr(importlib.import_module(library), class_name)
        if library == "diffusers":
            return cls.from_config(cls.load_config(folder))
        return cls(AutoConfig.from_pretrained(folder))


def plan_memory(config, spec: FamilyPlan) -> MemoryPlan:
    """The memory plan of a run of ``config`` for the family ``spec`` describes. Building the
    models draws random initial weights: the global random state is left as it was, so a run
    that plans first trains exactly as one that does not."""
    with torch.random.fork_rng(devices=[]):
        return _plan(config, spec)


def _plan(config, spec: FamilyPlan) -> MemoryPlan:
    # A plan made away from the GPU it is for (scripts/plan_memory.py) takes auto as bf16.
    dtype = torch.bfloat16 if config.mixed_precision == "auto" else weight_dtype(config)
    quantized = getattr(config, "quantize_base", "none")
    denoiser = meta_component(config, spec.family, spec.denoiser, dtype)
    with warnings.catch_warnings():
        # --init_lora_weights: its shape is what counts; loading values into meta is a no-op.
        warnings.filterwarnings("ignore", message=".*meta parameter.*")
        add_lora(denoiser, config, spec.lora_layers, spec.lora_format)
    shapes = trainable_shapes(denoiser)
    lora = 4 * sum(math.prod(shape) for shape in shapes)

    weights = frozen_bytes(denoiser, quantized)
    chosen = offloaded_blocks(denoiser, getattr(config, "offload_blocks", 0))
    offloaded = [frozen_bytes(block, quantized) for block in chosen]
    # Two blocks' weights are on the device at a time: the one running, the one let go of.
    weights += sum(sorted(offloaded)[-2:]) - sum(offloaded)

    encoders = 0
    if not (config.cache_latents and config.offload_encoders):
        text_mode = getattr(config, "quantize_text_encoders", "none")
        for name in ("vae", *spec.text_encoders):
            mode = text_mode if name in spec.text_encoders else "none"
            module = meta_component(config, spec.family, name, dtype).requires_grad_(False)
            # transformers' quantizers leave the output embedding as it is.
            encoders += frozen_bytes(module, mode, skip=("lm_head",))

    # Traced as autocast runs the LoRA: in the compute dtype.
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    inputs = spec.step_inputs(denoiser, config, config.train_batch_size)
    blocks = _checkpointed_blocks(denoiser)
    trace = trace_activations(denoiser, blocks, lambda: denoiser(**inputs))
    # torchao's weight-only linears keep each weight dequantized for their backward pass.
    itemsize = dtype.itemsize if quantized in ("int8", "fp8") else 0
    with_checkpointing = trace.bytes(True, itemsize)
    without = trace.bytes(False, itemsize)
    return MemoryPlan(
        denoiser_weights=weights,
        lora=lora,
        gradients=lora,
        optimizer_state=optimizer_state_bytes(config.optimizer, shapes),
        encoders=encoders,
        activations=with_checkpointing if config.gradient_checkpointing else without,
        activations_with_checkpointing=with_checkpointing,
        activations_without_checkpointing=without,
        offloaded_to_cpu=sum(offloaded),
    )


def _checkpointed_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules diffusers' gradient checkpointing recomputes as one: a transformer's blocks,
    a UNet's down, mid and up blocks."""
    if hasattr(denoiser, "transformer_blocks"):
        return denoiser_blocks(denoiser)
    return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]


def device_memory() -> int | None:
    """Bytes of memory of this process's CUDA device; None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def log_memory_plan(config, spec: FamilyPlan, accelerator) -> MemoryPlan:
    """Plan the run and log the plan (main process), warning when it exceeds the device."""
    plan = plan_memory(config, spec)
    if accelerator.is_main_process:
        device = device_memory()
        text = plan.describe(device)
        if device is not None and plan.total > device:
            logger.warning("memory plan of this run, per device:\n%s", text)
        else:
            logger.info("memory plan of this run, per device:\n%s", text)
    return plan
