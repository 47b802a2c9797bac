"""Validation images: tensors to PIL, mask overlays and labelled grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

VALIDATION_DIR = "validation"


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> RGB image."""
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def mask_overlay(image: Image.Image, mask: torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """``image`` with ``mask: [1, H, W]`` in [0, 1] tinted red."""
    base = np.asarray(image, dtype=np.float32)
    weight = alpha * mask.detach().float().cpu()[0].numpy()[..., None]
    tinted = base * (1 - weight) + np.array([255.0, 0.0, 0.0]) * weight
    return Image.fromarray(tinted.round().astype(np.uint8))


def image_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str]) -> Image.Image:
    """Rows of equally sized images under a header of column ``labels``."""
    width, height = rows[0][0].size
    header = 14
    grid = Image.new("RGB", (width * len(labels), header + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((column * width + 2, 1), label, fill="black")
    for row_index, row in enumerate(rows):
        for column, image in enumerate(row):
            grid.paste(image.resize((width, height)), (column * width, header + row_index * height))
    return grid


def save_grid(grid: Image.Image, output_dir: str | Path, step: int) -> Path:
    """Write ``grid`` to ``<output_dir>/validation/step-<step>.png``."""
    folder = Path(output_dir) / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    grid.save(path)
    return path


class PipelineValidation:
    """Runs a family's pipeline with the training model (the pipeline holds it) on the first
    examples and saves a grid under ``validation/``. Subclasses say how an item is passed to the
    pipeline (:meth:`call_arguments`) and shown (:meth:`row`, one image per ``labels`` entry);
    ``pipeline_kwargs`` are the family's fixed call arguments (guidance, prompt length)."""

    labels: tuple[str, ...]

    def __init__(self, pipe, dataset, config, accelerator, pipeline_kwargs: dict[str, Any]):
        self.pipe = pipe
        self.dataset = dataset
        self.config = config
        self.accelerator = accelerator
        self.pipeline_kwargs = pipeline_kwargs

    def call_arguments(self, item: dict) -> dict[str, Any]:
        raise NotImplementedError

    def row(self, item: dict, prediction: Image.Image) -> list[Image.Image]:
        raise NotImplementedError

    def __call__(self, model, step: int) -> Path:
        config = self.config
        rows = []
        for index in range(min(config.num_validation_images, len(self.dataset))):
            item = self.dataset[index]
            with self.accelerator.autocast():
                prediction = self.pipe(
                    prompt=config.validation_prompt or item["prompt"],
                    num_inference_steps=config.validation_inference_steps,
                    generator=torch.Generator(self.pipe.device).manual_seed(config.seed),
                    **self.call_arguments(item),
                    **self.pipeline_kwargs,
                ).images[0]
            rows.append(self.row(item, prediction))
        return save_grid(image_grid(rows, self.labels), config.output_dir, step)


class EditValidation(PipelineValidation):
    """An edit pipeline (Kontext, Qwen-Image-Edit) on edit pairs: context | target | prediction
    | prediction with the mask tinted, at the target's size."""

    labels = ("context", "target", "prediction", "mask overlay")

    def call_arguments(self, item: dict) -> dict[str, Any]:
        height, width = item["target"].shape[-2:]
        return {"image": to_pil(item["context"]), "height": height, "width": width}

    def row(self, item: dict, prediction: Image.Image) -> list[Image.Image]:
        context, target = to_pil(item["context"]), to_pil(item["target"])
        return [context, target, prediction, mask_overlay(prediction, item["mask"])]


class InpaintingValidation(PipelineValidation):
    """An inpainting pipeline (FLUX.1 Fill, SD1.5 inpainting): image | mask | prediction |
    prediction with the mask tinted."""

    labels = ("image", "mask", "prediction", "mask overlay")

    def call_arguments(self, item: dict) -> dict[str, Any]:
        height, width = item["image"].shape[-2:]
        return {
            "image": to_pil(item["image"]),
            "mask_image": self.mask_image(item),
            "height": height,
            "width": width,
        }

    @staticmethod
    def mask_image(item: dict) -> Image.Image:
        return to_pil(item["mask"].expand(3, -1, -1) * 2 - 1)

    def row(self, item: dict, prediction: Image.Image) -> list[Image.Image]:
        overlay = mask_overlay(prediction, item["mask"])
        return [to_pil(item["image"]), self.mask_image(item), prediction, overlay]
