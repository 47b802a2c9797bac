"""Validation images: tensors to PIL, mask overlays and labelled grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.buckets import fit_to_bucket, make_buckets, nearest_bucket
from data.images import mask_to_tensor, open_image, open_mask, to_model_range

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


def blank_like(image: Image.Image) -> Image.Image:
    """A white image of ``image``'s size: the empty cell of a grid."""
    return Image.new("RGB", image.size, "white")


def save_grid(grid: Image.Image, output_dir: str | Path, step: int) -> Path:
    """Write ``grid`` to ``<output_dir>/validation/step-<step>.png``."""
    folder = Path(output_dir) / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:06d}.png"
    grid.save(path)
    return path


def validation_file_items(config) -> list[dict[str, torch.Tensor | None]]:
    """``--validation_images`` (and ``--validation_masks``), each scaled and centre-cropped to
    its bucket of the largest ``--resolution`` as training images are: ``{"image": [3, H, W] in
    [-1, 1], "mask": [1, H, W] in {0, 1} or None}``. A file that cannot be read raises
    ``DataError`` naming it."""
    buckets = make_buckets(config.largest_resolution)
    masks = config.validation_masks or [None] * len(config.validation_images)
    items = []
    for image_file, mask_file in zip(config.validation_images, masks, strict=True):
        image = open_image(image_file, "validation image")
        size = nearest_bucket(image.height, image.width, buckets)
        mask = None
        if mask_file is not None:
            fitted = fit_to_bucket(open_mask(mask_file, "validation mask"), size, Image.BILINEAR)
            mask = mask_to_tensor(fitted)
        items.append({"image": to_model_range(fit_to_bucket(image, size)), "mask": mask})
    return items


class PipelineValidation:
    """Runs a family's pipeline with the training model (the pipeline holds it) on the first
    examples, or on --validation_images, and saves a grid under ``validation/``. Subclasses say
    how a file becomes an item (:meth:`file_item`), how an item is passed to the pipeline
    (:meth:`call_arguments`) and shown (:meth:`row`, one image per ``labels`` entry);
    ``pipeline_kwargs`` are the family's fixed call arguments (guidance, prompt length)."""

    labels: tuple[str, ...]

    def __init__(self, pipe, dataset, config, accelerator, pipeline_kwargs: dict[str, Any]):
        self.pipe = pipe
        self.dataset = dataset
        self.config = config
        self.accelerator = accelerator
        self.pipeline_kwargs = pipeline_kwargs
        # Read now, so that a bad file stops the run before it trains, not at its first validation.
        self.file_items = (
            [self.file_item(item) for item in validation_file_items(config)]
            if config.validation_images
            else None
        )

    def file_item(self, item: dict[str, torch.Tensor | None]) -> dict[str, Any]:
        raise NotImplementedError

    def call_arguments(self, item: dict) -> dict[str, Any]:
        raise NotImplementedError

    def row(self, item: dict, prediction: Image.Image) -> list[Image.Image]:
        raise NotImplementedError

    def items(self) -> list[dict]:
        """The validation items: from --validation_images, else the first training examples."""
        if self.file_items is not None:
            return self.file_items
        count = min(self.config.num_validation_images, len(self.dataset))
        return [self.dataset[index] for index in range(count)]

    def prompt(self, index: int, item: dict) -> str:
        config = self.config
        if config.validation_prompts:
            return config.validation_prompts[index]
        return config.validation_prompt or item["prompt"]

    def __call__(self, model, step: int) -> Path:
        config = self.config
        rows = []
        for index, item in enumerate(self.items()):
            with self.accelerator.autocast():
                prediction = self.pipe(
                    prompt=self.prompt(index, item),
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

    def file_item(self, item: dict[str, torch.Tensor | None]) -> dict[str, Any]:
        """A validation file as an edit item: the image is the context (the only reference);
        there is no target, and no overlay without a mask."""
        image = item["image"]
        return {"context": image, "references": [image], "target": None, "mask": item["mask"]}

    def call_arguments(self, item: dict) -> dict[str, Any]:
        height, width = item["context" if item["target"] is None else "target"].shape[-2:]
        return {"image": to_pil(item["context"]), "height": height, "width": width}

    def row(self, item: dict, prediction: Image.Image) -> list[Image.Image]:
        context = to_pil(item["context"])
        target = blank_like(context) if item["target"] is None else to_pil(item["target"])
        mask = item["mask"]
        overlay = prediction if mask is None else mask_overlay(prediction, mask)
        return [context, target, prediction, overlay]


class InpaintingValidation(PipelineValidation):
    """An inpainting pipeline (FLUX.1 Fill, SD1.5 inpainting): image | mask | prediction |
    prediction with the mask tinted."""

    labels = ("image", "mask", "prediction", "mask overlay")

    def file_item(self, item: dict[str, torch.Tensor | None]) -> dict[str, Any]:
        return item

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
