"""Resumable checkpoints: ``checkpoint-<step>/`` is complete or absent, never half written.

A checkpoint holds the LoRA in diffusers' safetensors format, the optimizer, schedule and RNG
state in safetensors + JSON (never pickle), and ``training_state.json`` (step, epoch, how many
batches of that epoch were consumed, the batch layout that position is counted in, what run it
belongs to, and a digest of every file). It is written under a hidden
``.checkpoint-<step>.partial`` name and renamed once everything is on disk, and the state file is
written last, so neither a crash nor a stray folder can be taken for a checkpoint.

A run resumed with another number of processes continues exactly where it stopped as long as
the global batch (processes x accumulation x batch size) is the same; anything else is refused
with a message saying what changed, since the data position and the schedule would not mean
what they meant.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from safetensors import SafetensorError

from data.images import DataError
from training.checkpointing.sharding import (
    is_sharded,
    local_optimizer_state,
    sharded_optimizer_state,
    whole_trainable_parameters,
)
from training.checkpointing.state_io import load_state, rng_state, save_state, set_rng_state
from training.optimizers import averaged_weights, resume_training_weights

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


class Checkpointer:
    """Saves and restores the checkpoints of one run, without pickle.

    A checkpoint holds the trainable state only: ``save_lora(model, folder)`` writes the LoRA
    (or adapter) and ``load_lora(model, folder)`` reads it back; the optimizer, the LR schedule,
    the fp16 grad scaler and every rank's RNG go through :mod:`training.checkpointing.state_io`
    (safetensors + JSON). ``training_state.json``, written last, holds the progress, the batch
    layout, the run's ``identity`` (script, base model, trainable tensors' shapes) and a sha256 of
    every file, so a changed or damaged file is refused by name instead of resuming inexactly.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str | Path,
        total_limit: int | None,
        save_lora: Callable[[torch.nn.Module, Path], None],
        load_lora: Callable[[torch.nn.Module, Path], None],
        layout: BatchLayout,
        identity: dict,
        training_objects: tuple,
    ) -> None:
        """``training_objects`` is the prepared ``(model, optimizer, lr_scheduler)``."""
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be >= 1, got {total_limit}")
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        self.save_lora = save_lora
        self.load_lora = load_lora
        self.layout = layout
        self.identity = identity
        self.model, self.optimizer, self.lr_scheduler = training_objects

    def save(self, progress: TrainingProgress) -> Path:
        """Write ``checkpoint-<global_step>`` (every rank calls this); returns its folder.

        Raises:
            RuntimeError: on every rank, when any rank could not write its part (a full disk,
                say); the partial folder is removed and earlier checkpoints are untouched.
        """
        accelerator = self.accelerator
        final = self.output_dir / f"checkpoint-{progress.global_step}"
        partial = self.output_dir / f".checkpoint-{progress.global_step}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with averaged_weights(self.optimizer):
            failure = self._write_state(partial)
        self._raise_if_any_rank_failed(failure, final, partial)
        if accelerator.is_main_process:
            failure = self._seal(partial, progress)
        self._raise_if_any_rank_failed(failure, final, partial)
        if accelerator.is_main_process:
            replaced = self.output_dir / f".checkpoint-{progress.global_step}.replaced"
            if final.exists():  # a rerun reaching the same step again: swap, then delete the old
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(final, replaced)
            os.replace(partial, final)
            shutil.rmtree(replaced, ignore_errors=True)
            logger.info("saved %s", final)
            self._rotate(progress.global_step)
        accelerator.wait_for_everyone()
        return final

    def _write_state(self, folder: Path) -> Exception | None:
        """This rank's files: its RNG (and under FSDP2 its shard of the optimizer state); on the
        main process also the LoRA (gathered from every rank when sharded), the optimizer and
        the schedule."""
        accelerator = self.accelerator
        sharded = is_sharded(self.model)
        try:
            with whole_trainable_parameters(accelerator.unwrap_model(self.model)) as model:
                if accelerator.is_main_process:
                    self.save_lora(model, folder)
            if sharded:  # each rank holds its shard of the optimizer state
                optimizer_state = local_optimizer_state(self.optimizer.state_dict())
                save_state(optimizer_state, folder, f"optimizer-{accelerator.process_index}")
            if accelerator.is_main_process:
                if not sharded:
                    save_state(self.optimizer.state_dict(), folder, "optimizer")
                save_state(self.lr_scheduler.state_dict(), folder, "scheduler")
                if accelerator.scaler is not None:
                    save_state(accelerator.scaler.state_dict(), folder, "scaler")
            save_state(rng_state(), folder, f"rng-{accelerator.process_index}")
        except (OSError, SafetensorError) as error:  # safetensors reports a full disk its way
            return error
        return None

    def _seal(self, folder: Path, progress: TrainingProgress) -> Exception | None:
        """Write ``training_state.json`` with the digests of everything in ``folder``."""
        digests = {
            str(path.relative_to(folder)): _sha256(path)
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        state = {
            **asdict(progress),
            "layout": asdict(self.layout),
            "identity": self.identity,
            "files": digests,
        }
        try:
            _write_json(folder / STATE_FILE, state)
        except OSError as error:
            return error
        return None

    def _raise_if_any_rank_failed(
        self, failure: Exception | None, final: Path, partial: Path
    ) -> None:
        """Every rank learns whether any rank failed, so that none waits on the others."""
        accelerator = self.accelerator
        failed = torch.tensor([failure is not None], device=accelerator.device)
        if accelerator.num_processes > 1:
            failed = accelerator.gather(failed)
        if not failed.any():
            return
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        earlier = [folder.name for _, folder in complete_checkpoints(self.output_dir)]
        kept = f"; {', '.join(earlier)} untouched" if earlier else ""
        raise RuntimeError(
            f"could not write {final.name}: {failure or 'another rank failed'}{kept}. Free space "
            "(or fix the folder) and run again with --resume_from_checkpoint latest."
        ) from failure

    def restore(self, folder: Path) -> TrainingProgress:
        """Load a checkpoint's LoRA, optimizer, schedule, grad scaler and RNG; returns its
        progress, counted in this run's batch layout (see :func:`convert_progress`).

        Raises:
            DataError: a file is missing, changed since it was written, or unreadable; or the
                checkpoint belongs to another run (script, base model, LoRA shape).
        """
        accelerator = self.accelerator
        state = read_checkpoint_state(folder)
        saved_identity = state.pop("identity")
        state.pop("files")
        check_identity(saved_identity, self.identity, folder)
        saved = BatchLayout(**state.pop("layout"))
        progress = convert_progress(TrainingProgress(**state), saved, self.layout, folder)
        model = accelerator.unwrap_model(self.model)
        with whole_trainable_parameters(model, write_back=True):
            self.load_lora(model, folder)
        optimizer_file = (
            f"optimizer-{accelerator.process_index}" if is_sharded(self.model) else "optimizer"
        )
        if not (folder / f"{optimizer_file}.json").is_file():
            # The optimizer state is one file unsharded, one shard per rank under FSDP2.
            raise DataError(
                f"{folder} holds no {optimizer_file}.json: it was written "
                f"{'without' if is_sharded(self.model) else 'with'} FSDP sharding or by another "
                "number of processes. Resume with the accelerate config and process count it was "
                "written with, or start a new run from its LoRA with --init_lora_weights "
                f"{folder / 'pytorch_lora_weights.safetensors'}."
            )
        optimizer_state = load_state(folder, optimizer_file)
        if is_sharded(self.model):
            optimizer_state = sharded_optimizer_state(optimizer_state, self.optimizer)
        self.optimizer.load_state_dict(optimizer_state)
        resume_training_weights(self.optimizer)
        self.lr_scheduler.load_state_dict(load_state(folder, "scheduler"))
        if accelerator.scaler is not None and (folder / "scaler.json").exists():
            accelerator.scaler.load_state_dict(load_state(folder, "scaler"))
        rng = f"rng-{accelerator.process_index}"
        if (folder / f"{rng}.json").exists():
            set_rng_state(load_state(folder, rng))
        else:
            logger.warning(
                "%s holds no RNG state for rank %d (written by %d processes); its draws start "
                "from --seed",
                folder.name,
                accelerator.process_index,
                saved.num_processes,
            )
        # accelerate's micro-batch counter decides when accumulation ends; a checkpoint sits at
        # an optimizer step's boundary, whatever the saved counter says in another layout.
        accelerator.step = progress.global_step * self.layout.gradient_accumulation_steps
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


# Flags a resumed run may change: how long and how often (steps, checkpoints, validation,
# logging), where things go, and how memory is spent where that leaves the computation as it
# was. The batch layout is checked apart (``convert_progress``). Every other flag defines the run.
RESUMABLE_CHANGES = frozenset(
    {
        "max_train_steps",
        "num_train_epochs",
        "train_batch_size",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "output_dir",
        "save_on_signal",
        "max_nonfinite_steps",
        "save_dtype",
        "validation_steps",
        "validation_prompt",
        "validation_prompts",
        "validation_images",
        "validation_masks",
        "validation_at_start",
        "num_validation_images",
        "validation_inference_steps",
        "validation_data_dir",
        "report_to",
        "push_to_hub",
        "hub_model_id",
        "hub_private",
        "dataloader_num_workers",
        "cache_latents",
        "cache_dir",
        "offload_encoders",
        "offload_blocks",
        "gradient_checkpointing",
        "compile",
        "debug",
        "init_lora_weights",  # the checkpoint's LoRA replaces it; its shape is checked apart
        "false_colour_bands",
        "allow_paths_outside_data",
    }
)


# Flags the identity holds on their own (the base model and its quantization), and the token,
# which no file should keep.
_NOT_SETTINGS = frozenset({"pretrained_model_name_or_path", "quantize_base", "hub_token"})


def run_settings(config) -> dict:
    """The flags of ``config`` as JSON values (nested blocks dotted), but :data:`_NOT_SETTINGS`."""
    settings = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if item.name in _NOT_SETTINGS:
            continue
        if dataclasses.is_dataclass(value):
            settings |= {f"{item.name}.{k}": v for k, v in dataclasses.asdict(value).items()}
        else:
            settings[item.name] = (
                value
                if isinstance(value, int | float | str | bool) or (value is None)
                else str(value)
            )
    return settings


def run_identity(config, model: torch.nn.Module) -> dict:
    """What a checkpoint must share with the run resuming it: the script's config class, the
    base model and its quantization, the names and shapes of the trainable tensors (LoRA rank
    and layers, or an adapter's shape), and the flags that define the run (``settings``)."""
    return {
        "script": type(config).__name__,
        "base_model": str(config.pretrained_model_name_or_path),
        "quantize_base": getattr(config, "quantize_base", "none"),
        "trainable": {
            name: list(param.shape)
            for name, param in model.named_parameters()
            if param.requires_grad
        },
        "settings": run_settings(config),
    }


def check_identity(saved: dict, current: dict, folder: Path) -> None:
    """Refuse a checkpoint of another run, saying what differs."""
    # Checkpoints from before quantization existed were trained on an unquantized base.
    saved = {"quantize_base": "none", **saved}
    problems = [
        f"{what} {saved[key]!r}, this run {current[key]!r}"
        for key, what in (
            ("script", "script config"),
            ("base_model", "base model"),
            ("quantize_base", "--quantize_base"),
        )
        if saved[key] != current[key]
    ]
    if saved["trainable"] != current["trainable"]:
        ours, theirs = current["trainable"], saved["trainable"]
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        reshaped = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
        details = [
            f"{len(missing)} not in this run (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} new in this run (e.g. {extra[0]})" if extra else "",
            (
                f"{len(reshaped)} of another shape (e.g. {reshaped[0]}: "
                f"{theirs[reshaped[0]]} in the checkpoint, {ours[reshaped[0]]} now)"
            )
            if reshaped
            else "",
        ]
        problems.append(
            "trainable tensors differ: "
            + "; ".join(d for d in details if d)
            + " (another --rank, --lora_layers or adapter option)"
        )
    # Checkpoints from before settings were recorded resume as they always did.
    before, now = saved.get("settings", {}), current.get("settings", {})
    changed = sorted(name for name in before.keys() & now.keys() if before[name] != now[name])
    allowed = [name for name in changed if name.split(".")[0] in RESUMABLE_CHANGES]
    defining = [name for name in changed if name not in allowed]
    if defining:
        problems.append(
            "settings differ: "
            + ", ".join(f"--{name} {before[name]!r} -> {now[name]!r}" for name in defining)
        )
    if problems:
        raise DataError(
            f"{folder} belongs to another run: {'; '.join(problems)}. Resume with the settings "
            f"it was written with, or start a new run from its weights with --init_lora_weights."
        )
    for name in allowed:
        logger.info("resuming with --%s %r (it was %r)", name, now[name], before[name])


def read_checkpoint_state(folder: Path) -> dict:
    """``training_state.json`` of ``folder``, after checking every file it lists against its
    sha256 (a file missing or changed since the save is a :class:`DataError` naming it)."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"'{path}': not a readable checkpoint state ({error})") from error
    if not isinstance(state, dict) or "files" not in state or "identity" not in state:
        raise DataError(
            f"'{path}': not a checkpoint of this version (no file digests); resume refused, "
            "since its state could only be read by unpickling"
        )
    for name, digest in state["files"].items():
        file = folder / name
        if not file.is_file():
            raise DataError(f"'{file}': listed in {STATE_FILE} but missing")
        if _sha256(file) != digest:
            raise DataError(
                f"'{file}': changed since the checkpoint was written (sha256 differs); "
                "resume refused. Use another checkpoint."
            )
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
