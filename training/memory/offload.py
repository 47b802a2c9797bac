"""``--offload_blocks``: the frozen weights of the denoiser's transformer blocks kept on the CPU,
each block's brought to the device just before the block runs.

Between calls an offloaded block holds no frozen weights at all: they live in
:class:`BlockOffload`, so moving the model to the device, DDP and peft's state dicts never see
them. A hook on the block puts a device copy in place before its forward and takes it away after,
while autograd keeps whatever copy the backward pass needs. With gradient checkpointing the
forward pass keeps nothing and the backward pass recomputes one block at a time (the hook runs
again), so the device holds about two blocks' frozen weights instead of all of them. The LoRA
layers stay on the device with their optimizer state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)


class FrozenSlot(NamedTuple):
    """One frozen tensor of an offloaded block: where it belongs and its CPU copy."""

    module: torch.nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    stored: torch.Tensor


def denoiser_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a FLUX or Qwen-Image denoiser in the order they run (FLUX: 19
    two-stream then 38 single-stream blocks; Qwen-Image: 60). Each is what diffusers' gradient
    checkpointing recomputes as one.

    Raises:
        ValueError: the model has no transformer blocks (an SD1.5 UNet, which fits any card
            whole, checkpoints inside its blocks instead).
    """
    if not hasattr(model, "transformer_blocks"):
        raise ValueError(
            f"--offload_blocks works on transformer denoisers (FLUX, Qwen-Image), not on a "
            f"{type(model).__name__}"
        )
    return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))


def _to(tensor: torch.Tensor, device, is_parameter: bool) -> torch.Tensor:
    moved = tensor.to(device, non_blocking=True)
    if is_parameter and not isinstance(moved, torch.nn.Parameter):
        moved = torch.nn.Parameter(moved, requires_grad=False)
    return moved


def _stored(tensor: torch.Tensor, is_parameter: bool) -> torch.Tensor:
    """A CPU copy; plain tensors pinned on CUDA machines, so copies to the GPU run async."""
    cpu = _to(tensor, "cpu", is_parameter)
    if torch.cuda.is_available() and type(cpu) in (torch.Tensor, torch.nn.Parameter):
        cpu = _to(cpu.data.pin_memory(), "cpu", is_parameter)
    return cpu


class BlockOffload:
    """The frozen weights of ``blocks`` on the CPU, on ``device`` only while a block runs."""

    def __init__(self, blocks: Sequence[torch.nn.Module], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.slots: dict[torch.nn.Module, list[FrozenSlot]] = {}
        self.onloaded: set[torch.nn.Module] = set()
        for block in blocks:
            self.slots[block] = self._take_frozen(block)
            block.register_forward_pre_hook(self._before)
            block.register_forward_hook(self._after)

    @staticmethod
    def _take_frozen(block: torch.nn.Module) -> list[FrozenSlot]:
        slots = []
        for module in block.modules():
            for kind in ("_parameters", "_buffers"):
                tensors = getattr(module, kind)
                for name, tensor in tensors.items():
                    if tensor is None or (kind == "_parameters" and tensor.requires_grad):
                        continue
                    is_parameter = kind == "_parameters"
                    slots.append(FrozenSlot(module, kind, name, _stored(tensor, is_parameter)))
                    tensors[name] = None
        return slots

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of frozen weights kept on the CPU."""
        return sum(tensor_bytes(slot.stored) for slots in self.slots.values() for slot in slots)

    def onload(self, block: torch.nn.Module) -> None:
        for slot in self.slots[block]:
            is_parameter = slot.kind == "_parameters"
            getattr(slot.module, slot.kind)[slot.name] = _to(slot.stored, self.device, is_parameter)
        self.onloaded.add(block)

    def offload(self, block: torch.nn.Module) -> None:
        for slot in self.slots[block]:
            getattr(slot.module, slot.kind)[slot.name] = None
        self.onloaded.discard(block)

    def _before(self, block: torch.nn.Module, args) -> None:
        # A recomputation inside checkpointing may stop before the block's end (and its hook):
        # whatever is still in place from such a call goes first.
        for other in list(self.onloaded):
            self.offload(other)
        self.onload(block)

    def _after(self, block: torch.nn.Module, args, output) -> None:
        self.offload(block)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized, subclassed) tensor holds."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def offloaded_blocks(model: torch.nn.Module, count: int | str) -> list[torch.nn.Module]:
    """The blocks ``--offload_blocks count`` keeps on the CPU: the last ``count`` transformer
    blocks of ``model``, all with ``"all"``, none with 0."""
    if not count:
        return []
    blocks = denoiser_blocks(model)
    return blocks if count == "all" else blocks[len(blocks) - min(count, len(blocks)) :]


def offload_blocks(
    model: torch.nn.Module, count: int | str, device: torch.device | str
) -> BlockOffload | None:
    """Keep the frozen weights of :func:`offloaded_blocks` on the CPU; None when there are
    none. Call before moving ``model`` to the device."""
    chosen = offloaded_blocks(model, count)
    if not chosen:
        return None
    offload = BlockOffload(chosen, device)
    logger.info(
        "--offload_blocks: frozen weights of %d of %d blocks (%.2f GB) stay on the CPU",
        len(chosen),
        len(denoiser_blocks(model)),
        offload.offloaded_bytes / 1e9,
    )
    return offload


def place_denoiser(model: torch.nn.Module, config, device: torch.device | str) -> None:
    """Move the denoiser to the device for training, its ``--offload_blocks`` blocks' frozen
    weights excepted. Scripts call it once encoding (and the latent cache) is done, so the
    denoiser and the encoders only share the device when training needs both."""
    offload_blocks(model, getattr(config, "offload_blocks", 0), device)
    model.to(device)
