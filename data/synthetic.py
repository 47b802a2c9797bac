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
from PIL import Image, ImageDraw, ImageFont

from data.multispectral import write_multispectral_dataset

Family = Literal["kontext", "qwen-edit", "flux-fill", "sd15-inpaint", "multispectral"]

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
# A pale grey stand-in that marks where an object goes: brighter than any background, so the
# context shows the region, and every object colour still differs from it on every mask pixel.
PLACEHOLDER_GREY = 215.0


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


def make_kontext_example(
    rng: np.random.Generator,
    height: int,
    width: int,
    placeholder: bool = False,
    colour: str | None = None,
) -> KontextExample:
    """One insertion pair of size ``(height, width)`` drawn from ``rng``.

    With ``placeholder`` the context holds a flat grey silhouette of the mask (a replacement
    task: the model can see where the object goes); with ``colour`` (a key of
    ``OBJECT_COLOURS``) the object has that colour instead of a drawn one. Neither changes the
    draws from ``rng``: two generators in the same state give the same scene either way.
    """
    background = smooth_background(rng, height, width)
    inside, shape = region_mask(rng, height, width)
    drawn = str(rng.choice(list(OBJECT_COLOURS)))
    colour = colour or drawn
    obj = textured_object(rng, OBJECT_COLOURS[colour], height, width)
    target = np.where(inside[..., None], obj, background)
    if placeholder:
        background = np.where(inside[..., None], PLACEHOLDER_GREY, background)

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
    make: Callable[[np.random.Generator, int, int], dict],
    files: dict[str, tuple[str, str]],
    side_files: dict[str, str] | None = None,
    prompt: Callable[[str], str] = str,
    square: bool = False,
) -> Path:
    """Write ``n`` examples drawn by ``make(rng, height, width)`` (images and a ``prompt``) as a
    folder with ``metadata.jsonl``, of the sizes of :func:`example_size` (all square with
    ``square``).

    ``files`` maps each row field to (path pattern with the index, key of the image written
    there); ``side_files`` maps path patterns to images written but not listed in the rows; the
    row's prompt is ``prompt(example["prompt"])``.
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
        example = make(rng, *example_size(0 if square else index, resolution))
        row = {field: pattern.format(index) for field, (pattern, _) in files.items()}
        written = {pattern.format(index): key for pattern, key in (side_files or {}).items()}
        written |= {row[field]: key for field, (_, key) in files.items()}
        for path, key in written.items():
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            example[key].save(out / path)
        rows.append({**row, "prompt": prompt(example["prompt"])})
    return _write_metadata(out, rows)


def _kontext_example(rng: np.random.Generator, height: int, width: int) -> dict:
    return vars(make_kontext_example(rng, height, width))


def _placeholder_example(rng: np.random.Generator, height: int, width: int) -> dict:
    return vars(make_kontext_example(rng, height, width, placeholder=True))


def write_kontext_dataset(
    out: str | Path, *, n: int = 8, resolution: int = 128, seed: int = 0, placeholder: bool = False
) -> Path:
    """Write ``n`` insertion pairs as an edit-pair folder; the same seed gives the same files.
    ``placeholder``: contexts mark the mask with a grey silhouette (see ``make_kontext_example``).

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
    make = _placeholder_example if placeholder else _kontext_example
    return _write_examples(out, n=n, resolution=resolution, seed=seed, make=make, files=files)


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
        make=_kontext_example,
        files=files,
        prompt=lambda text: text.removeprefix("insert "),
    )


TEXT_WORDS = ("CAFE", "OPEN", "SALE", "BAR", "HOTEL", "EXIT", "BOOKS", "TAXI")
TEXT_COLOURS = {"red": (200, 30, 30), "blue": (30, 50, 200), "black": (20, 20, 20)}


def make_text_edit(
    rng: np.random.Generator, height: int, width: int, colour: str | None = None
) -> dict:
    """One text edit: a background with a pale sign (``context``), the same with a word written
    on the sign (``target``), the word's box (``mask``, 0/255) and the instruction.

    With ``colour`` (a key of ``TEXT_COLOURS``) the word has that colour instead of a drawn one,
    without changing the draws from ``rng``: two generators in the same state give the same
    sign and word either way.
    """
    background = smooth_background(rng, height, width)
    sign_height = round(rng.uniform(0.3, 0.45) * height)
    sign_width = round(rng.uniform(0.6, 0.85) * width)
    top = int(rng.integers(0, height - sign_height + 1))
    left = int(rng.integers(0, width - sign_width + 1))
    context = Image.fromarray(np.rint(background).astype(np.uint8))
    draw = ImageDraw.Draw(context)
    draw.rectangle((left, top, left + sign_width - 1, top + sign_height - 1), fill=(235, 230, 215))
    word = str(rng.choice(TEXT_WORDS))
    drawn = str(rng.choice(list(TEXT_COLOURS)))
    colour = colour or drawn
    font = ImageFont.load_default(size=max(8, sign_height // 2))
    target = context.copy()
    box = ImageDraw.Draw(target).textbbox((0, 0), word, font=font)
    x = left + (sign_width - (box[2] - box[0])) // 2 - box[0]
    y = top + (sign_height - (box[3] - box[1])) // 2 - box[1]
    ImageDraw.Draw(target).text((x, y), word, font=font, fill=TEXT_COLOURS[colour])
    drawn = np.any(np.asarray(target) != np.asarray(context), axis=-1)
    rows, cols = np.nonzero(drawn)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = 255
    prompt = f'write "{word}" in {colour} on the sign'
    return {"context": context, "target": target, "mask": Image.fromarray(mask), "prompt": prompt}


def write_text_edit_dataset(
    out: str | Path, *, n: int = 8, resolution: int = 128, seed: int = 0, square: bool = False
) -> Path:
    """Write ``n`` text edits as a Qwen-Image-Edit folder, masks in seed 000's parallel layout;
    square, landscape and portrait in turn, or all square with ``square``.

    Layout: ``images/NNNN_context.png``, ``images/NNNN_target.png``, ``metadata.jsonl`` rows
    ``{"context", "target", "prompt"}`` and ``text_masks/NNNN_target.png``, the text's box named
    after its target (read with ``data.use_text_mask``).
    """
    files = {
        "context": ("images/{:04d}_context.png", "context"),
        "target": ("images/{:04d}_target.png", "target"),
    }
    return _write_examples(
        out,
        n=n,
        resolution=resolution,
        seed=seed,
        make=make_text_edit,
        files=files,
        side_files={"text_masks/{:04d}_target.png": "mask"},
        square=square,
    )


SYNTHETIC_WRITERS: dict[str, Callable[..., Path]] = {
    "kontext": write_kontext_dataset,
    "qwen-edit": write_text_edit_dataset,
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
