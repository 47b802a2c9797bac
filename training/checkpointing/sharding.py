"""LoRA weights of a model whose parameters FSDP2 shards (``configs/accelerate/fsdp.yaml``).

Under FSDP2 every parameter is a ``DTensor`` holding 1/N of its rows on each rank, so peft's
state-dict helpers would see shards. Saving and loading a LoRA therefore gather the *trainable*
parameters only (a few MB; the frozen base stays sharded), swap them into the model as whole
tensors for the duration, and put them back, so the LoRA file is the same file a single-GPU or
DDP run writes (and ``--init_lora_weights`` takes either). The optimizer state stays sharded:
each rank checkpoints its own shard, so a checkpoint resumes under the engine and the number of
processes it was written with.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded_tensor(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2)."""
    return any(isinstance(param, DTensor) for param in model.parameters())


@contextmanager
def whole_trainable_parameters(
    model: torch.nn.Module, write_back: bool = False
) -> Iterator[torch.nn.Module]:
    """``model`` with each sharded trainable parameter replaced by the whole tensor, on every
    rank (gathering is a collective: every rank enters, in the same order). With ``write_back``
    the whole tensors' values (a loaded LoRA, identical on every rank) go back into the shards
    on exit. Without sharding, ``model`` as it is."""
    swapped = []
    post_load_hooks = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor) and param.requires_grad:
                whole = torch.nn.Parameter(param.full_tensor().detach().clone())
                module._parameters[name] = whole
                swapped.append((module, name, param, whole))
                if write_back and module not in post_load_hooks:
                    # FSDP2's hook after load_state_dict re-reads the module's parameter as its
                    # shard; here it is the whole tensor, and the shards are written on exit.
                    post_load_hooks[module] = module._load_state_dict_post_hooks
                    module._load_state_dict_post_hooks = OrderedDict()
    try:
        yield model
    finally:
        for module, hooks in post_load_hooks.items():
            module._load_state_dict_post_hooks = hooks
        for module, name, sharded, whole in swapped:
            module._parameters[name] = sharded
            if write_back:
                # Every rank holds the same whole tensor: each keeps its own shard of it.
                local = distribute_tensor(
                    whole.detach().to(sharded.dtype),
                    sharded.device_mesh,
                    sharded.placements,
                    src_data_rank=None,
                )
                with torch.no_grad():
                    sharded.to_local().copy_(local.to_local())


def local_optimizer_state(state: dict) -> dict:
    """An optimizer ``state_dict`` with each ``DTensor`` as this rank's shard (a plain tensor),
    for this rank's ``optimizer-<rank>`` file."""

    def local(value):
        if isinstance(value, DTensor):
            return value.to_local()
        if isinstance(value, dict):
            return {key: local(item) for key, item in value.items()}
        return value

    return {**state, "state": local(state["state"])}


def sharded_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of :func:`local_optimizer_state` for ``optimizer``'s parameters: a shard
    shaped like its parameter's local shard becomes a ``DTensor`` placed as the parameter is
    (the step counters stay as they are). Needs the number of ranks that saved it."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    restored = {}
    for index, values in state["state"].items():
        param = params[int(index)]
        restored[index] = {
            key: DTensor.from_local(value, param.device_mesh, param.placements, run_check=False)
            if isinstance(param, DTensor)
            and isinstance(value, torch.Tensor)
            and value.shape == param.to_local().shape
            else value
            for key, value in values.items()
        }
    return {**state, "state": restored}
