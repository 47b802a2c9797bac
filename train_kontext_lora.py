"""Train a FLUX.1 Kontext LoRA that inserts or replaces an object inside a known mask.

Each example is (context image, target image, prompt[, insertion mask, overlay negative]); a row
without a mask trains with flow matching alone. The data is checked before the model loads. The
transformer sees exactly what ``FluxKontextPipeline`` feeds it: noisy target tokens followed by
the context image's tokens (image ids with channel 0 set to 1), T5 and pooled CLIP prompt
embeddings, the guidance embedding, and sigma as the timestep. The loss is

    flow matching on the target tokens
    + the geometry losses on x0_hat = x_t - sigma * v_pred against the mask
    + the embedding losses (no-edit identity, geometry match, overlay avoidance),

every weight a flag (0 switches a term off at no cost).

    accelerate launch train_kontext_lora.py \\
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-Kontext-dev \\
        --train_data_dir my_pairs --output_dir out --mixed_precision bf16 \\
        --resolution 1024 --max_train_steps 2000 --validation_steps 250

then ``FluxKontextPipeline.from_pretrained(...).load_lora_weights("out")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

from training.config import (
    EditPairDataConfig,
    FlowMatchingConfig,
    FluxConfig,
    GeometryLossConfig,
    LoraFileConfig,
    LowMemoryConfig,
    TrainConfig,
    bounded,
    exit_after_help,
    parse_config,
)


@dataclass(kw_only=True)
class KontextConfig(
    GeometryLossConfig,
    EditPairDataConfig,
    FlowMatchingConfig,
    FluxConfig,
    LoraFileConfig,
    LowMemoryConfig,
    TrainConfig,
):
    """Train a FLUX.1 Kontext LoRA with mask geometry and embedding losses."""

    shipped_configs: ClassVar[str] = "kontext"
    """Prefix of this script's files in configs/, which --help lists."""
    base_model_id: ClassVar[str] = "black-forest-labs/FLUX.1-Kontext-dev"
    """The Hub id a single-file denoiser's pipeline comes from without --base_model_folder."""
    resolution: int | list[int] = bounded(1024, low=16)
    """Target side length in pixels (FLUX.1 Kontext's native 1024); buckets keep about
    resolution**2 pixels. A multiple of 16. Several (512,768,1024) train each item once at each
    size."""
    guidance_scale: float = 3.5
    """Guidance embedding value (FluxKontextPipeline's default guidance_scale)."""
    identity_weight: float = bounded(1.0, low=0)
    """Embedding: penalise a prediction closer to the source than to the target."""
    geometry_match_weight: float | None = bounded(None, low=0)
    """Embedding: squared L2 between prediction and target embeddings. Default: 0.5
    with --embedding_encoder; 0 on latent tokens, where it is exactly 64 * sigma**2 times the
    flow-matching loss (a sigma-dependent reweighting of it, not a shape term)."""
    overlay_weight: float = bounded(0.7, low=0)
    """Embedding: penalise a prediction closer to the overlay negative than to the target."""
    identity_margin: float = 0.25
    """Cosine margin of the identity term."""
    overlay_margin: float = 0.25
    """Cosine margin of the overlay term."""
    embedding_encoder: str | None = None
    """Local DINOv2 or CLIP checkpoint for the embedding losses; default: latent tokens."""

    def embedding_weights(self) -> EmbeddingLossWeights:
        geometry = self.geometry_match_weight
        if geometry is None:
            geometry = SEED_GEOMETRY_MATCH_WEIGHT if self.embedding_encoder else 0.0
        return EmbeddingLossWeights(
            identity=self.identity_weight,
            geometry=geometry,
            overlay=self.overlay_weight,
            identity_margin=self.identity_margin,
            overlay_margin=self.overlay_margin,
        )


# --help answers here, before torch, diffusers and the models load.
exit_after_help(__name__, KontextConfig, __doc__)

import torch
from diffusers import FluxKontextPipeline

from data.rows import collate_items
from losses import (
    EmbeddingLossWeights,
    embedding_starter_loss,
    geometry_starter_loss,
    masked_flow_matching_loss,
    masked_rows_loss,
)
from training.datasets import bucket_sampler, edit_pair_dataset
from training.inputs.caching import encoded_items, encoder_weights, offload_after_caching
from training.inputs.captions import caption_dropout
from training.inputs.embeddings import ImageEmbedder
from training.inputs.flow_matching import loss_weighting, noisy_latents, predicted_x0, sample_sigmas
from training.inputs.flux import (
    FLUX_ENCODERS,
    FLUX_LORA_LAYERS,
    flux_encoder_fingerprint,
    flux_image_ids,
    flux_prompt_encoding,
    flux_transformer_inputs,
    pack,
    planned_flux_conditioning,
    vae_scale_factor,
)
from training.loop import TrainingParts, train
from training.lora.adapters import LoraFormat, add_lora
from training.memory.offload import place_denoiser
from training.memory.plan import FamilyPlan, log_memory_plan, meta_tensor, pipeline_holding
from training.model_card import ModelCardInfo, edit_call, lora_usage
from training.runtime import build_accelerator, load_pipeline, run_main
from training.validation import EditValidation

KONTEXT_LORA = LoraFormat(FluxKontextPipeline, "transformer")

# Seed 003's geometry-match weight, the default when embeddings come from an image encoder.
SEED_GEOMETRY_MATCH_WEIGHT = 0.5

# Every auxiliary loss term: its name in metrics.jsonl and the flag that weights it.
TERM_WEIGHT_FLAGS = {
    "geo_mse": "geometry_mse_weight",
    "geo_bg": "background_weight",
    "geo_dice": "dice_weight",
    "geo_area": "area_weight",
    "geo_bnd": "boundary_weight",
    "emb_identity": "identity_weight",
    "emb_geometry": "geometry_match_weight",
    "emb_overlay": "overlay_weight",
}


def kontext_transformer_inputs(
    pipe: FluxKontextPipeline,
    noisy_target: torch.Tensor,
    context_latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float,
) -> dict:
    """Transformer kwargs as ``FluxKontextPipeline`` builds them for one denoising step.

    ``noisy_target: [B, 16, h, w]`` and ``context_latents: [B, 16, hc, wc]`` (VAE-scaled) are
    packed 2x2 and concatenated along the sequence, target first; the context's image ids carry
    1 in channel 0; ``sigmas: [B]`` is the timestep.
    """
    context_ids = flux_image_ids(pipe, *context_latents.shape[-2:], noisy_target)
    context_ids[..., 0] = 1
    return flux_transformer_inputs(
        pipe,
        torch.cat([pack(pipe, noisy_target), pack(pipe, context_latents)], dim=1),
        torch.cat([flux_image_ids(pipe, *noisy_target.shape[-2:], noisy_target), context_ids]),
        prompt_embeds,
        pooled_prompt_embeds,
        sigmas,
        guidance_scale,
    )


class KontextEncoder:
    """Turns a batch of pixels and prompts into what the loss needs, with the pipeline's own
    encoders: VAE mode latents, shifted and scaled; T5 and pooled CLIP prompt embeddings; the
    overlay negative's latent tokens; and, with --embedding_encoder, image embeddings of target,
    context and overlay instead."""

    def __init__(
        self, pipe: FluxKontextPipeline, config: KontextConfig, embedder: ImageEmbedder | None
    ) -> None:
        self.pipe = pipe
        self.config = config
        self.embedder = embedder
        weights = config.embedding_weights()
        self.needs_overlay = weights.overlay != 0
        self.needs_image_embeddings = embedder is not None and any(
            (weights.identity, weights.geometry, weights.overlay)
        )

    def fingerprint(self) -> str:
        """What the encoded tensors depend on besides the item, for the cache."""
        embedder = self.config.embedding_encoder if self.needs_image_embeddings else None
        return flux_encoder_fingerprint(
            self.pipe,
            self.config,
            overlay=self.needs_overlay,
            embedder=embedder and [embedder, encoder_weights(embedder)],
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return flux_prompt_encoding(self.pipe, prompts, self.config.max_sequence_length)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        dtype = pipe.vae.dtype
        encoded = {
            "target_latents": pipe._encode_vae_image(batch["target"].to(dtype), generator=None),
            "context_latents": pipe._encode_vae_image(batch["context"].to(dtype), generator=None),
            **self.encode_prompts(batch["prompt"]),
            "mask_latent": batch["mask_latent"],
            "signed_distance_map": batch["signed_distance_map"],
            "has_mask": batch["has_mask"],
        }
        if self.needs_overlay and not self.needs_image_embeddings:
            # Only ever compared as latent tokens: pack it here, once per item.
            overlay = pipe._encode_vae_image(batch["overlay"].to(dtype), generator=None)
            encoded["overlay_tokens"] = pack(pipe, overlay)
        if self.needs_image_embeddings:
            for name in ("target", "context", "overlay"):
                encoded[f"{name}_embeds"] = self.embedder(batch[name])
        return encoded


class KontextLoss:
    """Flow matching + geometry + embedding losses for one batch (the loop's ``compute_loss``)."""

    def __init__(
        self,
        pipe: FluxKontextPipeline,
        config: KontextConfig,
        encoder: KontextEncoder,
        embedder: ImageEmbedder | None,
        batches_are_encoded: bool,
    ) -> None:
        self.pipe = pipe
        self.config = config
        self.encoder = encoder
        self.embedder = embedder
        self.batches_are_encoded = batches_are_encoded
        self.geometry = config.geometry_options()
        self.embedding = config.embedding_weights()

    def __call__(
        self, model: torch.nn.Module, batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        encoded = batch if self.batches_are_encoded else self.encoder(batch)
        pipe, config = self.pipe, self.config
        x0 = encoded["target_latents"]
        batch_size, _, height, width = x0.shape
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sigmas = sample_sigmas(
            config, batch_size, (height // 2) * (width // 2), pipe.scheduler.config, generator
        )
        x_t = noisy_latents(x0, noise, sigmas)
        inputs = kontext_transformer_inputs(
            pipe,
            x_t,
            encoded["context_latents"],
            encoded["prompt_embeds"],
            encoded["pooled_prompt_embeds"],
            sigmas,
            config.guidance_scale,
        )
        target_tokens = (height // 2) * (width // 2)
        velocity = model(**inputs)[0][:, :target_tokens].float()
        target_velocity = pack(pipe, noise - x0)
        flow_matching = masked_flow_matching_loss(
            velocity, target_velocity.float(), weighting=loss_weighting(config, sigmas)
        )
        with_mask = encoded["has_mask"].bool()
        components = {"fm": flow_matching.detach(), "masked_samples": with_mask.float().mean()}
        total = config.flow_matching_weight * flow_matching
        # Tensors already packed: x_t's tokens are the first part of the transformer's input,
        # and the velocities come packed (each 2x2 repacking copy costs more than the losses on
        # small latents).
        rows = {
            **encoded,
            "noisy_tokens": inputs["hidden_states"][:, :target_tokens],
            "context_tokens": inputs["hidden_states"][:, target_tokens:],
            "velocity": velocity,
            "target_velocity": target_velocity,
            "sigmas": sigmas,
        }
        terms = masked_rows_loss(
            with_mask, rows, partial(self._mask_terms, components, height, width)
        )
        return (total if terms is None else total + terms), components

    def _mask_terms(self, components: dict, height: int, width: int, rows: dict) -> torch.Tensor:
        """The geometry and embedding terms on the masked ``rows``; their parts go into
        ``components``."""
        noisy = rows["noisy_tokens"].float()
        tokens = {
            "pred": predicted_x0(noisy, rows["velocity"], rows["sigmas"]),
            "target": predicted_x0(noisy, rows["target_velocity"].float(), rows["sigmas"]),
            "context": rows["context_tokens"].float(),
        }
        geometry, parts = self._geometry_losses(rows, tokens["pred"], height, width)
        components.update({f"geo_{name}": value.detach() for name, value in parts.items()})
        embedding, parts = self._embedding_losses(rows, tokens, height, width)
        components.update({f"emb_{name}": value.detach() for name, value in parts.items()})
        return geometry + embedding

    def _geometry_losses(
        self, encoded: dict, predicted_tokens: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not any(vars(self.geometry["weights"]).values()):
            return predicted_tokens.new_zeros(()), {}
        scale = self.pipe.vae_scale_factor
        x0_hat = self.pipe._unpack_latents(predicted_tokens, height * scale, width * scale, scale)
        return geometry_starter_loss(
            x0_hat,
            encoded["target_latents"].float(),
            encoded["context_latents"].float(),
            encoded["mask_latent"],
            signed_distance_map=encoded["signed_distance_map"],
            **self.geometry,
        )

    def _embedding_losses(
        self, encoded: dict, tokens: dict[str, torch.Tensor], height: int, width: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The seed 003 mix on latent tokens ``[B, L, 64]``, or on image-encoder embeddings of
        the decoded prediction when --embedding_encoder is set."""
        weights = self.embedding
        if not any((weights.identity, weights.geometry, weights.overlay)):
            return tokens["pred"].new_zeros(()), {}
        if self.embedder is not None:
            # Decode the prediction (through the frozen VAE, keeping the graph) and embed it.
            pipe, scale = self.pipe, self.pipe.vae_scale_factor
            x0_hat = pipe._unpack_latents(tokens["pred"], height * scale, width * scale, scale)
            latents = x0_hat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
            pred = self.embedder(pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0])
            return embedding_starter_loss(
                pred,
                encoded["target_embeds"],
                encoded["context_embeds"],
                encoded.get("overlay_embeds"),
                weights=weights,
            )
        overlay = encoded.get("overlay_tokens")
        return embedding_starter_loss(
            tokens["pred"],
            tokens["target"],
            tokens["context"],
            None if overlay is None else overlay.float(),
            weights=weights,
        )


def planned_step_inputs(transformer, config: KontextConfig, batch_size: int) -> dict:
    """The transformer's inputs in one step at the largest --resolution, on the meta device:
    target and context of that size, T5 embeddings at --max_sequence_length."""
    latents = (batch_size, 16, config.largest_resolution // 8, config.largest_resolution // 8)
    return kontext_transformer_inputs(
        pipeline_holding(FluxKontextPipeline, transformer),
        meta_tensor(transformer, *latents),
        meta_tensor(transformer, *latents),
        *planned_flux_conditioning(transformer, config, batch_size),
    )


MEMORY_PLAN = FamilyPlan(
    "kontext",
    "transformer",
    FLUX_LORA_LAYERS,
    KONTEXT_LORA,
    ("text_encoder", "text_encoder_2"),
    planned_step_inputs,
)


def card_info(config: KontextConfig) -> ModelCardInfo:
    """The model card's family part: every loss term by its metrics.jsonl name."""
    losses = {"fm": config.flow_matching_weight}
    losses |= {name: getattr(config, flag) for name, flag in TERM_WEIGHT_FLAGS.items()}
    losses["emb_geometry"] = config.embedding_weights().geometry  # None resolved
    return ModelCardInfo(
        title="FLUX.1 Kontext LoRA",
        tags=("flux", "flux-kontext", "image-editing"),
        losses=losses,
        usage=lora_usage("FluxKontextPipeline", edit_call(config.validation_prompt)),
    )


class KontextValidation(EditValidation):
    """``FluxKontextPipeline`` at exactly the bucket's size: no automatic resize of the context."""

    def call_arguments(self, item: dict) -> dict:
        arguments = super().call_arguments(item)
        return {
            **arguments,
            "max_area": arguments["height"] * arguments["width"],
            "_auto_resize": False,
        }


def main(argv: list[str] | None = None) -> None:
    config = parse_config(KontextConfig, argv, description=__doc__)
    accelerator = build_accelerator(config)
    dataset = edit_pair_dataset(config, vae_scale_factor(config.pipeline_source))
    log_memory_plan(config, MEMORY_PLAN, accelerator)

    pipe = load_pipeline(FluxKontextPipeline, config, accelerator, FLUX_ENCODERS)
    transformer = pipe.transformer
    add_lora(transformer, config, FLUX_LORA_LAYERS, KONTEXT_LORA)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    embedder = None
    if config.embedding_encoder:
        embedder = ImageEmbedder(config.embedding_encoder).to(accelerator.device)

    encoder = KontextEncoder(pipe, config, embedder)
    dropout = caption_dropout(config, encoder.encode_prompts)
    items = encoded_items(accelerator, config, dataset, encoder, collate_items)
    place_denoiser(transformer, config, accelerator.device)

    parts = TrainingParts(
        model=transformer,
        dataset=items,
        sampler=bucket_sampler(
            config, accelerator, dataset.bucket_of_items, dataset.repeats_of_items
        ),
        caption_dropout=dropout,
        collate_fn=collate_items,
        compute_loss=KontextLoss(pipe, config, encoder, embedder, config.cache_latents),
        save_lora=KONTEXT_LORA.save,
        load_lora=KONTEXT_LORA.load,
        card=card_info(config),
        validate=offload_after_caching(
            config,
            # With an image encoder the loss decodes predictions: the VAE stays.
            [pipe.text_encoder, pipe.text_encoder_2] + ([] if embedder else [pipe.vae]),
            accelerator.device,
            KontextValidation(
                pipe,
                dataset,
                config,
                accelerator,
                {
                    "guidance_scale": config.guidance_scale,
                    "max_sequence_length": config.max_sequence_length,
                },
            ),
        ),
    )
    train(accelerator, config, parts)


if __name__ == "__main__":
    run_main(main)
