"""The shared training loop: optimizer, schedule, accumulation, logging, checkpoints, resume.

A script hands it a prepared model, the dataset with its batch sampler, and ``compute_loss``, the
family's loss for one batch; everything a run does between batches happens here. :class:`Run`
holds what any driver of optimizer steps shares (optimizer, schedule, checkpoints and exact
resume, metrics, validation, the final save); :func:`train` drives it with supervised batches,
``training.grpo.policy`` with sampled groups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.images import DataError
from training.checkpointing.checkpoints import (
    BatchLayout,
    Checkpointer,
    TrainingProgress,
    resolve_checkpoint,
    run_identity,
)
from training.checkpointing.output_dir import RunLock
from training.checkpointing.sharding import is_sharded_tensor, whole_trainable_parameters
from training.checkpointing.stopping import NonFiniteSteps, StopSignals, describe_items
from training.compiling import compile_repeated_blocks
from training.config import LoraFileConfig, TrainConfig
from training.inputs.captions import CaptionDropout
from training.lora.adapters import SAVE_DTYPES, cast_lora_file
from training.lora.export import LORA_WEIGHTS_NAME
from training.metrics import MetricsLog, mean_across_ranks
from training.model_card import ModelCardInfo, publish_run
from training.optimizers import (
    averaged_weights,
    build_optimizer,
    scheduler_warmup_steps,
    use_averaged_weights,
)
from training.runtime import keep_frozen_parameters_local, step_generator

logger = logging.getLogger(__name__)

# (prepared model, batch on device, generator) -> (loss, components by name). The prepared model
# must be the one called: under DDP only its forward synchronises gradients across ranks.
LossFn = Callable[
    [torch.nn.Module, dict, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]
]


@dataclass
class TrainingParts:
    """What a script builds for the loop. ``sampler`` is a ``data.BucketBatchSampler`` (or any
    batch sampler with ``set_epoch(epoch, start_batch)`` and ``batches_per_epoch``) yielding this
    rank's batches, a multiple of --gradient_accumulation_steps per epoch. ``validate(model, step)``
    runs on the main process; a mapping it returns (metric name -> number) joins that step's
    record in metrics.jsonl. ``caption_dropout`` (--caption_dropout) replaces some prompts of each
    batch before ``compute_loss`` sees it."""

    model: torch.nn.Module
    dataset: Dataset
    sampler: object
    collate_fn: Callable[[list], dict]
    compute_loss: LossFn
    save_lora: Callable[[torch.nn.Module, Path], None]
    load_lora: Callable[[torch.nn.Module, Path], None]
    card: ModelCardInfo
    validate: Callable[[torch.nn.Module, int], Mapping[str, float] | None] | None = None
    caption_dropout: CaptionDropout | None = None


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: --max_train_steps, else epochs x steps per epoch."""
    if config.max_train_steps is not None:
        return config.max_train_steps
    return config.num_train_epochs * (batches_per_epoch // config.gradient_accumulation_steps)


def epoch_batches(parts, config: TrainConfig, epoch: int, skip: int):
    """This rank's batches of ``epoch``, without the first ``skip`` (already trained on).

    ``parts`` has the ``dataset``, ``sampler`` and ``collate_fn`` of :class:`TrainingParts`.
    """
    parts.sampler.set_epoch(epoch, start_batch=skip)
    return DataLoader(
        parts.dataset,
        batch_sampler=parts.sampler,
        collate_fn=parts.collate_fn,
        num_workers=config.dataloader_num_workers,
        # Creating the iterator draws worker seeds; from a seeded generator, not the global RNG.
        generator=torch.Generator().manual_seed(config.seed + epoch),
    )


class Run:
    """What happens around the batches of a run, whatever drives them (this module's supervised
    loop, or ``training.grpo.policy``): the --optimizer over the LoRA, the LR schedule, accelerate's
    preparation, checkpoints with exact resume, ``metrics.jsonl``, trackers, validation, the
    final save.

    ``model`` is the prepared model (DDP-wrapped on several ranks); ``progress`` is where the run
    stands, restored from --resume_from_checkpoint when given.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        config: TrainConfig,
        parts,
        max_steps: int,
    ) -> None:
        """``parts`` has the ``model``, ``dataset``, ``save_lora``, ``load_lora``, ``card`` and
        ``validate`` of :class:`TrainingParts`."""
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        self.accelerator = accelerator
        self.config = config
        self.parts = parts
        self.max_steps = max_steps
        if config.compile:
            compile_repeated_blocks(parts.model)
        optimizer = build_optimizer(config, parts.model)
        # Stepped once per optimizer step (build_accelerator turns accelerate's own stepping
        # off), so the schedule counts optimizer steps whatever the number of processes.
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=scheduler_warmup_steps(config),
            num_training_steps=max_steps,
        )
        keep_frozen_parameters_local(parts.model)
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(
            parts.model, optimizer, lr_scheduler
        )
        self.checkpointer = Checkpointer(
            accelerator,
            config.output_dir,
            config.checkpoints_total_limit,
            parts.save_lora,
            parts.load_lora,
            BatchLayout(
                accelerator.num_processes,
                config.train_batch_size,
                config.gradient_accumulation_steps,
            ),
            run_identity(config, parts.model),
            (self.model, self.optimizer, self.lr_scheduler),
        )
        resume_from = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
        self.progress = (
            self.checkpointer.restore(resume_from) if resume_from else TrainingProgress()
        )
        self.metrics = MetricsLog(
            config.output_dir,
            resume_step=self.progress.global_step,
            enabled=accelerator.is_main_process,
        )
        if accelerator.is_main_process:
            accelerator.init_trackers(Path(config.output_dir).name, config=_tracker_config(config))
        self.trainable = [param for param in self.model.parameters() if param.requires_grad]
        self.bar = tqdm(
            total=max_steps,
            initial=self.progress.global_step,
            desc="steps",
            disable=not accelerator.is_main_process,
        )
        self.signals = StopSignals(config.save_on_signal)
        self.nonfinite = NonFiniteSteps(config.max_nonfinite_steps)
        self.stopped = False
        self.last_indices: list[int] = []
        self._finite = True
        self._skipped = False

    @property
    def done(self) -> bool:
        return self.progress.global_step >= self.max_steps

    @property
    def should_stop(self) -> bool:
        """The run is complete, or stopped early (a signal) after a checkpoint."""
        return self.done or self.stopped

    def saw(self, batch: dict) -> None:
        """Note the items of the batch being trained on, for messages about it."""
        self.last_indices = batch["index"].tolist()

    def optimizer_step(self, loss: torch.Tensor | None = None) -> None:
        """Clip, step and zero the gradients; advance the schedule. Inside ``accelerate``'s
        ``accumulate`` only the micro-batch that ends an accumulation steps.

        A step whose ``loss`` (any micro-batch's) or gradient norm is not finite on any rank is
        skipped on every rank (its gradients dropped; the schedule still advances, so step and
        learning rate stay paired). With fp16, the grad scaler does this itself.
        """
        accelerator, config = self.accelerator, self.config
        if loss is not None:
            self._finite &= bool(torch.isfinite(loss.detach()).all())
        if not accelerator.sync_gradients:
            self.optimizer.step()  # accelerate makes this a no-op until the last micro-batch
            self.optimizer.zero_grad(set_to_none=True)
            return
        self._skipped = False
        if accelerator.scaler is None:
            limit = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
            norm = accelerator.clip_grad_norm_(self.trainable, limit)
            finite = torch.tensor(
                [float(self._finite and bool(torch.isfinite(norm)))], device=accelerator.device
            )
            self._finite = True
            if accelerator.num_processes > 1:
                finite = accelerator.gather(finite)
            self._skipped = not bool(finite.all())
        elif config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
        if not self._skipped:
            self.optimizer.step()
        if self._skipped or not accelerator.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def validation_due(self, step: int) -> bool:
        return _validation_due(self.config, step, self.max_steps)

    def validate_at_start(self) -> None:
        """With --validation_at_start, validate a fresh run before its first step (step 0):
        what the model does before training, beside what it learns."""
        config = self.config
        if config.validation_steps is None or not config.validation_at_start:
            return
        if self.progress.global_step == 0:
            _validate(self.accelerator, self.parts, self.model, 0)

    def end_step(
        self, progress: TrainingProgress, values: dict[str, float], may_stop: bool = True
    ) -> None:
        """Book the optimizer step that brought the run to ``progress``: its record (step,
        epoch, lr, ``values`` by name, ``nonfinite_skipped``, and validation metrics when due)
        goes to metrics.jsonl and the trackers; a checkpoint is written when due.

        Where ``may_stop`` (a point a checkpoint can resume from), a stop signal on any rank
        writes a checkpoint and stops the run (:attr:`should_stop`).

        Raises:
            RuntimeError: after --max_nonfinite_steps skipped steps in a row, once a checkpoint
                is written; the message names the last batch's files.
        """
        self.progress = progress
        step = progress.global_step
        lr = self.lr_scheduler.get_last_lr()[0]
        record = {"step": step, "epoch": progress.epoch, "lr": lr, **values}
        record["nonfinite_skipped"] = int(self._skipped)
        if self.validation_due(step):
            with averaged_weights(self.optimizer):
                record.update(_validate(self.accelerator, self.parts, self.model, step))
        self.metrics.write(record)
        self.accelerator.log(record, step=step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        saved = step % self.config.checkpointing_steps == 0
        if saved:
            self.checkpointer.save(progress)
        if self.nonfinite.record(not self._skipped):
            if not saved:
                self.checkpointer.save(progress)
            raise RuntimeError(
                f"{self.nonfinite.in_a_row} steps in a row had a non-finite loss or gradient "
                f"(up to step {step}); stopped after saving checkpoint-{step}. Last batch: "
                f"{describe_items(self.parts.dataset, self.last_indices)}. Check those files, "
                "or lower the learning rate, and resume with --resume_from_checkpoint latest."
            )
        if may_stop and self._stop_requested():
            if not saved:
                self.checkpointer.save(progress)
            self.stopped = True
            logger.warning(
                "stopped at step %d (%s) after saving checkpoint-%d; resume with "
                "--resume_from_checkpoint latest",
                step,
                self.signals.requested or "a signal on another rank",
                step,
            )

    @contextmanager
    def checkpointed_on_data_error(self) -> Iterator[None]:
        """Around the steps: a file that turns out bad mid-run (changed or damaged since the
        up-front check) stops the run with its error, after a checkpoint of the last completed
        step, so that the steps since the previous checkpoint are not lost. (On several ranks
        the others cannot join the save: the previous checkpoint stays the one to resume
        from.) Any error puts the signal handlers back."""
        try:
            yield
        except BaseException as error:
            self.signals.close()  # the run ends here: SIGTERM and Ctrl+C act as usual again
            if isinstance(error, DataError):
                self._checkpoint_before_stopping()
            raise

    def _checkpoint_before_stopping(self) -> None:
        step = self.progress.global_step
        folder = Path(self.config.output_dir) / f"checkpoint-{step}"
        if step > 0 and self.accelerator.num_processes == 1 and not folder.exists():
            self.checkpointer.save(self.progress)
            logger.error(
                "saved checkpoint-%d before stopping on the data error below; fix the file "
                "and resume with --resume_from_checkpoint latest",
                step,
            )

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (ranks may receive it at different steps)."""
        requested = torch.tensor([float(self.signals.requested is not None)])
        if self.accelerator.num_processes > 1:
            requested = self.accelerator.gather(requested.to(self.accelerator.device))
        return bool(requested.any())

    def finish(self) -> TrainingProgress:
        """Check that the ranks agree, save the final LoRA, close the trackers; then the main
        process writes the model card (and uploads the folder with --push_to_hub). A run
        stopped early by a signal does neither: its checkpoint holds its state."""
        accelerator = self.accelerator
        self.bar.close()
        self.signals.close()
        _check_replicas_agree(accelerator, self.trainable)
        use_averaged_weights(self.optimizer)
        if not self.stopped:
            # Sharded (FSDP2): every rank gathers the LoRA, the main process writes it.
            with whole_trainable_parameters(accelerator.unwrap_model(self.model)) as model:
                if accelerator.is_main_process:
                    self.parts.save_lora(model, Path(self.config.output_dir))
                    if isinstance(self.config, LoraFileConfig) and self.config.save_dtype != "fp32":
                        lora = Path(self.config.output_dir) / LORA_WEIGHTS_NAME
                        cast_lora_file(lora, SAVE_DTYPES[self.config.save_dtype])
                    logger.info("saved the LoRA to %s", self.config.output_dir)
        # Every rank tears the process group down together, after the last file is written.
        accelerator.wait_for_everyone()
        self._release_replicas()
        accelerator.end_training()
        if accelerator.is_main_process:
            if not self.stopped:
                publish_run(
                    self.config,
                    self.parts.card,
                    steps=self.progress.global_step,
                    examples=len(self.parts.dataset),
                    processes=accelerator.num_processes,
                )
            RunLock(self.config.output_dir).release()
        return self.progress

    def _release_replicas(self) -> None:
        """Free the DDP wrapper, optimizer and schedule before the process group goes.

        The wrapper holds the group: freed after ``destroy_process_group`` (when the caller's
        frame unwinds, or at exit), gloo's teardown can wait forever on a peer that already left.
        The loops therefore keep no reference of their own to ``self.model``.
        """
        self.model = self.accelerator.unwrap_model(self.model)
        self.optimizer = self.lr_scheduler = self.checkpointer = None
        self.accelerator.free_memory()


def train(accelerator: Accelerator, config: TrainConfig, parts: TrainingParts) -> TrainingProgress:
    """Run (or resume) training; returns the final progress. Every rank calls this.

    Writes ``metrics.jsonl``, ``checkpoint-<step>/`` every --checkpointing_steps, validation
    images every --validation_steps and at the end, and the final LoRA in ``output_dir``. Log
    lines are printed above the progress bar, not into it.
    """
    with logging_redirect_tqdm():
        return _train(accelerator, config, parts)


def _train(accelerator: Accelerator, config: TrainConfig, parts: TrainingParts):
    batches_per_epoch = parts.sampler.batches_per_epoch
    accumulation = config.gradient_accumulation_steps
    run = Run(accelerator, config, parts, total_steps(config, batches_per_epoch))
    logger.info(
        "training %d steps: %d batches of %d per epoch and rank, %d ranks, accumulation %d",
        run.max_steps,
        batches_per_epoch,
        config.train_batch_size,
        accelerator.num_processes,
        accumulation,
    )
    log_repeated_batches(parts.sampler, accelerator, accumulation)
    run.validate_at_start()
    run.model.train()
    epoch, consumed = run.progress.epoch, run.progress.batches_in_epoch
    with run.checkpointed_on_data_error():
        _supervised_steps(run, parts, config, epoch, consumed)
    return run.finish()


def _supervised_steps(run: Run, parts: TrainingParts, config: TrainConfig, epoch, consumed):
    """The supervised loop's optimizer steps, from ``epoch`` after ``consumed`` batches."""
    accelerator, accumulation = run.accelerator, config.gradient_accumulation_steps
    sums: dict[str, torch.Tensor] = {}
    while not run.should_stop:
        for batch in epoch_batches(parts, config, epoch, consumed):
            # Ranks take every num_processes-th batch of the epoch's global order.
            position = consumed * accelerator.num_processes + accelerator.process_index
            generator = step_generator(config.seed, epoch, position, accelerator.device)
            run.saw(batch)
            if parts.caption_dropout is not None:
                batch = parts.caption_dropout(batch, generator)
            with accelerator.accumulate(run.model):
                loss, components = parts.compute_loss(
                    run.model, send_to_device(batch, accelerator.device), generator
                )
                accelerator.backward(loss)
                run.optimizer_step(loss)
            consumed += 1
            for name, value in {"loss": loss, **components}.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
            if not accelerator.sync_gradients:
                continue
            means = mean_across_ranks(accelerator, {k: v / accumulation for k, v in sums.items()})
            sums = {}
            run.end_step(TrainingProgress(run.progress.global_step + 1, epoch, consumed), means)
            if run.should_stop:
                break
        else:
            epoch, consumed = epoch + 1, 0


def log_repeated_batches(sampler, accelerator: Accelerator, accumulation: int) -> None:
    repeated = getattr(sampler, "repeated_batches", 0)
    if repeated:
        logger.info(
            "each epoch repeats %d batch(es) from its start so that every rank runs whole "
            "optimizer steps (%d ranks x accumulation %d)",
            repeated,
            accelerator.num_processes,
            accumulation,
        )


def _check_replicas_agree(accelerator: Accelerator, trainable: list[torch.Tensor]) -> None:
    """Raise unless every rank ends with the same trainable weights, as DDP must keep them."""
    if accelerator.num_processes == 1 or any(is_sharded_tensor(p) for p in trainable):
        return  # one copy (sharded parameters are a single copy by construction)
    flat = torch.cat([param.detach().double().flatten() for param in trainable])
    position = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    digest = torch.stack([flat.sum(), (flat * flat).sum(), (flat * position).sum()])
    digests = accelerator.gather(digest[None])
    if not torch.equal(digests, digests[:1].expand_as(digests)):
        raise RuntimeError(f"LoRA weights differ across ranks: digests {digests.tolist()}")
    logger.info("LoRA weights identical on all %d ranks", accelerator.num_processes)


def _validation_due(config: TrainConfig, step: int, max_steps: int) -> bool:
    if config.validation_steps is None:
        return False
    return step % config.validation_steps == 0 or step == max_steps


def _validate(accelerator: Accelerator, parts: TrainingParts, model, step: int) -> dict:
    """Run ``parts.validate`` on the main process; the metrics it returned ({} elsewhere)."""
    results = None
    if parts.validate is not None and accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        with torch.no_grad():
            results = parts.validate(unwrapped, step)
        unwrapped.train()
        if isinstance(results, Path):
            logger.info("step %d: validation images in %s", step, results)
        elif isinstance(results, Mapping):
            shown = ", ".join(f"{name} {value:.4g}" for name, value in results.items())
            logger.info("step %d: validation %s", step, shown)
    accelerator.wait_for_everyone()
    return dict(results) if isinstance(results, Mapping) else {}


def _tracker_config(config: TrainConfig) -> dict:
    # Trackers accept scalars and strings only.
    return {k: v for k, v in vars(config).items() if isinstance(v, int | float | str | bool)}
