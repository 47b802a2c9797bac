"""Train a Qwen-Image-Edit LoRA with a text-region mask loss.

Each example is (references, target image, instruction[, text mask]): one reference for
Qwen-Image-Edit, one or more for Edit-2509/2511. The transformer sees exactly what the
checkpoint's pipeline feeds it, ``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``, chosen
from ``model_index.json``: noisy target tokens followed by each reference's tokens (VAE mode,
normalised by the VAE's latent mean and std), ``img_shapes`` with one entry per image, the prompt
embedded by the vision-language encoder with the pipeline's own template (one picture
placeholder per reference) and images, ``encoder_hidden_states_mask`` as the pipeline passes it,
and sigma as the timestep with the pipeline's resolution-dependent shift. Each reference is
resized by the pipeline's own rule (:func:`condition_images`). The loss is flow matching on the
target tokens, mixed with the text-region weighting when ``mask_loss.enabled``. The data is
checked before the model loads.

    accelerate launch train_qwen_edit_mask.py --config configs/qwen_edit.yaml \\
        --train_data_dir my_text_edits --output_dir out

(or ``--control_dirs``, ``--train_data_file``: the layouts of :mod:`data.edit_sources`), then
``QwenImageEditPipeline.from_pretrained(...).load_lora_weights("out")``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Literal

from training.config import (
    FlowMatchingConfig,
    LoraFileConfig,
    LowMemoryConfig,
    RegionLossConfig,
    TextEditDataConfig,
    TrainConfig,
    bounded,
    exit_after_help,
    parse_config,
)


@dataclass(kw_only=True)
class QwenEditConfig(
    RegionLossConfig,
    TextEditDataConfig,
    FlowMatchingConfig,
    LoraFileConfig,
    LowMemoryConfig,
    TrainConfig,
):
    """Train a Qwen-Image-Edit LoRA with a text-region mask loss."""

    shipped_configs: ClassVar[str] = "qwen_edit"
    """Prefix of this script's files in configs/, which --help lists."""
    base_model_id: ClassVar[str] = "Qwen/Qwen-Image-Edit"
    """The Hub id a single-file denoiser's pipeline comes from without --base_model_folder."""
    resolution: int | list[int] = bounded(1024, low=16)
    """Target side length in pixels (Qwen-Image-Edit's native 1024); buckets keep about
    resolution**2 pixels. A multiple of 16. Several (512,768,1024) train each item once at each
    size."""
    timestep_shift: float | Literal["auto"] = bounded("auto", low=0, low_open=True)
    """Shift of the sampled sigmas; 'auto' is the pipeline's own, from the target's token
    count (exp(mu)); a number fixes it; 1.0 is no shift."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.caption_dropout and self.cache_latents:
            raise ValueError(
                "--caption_dropout needs --cache_latents false here: Qwen-Image-Edit encodes "
                "the reference images with the prompt, so an empty caption is encoded per "
                "example at each step"
            )


# --help answers here, before torch, diffusers and the models load.
exit_after_help(__name__, QwenEditConfig, __doc__)

import torch
import torch.nn.functional as F
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
from PIL import Image

from data.cache import fingerprint
from data.rows import collate_items
from data.text_edits import TextEditDataset
from losses import map_mask_to_latent, masked_flow_matching_loss
from models.qwen_processor import load_image_only_processor
from training.datasets import bucket_sampler, text_edits_dataset
from training.inputs.caching import encoded_items, encoder_weights, offload_after_caching
from training.inputs.captions import caption_dropout
from training.inputs.flow_matching import loss_weighting, noisy_latents, sample_sigmas
from training.inputs.flux import FLUX_LORA_LAYERS, pack
from training.loop import TrainingParts, train
from training.lora.adapters import LoraFormat, add_lora
from training.memory.offload import place_denoiser
from training.memory.plan import FamilyPlan, log_memory_plan, meta_tensor, pipeline_holding
from training.model_card import ModelCardInfo, edit_call, lora_usage, region_weighted
from training.runtime import build_accelerator, load_pipeline, run_main
from training.validation import EditValidation, to_pil

logger = logging.getLogger(__name__)

QWEN_ENCODERS = ("vae", "text_encoder")
PIPELINES = {cls.__name__: cls for cls in (QwenImageEditPipeline, QwenImageEditPlusPipeline)}
# The attention projections of both streams, as for FLUX, but the text stream's output
# projection: Qwen-Image has no single-stream blocks, so the last block's text output is
# discarded and a LoRA there would never get a gradient (which DDP refuses).
LORA_LAYERS = tuple(layer for layer in FLUX_LORA_LAYERS if layer != "attn.to_add_out")


def pipeline_class(name_or_path: str) -> type:
    """``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``, as ``model_index.json`` says."""
    name = QwenImageEditPipeline.load_config(name_or_path)["_class_name"]
    if name not in PIPELINES:
        raise ValueError(f"{name_or_path} holds a {name}; expected one of {sorted(PIPELINES)}")
    return PIPELINES[name]


def vae_size(plus: bool, height: int, width: int) -> tuple[int, int]:
    """``(height, width)`` at which the pipeline VAE-encodes a reference of that size: about
    1024x1024 area in multiples of 32 (Edit), or of 16 (Plus)."""
    ratio = width / height
    if plus:
        width, height = edit_plus.calculate_dimensions(edit_plus.VAE_IMAGE_SIZE, ratio)
    else:
        width, height, _ = edit.calculate_dimensions(1024 * 1024, ratio)
    return height, width


def condition_grid(pipeline: type, size: tuple[int, int]) -> tuple[int, int]:
    """The token grid of a reference of ``size = (height, width)`` in ``pipeline``'s
    transformer input: the VAE size over 16."""
    height, width = vae_size(pipeline is QwenImageEditPlusPipeline, *size)
    return height // 16, width // 16


def condition_images(
    pipe, references: list[Image.Image]
) -> tuple[list[Image.Image], list[torch.Tensor]]:
    """The pipeline's own resize rule for each reference: ``(images the vision-language encoder
    sees, pixels the VAE encodes [1, 3, 1, H_i, W_i] in [-1, 1])``.

    Edit: both from the image resized to about 1024x1024 area. Plus: the encoder's at about
    384x384 area, the VAE's at about 1024x1024, both from the original.
    """
    processor = pipe.image_processor
    plus = isinstance(pipe, QwenImageEditPlusPipeline)
    vl_images, pixels = [], []
    for image in references:
        height, width = vae_size(plus, image.height, image.width)
        if plus:
            ratio = image.width / image.height
            vl_width, vl_height = edit_plus.calculate_dimensions(
                edit_plus.CONDITION_IMAGE_SIZE, ratio
            )
            vl_images.append(processor.resize(image, vl_height, vl_width))
            pixels.append(processor.preprocess(image, height, width).unsqueeze(2))
        else:
            vl_images.append(processor.resize(image, height, width))
            pixels.append(processor.preprocess(vl_images[-1], height, width).unsqueeze(2))
    return vl_images, pixels


def pad_prompts(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[T_i, D]`` prompt embeddings -> ``([B, T, D]`` zero-padded, ``[B, T]`` mask ``)``, the
    mask None when no prompt is padded, as the pipeline passes it."""
    longest = max(e.shape[0] for e in embeds)
    padded = torch.stack([F.pad(e, (0, 0, 0, longest - e.shape[0])) for e in embeds])
    if all(e.shape[0] == longest for e in embeds):
        return padded, None
    mask = torch.stack(
        [torch.arange(longest, device=padded.device) < e.shape[0] for e in embeds]
    ).long()
    return padded, mask


def qwen_transformer_inputs(
    noisy_target: torch.Tensor,
    condition_tokens: torch.Tensor,
    condition_shapes: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_embeds_mask: torch.Tensor | None,
    sigmas: torch.Tensor,
    pipe,
) -> dict:
    """Transformer kwargs of one edit-pipeline step: ``noisy_target: [B, 16, h, w]`` packed 2x2,
    followed along the sequence by ``condition_tokens: [B, L, 64]``, the references' packed
    normalised latents one after another; ``img_shapes`` one entry per image, the references'
    token grids from ``condition_shapes: [B, N, 2]``; ``sigmas: [B]`` the timestep."""
    height, width = noisy_target.shape[-2:]
    img_shapes = [
        [(1, height // 2, width // 2)] + [(1, int(h), int(w)) for h, w in shapes.tolist()]
        for shapes in condition_shapes
    ]
    return {
        "hidden_states": torch.cat([pack(pipe, noisy_target), condition_tokens], 1),
        "timestep": sigmas.to(noisy_target.dtype),
        "guidance": None,
        "encoder_hidden_states_mask": prompt_embeds_mask,
        "encoder_hidden_states": prompt_embeds,
        "img_shapes": img_shapes,
        "return_dict": False,
    }


def target_velocity(
    model,
    pipe,
    noisy_target: torch.Tensor,
    encoded: dict,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """``model``'s packed velocity of the target tokens ``[B, h/2 * w/2, 64]`` at one edit-pipeline
    step (``encoded``: the encoder's ``condition_tokens``, ``condition_shapes`` and
    ``prompt_embeds``, ``[T_i, D]`` each); the reference tokens after them are dropped, as the
    pipeline drops them."""
    padded, mask = pad_prompts(encoded["prompt_embeds"])
    inputs = qwen_transformer_inputs(
        noisy_target,
        encoded["condition_tokens"],
        encoded["condition_shapes"],
        padded,
        mask,
        sigmas,
        pipe,
    )
    height, width = noisy_target.shape[-2:]
    return model(**inputs)[0][:, : (height // 2) * (width // 2)]


def normalised_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 1, H, W]`` -> ``[B, 16, H/8, W/8]``: VAE mode, ``(z - mean) / std``, as the
    pipeline encodes its condition image."""
    return pipe._encode_vae_image(pixels.to(pipe.vae.dtype), generator=None)[:, :, 0]


@torch.no_grad()
def encode_condition(pipe, references: list[Image.Image], prompt: str) -> dict[str, torch.Tensor]:
    """One edit's condition as the pipeline encodes it: ``prompt_embeds: [T, D]`` (the prompt with
    one picture placeholder per reference, the references as the vision-language encoder sees
    them), ``condition_tokens: [1, L, 64]`` (the references' normalised latents, packed, one
    after another) and ``condition_shapes: [1, N, 2]`` (each reference's token grid)."""
    vl_images, pixels = condition_images(pipe, references)
    image = vl_images if isinstance(pipe, QwenImageEditPlusPipeline) else vl_images[0]
    prompt_embeds, _ = pipe.encode_prompt(prompt=[prompt], image=image, device=pipe.vae.device)
    latents = [normalised_latents(pipe, p.to(pipe.vae.device)) for p in pixels]
    tokens, shapes = reference_tokens(pipe, latents)
    return {
        "prompt_embeds": prompt_embeds[0],
        "condition_tokens": tokens,
        "condition_shapes": shapes,
    }


def reference_tokens(pipe, latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The references' normalised latents ``[B, 16, h_i, w_i]`` each -> ``condition_tokens:
    [B, sum_i h_i/2 * w_i/2, 64]`` (packed, one after another) and ``condition_shapes: [B, N,
    2]`` (each reference's token grid)."""
    shapes = [[z.shape[-2] // 2, z.shape[-1] // 2] for z in latents]
    tokens = torch.cat([pack(pipe, latent) for latent in latents], 1)
    return tokens, torch.tensor([shapes] * latents[0].shape[0], device=tokens.device)


class QwenEditEncoder:
    """A batch of pixels and prompts -> prompt embeddings (``[T_i, D]`` each, the context image
    seen by the vision-language encoder), normalised condition and target latents, and the mask
    as one weight per target token with its ``has_mask`` flag."""

    def __init__(self, pipe, config: QwenEditConfig) -> None:
        self.pipe = pipe
        self.config = config

    def fingerprint(self) -> str:
        pipe = self.pipe
        return fingerprint(
            model=self.config.pipeline_source,
            pipeline=type(pipe).__name__,
            weights=encoder_weights(self.config.pipeline_source, QWEN_ENCODERS),
            vae=dict(pipe.vae.config),
            text_encoder=pipe.text_encoder.config.to_dict(),
            dtype=str(pipe.vae.dtype),
        )

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        # One item at a time: the Plus pipeline reads a list of images as one prompt's pictures.
        conditions = [
            encode_condition(pipe, [to_pil(image) for image in references], prompt)
            for references, prompt in zip(batch["references"], batch["prompt"], strict=True)
        ]
        return {
            "prompt_embeds": [condition["prompt_embeds"] for condition in conditions],
            "condition_tokens": torch.cat([c["condition_tokens"] for c in conditions]),
            "condition_shapes": torch.cat([c["condition_shapes"] for c in conditions]),
            "target_latents": normalised_latents(pipe, batch["target"][:, :, None]),
            "mask_tokens": map_mask_to_latent(batch["mask"][:, 0], pipe.vae_scale_factor),
            "has_mask": batch["has_mask"],
        }


def collate_encoded(items: list[dict]) -> dict:
    """Cached items into a batch: prompt embeddings padded (:func:`pad_prompts`)."""
    batch = collate_items([{k: v for k, v in i.items() if k != "prompt_embeds"} for i in items])
    batch["prompt_embeds"] = [item["prompt_embeds"] for item in items]
    return batch


class QwenEditLoss:
    """Flow matching on the target tokens, mixed with seed 000's region weighting for samples
    with a mask (plain for the others): the loop's ``compute_loss``."""

    def __init__(self, pipe, config: QwenEditConfig, encoder: QwenEditEncoder, encoded: bool):
        self.pipe = pipe
        self.config = config
        self.encoder = encoder
        self.batches_are_encoded = encoded

    def __call__(self, model, batch: dict, generator: torch.Generator):
        encoded = batch if self.batches_are_encoded else self.encoder(batch)
        pipe, config = self.pipe, self.config
        x0 = encoded["target_latents"]
        batch_size, _, height, width = x0.shape
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sigmas = sample_sigmas(
            config, batch_size, (height // 2) * (width // 2), pipe.scheduler.config, generator
        )
        velocity = target_velocity(
            model, pipe, noisy_latents(x0, noise, sigmas), encoded, sigmas
        ).float()
        target = pack(pipe, noise - x0).float()
        weighting = loss_weighting(config, sigmas)
        with_mask = encoded["has_mask"].bool() & config.mask_loss.enabled
        loss = masked_flow_matching_loss(velocity, target, weighting=weighting)
        components = {"fm": loss.detach(), "masked_samples": with_mask.float().mean()}
        if with_mask.any():
            # Samples have equal token counts: the mean of per-subset means, by subset size.
            plain = ~with_mask
            region = masked_flow_matching_loss(
                velocity[with_mask],
                target[with_mask],
                encoded["mask_tokens"][with_mask],
                weighting=None if weighting is None else weighting[with_mask],
                **config.region_loss_weights(),
            )
            rest = (
                masked_flow_matching_loss(
                    velocity[plain],
                    target[plain],
                    weighting=None if weighting is None else weighting[plain],
                )
                if plain.any()
                else region.new_zeros(())
            )
            loss = (region * with_mask.sum() + rest * plain.sum()) / batch_size
            components["mask_loss"] = region.detach()
        return loss, components


def text_edit_dataset(config: QwenEditConfig, pipeline: type) -> TextEditDataset:
    """The data flags' edits for ``pipeline``: the Edit pipeline reads one reference, Plus
    several, each resized by the pipeline's rule. Reads image headers only."""
    one = (1, f"{pipeline.__name__} (Qwen-Image-Edit; Edit-2509 and 2511 read several)")
    return text_edits_dataset(
        config,
        reference_grid=partial(condition_grid, pipeline),
        max_references=None if pipeline is QwenImageEditPlusPipeline else one,
    )


# Tokens of the prompt as the vision-language encoder reads it in Qwen-Image-Edit: the
# condition image at about 1024x1024 in 28-pixel patches merged 2x2 (37 x 37) and the template.
PLANNED_PROMPT_TOKENS = 37 * 37 + 64


def planned_step_inputs(transformer, config: QwenEditConfig, batch_size: int) -> dict:
    """The transformer's inputs in one step on the meta device: the target at the largest
    --resolution, the condition at the pipeline's 1024x1024, the prompt as Qwen-Image-Edit's
    encoder reads it (Edit-2509/2511 read the image at 384x384: fewer tokens)."""
    target, condition = config.largest_resolution // 8, 1024 // 8
    width = transformer.config.joint_attention_dim
    return qwen_transformer_inputs(
        meta_tensor(transformer, batch_size, 16, target, target),
        meta_tensor(transformer, batch_size, (condition // 2) ** 2, 64),
        torch.tensor([[[condition // 2, condition // 2]]] * batch_size),
        meta_tensor(transformer, batch_size, PLANNED_PROMPT_TOKENS, width),
        None,
        meta_tensor(transformer, batch_size),
        pipeline_holding(QwenImageEditPipeline, transformer),
    )


MEMORY_PLAN = FamilyPlan(
    "qwen-edit",
    "transformer",
    LORA_LAYERS,
    LoraFormat(QwenImageEditPipeline),
    ("text_encoder",),
    planned_step_inputs,
)


def card_info(config: QwenEditConfig, pipeline: str) -> ModelCardInfo:
    """The model card's family part, for the checkpoint's ``pipeline`` (Edit or Edit Plus)."""
    return ModelCardInfo(
        title=f"{pipeline.removesuffix('Pipeline')} LoRA",
        tags=("qwen-image", "qwen-image-edit", "image-editing"),
        losses=region_weighted(config, "flow matching"),
        usage=lora_usage(pipeline, edit_call(config.validation_prompt)),
    )


class QwenEditValidation(EditValidation):
    """The pipeline on an item's references: all of them for Plus, the one for Edit."""

    def call_arguments(self, item: dict) -> dict:
        references = [to_pil(image) for image in item["references"]]
        image = references if isinstance(self.pipe, QwenImageEditPlusPipeline) else references[0]
        return {**super().call_arguments(item), "image": image}


def main(argv: list[str] | None = None) -> None:
    config = parse_config(QwenEditConfig, argv, description=__doc__)
    accelerator = build_accelerator(config)
    pipeline = pipeline_class(config.pipeline_source)
    dataset = text_edit_dataset(config, pipeline)
    log_memory_plan(config, MEMORY_PLAN, accelerator)
    pipe = load_pipeline(
        pipeline,
        config,
        accelerator,
        QWEN_ENCODERS,
        processor=load_image_only_processor(config.pipeline_source),
    )
    lora_format = LoraFormat(pipeline, "transformer")
    add_lora(pipe.transformer, config, LORA_LAYERS, lora_format)
    if config.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()

    encoder = QwenEditEncoder(pipe, config)
    items = encoded_items(accelerator, config, dataset, encoder, collate_items)
    place_denoiser(pipe.transformer, config, accelerator.device)
    parts = TrainingParts(
        model=pipe.transformer,
        dataset=items,
        sampler=bucket_sampler(
            config, accelerator, dataset.batch_group_of_items, dataset.repeats_of_items
        ),
        # Its prompt encoding holds the references: an empty caption is encoded per example,
        # from the raw batch (the config refuses --caption_dropout with --cache_latents).
        caption_dropout=caption_dropout(config, None),
        collate_fn=collate_encoded if config.cache_latents else collate_items,
        compute_loss=QwenEditLoss(pipe, config, encoder, config.cache_latents),
        save_lora=lora_format.save,
        load_lora=lora_format.load,
        card=card_info(config, pipeline.__name__),
        validate=offload_after_caching(
            config,
            [getattr(pipe, name) for name in QWEN_ENCODERS],
            accelerator.device,
            # No negative prompt: the pipeline's true cfg is off; say so rather than warn.
            QwenEditValidation(pipe, dataset, config, accelerator, {"true_cfg_scale": 1.0}),
        ),
    )
    train(accelerator, config, parts)


if __name__ == "__main__":
    run_main(main)
