"""The optimizer a run trains its LoRA (or adapter) with, chosen by ``--optimizer``.

- ``adamw``: torch's AdamW, fp32 moments (8 bytes per trainable parameter);
- ``adamw8bit`` / ``paged_adamw8bit``: bitsandbytes' block-wise 8-bit AdamW (about 2 bytes per
  parameter); the paged one keeps its state in CUDA unified memory, which spills to the CPU
  instead of running out;
- ``adafactor``: transformers' Adafactor with a fixed learning rate (factored second moments,
  no first moment: a few bytes per row and column of each matrix);
- ``prodigy``: prodigyopt's Prodigy, which estimates the step size itself: ``--learning_rate``
  is a multiplier of that estimate, usually 1.0;
- ``schedulefree_adamw``: schedulefree's AdamW without a learning-rate schedule: it trains on
  one sequence of weights and averages another. The averaged weights are the result:
  checkpoints, validation and the final LoRA see them (:func:`averaged_weights`).

Every state is tensors and plain values, which checkpoints store as safetensors + JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import get_args

import torch

from training.config import OptimizerName

logger = logging.getLogger(__name__)

OPTIMIZERS = get_args(OptimizerName)
# Prodigy's step size is its own estimate times the learning rate: below this the run barely moves.
_PRODIGY_LOW_LR = 0.1


def build_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``config.optimizer`` over the trainable parameters of ``model``, with --learning_rate,
    --adam_beta1/2, --adam_weight_decay and --adam_epsilon where the optimizer has them."""
    params = [param for param in model.parameters() if param.requires_grad]
    name = config.optimizer
    adam = {
        "lr": config.learning_rate,
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
    if name == "adamw":
        return torch.optim.AdamW(params, **adam)
    if name in ("adamw8bit", "paged_adamw8bit"):
        from bitsandbytes import optim

        return (optim.AdamW8bit if name == "adamw8bit" else optim.PagedAdamW8bit)(params, **adam)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed step size, as every other choice here; Adafactor's own schedule is off.
        return Adafactor(
            params,
            lr=config.learning_rate,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            weight_decay=config.adam_weight_decay,
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        if config.learning_rate < _PRODIGY_LOW_LR:
            logger.warning(
                "--optimizer prodigy estimates the step size itself and multiplies it by "
                "--learning_rate (%g); 1.0 is the usual value",
                config.learning_rate,
            )
        return Prodigy(params, **adam)
    if name == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(params, **adam, warmup_steps=config.lr_warmup_steps)
        optimizer.train()
        return optimizer
    raise ValueError(f"unknown --optimizer {name!r}; one of {', '.join(OPTIMIZERS)}")


def scheduler_warmup_steps(config) -> int:
    """Warm-up steps of the learning-rate schedule: the schedule-free optimizer warms up itself."""
    return 0 if config.optimizer == "schedulefree_adamw" else config.lr_warmup_steps


def _switches_weights(optimizer) -> bool:
    """Whether ``optimizer`` (or the one accelerate wraps) trains on other weights than it
    returns: schedule-free optimizers, which have ``train()`` and ``eval()``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None))


@contextmanager
def averaged_weights(optimizer) -> Iterator[None]:
    """Inside the block the model holds the weights the optimizer returns as its result (a
    schedule-free optimizer's average; for any other optimizer, the weights themselves).

    A checkpoint is written inside it, so a resumed run, switching back to training weights
    after loading, computes them exactly as the uninterrupted run did on leaving the block.
    """
    switches = _switches_weights(optimizer)
    if switches:
        optimizer.eval()
    try:
        yield
    finally:
        if switches:
            optimizer.train()


def use_averaged_weights(optimizer) -> None:
    """Leave the model with the optimizer's result for good (the end of a run)."""
    if _switches_weights(optimizer):
        optimizer.eval()


def resume_training_weights(optimizer) -> None:
    """After loading a checkpoint written inside :func:`averaged_weights`: back to the weights
    the optimizer trains on."""
    if _switches_weights(optimizer):
        optimizer.train()
