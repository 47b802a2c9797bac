"""Synthetic datasets: small, deterministic, and in the layout each family's script reads.

They let the tests and a first CPU run exercise a training script end to end in seconds, with
answers known by construction. The inpainting set (FLUX.1 Fill, SD1.5 inpainting) is the
insertion set's targets with their object masks: the model learns to fill the mask with the
object the prompt names. The Kontext insertion set: each example is a smooth background
(``context``), the same background with a textured, strongly coloured object filling a known
mask region (``target``), the mask (0/255 PNG) and a prompt naming the object ("insert a red
ball"). Backgrounds are muted (every channel in [80, 180]) and every object colour has a channel
at most 40, so the target differs from the context on every mask pixel and nowhere else.
The multispectral leaf set is written by :func:`data.multispectral.write_multispectral_dataset`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from data.multispectral import write_multispectral_dataset

Family = Literal["kontext", "flux-fill", "sd15-inpaint", "multispectral"]

OBJECT_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 40, 200),
    "orange": (240, 130, 20),
}
OBJECT_OF_SHAPE = {"ellipse": "ball", "rectangle": "box"}
BACKGROUND_RANGE = (80.0, 180.0)


@dataclass(frozen=True)
class KontextExample:
    """One insertion pair: RGB ``context`` and ``target``, an "L" 0/255 ``mask``, a prompt."""

    context: Image.Image
    target: Image.Image
    mask: Image.Image
    prompt: str


def example_size(index: int, resolution: int) -> tuple[int, int]:
    """``(height, width)`` of example ``index``: square, landscape and portrait in turn.

    The long side is ``1.25 * resolution`` rounded to 16, so several buckets are used.
    """
    long = round(resolution * 1.25 / 16) * 16
    return [(resolution, resolution), (resolution, long), (long, resolution)][index % 3]


def _low_frequency_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` smooth noise of unit scale: a 4x4 random grid per channel, upsampled."""
    channels = [
        np.asarray(
            Image.fromarray(rng.normal(size=(4, 4)).astype(np.float32)).resize(
                (width, height), Image.Resampling.BICUBIC
            )
        )
        for _ in range(3)
    ]
    return np.stack(channels, axis=-1)


def smooth_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` float: a two-colour linear gradient plus low-frequency noise, muted."""
    start, end = rng.uniform(100, 160, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    along = np.cos(angle) * xx / width + np.sin(angle) * yy / height
    t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    gradient = start * (1 - t[..., None]) + end * t[..., None]
    noisy = gradient + 10.0 * _low_frequency_noise(rng, height, width)
    return np.clip(noisy, *BACKGROUND_RANGE)


def region_mask(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, str]:
    """A random rectangle or ellipse, 20-45% of each side: ``([H, W] bool, shape name)``."""
    shape = str(rng.choice(list(OBJECT_OF_SHAPE)))
    region_height = round(rng.uniform(0.2, 0.45) * height)
    region_width = round(rng.uniform(0.2, 0.45) * width)
    top = int(rng.integers(0, height - region_height + 1))
    left = int(rng.integers(0, width - region_width + 1))
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    if shape == "rectangle":
        inside = (
            (yy >= top) & (yy < top + region_height) & (xx >= left) & (xx < left + region_width)
        )
    else:
        dy = (yy - top - region_height / 2) / (region_height / 2)
        dx = (xx - left - region_width / 2) / (region_width / 2)
        inside = dy**2 + dx**2 <= 1
    return inside, shape


def textured_object(
    rng: np.random.Generator, colour: tuple[int, int, int], height: int, width: int
) -> np.ndarray:
    """``[H, W, 3]`` float: ``colour`` modulated by random stripes, 70-100% brightness."""
    period = rng.uniform(6, 12)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    return np.asarray(colour, dtype=np.float64) * (0.7 + 0.3 * stripes[..., None])


def make_kontext_example(rng: np.random.Generator, height: int, width: int) -> KontextExample:
    """One insertion pair of size ``(height, width)`` drawn from ``rng``."""
    background = smooth_background(rng, height, width)
    inside, shape = region_mask(rng, height, width)
    colour = str(rng.choice(list(OBJECT_COLOURS)))
    obj = textured_object(rng, OBJECT_COLOURS[colour], height, width)
    target = np.where(inside[..., None], obj, background)

    def to_image(pixels: np.ndarray) -> Image.Image:
        return Image.fromarray(np.rint(pixels).astype(np.uint8))

    return KontextExample(
        context=to_image(background),
        target=to_image(target),
        mask=Image.fromarray(inside.astype(np.uint8) * 255),
        prompt=f"insert {'an' if colour[0] in 'aeiou' else 'a'} {colour} {OBJECT_OF_SHAPE[shape]}",
    )


def _write_metadata(out: Path, rows: list[dict[str, str]]) -> Path:
    """Write ``metadata.jsonl`` last and atomically: it never lists files not yet written."""
    metadata = out / "metadata.jsonl"
    partial = metadata.with_suffix(".jsonl.partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(partial, metadata)
    return metadata


def _write_examples(
    out: str | Path,
    *,
    n: int,
    resolution: int,
    seed: int,
    files: dict[str, tuple[str, str]],
    prompt: Callable[[str], str],
) -> Path:
    """Write ``n`` insertion examples as a folder with ``metadata.jsonl``.

    ``files`` maps each row field to (path pattern with the index, ``KontextExample``
    attribute written there); the row's prompt is ``prompt(example.prompt)``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if resolution < 16 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16, got {resolution}")
    out = Path(out)
    if (out / "metadata.jsonl").exists():
        raise FileExistsError(f"'{out / 'metadata.jsonl'}' already exists; choose another --out")
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n):
        example = make_kontext_example(rng, *example_size(index, resolution))
        row = {}
        for field, (pattern, attribute) in files.items():
            row[field] = pattern.format(index)
            (out / row[field]).parent.mkdir(parents=True, exist_ok=True)
            getattr(example, attribute).save(out / row[field])
        rows.append({**row, "prompt": prompt(example.prompt)})
    return _write_metadata(out, rows)


def write_kontext_dataset(
    out: str | Path, *, n: int = 8, resolution: int = 128, seed: int = 0
) -> Path:
    """Write ``n`` insertion pairs as an edit-pair folder; the same seed gives the same files.

    Layout: ``images/NNNN_context.png``, ``images/NNNN_target.png``, ``masks/NNNN.png`` and
    ``metadata.jsonl`` with paths relative to ``out``. Returns the metadata path.

    Raises:
        ValueError: ``n < 1`` or ``resolution`` not a positive multiple of 16.
        FileExistsError: ``out`` already holds a ``metadata.jsonl`` (nothing is overwritten).
    """
    files = {
        "context": ("images/{:04d}_context.png", "context"),
        "target": ("images/{:04d}_target.png", "target"),
        "mask": ("masks/{:04d}.png", "mask"),
    }
    return _write_examples(
        out, n=n, resolution=resolution, seed=seed, files=files, prompt=lambda text: text
    )


def write_inpainting_dataset(
    out: str | Path, *, n: int = 8, resolution: int = 128, seed: int = 0
) -> Path:
    """Write ``n`` inpainting examples in seed 004's folder format; returns the metadata path.

    Layout: ``images/NNNN.png`` (an object on a smooth background), ``masks/NNNN.png`` (the
    object's region, 0/255, not aligned to any latent grid) and ``metadata.jsonl`` rows
    ``{"image", "mask", "prompt"}`` with the prompt naming the object ("a red ball").

    Raises:
        ValueError: ``n < 1`` or ``resolution`` not a positive multiple of 16.
        FileExistsError: ``out`` already holds a ``metadata.jsonl``.
    """
    files = {"image": ("images/{:04d}.png", "target"), "mask": ("masks/{:04d}.png", "mask")}
    return _write_examples(
        out,
        n=n,
        resolution=resolution,
        seed=seed,
        files=files,
        prompt=lambda text: text.removeprefix("insert "),
    )


SYNTHETIC_WRITERS: dict[str, Callable[..., Path]] = {
    "kontext": write_kontext_dataset,
    "flux-fill": write_inpainting_dataset,
    "sd15-inpaint": write_inpainting_dataset,
    "multispectral": write_multispectral_dataset,
}


def write_synthetic_dataset(
    family: Family, out: str | Path, *, n: int = 8, resolution: int = 128, seed: int = 0
) -> Path:
    """Write the synthetic dataset of ``family`` into ``out``; returns its index file
    (``metadata.jsonl``; for ``multispectral``, the ``images`` folder)."""
    return SYNTHETIC_WRITERS[family](out, n=n, resolution=resolution, seed=seed)
