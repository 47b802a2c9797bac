"""Rewards for GRPO on inpainting: built-in scores, the user's own, and their weighted sum.

A reward is a callable ``reward(images, prompts, masks, sources) -> scores``:

- ``images``: ``[N, 3, H, W]`` in [0, 1], the sampled (inpainted) images;
- ``prompts``: ``N`` strings;
- ``masks``: ``[N, 1, H, W]`` in {0, 1}, 1 = the region that was filled;
- ``sources``: ``[N, 3, H, W]`` in [0, 1], the images before inpainting;
- ``scores``: ``[N]``, higher is better.

``--reward`` lists them, comma-separated, each ``name[:weight]``: a built-in name
(:data:`BUILTIN_REWARDS`) or ``module:function`` (importable from the checkout or the Python
path), e.g. ``background:1,seam:0.5,fill,my_rewards:pickscore:2``. A reward that raises, or returns
anything but ``N`` finite scores, stops training with an error naming it: a failure is never
scored as 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training.grpo.config import RewardTerm, parse_reward_spec

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


def dilated(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """``masks: [N, 1, H, W]`` grown by ``radius`` pixels (square neighbourhoods)."""
    return F.max_pool2d(masks.float(), 2 * radius + 1, stride=1, padding=radius)


def edge_band(masks: torch.Tensor, half_width: int) -> torch.Tensor:
    """``[N, 1, H, W]`` in {0, 1}: pixels within ``half_width`` of the mask's edge (the mask
    dilated minus the mask eroded, square neighbourhoods). Empty for empty and full masks."""
    eroded = 1 - dilated(1 - masks.float(), half_width)
    return dilated(masks, half_width) - eroded


def region_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``values: [N, C, H, W]`` averaged over ``region: [N, 1, H, W]`` (0/1) per channel:
    ``[N, C]`` (0 for an empty region)."""
    return (values * region).sum(dim=(2, 3)) / region.sum(dim=(2, 3)).clamp_min(1)


def seam_smoothness(
    images: torch.Tensor,
    prompts: list[str],
    masks: torch.Tensor,
    sources: torch.Tensor,
    half_width: int = 4,
) -> torch.Tensor:
    """Whether the mask's edge is as busy as the source around it: ``[N]``, at most 0.

    Minus |mean gradient magnitude of the image in a band of ``half_width`` pixels each side of
    the mask's edge - mean gradient magnitude of the *source* in the ring of the same width just
    outside that band|. A visible seam or noise at the edge makes the band busier, a blurred or
    flat fill makes it calmer: both score below 0, and a fill that continues the source scores
    about 0. The fill is compared with the source only, never with itself, so a busier fill
    cannot raise it. No edge (an empty or full mask) scores 0.
    """
    band = edge_band(masks, half_width)
    ring = dilated(masks, 2 * half_width) - dilated(masks, half_width)
    in_band = region_mean(gradient_magnitude(images), band)[:, 0]
    around = region_mean(gradient_magnitude(sources), ring)[:, 0]
    has_edge = band.flatten(1).any(dim=1) & ring.flatten(1).any(dim=1)
    return torch.where(has_edge, -(in_band - around).abs(), torch.zeros_like(in_band))


def fill_statistics(
    images: torch.Tensor,
    prompts: list[str],
    masks: torch.Tensor,
    sources: torch.Tensor,
    ring_width: int = 16,
) -> torch.Tensor:
    """Whether the fill has the colour and texture of the source around it: ``[N]``, at most 0.

    Minus the squared distance between two summaries, per colour channel: the fill's (the image
    inside the mask) mean, standard deviation and mean gradient magnitude, and the same of the
    source in a ring ``ring_width`` pixels wide around the mask. A grey hole, a flat fill of the
    mean colour and a blurred fill lack the ring's spread and texture; noise has too much of
    both; all score below a fill that continues the source. It judges continuation, not the
    prompt: for fills that should differ from their surroundings (an inserted object), pair it
    with a prompt-aware reward (``clip``, or your own). No fill or no ring (an empty or full
    mask) scores 0.
    """
    inside = masks.float()
    ring = dilated(masks, ring_width) - inside

    def summary(pixels: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        pixels = pixels.float()
        mean = region_mean(pixels, region)
        variance = region_mean((pixels - mean[..., None, None]) ** 2, region)
        texture = region_mean(gradient_magnitude(pixels), region)
        return torch.cat([mean, variance.sqrt(), texture], dim=1)

    distance = ((summary(images, inside) - summary(sources, ring)) ** 2).sum(dim=1)
    present = inside.flatten(1).any(dim=1) & ring.flatten(1).any(dim=1)
    return torch.where(present, -distance, torch.zeros_like(distance))


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
    (``from_pretrained``), e.g. a saved ``openai/clip-vit-large-patch14``.

    With ``whole_image`` and ``logit_scaled`` it is a preference score of the PickScore kind (a
    CLIP fine-tuned on human preferences): the model's logit scale times the cosine similarity
    of the prompt and the whole image.
    """

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        *,
        whole_image: bool = False,
        logit_scaled: bool = False,
    ) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        processor = CLIPImageProcessor.from_pretrained(path)
        crop = processor.crop_size
        self.size = (crop["height"], crop["width"])
        self.mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)
        self.device = device
        self.whole_image = whole_image
        self.logit_scaled = logit_scaled

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[str], masks: torch.Tensor, sources: torch.Tensor
    ) -> torch.Tensor:
        regions = torch.zeros_like(masks) if self.whole_image else masks  # empty: whole image
        crops = mask_box_crops(images.to(self.device), regions.to(self.device) > 0.5, self.size)
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
        similarity = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
        return (
            self.model.logit_scale.exp().float() * similarity if self.logit_scaled else similarity
        )


@dataclass(frozen=True)
class RewardOptions:
    """Settings the built-in rewards read (from the GRPO flags)."""

    clip_model: str | None = None
    """Local CLIP folder for ``clip``."""
    preference_model: str | None = None
    """Local folder of a CLIP-architecture preference model (PickScore, say) for
    ``preference``."""
    seam_half_width: int = 4
    """Half-width, in pixels, of ``seam``'s band around the mask edge."""
    fill_ring_width: int = 16
    """Width, in pixels, of the ring of source around the mask that ``fill`` compares with."""


def _clip(options: RewardOptions, device) -> RewardFn:
    if options.clip_model is None:
        raise ValueError("the 'clip' reward needs --clip_reward_model (a local CLIP folder)")
    return ClipCropScore(options.clip_model, device)


def _preference(options: RewardOptions, device) -> RewardFn:
    if options.preference_model is None:
        raise ValueError(
            "the 'preference' reward needs --preference_reward_model (a local folder of a "
            "CLIP-architecture preference model such as PickScore)"
        )
    return ClipCropScore(options.preference_model, device, whole_image=True, logit_scaled=True)


def _seam(options: RewardOptions, device) -> RewardFn:
    def seam(images, prompts, masks, sources):
        return seam_smoothness(images, prompts, masks, sources, options.seam_half_width)

    return seam


def _fill(options: RewardOptions, device) -> RewardFn:
    def fill(images, prompts, masks, sources):
        return fill_statistics(images, prompts, masks, sources, options.fill_ring_width)

    return fill


# Built-in name -> factory(options, device) -> reward.
BUILTIN_REWARDS: dict[str, Callable[[RewardOptions, object], RewardFn]] = {
    "background": lambda options, device: background_consistency,
    "seam": _seam,
    "fill": _fill,
    "clip": _clip,
    "preference": _preference,
}


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
