"""Train a FLUX.2 edit LoRA ([klein] 4B/9B or [dev]) from one or several references, with the
mask losses.

Each example is (target image, one or more reference images, prompt[, mask]); a row without a
mask trains with flow matching alone. The data is checked before the model loads. The
transformer sees exactly what ``Flux2KleinPipeline`` (or ``Flux2Pipeline``) feeds it: the noisy
target's tokens followed by each reference's, every reference resized by the pipeline's own rule
and encoded as it encodes them (VAE mode, 2x2 patches, batch-norm statistics), the 4-axis
position ids with the references at t = 10, 20, ..., the text encoder's three hidden-state
layers, the guidance embedding for [dev], and sigma as the timestep. The loss is

    flow matching on the target tokens
    + the geometry terms on x0_hat against the mask, on the token grid (h/16 x w/16),

every weight a flag (0 switches a term off at no cost).

    accelerate launch train_flux2_edit_lora.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-base-4B \\
        --train_data_dir my_edits --output_dir out --max_train_steps 2000

then ``Flux2KleinPipeline.from_pretrained(...).load_lora_weights("out")``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import ClassVar, Literal

from training.config import (
    FlowMatchingConfig,
    GeometryLossConfig,
    LoraFileConfig,
    LowMemoryConfig,
    TextEditDataConfig,
    TextMaskSettings,
    TrainConfig,
    bounded,
    exit_after_help,
    parse_config,
)


@dataclass(kw_only=True)
class Flux2EditConfig(
    GeometryLossConfig,
    TextEditDataConfig,
    FlowMatchingConfig,
    LoraFileConfig,
    LowMemoryConfig,
    TrainConfig,
):
    """Train a FLUX.2 [klein] or [dev] edit LoRA with the mask geometry losses."""

    shipped_configs: ClassVar[str] = "flux2"
    """Prefix of this script's files in configs/, which --help lists."""
    base_model_id: ClassVar[str] = "black-forest-labs/FLUX.2-klein-base-4B"
    """The Hub id a single-file denoiser's pipeline comes from without --base_model_folder."""
    resolution: int | list[int] = bounded(1024, low=16)
    """Target side length in pixels (FLUX.2's native 1024); buckets keep about resolution**2
    pixels. A multiple of 16. Several (512,768,1024) train each item once at each size."""
    data: TextMaskSettings = field(
        default_factory=lambda: TextMaskSettings(use_text_mask=True, mask_dir_name="masks")
    )
    """Masks: use_text_mask (read a row's 'mask', else <dataset>/<mask_dir_name>/<target
    stem>.png), mask_dir_name."""
    guidance_scale: float = 4.0
    """[dev]: the guidance embedding's value, in training and validation (Flux2Pipeline's
    default). [klein] base: the classifier-free guidance scale of validation; distilled: unused."""
    max_sequence_length: int = bounded(512, low=1)
    """Prompt length in tokens, as the pipeline's max_sequence_length."""
    timestep_shift: float | Literal["auto"] = bounded("auto", low=0, low_open=True)
    """Shift of the sampled sigmas; 'auto' is the pipeline's own for the target's token count
    at --validation_inference_steps steps; a number fixes it; 1.0 is no shift."""
    validation_inference_steps: int = bounded(50, low=1)
    """Denoising steps of the validation pipeline (4 for a step-distilled [klein])."""


# --help answers here, before torch, diffusers and the models load.
exit_after_help(__name__, Flux2EditConfig, __doc__)

import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline

from data.rows import collate_items
from losses import geometry_starter_loss, masked_flow_matching_loss, masked_rows_loss
from training.datasets import bucket_sampler, text_edits_dataset
from training.inputs.caching import encoded_items, offload_after_caching
from training.inputs.captions import caption_dropout
from training.inputs.flow_matching import loss_weighting, noisy_latents, predicted_x0, sample_sigmas
from training.inputs.flux2 import (
    FLUX2_ENCODERS,
    FLUX2_LORA_LAYERS,
    TOKEN_PIXELS,
    flux2_encoder_fingerprint,
    flux2_prompt_encoding,
    flux2_transformer_inputs,
    latent_grid,
    normalised_latents,
    reference_grid,
    reference_pixels,
    reference_tokens,
    sampling_guidance,
    sampling_shift,
)
from training.loop import TrainingParts, train
from training.lora.adapters import LoraFormat, add_lora
from training.memory.offload import place_denoiser
from training.memory.plan import FamilyPlan, log_memory_plan, meta_tensor, pipeline_holding
from training.model_card import ModelCardInfo, edit_call, lora_usage
from training.runtime import build_accelerator, load_pipeline, run_main
from training.validation import EditValidation, to_pil

PIPELINES = {cls.__name__: cls for cls in (Flux2KleinPipeline, Flux2Pipeline)}


def pipeline_class(name_or_path: str) -> type:
    """``Flux2KleinPipeline`` or ``Flux2Pipeline``, as ``model_index.json`` says."""
    name = Flux2KleinPipeline.load_config(name_or_path)["_class_name"]
    if name not in PIPELINES:
        raise ValueError(f"{name_or_path} holds a {name}; expected one of {sorted(PIPELINES)}")
    return PIPELINES[name]


class Flux2Encoder:
    """A batch of pixels and prompts -> what the loss needs, with the pipeline's own encoders:
    the target's and each reference's normalised latents (the references at the pipeline's
    sizes, as tokens with their ids), the context in the target's bucket for the background
    terms and the prompt embeddings; the mask on the token grid and its signed distances come
    from the data loader."""

    def __init__(self, pipe, config: Flux2EditConfig) -> None:
        self.pipe = pipe
        self.config = config

    def fingerprint(self) -> str:
        return flux2_encoder_fingerprint(self.pipe, self.config)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return flux2_prompt_encoding(self.pipe, prompts, self.config.max_sequence_length)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        target = normalised_latents(pipe, batch["target"])
        # A batch's items have references of equal shapes (the sampler groups them so).
        references = [
            normalised_latents(
                pipe, torch.cat([reference_pixels(pipe, to_pil(image)) for image in images])
            )
            for images in zip(*batch["references"], strict=True)
        ]
        tokens, ids = reference_tokens(pipe, references)
        # The context is the first reference in the target's bucket: that reference itself
        # when the data handed it over in that bucket and the pipeline kept its size.
        aligned = batch["references"][0][0].shape == batch["target"].shape[1:]
        if aligned and references[0].shape == target.shape:
            context = references[0]
        else:
            context = normalised_latents(pipe, batch["context"])
        return {
            "target_latents": target,
            "context_latents": context,
            "reference_tokens": tokens,
            "reference_ids": ids,
            **self.encode_prompts(batch["prompt"]),
            "mask_latent": batch["mask_latent"],
            "signed_distance_map": batch["signed_distance_map"],
            "has_mask": batch["has_mask"],
        }


class Flux2Loss:
    """Flow matching on the target tokens + the geometry terms on the rows with a mask (the
    loop's ``compute_loss``)."""

    def __init__(self, pipe, config: Flux2EditConfig, encoder: Flux2Encoder, encoded: bool):
        self.pipe = pipe
        self.config = config
        self.encoder = encoder
        self.batches_are_encoded = encoded
        self.geometry = config.geometry_options()
        self.shift = partial(sampling_shift, steps=config.validation_inference_steps)

    def __call__(self, model, batch: dict, generator: torch.Generator):
        encoded = batch if self.batches_are_encoded else self.encoder(batch)
        pipe, config = self.pipe, self.config
        x0 = encoded["target_latents"]
        batch_size, _, height, width = x0.shape
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sigmas = sample_sigmas(
            config, batch_size, height * width, pipe.scheduler.config, generator, self.shift
        )
        x_t = noisy_latents(x0, noise, sigmas)
        inputs = flux2_transformer_inputs(
            pipe,
            x_t,
            encoded["reference_tokens"],
            encoded["reference_ids"],
            encoded["prompt_embeds"],
            sigmas,
            config.guidance_scale,
        )
        velocity = model(**inputs)[0][:, : height * width].float()
        target_velocity = pipe._pack_latents(noise - x0).float()
        flow_matching = masked_flow_matching_loss(
            velocity, target_velocity, weighting=loss_weighting(config, sigmas)
        )
        with_mask = encoded["has_mask"].bool()
        components = {"fm": flow_matching.detach(), "masked_samples": with_mask.float().mean()}
        total = config.flow_matching_weight * flow_matching
        rows = {
            **encoded,
            "noisy_tokens": inputs["hidden_states"][:, : height * width],
            "velocity": velocity,
            "sigmas": sigmas,
        }
        terms = masked_rows_loss(with_mask, rows, partial(self._geometry, components))
        return (total if terms is None else total + terms), components

    def _geometry(self, components: dict, rows: dict) -> torch.Tensor:
        """The geometry terms on the masked ``rows``, on the token grid; parts into
        ``components``."""
        target = rows["target_latents"].float()
        if not any(vars(self.geometry["weights"]).values()):
            return target.new_zeros(())
        predicted = predicted_x0(rows["noisy_tokens"].float(), rows["velocity"], rows["sigmas"])
        loss, parts = geometry_starter_loss(
            latent_grid(predicted, *target.shape[-2:]),
            target,
            rows["context_latents"].float(),
            rows["mask_latent"],
            signed_distance_map=rows["signed_distance_map"],
            **self.geometry,
        )
        components.update({f"geo_{name}": value.detach() for name, value in parts.items()})
        return loss


def text_edit_dataset(config: Flux2EditConfig):
    """The data flags' edits, each reference's token grid by the pipelines' resize rule (they
    read any number), the mask also on the token grid with its signed distances (made in the
    data loader). Reads image headers only."""
    return text_edits_dataset(
        config, reference_grid=reference_grid, max_references=None, mask_factor=TOKEN_PIXELS
    )


def planned_step_inputs(transformer, config: Flux2EditConfig, batch_size: int) -> dict:
    """The transformer's inputs in one step on the meta device: the target and one reference
    at the largest --resolution, the prompt at --max_sequence_length."""
    grid = config.largest_resolution // 16
    prompt_width = transformer.config.joint_attention_dim
    pipe = pipeline_holding(Flux2KleinPipeline, transformer)
    reference = meta_tensor(transformer, batch_size, 128, grid, grid)
    tokens, ids = reference_tokens(pipe, [reference])
    return flux2_transformer_inputs(
        pipe,
        meta_tensor(transformer, batch_size, 128, grid, grid),
        tokens,
        ids.to(tokens.device),
        meta_tensor(transformer, batch_size, config.max_sequence_length, prompt_width),
        meta_tensor(transformer, batch_size),
        config.guidance_scale,
    )


MEMORY_PLAN = FamilyPlan(
    "flux2-klein",
    "transformer",
    FLUX2_LORA_LAYERS,
    LoraFormat(Flux2KleinPipeline),
    ("text_encoder",),
    planned_step_inputs,
)

# metrics.jsonl name -> the flag weighting it.
TERM_WEIGHT_FLAGS = {
    "fm": "flow_matching_weight",
    "geo_mse": "geometry_mse_weight",
    "geo_bg": "background_weight",
    "geo_dice": "dice_weight",
    "geo_area": "area_weight",
    "geo_bnd": "boundary_weight",
}


def card_info(config: Flux2EditConfig, pipeline: str) -> ModelCardInfo:
    """The model card's family part, for the checkpoint's ``pipeline`` ([klein] or [dev])."""
    return ModelCardInfo(
        title=f"{pipeline.removesuffix('Pipeline')} edit LoRA",
        tags=("flux2", "image-editing"),
        losses={name: getattr(config, flag) for name, flag in TERM_WEIGHT_FLAGS.items()},
        usage=lora_usage(pipeline, edit_call(config.validation_prompt)),
    )


class Flux2Validation(EditValidation):
    """The pipeline on an item's references, all of them, at the target's size."""

    def call_arguments(self, item: dict) -> dict:
        references = [to_pil(image) for image in item["references"]]
        return {**super().call_arguments(item), "image": references}


def validation_kwargs(pipe, config: Flux2EditConfig) -> dict:
    """The pipeline's fixed arguments: --guidance_scale, except for a step-distilled [klein],
    which ignores it (and warns when it is above 1)."""
    return {
        "guidance_scale": sampling_guidance(pipe, config.guidance_scale),
        "max_sequence_length": config.max_sequence_length,
    }


def main(argv: list[str] | None = None) -> None:
    config = parse_config(Flux2EditConfig, argv, description=__doc__)
    accelerator = build_accelerator(config)
    pipeline = pipeline_class(config.pipeline_source)
    dataset = text_edit_dataset(config)
    log_memory_plan(config, MEMORY_PLAN, accelerator)
    pipe = load_pipeline(pipeline, config, accelerator, FLUX2_ENCODERS)
    lora_format = LoraFormat(pipeline, "transformer")
    add_lora(pipe.transformer, config, FLUX2_LORA_LAYERS, lora_format)
    if config.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()

    encoder = Flux2Encoder(pipe, config)
    dropout = caption_dropout(config, encoder.encode_prompts)
    items = encoded_items(accelerator, config, dataset, encoder, collate_items)
    place_denoiser(pipe.transformer, config, accelerator.device)
    parts = TrainingParts(
        model=pipe.transformer,
        dataset=items,
        sampler=bucket_sampler(
            config, accelerator, dataset.batch_group_of_items, dataset.repeats_of_items
        ),
        caption_dropout=dropout,
        collate_fn=collate_items,
        compute_loss=Flux2Loss(pipe, config, encoder, config.cache_latents),
        save_lora=lora_format.save,
        load_lora=lora_format.load,
        card=card_info(config, pipeline.__name__),
        validate=offload_after_caching(
            config,
            [getattr(pipe, name) for name in FLUX2_ENCODERS],
            accelerator.device,
            Flux2Validation(pipe, dataset, config, accelerator, validation_kwargs(pipe, config)),
        ),
    )
    train(accelerator, config, parts)


if __name__ == "__main__":
    run_main(main)
