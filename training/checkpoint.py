"""Resumable checkpoints: ``checkpoint-<step>/`` is complete or absent, never half written.

A checkpoint holds the LoRA in diffusers' safetensors format, accelerate's optimizer, scheduler
and RNG state, and ``training_state.json`` (step, epoch and how many batches of that epoch were
consumed). It is written under a hidden ``.checkpoint-<step>.partial`` name and renamed once
everything is on disk, and the state file is written last, so neither a crash nor a stray folder
can be taken for a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
_NAME = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class TrainingProgress:
    """Where a run stands: optimizer steps done, the current epoch, and the micro-batches of that
    epoch already consumed on each rank."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint in ``output_dir``, oldest first."""
    found = []
    root = Path(output_dir)
    if root.is_dir():
        for folder in root.iterdir():
            match = _NAME.fullmatch(folder.name)
            if match and (folder / STATE_FILE).is_file():
                found.append((int(match.group(1)), folder))
    return sorted(found)


def resolve_checkpoint(output_dir: str | Path, value: str | None) -> Path | None:
    """The folder ``--resume_from_checkpoint`` names: ``latest`` (None when there is none yet, so
    a first run and a resumed one share one command line), a checkpoint folder, or the name of
    one inside ``output_dir`` (``checkpoint-500``), as in diffusers' examples."""
    if value is None:
        return None
    if value == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    folder = Path(value)
    if not folder.exists() and (Path(output_dir) / value).exists():
        folder = Path(output_dir) / value
    if not (folder / STATE_FILE).is_file():
        raise ValueError(f"{folder} is not a complete checkpoint (no {STATE_FILE} in it)")
    return folder


class Checkpointer:
    """Saves and restores checkpoints of one run through accelerate's state hooks.

    ``save_lora(model, folder)`` and ``load_lora(model, folder)`` handle the trainable model, so a
    checkpoint carries the LoRA only, never the frozen base weights.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str | Path,
        total_limit: int | None,
        save_lora: Callable[[torch.nn.Module, Path], None],
        load_lora: Callable[[torch.nn.Module, Path], None],
    ) -> None:
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit

        def save_hook(models, weights, folder):
            for model in models:
                if accelerator.is_main_process:
                    save_lora(accelerator.unwrap_model(model), Path(folder))
                weights.pop()

        def load_hook(models, folder):
            while models:
                load_lora(accelerator.unwrap_model(models.pop()), Path(folder))

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def save(self, progress: TrainingProgress) -> Path:
        """Write ``checkpoint-<global_step>`` (every rank calls this); returns its folder."""
        final = self.output_dir / f"checkpoint-{progress.global_step}"
        partial = self.output_dir / f".checkpoint-{progress.global_step}.partial"
        if self.accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            _write_json(partial / STATE_FILE, asdict(progress))
            replaced = self.output_dir / f".checkpoint-{progress.global_step}.replaced"
            if final.exists():  # a rerun reaching the same step again: swap, then delete the old
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(partial, final)
            shutil.rmtree(replaced, ignore_errors=True)
            self._rotate()
            logger.info("saved %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def restore(self, folder: Path) -> TrainingProgress:
        """Load a checkpoint's LoRA, optimizer, scheduler and RNG state; returns its progress."""
        self.accelerator.load_state(str(folder))
        progress = TrainingProgress(**json.loads((folder / STATE_FILE).read_text()))
        logger.info("resumed from %s at step %d", folder, progress.global_step)
        return progress

    def _rotate(self) -> None:
        if self.total_limit is None:
            return
        checkpoints = complete_checkpoints(self.output_dir)
        for _, folder in checkpoints[: max(0, len(checkpoints) - self.total_limit)]:
            shutil.rmtree(folder)
            logger.info("removed %s (--checkpoints_total_limit %d)", folder, self.total_limit)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
