"""Train from precomputed tensors: fill a ``data.cache.TensorCache`` once, then serve it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from data.cache import TensorCache, fingerprint, weight_files_digest
from training.checkpointing.stopping import exit_with_message_on_signal

logger = logging.getLogger(__name__)

EncodeFn = Callable[[dict], dict[str, torch.Tensor]]


def encoder_weights(name_or_path: str, components: Sequence[str] = ("",)) -> dict[str, list]:
    """:func:`data.cache.weight_files_digest` of the ``components`` (subfolders) of a local
    model folder, or of a Hub id's snapshot in the local cache; part of a cache fingerprint, so
    that replaced encoder weights never reuse old entries."""
    root = Path(name_or_path)
    if not root.is_dir():
        try:
            root = Path(snapshot_download(name_or_path, local_files_only=True))
        except (HFValidationError, LocalEntryNotFoundError, OSError):
            logger.warning("%s: no local files to fingerprint the cache with", name_or_path)
            return {}
    return weight_files_digest(root / component for component in components)


def fill_cache(
    accelerator: Accelerator,
    dataset: Dataset,
    cache: TensorCache,
    collate_fn: Callable[[list], dict],
    encode: EncodeFn,
) -> None:
    """Encode every item of ``dataset`` missing from ``cache`` (each rank a share), then wait.

    ``dataset`` has ``key(i)``; ``encode`` maps a collated batch of one item to tensors with a
    leading batch dim of 1, which are stored without it.
    """
    missing = [
        index
        for index in range(accelerator.process_index, len(dataset), accelerator.num_processes)
        if dataset.key(index) not in cache
    ]
    logger.info("caching %d of %d items in %s", len(missing), len(dataset), cache.folder)
    done = [0]

    def kept() -> str:
        return (
            f"stopped while caching: the {done[0]} item(s) encoded so far are kept in "
            f"{cache.folder} (of {len(missing)} this process had to encode); the next run "
            "encodes only the rest"
        )

    with exit_with_message_on_signal(kept):
        for index in tqdm(missing, desc="caching", disable=not accelerator.is_main_process):
            tensors = encode(collate_fn([dataset[index]]))
            cache.save(dataset.key(index), {name: value[0] for name, value in tensors.items()})
            done[0] += 1
    accelerator.wait_for_everyone()


def encoded_items(
    accelerator: Accelerator,
    config,
    dataset: Dataset,
    encoder,
    collate_fn: Callable[[list], dict],
) -> Dataset:
    """What the loop trains on: ``dataset`` itself, or with --cache_latents its items as
    ``encoder`` encodes them (``encoder(batch)`` and ``encoder.fingerprint()``), cached once in
    --cache_dir (default ``<output_dir>/cache``). Quantized text encoders
    (--quantize_text_encoders) encode into entries of their own."""
    if not config.cache_latents:
        return dataset
    root = config.cache_dir or Path(config.output_dir) / "cache"
    key = encoder.fingerprint()
    quantized = getattr(config, "quantize_text_encoders", "none")
    if quantized != "none":
        key = fingerprint(encoder=key, quantize_text_encoders=quantized)
    cache = TensorCache(root, key)
    fill_cache(accelerator, dataset, cache, collate_fn, encoder)
    return CachedItems(dataset, cache)


class EncoderOffload:
    """Frozen encoders kept on the CPU once the cache is full (--offload_encoders), brought back
    to the training device around each validation, which runs the whole pipeline."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.modules = list(modules)
        self.device = device

    def offload(self) -> None:
        for module in self.modules:
            module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def around(self, validate: Callable) -> Callable:
        """``validate`` with the encoders on the device while it runs."""

        def validate_on_device(model, step):
            for module in self.modules:
                module.to(self.device)
            try:
                return validate(model, step)
            finally:
                self.offload()

        return validate_on_device


def offload_after_caching(config, modules: Sequence[torch.nn.Module], device, validate):
    """With --offload_encoders, move ``modules`` to the CPU now and return ``validate`` wrapped
    to bring them back while it runs; otherwise ``validate`` unchanged."""
    if not config.offload_encoders:
        return validate
    offload = EncoderOffload(modules, device)
    offload.offload()
    logger.info("encoders offloaded to the CPU; the device holds the denoiser alone")
    return validate and offload.around(validate)


class CachedItems(Dataset):
    """The items of ``dataset`` as stored in ``cache``: its tensors plus ``index``."""

    def __init__(self, dataset: Dataset, cache: TensorCache) -> None:
        self.dataset = dataset
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.cache.load(self.dataset.key(index)), "index": index}

    def describe(self, index: int) -> str:
        """The files item ``index`` was encoded from."""
        describe = getattr(self.dataset, "describe", None)
        return describe(index) if describe else f"item {index}"
