"""Resumable checkpoints: ``checkpoint-<step>/`` is complete or absent, never half written.

A checkpoint holds the LoRA in diffusers' safetensors format, accelerate's optimizer, scheduler
and RNG state, and ``training_state.json`` (step, epoch, how many batches of that epoch were
consumed, and the batch layout that position is counted in). It is written under a hidden
``.checkpoint-<step>.partial`` name and renamed once everything is on disk, and the state file is
written last, so neither a crash nor a stray folder can be taken for a checkpoint.

A run resumed with another number of processes continues exactly where it stopped as long as
the global batch (processes x accumulation x batch size) is the same; anything else is refused
with a message saying what changed, since the data position and the schedule would not mean
what they meant.
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


@dataclass(frozen=True)
class BatchLayout:
    """How a run splits each optimizer step's data: processes x accumulation micro-batches of
    ``train_batch_size`` items each."""

    num_processes: int
    train_batch_size: int
    gradient_accumulation_steps: int

    @property
    def batches_per_step(self) -> int:
        """Micro-batches, summed over all ranks, that make one optimizer step."""
        return self.num_processes * self.gradient_accumulation_steps

    def describe(self) -> str:
        return (
            f"{self.num_processes} process(es) x accumulation {self.gradient_accumulation_steps}"
            f" x batch {self.train_batch_size} = {self.batches_per_step * self.train_batch_size}"
            " items per step"
        )


def convert_progress(
    progress: TrainingProgress, saved: BatchLayout, current: BatchLayout, folder: Path
) -> TrainingProgress:
    """``progress`` counted in ``saved``'s layout, re-counted in ``current``'s.

    Every rank takes every ``num_processes``-th batch of one global order, so with the same
    micro-batch size and the same micro-batches per step, a position of ``b`` batches per rank
    is ``b * saved.num_processes`` global batches: the same optimizer steps, items and schedule.

    Raises:
        ValueError: naming ``folder``, what changed and how to proceed, when the layouts differ
            in batch size or in items per optimizer step.
    """
    if saved == current:
        return progress
    if (
        saved.train_batch_size != current.train_batch_size
        or saved.batches_per_step != current.batches_per_step
    ):
        keep = saved.batches_per_step / current.num_processes
        hint = (
            f" Resume with --train_batch_size {saved.train_batch_size} and "
            f"--gradient_accumulation_steps {int(keep)} to keep the global batch"
            if keep == int(keep)
            else ""
        )
        raise ValueError(
            f"{folder} was written by a run of {saved.describe()}; this run has "
            f"{current.describe()}, so its data position and learning-rate schedule would not "
            f"match.{hint}, or start a new run from its LoRA with --init_lora_weights "
            f"{folder / 'pytorch_lora_weights.safetensors'}."
        )
    global_batches = progress.batches_in_epoch * saved.num_processes
    logger.info("converting %s from %s to %s", folder.name, saved.describe(), current.describe())
    return TrainingProgress(
        progress.global_step, progress.epoch, global_batches // current.num_processes
    )


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


# The one folder --overwrite_output_dir keeps: latents keyed by content stay valid.
_KEPT_ON_OVERWRITE = "cache"


def prepare_output_dir(
    output_dir: str | Path, resume: str | None, overwrite: bool, is_main_process: bool
) -> None:
    """Refuse to start a fresh run on top of another run's checkpoints, or clear them.

    A fresh run (no ``--resume_from_checkpoint``) in a folder holding checkpoints would mix two
    runs: ``latest`` could later resume the other run's weights. It raises ``ValueError`` unless
    ``overwrite`` (--overwrite_output_dir), which deletes everything the earlier run left in the
    folder but its latent cache (keyed by content, so still valid), on the main process.
    """
    root = Path(output_dir)
    existing = complete_checkpoints(root)
    if resume is not None or not existing:
        return
    if not overwrite:
        names = ", ".join(folder.name for _, folder in existing)
        raise ValueError(
            f"{root} already holds checkpoints of another run ({names}). Pass "
            "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to delete "
            "them and start afresh, or choose another --output_dir."
        )
    if is_main_process:
        for path in root.iterdir():
            if path.name == _KEPT_ON_OVERWRITE:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        logger.info("--overwrite_output_dir: removed the earlier run's outputs from %s", root)


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
        layout: BatchLayout,
    ) -> None:
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be >= 1, got {total_limit}")
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        self.layout = layout

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
            _write_json(partial / STATE_FILE, {**asdict(progress), "layout": asdict(self.layout)})
            replaced = self.output_dir / f".checkpoint-{progress.global_step}.replaced"
            if final.exists():  # a rerun reaching the same step again: swap, then delete the old
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(partial, final)
            shutil.rmtree(replaced, ignore_errors=True)
            logger.info("saved %s", final)
            self._rotate(progress.global_step)
        self.accelerator.wait_for_everyone()
        return final

    def restore(self, folder: Path) -> TrainingProgress:
        """Load a checkpoint's LoRA, optimizer, scheduler and RNG state; returns its progress,
        counted in this run's batch layout (see :func:`convert_progress`)."""
        state = json.loads((folder / STATE_FILE).read_text())
        saved = BatchLayout(**state.pop("layout")) if "layout" in state else self.layout
        progress = convert_progress(TrainingProgress(**state), saved, self.layout, folder)
        self.accelerator.load_state(str(folder))
        # accelerate's micro-batch counter decides when accumulation ends; a checkpoint sits at
        # an optimizer step's boundary, whatever the saved counter says in another layout.
        self.accelerator.step = progress.global_step * self.layout.gradient_accumulation_steps
        logger.info("resumed from %s at step %d", folder, progress.global_step)
        later = [
            p.name for s, p in complete_checkpoints(self.output_dir) if s > progress.global_step
        ]
        if later:
            logger.warning(
                "%s continue(s) the interrupted history past step %d; this run replaces them "
                "as it reaches them (or removes them under --checkpoints_total_limit)",
                ", ".join(later),
                progress.global_step,
            )
        return progress

    def _rotate(self, current_step: int) -> None:
        """Apply --checkpoints_total_limit after ``checkpoint-<current_step>`` was written: keep
        it and the newest earlier ones. Checkpoints past it belong to the run this one resumed
        from an earlier step and no longer continue this run's history, so they go first."""
        if self.total_limit is None:
            return
        others = [
            (step, folder)
            for step, folder in complete_checkpoints(self.output_dir)
            if step != current_step
        ]
        earlier = [folder for step, folder in others if step < current_step]
        keep = set(earlier[-(self.total_limit - 1) :] if self.total_limit > 1 else [])
        for _, folder in others:
            if folder not in keep:
                shutil.rmtree(folder)
                logger.info("removed %s (--checkpoints_total_limit %d)", folder, self.total_limit)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
