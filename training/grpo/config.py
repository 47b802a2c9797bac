"""The flags of GRPO reward fine-tuning (``--objective grpo``) and the grammar of ``--reward``.

Nothing here imports torch: a script's ``--help`` reads these flags before the models' stack
loads. The rewards themselves are in :mod:`training.grpo.rewards`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# The built-in rewards (:data:`training.grpo.rewards.BUILTIN_REWARDS` implements each).
BUILTIN_REWARD_NAMES = ("background", "seam", "fill", "clip", "preference")
# Built-ins that load a model from a local folder: reward name -> the flag naming the folder.
MODEL_REWARDS = {"clip": "clip_reward_model", "preference": "preference_reward_model"}
# What --reward is when not given: every built-in that needs no model, so that the fill itself
# is judged (background alone scores a grey hole as high as a perfect fill).
DEFAULT_REWARD = "background,seam:0.5,fill"


@dataclass(frozen=True)
class RewardTerm:
    """One item of ``--reward``: its logged name, weight, and what it names (a built-in name or
    ``module:function``)."""

    name: str
    weight: float
    target: str

    @property
    def builtin(self) -> bool:
        return ":" not in self.target


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """``"background:1,seam:0.5,pkg.mod:fn:2"`` -> terms. A trailing ``:number`` is a weight
    (default 1); a name with a colon left is ``module:function``, logged as ``function``.

    Raises:
        ValueError: naming the item, for an empty list, an unknown built-in, a malformed item,
            a repeated name, or a weight that is not a finite number.
    """
    terms = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise ValueError(f"--reward {spec!r}: empty item")
        parts = item.split(":")
        weight = 1.0
        if len(parts) > 1 and _is_number(parts[-1]):
            weight = float(parts.pop())
            if not math.isfinite(weight):
                raise ValueError(f"--reward item {item!r}: weight must be finite")
        if len(parts) == 1:
            if parts[0] not in BUILTIN_REWARD_NAMES:
                known = ", ".join(BUILTIN_REWARD_NAMES)
                raise ValueError(
                    f"--reward item {item!r}: unknown reward {parts[0]!r}; built in: {known}, "
                    "or module:function for your own"
                )
            terms.append(RewardTerm(parts[0], weight, parts[0]))
        elif len(parts) == 2 and all(parts):
            terms.append(RewardTerm(parts[1], weight, ":".join(parts)))
        else:
            raise ValueError(
                f"--reward item {item!r}: expected name[:weight] or module:function[:weight]"
            )
    names = [term.name for term in terms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--reward {spec!r}: {', '.join(repeated)} given more than once")
    return terms


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(kw_only=True)
class GRPOConfig:
    """GRPO reward fine-tuning flags (``--objective grpo``); the script's config also inherits
    ``TrainConfig``."""

    objective: Literal["sft", "grpo"] = "sft"
    """sft: the supervised denoising loss on the data's images. grpo: sample groups of images
    with the current model, score them with --reward and raise the reward with GRPO."""
    num_generations: int = 8
    """GRPO: images sampled per (prompt, image, mask), one group; advantages are z-scored within
    it. A rank samples whole groups (--train_batch_size of them per micro-batch), so a group
    never spans ranks."""
    sampling_steps: int = 10
    """GRPO: denoising steps of each sampled image."""
    timestep_fraction: float = 1.0
    """GRPO: share of the stochastic steps trained per sample (at least one), in random order."""
    sde_window: int | None = None
    """GRPO: only this many consecutive steps, at a position drawn per micro-batch, are
    stochastic and trained, the others deterministic (the Flow-GRPO-Fast / MixGRPO saving).
    None: every step."""
    reward: str = DEFAULT_REWARD
    """GRPO: comma-separated name[:weight] terms. Built in: background (keep the source outside
    the mask), seam (the mask's edge as busy as the source around it), fill (the fill's colour
    and texture like the source around the mask), clip (CLIP score of the prompt on the mask's
    box, needs --clip_reward_model), preference (a PickScore-style preference score of the whole
    image, needs --preference_reward_model); module:function[:weight] for your own."""
    clip_reward_model: str | None = None
    """GRPO: local folder of a CLIP model (transformers) for the clip reward."""
    preference_reward_model: str | None = None
    """GRPO: local folder of a CLIP-architecture preference model (PickScore's weights with its
    processor, saved with save_pretrained) for the preference reward."""
    seam_band: int = 4
    """GRPO: half-width in pixels of the band around the mask edge that the seam reward
    measures."""
    fill_ring: int = 16
    """GRPO: width in pixels of the ring of source around the mask that the fill reward compares
    the fill with."""
    clip_range: float = 1e-4
    """GRPO: the ratio of new to old step probability (per latent element) is clipped to
    1 +- this."""
    adv_clip_max: float = 5.0
    """GRPO: advantages are clipped to +- this."""
    kl_beta: float = 0.0
    """GRPO: weight of the KL divergence to the base model (the LoRA switched off), the exact
    KL of each step's Gaussians, averaged over latent elements; 0: none. Flow-GRPO's KL term is
    this times |dt| (the step's sigma decrement), so a beta b taken from it acts here 1/|dt|
    times stronger (6 to 29 times on a shifted 10-step schedule): use about b * |dt|, b / 10
    for 10 even steps."""
    num_inner_epochs: int = 1
    """GRPO: optimizer steps per set of samples, each a pass over all of them; the first has
    ratio 1, later ones are off-policy and clipped. --max_train_steps, --checkpointing_steps and
    --validation_steps must be multiples of it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {
            "num_generations": self.num_generations >= 2,
            "sampling_steps": self.sampling_steps >= 1,
            "timestep_fraction": 0 < self.timestep_fraction <= 1,
            "clip_range": self.clip_range > 0,
            "adv_clip_max": self.adv_clip_max > 0,
            "kl_beta": self.kl_beta >= 0,
            "num_inner_epochs": self.num_inner_epochs >= 1,
            "seam_band": self.seam_band >= 1,
            "fill_ring": self.fill_ring >= 1,
            "sde_window": self.sde_window is None or 1 <= self.sde_window <= self.sampling_steps,
        }
        rules = {
            "num_generations": ">= 2 (advantages compare the images of a group)",
            "sampling_steps": ">= 1",
            "timestep_fraction": "in (0, 1]",
            "clip_range": "> 0",
            "adv_clip_max": "> 0",
            "kl_beta": ">= 0",
            "num_inner_epochs": ">= 1",
            "seam_band": ">= 1",
            "fill_ring": ">= 1",
            "sde_window": f"in [1, --sampling_steps {self.sampling_steps}]",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"--{name} must be {rules[name]}, got {getattr(self, name)}")
        terms = parse_reward_spec(self.reward)
        for term in terms:
            flag = MODEL_REWARDS.get(term.target)
            if flag is not None and getattr(self, flag) is None:
                raise ValueError(f"--reward {term.target} needs --{flag} (a local model folder)")
        if self.objective != "grpo":
            return
        if getattr(self, "caption_dropout", 0):
            raise ValueError(
                "--caption_dropout applies to supervised training: GRPO samples from the "
                "prompts as given"
            )
        if self.lora_dropout:
            raise ValueError(
                "--objective grpo needs --lora_dropout 0: dropout would make the policy's "
                "log-probabilities random, and the ratio meaningless"
            )
        for name in ("max_train_steps", "checkpointing_steps", "validation_steps"):
            value = getattr(self, name)
            if value is not None and value % self.num_inner_epochs:
                raise ValueError(
                    f"--{name} {value} must be a multiple of --num_inner_epochs "
                    f"{self.num_inner_epochs}, so that checkpoints fall between sets of samples"
                )
