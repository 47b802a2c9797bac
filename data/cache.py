"""On-disk cache of per-item tensors (VAE latents, prompt embeddings) in safetensors.

Entries live at ``<root>/<model fingerprint>/<item key>.safetensors``: the fingerprint covers
everything that shapes the tensors besides the item (model configs, the encoders' weight files,
encoding settings) and the item key covers the item's content (file bytes, prompt, bucket
size), so two different pairs, or one pair under two models, never share an entry. Files are
written under a temporary name and renamed, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from data.images import DataError


def fingerprint(**parts) -> str:
    """A short stable digest of JSON-serialisable ``parts`` (configs, settings)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def weight_files_digest(folders: Iterable[str | Path]) -> dict[str, list]:
    """What identifies the weight files under ``folders`` (recursively), cheaply.

    For each file with a weight suffix: its size, modification time (ns) and, for safetensors,
    a hash of its header (tensor names, dtypes, shapes, offsets, metadata). Weights replaced at
    the same path change at least the modification time, so a cache keyed by this never serves
    latents of the old weights; nothing the size of the weights is read. Missing folders give
    an empty entry.
    """
    digest: dict[str, list] = {}
    for folder in map(Path, folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        for path in files:
            stat = path.stat()
            digest[str(path)] = [stat.st_size, stat.st_mtime_ns, _safetensors_header_hash(path)]
    return digest


def _safetensors_header_hash(path: Path) -> str | None:
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return hashlib.sha256(handle.read(min(length, 100_000_000))).hexdigest()


class TensorCache:
    """Tensor dicts keyed by item key, under one model fingerprint."""

    def __init__(self, root: str | Path, model_fingerprint: str) -> None:
        self.folder = Path(root) / model_fingerprint

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        """Whether a readable entry is stored under ``key``: a damaged one (a disk error, a
        stray edit) counts as missing, so filling the cache writes it again."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            with safe_open(path, "pt"):
                return True
        except (SafetensorError, OSError):
            return False

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``key`` (CPU).

        Raises:
            DataError: naming the entry when it cannot be read (damaged since the cache filled).
        """
        path = self.path(key)
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise DataError(
                f"latent cache entry '{path}' cannot be read ({error}); delete it and run again: "
                "the cache encodes what is missing"
            ) from error

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` under ``key``, atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        partial = final.with_suffix(f".{os.getpid()}.partial")
        save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, partial)
        os.replace(partial, final)
