"""Regional compilation (--compile): torch.compile each repeated block of the denoiser in place.

Compiling the whole model takes minutes for a FLUX- or Qwen-size transformer and recompiles
whenever a bucket changes the sequence length; its blocks are a few classes repeated dozens of
times, so compiling each block compiles one graph per class and reuses it. ``module.compile()``
compiles in place: parameter names, and with them the LoRA file and checkpoints, do not change
(``torch.compile(module)`` would prefix every name with ``_orig_mod.``).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

logger = logging.getLogger(__name__)


def repeated_block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the repeated blocks of every diffusers model inside ``model``: their
    ``_repeated_blocks``, or, for a model that declares none (the VAE), its ``_no_split_modules``
    (the blocks diffusers keeps whole when it spreads a model over devices)."""
    declared: set[str] = set()
    fallback: set[str] = set()
    for module in model.modules():
        declared.update(getattr(module, "_repeated_blocks", None) or ())
        fallback.update(getattr(module, "_no_split_modules", None) or ())
    return declared or fallback


def compile_repeated_blocks(model: torch.nn.Module, **options) -> Counter:
    """Compile every repeated block of ``model`` in place with ``torch.compile(**options)``;
    returns how many blocks of each class were compiled.

    Raises:
        ValueError: ``model`` holds no block to compile.
    """
    classes = repeated_block_classes(model)
    compiled: Counter = Counter()

    def visit(module: torch.nn.Module) -> None:
        name = type(module).__name__
        if name in classes:
            # Blocks nested inside this one compile with it.
            module.compile(**options)
            compiled[name] += 1
            return
        for child in module.children():
            visit(child)

    visit(model)
    if not compiled:
        raise ValueError(
            f"--compile: {type(model).__name__} holds no repeated block to compile "
            f"(looked for {sorted(classes) or 'none declared'})"
        )
    logger.info("--compile: %s", ", ".join(f"{n} x {k}" for k, n in sorted(compiled.items())))
    return compiled
