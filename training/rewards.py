"""Rewards for GRPO on inpainting: built-in scores, the user's own, and their weighted sum.

A reward is a callable ``reward(images, prompts, masks, sources) -> scores``:

- ``images``: ``[N, 3, H, W]`` in [0, 1], the sampled (inpainted) images;
- ``prompts``: ``N`` strings;
- ``masks``: ``[N, 1, H, W]`` in {0, 1}, 1 = the region that was filled;
- ``sources``: ``[N, 3, H, W]`` in [0, 1], the images before inpainting;
- ``scores``: ``[N]``, higher is better.

``--reward`` lists them, comma-separated, each ``name[:weight]``: a built-in name
(:data:`BUILTIN_REWARDS`) or ``module:function`` (importable from the checkout or the Python
path), e.g. ``background:1,seam:0.5,my_rewards:pickscore:2``. A reward that raises, or returns
anything but ``N`` finite scores, stops training with an error naming it: a failure is never
scored as 0.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RewardFn = Callable[[torch.Tensor, list[str], torch.Tensor, torch.Tensor], torch.Tensor]


class RewardError(RuntimeError):
    """A reward failed or returned something other than one finite score per image."""


def background_consistency(
    images: torch.Tensor, prompts: list[str], masks: torch.Tensor, sources: torch.Tensor
) -> torch.Tensor:
    """Minus the mean squared difference to the source outside the mask: ``[N]``, at most 0.

    0 means the background was kept exactly; an all-white mask has no background and scores 0.
    Pixels are in [0, 1], so the score lies in [-1, 0].
    """
    keep = 1 - masks.float()
    squared = ((images.float() - sources.float()) ** 2 * keep).sum(dim=(1, 2, 3))
    kept_values = (keep.sum(dim=(1, 2, 3)) * images.shape[1]).clamp_min(1)
    return -squared / kept_values


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]``: per-pixel ``sqrt(dx^2 + dy^2)`` of forward differences (0 past the last
    row and column), averaged over the channels of ``images: [N, C, H, W]``."""
    images = images.float()
    dx = F.pad(images[..., :, 1:] - images[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(images[..., 1:, :] - images[..., :-1, :], (0, 0, 0, 1))
    return (dx**2 + dy**2).sqrt().mean(dim=1, keepdim=True)


def edge_band(masks: torch.Tensor, half_width: int) -> torch.Tensor:
    """``[N, 1, H, W]`` in {0, 1}: pixels within ``half_width`` of the mask's edge (the mask
    dilated minus the mask eroded, square neighbourhoods). Empty for empty and full masks."""
    masks = masks.float()
    size = 2 * half_width + 1
    dilated = F.max_pool2d(masks, size, stride=1, padding=half_width)
    eroded = 1 - F.max_pool2d(1 - masks, size, stride=1, padding=half_width)
    return dilated - eroded


def seam_smoothness(
    images: torch.Tensor,
    prompts: list[str],
    masks: torch.Tensor,
    sources: torch.Tensor,
    half_width: int = 4,
) -> torch.Tensor:
    """How much smoother the mask's edge is than the rest of the image: ``[N]``.

    Minus (mean gradient magnitude in a band of ``half_width`` pixels each side of the mask's
    edge - mean gradient magnitude elsewhere): a visible seam makes the band busier than the
    image around it and scores below 0; a fill that continues the image scores about 0. No edge
    (an empty or full mask) scores 0.
    """
    band = edge_band(masks, half_width)
    rest = 1 - band
    gradient = gradient_magnitude(images)
    in_band = (gradient * band).sum(dim=(1, 2, 3)) / band.sum(dim=(1, 2, 3)).clamp_min(1)
    elsewhere = (gradient * rest).sum(dim=(1, 2, 3)) / rest.sum(dim=(1, 2, 3)).clamp_min(1)
    has_edge = band.flatten(1).any(dim=1)
    return torch.where(has_edge, elsewhere - in_band, torch.zeros_like(in_band))


def mask_box_crops(
    images: torch.Tensor, masks: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """``[N, 3, *size]``: each image's crop to its mask's bounding box (the whole image for an
    empty mask), resized with bicubic interpolation."""
    crops = []
    for image, mask in zip(images, masks, strict=True):
        rows = mask[0].any(dim=1).nonzero()
        columns = mask[0].any(dim=0).nonzero()
        if len(rows):
            image = image[:, rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        crop = F.interpolate(image[None].float(), size=size, mode="bicubic", align_corners=False)
        crops.append(crop.clamp(0, 1))
    return torch.cat(crops)


class ClipCropScore:
    """CLIP's cosine similarity between the prompt and the mask's bounding-box crop: ``[N]`` in
    [-1, 1]. The model, its tokenizer and image processor settings come from a local folder
    (``from_pretrained``), e.g. a saved ``openai/clip-vit-large-patch14``."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        processor = CLIPImageProcessor.from_pretrained(path)
        crop = processor.crop_size
        self.size = (crop["height"], crop["width"])
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)
        self.device = device

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], masks: torch.Tensor, sources: torch.Tensor
    ) -> torch.Tensor:
        crops = mask_box_crops(images.to(self.device), masks.to(self.device) > 0.5, self.size)
        pixels = ((crops - self.mean) / self.std).to(self.model.dtype)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        image_features = self.model.get_image_features(pixel_values=pixels).pooler_output
        text_features = self.model.get_text_features(**tokens).pooler_output
        return F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)


@dataclass(frozen=True)
class RewardOptions:
    """Settings the built-in rewards read (from the GRPO flags)."""

    clip_model: str | None = None
    """Local CLIP folder for ``clip``."""
    seam_half_width: int = 4
    """Half-width, in pixels, of ``seam``'s band around the mask edge."""


def _clip(options: RewardOptions, device) -> RewardFn:
    if options.clip_model is None:
        raise ValueError("the 'clip' reward needs --clip_reward_model (a local CLIP folder)")
    return ClipCropScore(options.clip_model, device)


def _seam(options: RewardOptions, device) -> RewardFn:
    def seam(images, prompts, masks, sources):
        return seam_smoothness(images, prompts, masks, sources, options.seam_half_width)

    return seam


# Built-in name -> factory(options, device) -> reward.
BUILTIN_REWARDS: dict[str, Callable[[RewardOptions, object], RewardFn]] = {
    "background": lambda options, device: background_consistency,
    "seam": _seam,
    "clip": _clip,
}


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
            if parts[0] not in BUILTIN_REWARDS:
                known = ", ".join(BUILTIN_REWARDS)
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


def load_user_reward(target: str) -> RewardFn:
    """The callable ``module:function`` names.

    Raises:
        ValueError: naming ``target`` when the module cannot be imported or has no such callable.
    """
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--reward {target}: cannot import {module_name!r}: {error}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"--reward {target}: {module_name} has no callable {function_name!r}")
    return function


class Rewards:
    """The ``--reward`` terms, ready to score: ``rewards(images, prompts, masks, sources)`` ->
    ``(weighted total [N], {name: scores [N]})``."""

    def __init__(self, spec: str, options: RewardOptions, device) -> None:
        self.terms = parse_reward_spec(spec)
        self.functions = {
            term.name: (
                BUILTIN_REWARDS[term.target](options, device)
                if term.builtin
                else load_user_reward(term.target)
            )
            for term in self.terms
        }

    def __call__(
        self, images: torch.Tensor, prompts: list[str], masks: torch.Tensor, sources: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        count = images.shape[0]
        scores = {}
        for term in self.terms:
            try:
                value = self.functions[term.name](images, prompts, masks, sources)
            except Exception as error:
                raise RewardError(
                    f"reward {term.name!r} ({term.target}) failed: {type(error).__name__}: {error}"
                ) from error
            scores[term.name] = _checked(term, value, count).to(images.device)
        total = sum(term.weight * scores[term.name] for term in self.terms)
        return total, scores


def _checked(term: RewardTerm, value, count: int) -> torch.Tensor:
    """``value`` as ``[count]`` fp32 scores, or a :class:`RewardError` saying what is wrong."""
    if not isinstance(value, torch.Tensor):
        raise RewardError(
            f"reward {term.name!r} ({term.target}) returned {type(value).__name__}, "
            f"not a tensor of {count} scores"
        )
    if value.shape != (count,):
        raise RewardError(
            f"reward {term.name!r} ({term.target}) returned shape {list(value.shape)} for "
            f"{count} images; expected [{count}]"
        )
    value = value.detach().float()
    if not torch.isfinite(value).all():
        raise RewardError(
            f"reward {term.name!r} ({term.target}) returned non-finite scores: {value.tolist()}"
        )
    return value
