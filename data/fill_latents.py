"""Seed 004's precomputed FLUX.1 Fill dataset: encoded prompts, latents and masks on disk.

A folder holds ``manifest.json``, a JSON list with one record per example::

    {"caption": "a red car on the street",
     "prompt_embed_path": "fill_0.safetensors", "pooled_prompt_embeds_path": "fill_0.safetensors",
     "text_ids": "fill_0.safetensors", "masked_latents_path": "fill_0.safetensors",
     "mask_latents_path": "fill_0.safetensors", "latents_path": "fill_0.safetensors"}

and one folder per kind: ``prompt_embed/`` (T5, ``[T, D]``), ``pooled_prompt_embeds/`` (CLIP,
``[P]``), ``text_ids/`` (``[T, 3]``), ``masked_latents/`` (the masked image's latents,
``[16, h, w]``), ``mask_latents/`` (the pixel mask under each latent pixel, ``[64, h, w]``, or the
seed's downsampled ``[1, h, w]``) and ``latents/`` (the image's latents, which supervised training
needs and the seed's format lacks). ``scripts/precompute_flux_fill.py`` writes it in safetensors:
latents as the VAE's distribution (``mean`` and ``std``, unscaled), so training samples them
exactly as from raw images. The seed's ``.pt`` files are read with
``torch.load(weights_only=True)`` only, their latents taken as one fixed, already scaled sample.
Every record is checked up front; a path that leaves the folder is refused.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from data.images import DataError
from data.rows import MAX_REPORTED_PROBLEMS

MANIFEST_FILE = "manifest.json"
# Manifest key -> folder of its files.
FOLDERS = {
    "prompt_embed_path": "prompt_embed",
    "pooled_prompt_embeds_path": "pooled_prompt_embeds",
    "text_ids": "text_ids",
    "masked_latents_path": "masked_latents",
    "mask_latents_path": "mask_latents",
    "latents_path": "latents",
}
REQUIRED = ("prompt_embed_path", "pooled_prompt_embeds_path", "masked_latents_path")
REQUIRED += ("mask_latents_path",)
MASK_CHANNELS = 64  # the 8x8 pixels under a latent pixel


@dataclass(frozen=True)
class VaeScaling:
    """The VAE's latent shift and scale: ``scaled = (latent - shift) * scale``."""

    scaling_factor: float
    shift_factor: float = 0.0

    def unscale(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled / self.scaling_factor + self.shift_factor


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or the tensor of a seed ``.pt`` file as
    ``{"data": tensor}``; a ``.pt`` is read with ``weights_only=True`` and must hold a tensor.

    Raises:
        DataError: naming the file, when it is missing, unreadable, or holds anything else.
    """
    if not path.is_file():
        raise DataError(f"'{path}': file does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise DataError(f"'{path}': not a readable safetensors file ({error})") from error
    if path.suffix == ".pt":
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            raise DataError(
                f"'{path}': refused; a .pt file must hold a plain tensor, loadable without "
                f"running code (torch.load weights_only=True said: {str(error).splitlines()[0]})"
            ) from error
        if not isinstance(value, torch.Tensor):
            raise DataError(f"'{path}': holds a {type(value).__name__}, not a tensor")
        return {"data": value}
    raise DataError(f"'{path}': unknown tensor file type; use .safetensors (or the seed's .pt)")


def _single(tensors: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    if len(tensors) != 1:
        raise DataError(f"'{path}': expected one tensor, found {sorted(tensors)}")
    return next(iter(tensors.values()))


class FillLatentDataset(Dataset):
    """The examples of a precomputed folder, as the Fill script's encoder would give them.

    Args:
        root: the folder holding ``manifest.json``.
        scaling: the VAE's shift and scale, to read the seed's already scaled latents.
        require_latents: every record must have ``latents_path`` (supervised training).

    Items: ``prompt_embeds [T, D]``, ``pooled_prompt_embeds [P]``, ``masked_latents_mean`` /
    ``masked_latents_std`` and ``latents_mean`` / ``latents_std`` ``[16, h, w]`` (unscaled),
    ``mask_latents [64, h, w]``, ``index``.

    Raises:
        DataError: listing every bad record (up to ``MAX_REPORTED_PROBLEMS``).
    """

    def __init__(self, root: str | Path, scaling: VaeScaling, *, require_latents: bool) -> None:
        self.root = Path(root)
        self.manifest = self.root / MANIFEST_FILE
        self.scaling = scaling
        self.require_latents = require_latents
        if not self.manifest.is_file():
            raise DataError(f"'{self.manifest}': file does not exist")
        try:
            records = json.loads(self.manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"'{self.manifest}': malformed JSON ({error})") from error
        if not isinstance(records, list) or not records:
            raise DataError(f"'{self.manifest}': expected a non-empty JSON list of records")
        self.records = records
        sizes, problems = [], []
        for index in range(len(records)):
            try:
                sizes.append(tuple(self[index]["mask_latents"].shape[-2:]))
            except DataError as error:
                problems.append(str(error))
            if len(problems) >= MAX_REPORTED_PROBLEMS:
                problems.append(f"(stopped after {index + 1} of {len(records)} records)")
                break
        if problems:
            listed = "\n".join(f"  - {problem}" for problem in problems)
            raise DataError(f"precomputed Fill folder '{self.root}': bad records:\n{listed}")
        buckets = sorted(set(sizes))
        self.bucket_of_items = [buckets.index(size) for size in sizes]
        # One folder, every record drawn once an epoch (the sampler's ``repeats``).
        self.repeats_of_items = None

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, index: int) -> str:
        """Record ``index`` of the manifest, for messages."""
        return f"'{self.manifest}' record {index}"

    def _path(self, record: dict, key: str, where: str) -> Path:
        name = record.get(key)
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: missing '{key}'")
        path = (self.root / FOLDERS[key] / name).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise DataError(f"{where}: '{key}' {name!r} leaves the dataset folder '{self.root}'")
        return path

    def _distribution(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of a latent file: our distribution, or a seed's scaled sample."""
        tensors = read_tensors(path)
        if set(tensors) == {"mean", "std"}:
            return tensors["mean"], tensors["std"]
        mean = self.scaling.unscale(_single(tensors, path).float())
        return mean, torch.zeros_like(mean)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        where = f"'{self.manifest}' record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        keys = REQUIRED + (("latents_path",) if self.require_latents else ())
        paths = {key: self._path(record, key, where) for key in keys}
        prompt_embeds = _single(
            read_tensors(paths["prompt_embed_path"]), paths["prompt_embed_path"]
        )
        pooled = _single(
            read_tensors(paths["pooled_prompt_embeds_path"]), paths["pooled_prompt_embeds_path"]
        )
        masked_mean, masked_std = self._distribution(paths["masked_latents_path"])
        mask_path = paths["mask_latents_path"]
        mask = _single(read_tensors(mask_path), mask_path).float()
        item = {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "masked_latents_mean": masked_mean,
            "masked_latents_std": masked_std,
            "index": index,
        }
        if self.require_latents:
            item["latents_mean"], item["latents_std"] = self._distribution(paths["latents_path"])
        problems = []
        latent_size = tuple(masked_mean.shape[-2:])
        if masked_mean.ndim != 3 or latent_size[0] % 2 or latent_size[1] % 2:
            problems.append(f"masked latents of shape {list(masked_mean.shape)}, not [C, h, w]")
        if mask.ndim != 3 or mask.shape[0] not in (1, MASK_CHANNELS):
            problems.append(f"mask latents of shape {list(mask.shape)}, not [64 or 1, h, w]")
        elif tuple(mask.shape[-2:]) != latent_size:
            problems.append(f"mask latents {list(mask.shape)} vs latents {list(masked_mean.shape)}")
        if "latents_mean" in item and item["latents_mean"].shape != masked_mean.shape:
            problems.append(
                f"latents {list(item['latents_mean'].shape)} vs masked latents "
                f"{list(masked_mean.shape)}"
            )
        if prompt_embeds.ndim != 2 or pooled.ndim != 1:
            problems.append(
                f"prompt embeddings {list(prompt_embeds.shape)} and pooled "
                f"{list(pooled.shape)}, not [T, D] and [P]"
            )
        if problems:
            raise DataError(f"{where}: {'; '.join(problems)}")
        # The seed's downsampled mask holds one value per latent pixel: the same for its 8x8.
        item["mask_latents"] = mask.expand(MASK_CHANNELS, -1, -1).contiguous()
        return item


def mask_latents_from_pixels(mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` pixel mask -> ``[B, 64, H/8, W/8]``: the 8x8 pixels under each latent
    pixel as channels, in ``FluxFillPipeline.prepare_mask_latents``' order."""
    return F.pixel_unshuffle(mask, 8)


def pixels_from_mask_latents(mask_latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`mask_latents_from_pixels`: ``[B, 64, h, w] -> [B, 1, 8h, 8w]``."""
    return F.pixel_shuffle(mask_latents, 8)
