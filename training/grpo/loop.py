"""The GRPO training loop: sample groups, score them, update the LoRA; checkpoints and resume.

It drives the shared :class:`training.loop.Run` (optimizer, schedule, checkpoints, metrics,
validation, final save) with what ``training.grpo.policy`` computes. One optimizer step:

- each rank takes --gradient_accumulation_steps micro-batches of --train_batch_size examples
  from the shared bucketed sampler, as supervised training does, and samples a group of
  --num_generations images for each example: **a group lives on one rank**, whole, so
  advantages need no communication and mean the same on any number of ranks;
- the micro-batch at position ``p`` of an epoch's global order draws everything (masked-image
  latents, initial noise, the stochastic steps' noise, the SDE window, the trained steps) from
  ``step_generator(seed, epoch, p)``: a resumed run samples exactly what the uninterrupted run
  sampled, and a batch gets the same samples on 2 ranks as on 1 rank accumulating 2;
- the policy update back-propagates each trained step, synchronising gradients once;
- with --num_inner_epochs k, k optimizer steps reuse the same samples; checkpoints fall between
  sets of samples, so a checkpoint holds everything a resumed run needs (LoRA, optimizer,
  schedule, data position), never samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import Dataset
from tqdm.contrib.logging import logging_redirect_tqdm

from training.checkpointing.checkpoints import TrainingProgress
from training.grpo.policy import (
    GroupPreview,
    GRPOConfig,
    GRPOPolicy,
    policy_update,
    reward_metrics,
    sample_rollout,
    update_metrics,
)
from training.grpo.rewards import RewardOptions, Rewards
from training.loop import Run, TrainingParts, epoch_batches, log_repeated_batches, train
from training.model_card import ModelCardInfo
from training.runtime import step_generator
from training.validation import VALIDATION_DIR, image_grid, mask_overlay, to_pil

logger = logging.getLogger(__name__)


@dataclass
class GRPOParts:
    """What a script builds for GRPO: as ``training.loop.TrainingParts``, with the family's
    ``policy`` and the ``rewards`` instead of a loss. Dataset items hold ``image``, ``mask`` and
    ``prompt`` (the rewards score against them) and whatever the policy encodes."""

    model: torch.nn.Module
    dataset: Dataset
    sampler: object
    collate_fn: Callable[[list], dict]
    policy: GRPOPolicy
    rewards: Rewards
    save_lora: Callable[[torch.nn.Module, Path], None]
    load_lora: Callable[[torch.nn.Module, Path], None]
    card: ModelCardInfo
    validate: Callable[[torch.nn.Module, int], Mapping[str, float] | None] | None = None


class WithPixels(Dataset):
    """Items of a latent cache (``training.inputs.caching.CachedItems``) joined with the raw items
    they encode: rewards score pixels, which the cache does not keep."""

    def __init__(self, cached) -> None:
        self.cached = cached

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, index: int) -> dict:
        return {**self.cached.dataset[index], **self.cached[index]}


def grpo_items(items: Dataset, dataset: Dataset) -> Dataset:
    """What GRPO samples from: ``items`` when they are the raw ``dataset``, else the cached
    ``items`` with their pixels."""
    return items if items is dataset else WithPixels(items)


def _chunks(batches: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for batch in batches:
        chunk.append(batch)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:  # the sampler gives whole optimizer steps per epoch; never reached
        raise RuntimeError(f"an epoch ended inside an optimizer step ({len(chunk)} batches left)")


def save_group_preview(preview: GroupPreview, output_dir: str | Path, step: int) -> Path:
    """``<output_dir>/validation/rewards-step-<step>.png``: the source, its mask, and the group's
    images under their rewards."""
    source = to_pil(preview.source * 2 - 1)
    images = [to_pil(image * 2 - 1) for image in preview.images]
    row = [source, mask_overlay(source, preview.mask)]
    labels = ["source", "mask"] + [f"r={reward:.4g}" for reward in preview.rewards.tolist()]
    folder = Path(output_dir) / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rewards-step-{step:06d}.png"
    image_grid([row + images], labels).save(path)
    return path


def total_grpo_steps(config: GRPOConfig, batches_per_epoch: int) -> int:
    """Optimizer steps: --max_train_steps, else epochs x sets of samples x --num_inner_epochs."""
    if config.max_train_steps is not None:
        return config.max_train_steps
    sets = batches_per_epoch // config.gradient_accumulation_steps
    return config.num_train_epochs * sets * config.num_inner_epochs


def train_grpo(accelerator: Accelerator, config: GRPOConfig, parts: GRPOParts) -> TrainingProgress:
    """Run (or resume) GRPO; returns the final progress. Every rank calls this.

    Writes what supervised training writes (``metrics.jsonl`` with the rewards, objective and
    ratio statistics, checkpoints, validation images, the final LoRA) plus the first group's
    images with their rewards at each validation. Log lines are printed above the progress
    bar, not into it.
    """
    with logging_redirect_tqdm():
        return _train_grpo(accelerator, config, parts)


def _train_grpo(accelerator: Accelerator, config: GRPOConfig, parts: GRPOParts):
    accumulation = config.gradient_accumulation_steps
    batches_per_epoch = parts.sampler.batches_per_epoch
    run = Run(accelerator, config, parts, total_grpo_steps(config, batches_per_epoch))
    logger.info(
        "GRPO: %d steps; per step each of %d ranks samples %d x %d groups of %d images in %d "
        "denoising steps, reward %s",
        run.max_steps,
        accelerator.num_processes,
        accumulation,
        config.train_batch_size,
        config.num_generations,
        config.sampling_steps,
        config.reward,
    )
    log_repeated_batches(parts.sampler, accelerator, accumulation)
    run.validate_at_start()
    run.model.train()
    sampler_model = accelerator.unwrap_model(run.model)
    epoch, consumed = run.progress.epoch, run.progress.batches_in_epoch
    with run.checkpointed_on_data_error():
        while not run.should_stop:
            for batches in _chunks(epoch_batches(parts, config, epoch, consumed), accumulation):
                rollouts = []
                run.saw(batches[-1])
                for offset, batch in enumerate(batches):
                    position = (consumed + offset) * accelerator.num_processes
                    position += accelerator.process_index
                    generator = step_generator(config.seed, epoch, position, accelerator.device)
                    rollouts.append(
                        sample_rollout(
                            parts.policy,
                            sampler_model,
                            send_to_device(batch, accelerator.device),
                            config,
                            generator,
                            parts.rewards,
                        )
                    )
                consumed += len(batches)
                rewards = reward_metrics(accelerator, rollouts)
                for inner in range(config.num_inner_epochs):
                    terms = policy_update(accelerator, run.model, parts.policy, rollouts, config)
                    run.optimizer_step(torch.stack([term.loss for term in terms]))
                    progress = TrainingProgress(run.progress.global_step + 1, epoch, consumed)
                    if run.validation_due(progress.global_step) and accelerator.is_main_process:
                        save_group_preview(
                            rollouts[0].preview, config.output_dir, progress.global_step
                        )
                    # A checkpoint resumes between sets of samples: stop only after the last.
                    last_inner = inner == config.num_inner_epochs - 1
                    values = {**update_metrics(accelerator, terms), **rewards}
                    run.end_step(progress, values, may_stop=last_inner)
                    if run.should_stop:
                        break
                if run.should_stop:
                    break
            else:
                epoch, consumed = epoch + 1, 0
    return run.finish()


def build_rewards(config: GRPOConfig, device) -> Rewards:
    """The --reward terms, their models (the clip reward's CLIP) loaded on ``device``."""
    options = RewardOptions(
        clip_model=config.clip_reward_model,
        preference_model=config.preference_reward_model,
        seam_half_width=config.seam_band,
        fill_ring_width=config.fill_ring,
    )
    return Rewards(config.reward, options, device)


def train_objective(
    accelerator: Accelerator,
    config: GRPOConfig,
    parts: TrainingParts,
    dataset: Dataset,
    policy: GRPOPolicy,
) -> TrainingProgress:
    """--objective sft: the supervised loop on ``parts``. grpo: GRPO with ``policy`` on the same
    model, data and outputs (``dataset``, the raw items, supplies the pixels when ``parts``
    trains from a latent cache); ``parts.compute_loss`` is not used."""
    if config.objective == "sft":
        return train(accelerator, config, parts)
    grpo = GRPOParts(
        model=parts.model,
        dataset=grpo_items(parts.dataset, dataset),
        sampler=parts.sampler,
        collate_fn=parts.collate_fn,
        policy=policy,
        rewards=build_rewards(config, accelerator.device),
        save_lora=parts.save_lora,
        load_lora=parts.load_lora,
        card=parts.card,
        validate=parts.validate,
    )
    return train_grpo(accelerator, config, grpo)
