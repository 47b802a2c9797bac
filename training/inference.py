"""A trained LoRA run by its family's diffusers pipeline, beside the base model, on given inputs.

Inputs are a folder in the training layout (``metadata.jsonl`` rows: ``{"context", "prompt"}``
for the edit families, ``context`` a list of references for the pipelines that read several,
``{"image", "mask", "prompt"}`` for the inpainting ones; other keys are ignored) or image files
with their prompts (and masks). Each example is fitted to a size the
pipelines take (``--resolution``'s nearest aspect-ratio bucket, or its own size cropped to
multiples of 16), masks binarised as in training, and run twice from the same seed, the LoRA
off and on; both results and a grid of every example (input | mask | without LoRA | with LoRA)
are saved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image

from data.buckets import fit_to_bucket, make_buckets, nearest_bucket
from data.images import DataError, ImageRef, mask_to_tensor
from data.rows import FolderRows, RowFields, validated_sizes
from models.qwen_processor import load_image_only_processor
from training.lora.export import (
    DIFFUSERS_LOAD_ERRORS,
    KOHYA,
    PIPELINE_FAMILIES,
    describe_load_error,
    families_of_modules,
    lora_file_path,
    read_lora,
)
from training.lora.layouts import LAYOUTS, LayoutError
from training.validation import image_grid, mask_overlay

logger = logging.getLogger(__name__)

ADAPTER_NAME = "lora"
GRID_FILE = "grid.png"


@dataclass(frozen=True)
class Example:
    """One input: ``image`` (RGB), its ``mask`` (L, 0/255, 255 = region) for inpainting, the
    ``prompt``, a ``name`` for its output files, and more ``references`` for the pipelines that
    read several."""

    name: str
    image: Image.Image
    prompt: str
    mask: Image.Image | None = None
    references: tuple[Image.Image, ...] = ()
    """Further references after ``image``, at their own size (the pipeline resizes each)."""


@dataclass(frozen=True)
class InferenceFamily:
    """How a family's pipeline is loaded and called: the pipeline classes it accepts (as
    ``model_index.json`` names them), the ``metadata.jsonl`` field of its input image, whether
    it takes a mask, and fixed call arguments."""

    pipelines: tuple[str, ...]
    input_field: str
    takes_mask: bool
    fixed: dict[str, Any] = field(default_factory=dict)
    image_only_processor: bool = False
    several_references: tuple[str, ...] = ()
    """The pipelines among ``pipelines`` that take a list of reference images."""

    def call_arguments(self, example: Example) -> dict[str, Any]:
        """The pipeline's arguments for ``example``, at the example's size."""
        width, height = example.image.size
        image = [example.image, *example.references] if example.references else example.image
        arguments = {"prompt": example.prompt, "image": image}
        arguments |= {"height": height, "width": width, **self.fixed}
        if self.takes_mask:
            arguments["mask_image"] = example.mask
        if "max_area" in self.fixed:
            arguments["max_area"] = height * width
        return arguments


FAMILIES = {
    # Kontext resizes its input to one of its preferred sizes unless told the area to keep.
    "kontext": InferenceFamily(
        ("FluxKontextPipeline",), "context", False, {"max_area": None, "_auto_resize": False}
    ),
    # Without a negative prompt the pipeline's true CFG is off; saying so spares its warning.
    "qwen-edit": InferenceFamily(
        ("QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
        "context",
        False,
        {"true_cfg_scale": 1.0},
        image_only_processor=True,
        several_references=("QwenImageEditPlusPipeline",),
    ),
    "flux-fill": InferenceFamily(("FluxFillPipeline",), "image", True),
    "sd15-inpaint": InferenceFamily(("StableDiffusionInpaintPipeline",), "image", True),
    # FLUX.2 [klein] and [dev] both edit from every reference in the image list.
    "flux2": InferenceFamily(
        ("Flux2KleinPipeline", "Flux2Pipeline"),
        "context",
        False,
        several_references=("Flux2KleinPipeline", "Flux2Pipeline"),
    ),
}

# (input images, the first the one shown, mask or None, prompt from the folder or "")
_Source = tuple[list[ImageRef], ImageRef | None, str]


def _folder_sources(family: InferenceFamily, root: Path) -> list[_Source]:
    if family.takes_mask:
        fields = RowFields("inference", (family.input_field, "mask"))
    else:
        fields = RowFields("inference", (family.input_field,), several=family.input_field)
    rows = FolderRows(root, fields)
    validated_sizes(rows)  # every bad row in one error, before a pipeline is loaded
    sources = []
    for index in range(len(rows)):
        row = rows[index]
        inputs = row.several(fields) or [row.images[family.input_field]]
        sources.append((inputs, row.images.get("mask"), row.prompt))
    return sources


def _file_sources(
    family: InferenceFamily, inputs: Sequence[str | Path], masks: Sequence[str | Path]
) -> list[_Source]:
    if not family.takes_mask and masks:
        raise DataError("--mask: this family's pipeline takes no mask")
    if family.takes_mask and len(masks) != len(inputs):
        raise DataError(f"{len(inputs)} input image(s) need one --mask each, got {len(masks)}")
    images = [ImageRef(Path(path), "--input") for path in inputs]
    mask_refs = [ImageRef(Path(path), "--mask") for path in masks] or [None] * len(images)
    for image, mask in zip(images, mask_refs, strict=True):
        if mask is not None and mask.size() != image.size():
            raise DataError(f"{mask.label}: its size differs from {image.label}'s")
    return [([image], mask, "") for image, mask in zip(images, mask_refs, strict=True)]


def load_examples(
    family: InferenceFamily,
    inputs: Sequence[str | Path],
    masks: Sequence[str | Path] = (),
    prompts: Sequence[str] = (),
    resolution: int | None = None,
) -> list[Example]:
    """The examples of ``inputs``: one folder with a ``metadata.jsonl`` (``prompts`` then
    replace its rows'), or image files with one mask each (inpainting) and ``prompts``, one for
    all or one each. Raises ``DataError`` naming what is missing or does not fit."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        if masks:
            raise DataError("--mask is for image files; a folder's rows name their masks")
        sources = _folder_sources(family, Path(inputs[0]))
    else:
        sources = _file_sources(family, inputs, masks)
        if not prompts:
            raise DataError("image files need --prompt (one for all, or one per image)")
    if prompts and len(prompts) not in (1, len(sources)):
        raise DataError(f"--prompt: one, or one per example ({len(sources)}), not {len(prompts)}")
    examples = []
    for index, ([image_ref, *reference_refs], mask_ref, prompt) in enumerate(sources):
        image = image_ref.open("RGB")
        if resolution is None:
            size = (image.height // 16 * 16, image.width // 16 * 16)
        else:
            size = nearest_bucket(image.height, image.width, make_buckets(resolution))
        mask = None
        if mask_ref is not None:
            fitted = fit_to_bucket(mask_ref.open_mask(), size, Image.Resampling.BILINEAR)
            mask = Image.fromarray(mask_to_tensor(fitted)[0].numpy().astype(np.uint8) * 255)
        stem = image_ref.source.stem if isinstance(image_ref.source, Path) else "image"
        examples.append(
            Example(
                name=f"{index:03d}_{stem}",
                image=fit_to_bucket(image, size),
                prompt=prompts[index % len(prompts)] if prompts else prompt,
                mask=mask,
                references=tuple(ref.open("RGB") for ref in reference_refs),
            )
        )
    return examples


def family_pipeline(family_name: str, model: str | Path) -> str:
    """The class name of ``model``'s pipeline (a folder or Hub id), checked against the
    family."""
    family = FAMILIES[family_name]
    pipeline = diffusers.DiffusionPipeline.load_config(str(model))["_class_name"]
    if pipeline not in family.pipelines:
        raise ValueError(
            f"{model} holds a {pipeline}; --family {family_name} runs "
            f"{' or '.join(family.pipelines)}"
        )
    return pipeline


def check_references(family: InferenceFamily, pipeline: str, examples: Sequence[Example]) -> None:
    """Refuse examples with several references for a pipeline that reads one, naming them."""
    several = [example.name for example in examples if example.references]
    if several and pipeline not in family.several_references:
        readers = " and ".join(family.several_references) or "no pipeline of this family"
        raise DataError(
            f"{', '.join(several)}: several reference images; {pipeline} reads one ({readers} "
            "reads several)"
        )


def load_family_pipeline(family_name: str, model: str | Path, dtype: torch.dtype, device: str):
    """The family's pipeline from ``model`` (a folder or Hub id), checked against the family."""
    family = FAMILIES[family_name]
    pipeline = family_pipeline(family_name, model)
    extra = {}
    if family.image_only_processor:  # no torchvision needed (models.qwen_processor)
        extra["processor"] = load_image_only_processor(str(model))
    pipe = getattr(diffusers, pipeline).from_pretrained(model, dtype=dtype, **extra).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_lora_fits(pipe, lora: str | Path) -> None:
    """Refuse a LoRA (readable, or a ``ValueError`` naming the file) whose module names belong
    to another family of models than ``pipe``'s: diffusers would load the part that happens to
    fit, warn, and run a half-applied LoRA."""
    lora_file = read_lora(lora)
    theirs = families_of_modules(lora_file)
    ours = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if theirs and ours is not None and ours not in theirs:
        raise ValueError(
            f"'{lora_file.path}' is a {' or '.join(theirs)} LoRA (by its module names); "
            f"{type(pipe).__name__} is a {ours} pipeline. Give the matching --family and --model."
        )


def load_lora(pipe, lora: str | Path) -> None:
    """``pipe.load_lora_weights`` on ``lora`` as the adapter "lora". Raises ``ValueError`` naming
    the file and saying what is wrong when diffusers cannot read it: its key converters stop on
    keys they do not know with bare asserts and KeyErrors, its loaders on shapes that do not fit
    with RuntimeErrors."""
    path = lora_file_path(lora)
    try:
        pipe.load_lora_weights(str(path), adapter_name=ADAPTER_NAME)
    except DIFFUSERS_LOAD_ERRORS as error:
        family = PIPELINE_FAMILIES[type(pipe).__name__]
        raise ValueError(why_unreadable(path, family, error)) from error


def why_unreadable(path: Path, family: str, error: BaseException) -> str:
    """One line on a LoRA file of ``family`` that diffusers failed to load with ``error``: the
    kohya modules the family's layout has no name for, when it has some, else diffusers' own
    error and, for a kohya file the suite's layout reads, how to convert it first."""
    lora = read_lora(path)
    if lora.layout != KOHYA:
        return f"{path}: diffusers cannot load it as a {family} LoRA ({describe_load_error(error)})"
    problem = f"{path}: its keys are not a LoRA of {family} that diffusers can read"
    try:
        LAYOUTS[family].from_kohya(lora.pairs)
    except LayoutError as unknown:
        return f"{problem} ({unknown})"
    # Every module has its place in the family's layout: diffusers' converter is the narrower
    # (it splits FLUX's fused linear1 at FLUX.1's widths only).
    return (
        f"{problem} ({describe_load_error(error)}); scripts/export_lora.py {path} --to diffusers "
        "--out FILE writes a copy it reads"
    )


def run_with_and_without(
    pipe,
    family: InferenceFamily,
    examples: Sequence[Example],
    lora: str | Path,
    output_dir: str | Path,
    *,
    lora_scale: float = 1.0,
    seed: int = 0,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Run every example without and with ``lora`` (a safetensors file or a training output
    folder, in either key layout) at ``lora_scale``, from the same ``seed``; save
    ``<name>_base.png``, ``<name>_lora.png`` and the grid in ``output_dir``. Returns the grid."""
    check_lora_fits(pipe, lora)
    load_lora(pipe, lora)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_adapters(ADAPTER_NAME, lora_scale)
    rows = []
    for example in examples:
        arguments = {**family.call_arguments(example), **(pipeline_kwargs or {})}
        results = {}
        for name, switch in (("base", pipe.disable_lora), ("lora", pipe.enable_lora)):
            switch()
            generator = torch.Generator(pipe.device).manual_seed(seed)
            results[name] = pipe(**arguments, generator=generator).images[0]
            results[name].save(output_dir / f"{example.name}_{name}.png")
        shown = [example.image]
        if example.mask is not None:
            shown.append(mask_overlay(example.image, mask_to_tensor(example.mask)))
        rows.append([*shown, results["base"], results["lora"]])
        logger.info("%s: %s", example.name, example.prompt)
    labels = ["input", *(["mask"] if family.takes_mask else [])]
    labels += ["without LoRA", f"with LoRA x{lora_scale:g}"]
    grid = output_dir / GRID_FILE
    image_grid(rows, labels).save(grid)
    return grid
