"""GRPO for diffusion policies: group advantages, the clipped ratio objective, sampled rollouts.

A family (FLUX.1 Fill, SD1.5 inpainting) supplies a :class:`GRPOPolicy`: how its model is
called for one denoising step and which Gaussian that step is (``training.grpo.sde``). Everything
else is shared:

1. :func:`sample_rollout`: each example of a micro-batch is sampled ``--num_generations``
   times (a group) with the current model, without gradients; at every stochastic step the
   state, the sample drawn and its log-probability are kept, in fp32.
2. The decoded images are scored (``training.grpo.rewards``); advantages are the rewards z-scored
   within each group (:func:`group_advantages`).
3. :func:`policy_update`: at the trained steps the same :func:`transition` recomputes the
   log-probability of each stored sample under the model being trained, and
   :func:`clipped_objective` (+ ``--kl_beta`` times the KL to the base model, the same model
   with its LoRA switched off) is back-propagated one step at a time.

Because sampling and training evaluate one function on the same fp32 tensors with the same batch
layout, the ratio is exactly 1 before the first update.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor

from training.grpo.config import GRPOConfig
from training.grpo.rewards import Rewards
from training.grpo.sde import gaussian_kl, gaussian_log_prob
from training.lora.adapters import lora_disabled
from training.metrics import mean_across_ranks

# A group whose reward spread is at most this share of its largest reward counts as tied
# (zero advantages): a guard in the rewards' own units, so scaling a reward changes nothing,
# unlike the fixed epsilon Flow-GRPO and DanceGRPO add, which is the size of some rewards'
# whole spread. 1e-6 is a few float32 roundings.
TIED_REWARDS = 1e-6


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float) -> torch.Tensor:
    """``rewards: [B * G]`` (groups of ``G = group_size`` consecutive samples) -> advantages
    ``[B * G]``: ``(r - mean) / std`` within each group (population std), clipped to
    ``[-clip, clip]``; 0 for a tied group (spread at most :data:`TIED_REWARDS` of its largest
    absolute reward). Scaling the rewards leaves the advantages unchanged."""
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=False)
    tied = std <= TIED_REWARDS * grouped.abs().amax(dim=1, keepdim=True)
    advantages = (grouped - mean) / torch.where(tied, torch.ones_like(std), std)
    return torch.where(tied, 0.0, advantages).clamp(-clip, clip).flatten()


@dataclass
class ObjectiveTerms:
    """What one trained step contributes: the loss to back-propagate and, detached, the ratios
    ``[N]``, the clipped share, the approximate KL to the sampling policy and the KL to the
    base model (None without ``--kl_beta``)."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    kl: torch.Tensor | None = None


def clipped_objective(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> ObjectiveTerms:
    """GRPO's (PPO's) clipped surrogate for one step, to minimise:

        ratio = exp(log_prob - old_log_prob)
        loss  = mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))) + kl_beta * mean(kl)

    ``log_prob, old_log_prob, advantages: [N]``; ``kl: [N]`` or None.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    if kl is not None:
        loss = loss + kl_beta * kl.mean()
    with torch.no_grad():
        return ObjectiveTerms(
            loss=loss,
            ratio=ratio.detach(),
            clip_fraction=((ratio - 1).abs() > clip_range).float().mean(),
            approx_kl=0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            kl=None if kl is None else kl.detach().mean(),
        )


class GRPOPolicy(Protocol):
    """A family's sampler, as GRPO drives it. ``conditioning`` is whatever the family needs for
    the ``N`` samples of a micro-batch (prompt embeddings, masked-image latents, its schedule),
    built by :meth:`start` and passed back unchanged."""

    def start(
        self, batch: dict, generations: int, steps: int, generator: torch.Generator
    ) -> tuple[dict, torch.Tensor]:
        """``(conditioning, initial latents [B * generations, ...] fp32)`` for a batch of ``B``
        examples, each repeated ``generations`` times (group ``b`` is rows ``b*G .. b*G+G-1``),
        with a schedule of ``steps`` denoising steps. Draws from ``generator`` only."""

    def step_distribution(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        step: int,
        conditioning: dict,
        stochastic: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of denoising step ``step`` from ``latents: [N, ...]`` fp32: mean
        ``[N, ...]`` fp32 and a 0-dim std, 0 for the deterministic step."""

    def decode(self, latents: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """Final latents -> images ``[N, 3, H, W]`` in [0, 1], fp32."""


@dataclass
class Transition:
    """One stochastic step: the next latents, their log-probability ``[N]`` (per element, see
    ``training.grpo.sde.gaussian_log_prob``), and the step's mean and std."""

    next_latents: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def transition(
    policy: GRPOPolicy,
    model: torch.nn.Module,
    latents: torch.Tensor,
    step: int,
    conditioning: dict,
    next_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Transition:
    """Stochastic step ``step`` from ``latents``: while sampling (``next_latents`` None) it draws
    the next latents from ``generator``; while training it takes the stored ones. Either way the
    log-probability is this one computation, in fp32."""
    mean, std = policy.step_distribution(model, latents, step, conditioning, stochastic=True)
    if next_latents is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        next_latents = mean + std * noise
    return Transition(next_latents, gaussian_log_prob(next_latents, mean, std), mean, std)


@dataclass
class GroupPreview:
    """The first group of a rollout, for validation images: images ``[G, 3, H, W]`` in [0, 1],
    their rewards ``[G]``, the source ``[3, H, W]`` in [0, 1], the mask ``[1, H, W]``, and the
    prompt."""

    images: torch.Tensor
    rewards: torch.Tensor
    source: torch.Tensor
    mask: torch.Tensor
    prompt: str


@dataclass
class Rollout:
    """A micro-batch's groups, sampled and scored: ``N = B * G`` samples.

    ``states[j]`` is the latents before step ``j`` (and ``states[j + 1]`` the sample drawn) for
    every trained step, ``log_probs[j]: [N]`` their log-probability when sampled; ``trained`` is
    the steps to train, in the order they are trained. Rewards and advantages are ``[N]``.
    """

    group_size: int
    conditioning: dict
    states: dict[int, torch.Tensor]
    log_probs: dict[int, torch.Tensor]
    trained: list[int]
    reward: torch.Tensor
    rewards: dict[str, torch.Tensor]
    advantages: torch.Tensor
    preview: GroupPreview


def stochastic_steps(config: GRPOConfig, generator: torch.Generator) -> list[int]:
    """The steps sampled stochastically: all, or a window of --sde_window consecutive steps at a
    position drawn from ``generator``."""
    steps = config.sampling_steps
    if config.sde_window is None:
        return list(range(steps))
    start = int(
        torch.randint(
            0, steps - config.sde_window + 1, (1,), generator=generator, device=generator.device
        )
    )
    return list(range(start, start + config.sde_window))


def trained_steps(
    config: GRPOConfig, stochastic: list[int], generator: torch.Generator
) -> list[int]:
    """--timestep_fraction of the stochastic steps (at least one), in an order drawn from
    ``generator``; every sample of a micro-batch trains the same steps, so each training forward
    sees exactly the batch its sampling forward saw."""
    count = max(1, round(config.timestep_fraction * len(stochastic)))
    order = torch.randperm(len(stochastic), generator=generator, device=generator.device)
    return [stochastic[int(i)] for i in order[:count]]


@dataclass
class Samples:
    """A micro-batch's groups as sampled, before scoring: what :class:`Rollout` keeps of the
    trajectories, and the decoded images ``[N, 3, H, W]`` in [0, 1]."""

    conditioning: dict
    states: dict[int, torch.Tensor]
    log_probs: dict[int, torch.Tensor]
    trained: list[int]
    images: torch.Tensor


@torch.no_grad()
def sample_groups(
    policy: GRPOPolicy,
    model: torch.nn.Module,
    batch: dict,
    config: GRPOConfig,
    generator: torch.Generator,
) -> Samples:
    """Sample ``--num_generations`` images per example of ``batch`` with ``model``, keeping
    what training needs; every random draw comes from ``generator``."""
    conditioning, latents = policy.start(
        batch, config.num_generations, config.sampling_steps, generator
    )
    stochastic = stochastic_steps(config, generator)
    trained = trained_steps(config, stochastic, generator)
    states, log_probs = {}, {}
    for step in range(config.sampling_steps):
        if step in stochastic:
            result = transition(policy, model, latents, step, conditioning, generator=generator)
            if step in trained:
                states[step], states[step + 1] = latents, result.next_latents
                log_probs[step] = result.log_prob
            latents = result.next_latents
        else:
            latents = policy.step_distribution(
                model, latents, step, conditioning, stochastic=False
            )[0]
    return Samples(conditioning, states, log_probs, trained, policy.decode(latents, conditioning))


@torch.no_grad()
def score_groups(samples: Samples, batch: dict, config: GRPOConfig, rewards: Rewards) -> Rollout:
    """Score ``samples`` against ``batch``'s sources, masks and prompts (``image: [B, 3, H, W]``
    in [-1, 1], ``mask: [B, 1, H, W]``, ``prompt``: B strings) and compute the advantages."""
    groups = config.num_generations
    sources = ((batch["image"].float() + 1) / 2).repeat_interleave(groups, dim=0)
    masks = batch["mask"].float().repeat_interleave(groups, dim=0)
    prompts = [prompt for prompt in batch["prompt"] for _ in range(groups)]
    total, by_name = rewards(samples.images, prompts, masks, sources)
    preview = GroupPreview(
        samples.images[:groups].cpu(),
        total[:groups].cpu(),
        sources[0].cpu(),
        masks[0].cpu(),
        prompts[0],
    )
    return Rollout(
        group_size=groups,
        conditioning=samples.conditioning,
        states=samples.states,
        log_probs=samples.log_probs,
        trained=samples.trained,
        reward=total,
        rewards=by_name,
        advantages=group_advantages(total, groups, config.adv_clip_max),
        preview=preview,
    )


def sample_rollout(
    policy: GRPOPolicy,
    model: torch.nn.Module,
    batch: dict,
    config: GRPOConfig,
    generator: torch.Generator,
    rewards: Rewards,
) -> Rollout:
    """:func:`sample_groups` then :func:`score_groups`: one micro-batch's rollout."""
    samples = sample_groups(policy, model, batch, config, generator)
    return score_groups(samples, batch, config, rewards)


def policy_update(
    accelerator,
    model: torch.nn.Module,
    policy: GRPOPolicy,
    rollouts: list[Rollout],
    config: GRPOConfig,
) -> list[ObjectiveTerms]:
    """Accumulate the gradient of one optimizer step over every trained step of ``rollouts`` (a
    rank's micro-batches), one backward pass per step; returns each step's terms.

    ``model`` is the prepared (DDP) model: only the last backward pass synchronises gradients
    across ranks. ``accelerator.backward`` divides by --gradient_accumulation_steps (the number
    of rollouts), the loss here by the steps trained per rollout: the gradient of the mean.
    """
    unwrapped = accelerator.unwrap_model(model)
    passes = [(rollout, step) for rollout in rollouts for step in rollout.trained]
    terms = []
    for index, (rollout, step) in enumerate(passes):
        last = index == len(passes) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            result = transition(
                policy,
                model,
                rollout.states[step],
                step,
                rollout.conditioning,
                next_latents=rollout.states[step + 1],
            )
            kl = None
            if config.kl_beta > 0:
                with torch.no_grad(), lora_disabled(unwrapped):
                    reference, _ = policy.step_distribution(
                        unwrapped, rollout.states[step], step, rollout.conditioning, True
                    )
                kl = gaussian_kl(result.mean, reference, result.std)
            objective = clipped_objective(
                result.log_prob,
                rollout.log_probs[step],
                rollout.advantages,
                config.clip_range,
                kl,
                config.kl_beta,
            )
            accelerator.backward(objective.loss / len(rollout.trained))
        terms.append(dataclasses.replace(objective, loss=objective.loss.detach()))
    return terms


def update_metrics(accelerator, terms: list[ObjectiveTerms]) -> dict[str, float]:
    """An optimizer step's objective metrics, over every rank: means of the loss, clipped share
    and KLs; mean, min and max of the ratio."""
    ratios = torch.cat([term.ratio for term in terms])
    local = {
        "loss": torch.stack([term.loss for term in terms]).mean(),
        "clip_fraction": torch.stack([term.clip_fraction for term in terms]).mean(),
        "approx_kl": torch.stack([term.approx_kl for term in terms]).mean(),
        "ratio_mean": ratios.mean(),
    }
    if terms[0].kl is not None:
        local["kl"] = torch.stack([term.kl for term in terms]).mean()
    values = mean_across_ranks(accelerator, local)
    extremes = accelerator.gather(torch.stack([ratios.min(), -ratios.max()])[None])
    values["ratio_min"] = extremes[:, 0].min().item()
    values["ratio_max"] = -extremes[:, 1].min().item()
    return values


def reward_metrics(accelerator, rollouts: list[Rollout]) -> dict[str, float]:
    """A set of samples' reward metrics, over every rank: the weighted total (``reward``), each
    term (``reward_<name>``), the mean spread within a group and the mean absolute advantage."""
    group_size = rollouts[0].group_size
    local = {
        "reward": torch.cat([r.reward for r in rollouts]).mean(),
        **{
            f"reward_{name}": torch.cat([r.rewards[name] for r in rollouts]).mean()
            for name in rollouts[0].rewards
        },
        "reward_group_std": torch.cat(
            [r.reward.view(-1, group_size).std(dim=1, unbiased=False) for r in rollouts]
        ).mean(),
        "advantage_abs": torch.cat([r.advantages.abs() for r in rollouts]).mean(),
    }
    return mean_across_ranks(accelerator, local)
