"""A tiny *pretrained* FLUX.1 Fill world: fill the masked region with the object the prompt names.

It is the Kontext world's domain (``data.synthetic``: smooth backgrounds, striped objects of six
colours and two shapes) as an inpainting task, in the layout ``train_flux_fill.py`` reads.
``build_fill_world``

1. writes the inpainting examples (``data.synthetic.write_inpainting_dataset``: the image with
   its object, the object's mask, a prompt naming it, "a red ball"): ``train/`` for the LoRA and
   ``heldout/``, other examples, for evaluation;
2. trains an ``AutoencoderKL`` with FLUX's 16 latent channels at FLUX's own 8x
   (:func:`fill_vae`) on that domain, images and masked images alike, and sets its
   ``shift_factor`` / ``scaling_factor`` as the Kontext world does
   (``worlds.kontext_world.fit_latent_scale``), its posterior narrowed
   (:func:`narrow_posterior`: the pipeline samples from it). It is 8x, not the Kontext world's
   4x, because the script hands the transformer the 8x8 pixels of the mask under each latent pixel
   (``data.fill_latents.mask_latents_from_pixels``), which only lines up with an 8x VAE;
3. pretrains a small ``FluxTransformer2DModel`` with Fill's 384-channel input (the Kontext
   world's transformer, :func:`fill_transformer`) by flow matching on holes that hide only
   background (:func:`pretraining_examples`), with the script's own input builder: the base
   reconstructs the image around a hole and continues the background into it, but has never
   drawn an object in one. That is the LoRA's task;
4. saves a complete ``FluxFillPipeline`` with ``save_pretrained`` (safetensors).

The build is deterministic for its settings and is reused when ``world.json`` in the folder
records the same settings (``worlds.fitting.reusable_record``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxFillPipeline, FluxTransformer2DModel

from data.synthetic import make_kontext_example, region_mask, write_inpainting_dataset
from worlds.fitting import (
    posterior_means,
    pretrain_by_flow_matching,
    reconstruction_psnr,
    reusable_record,
    with_world_models,
    world_record,
    write_record,
)
from worlds.kontext_world import (
    WORLD_MAX_SEQUENCE_LENGTH,
    fit_latent_scale,
    train_vae,
    world_transformer,
)
from worlds.tiny_models import _seeded, tiny_flux_fill_pipeline

logger = logging.getLogger(__name__)

# FluxFillPipeline's default guidance embedding, which the script trains and samples at.
FILL_GUIDANCE = 30.0
# The log-variance of the VAE's posterior after :func:`narrow_posterior`: a standard deviation of
# exp(-7), about 1e-3, against latents of spread 1.
POSTERIOR_LOG_VARIANCE = -14.0
# The last scenes of the pretraining examples (two examples each), held out of both stages: the
# VAE's reconstruction PSNR in ``world.json`` is measured on them.
HELDOUT_SCENES = 16


@dataclass(frozen=True)
class FillWorldSettings:
    """What a Fill world depends on; a folder built with other settings is rebuilt."""

    resolution: int = 64
    """Side of the square examples (others are 1.25x longer on one side); a multiple of 16."""
    n_train: int = 96
    """Inpainting examples the LoRA trains on."""
    n_heldout: int = 24
    """Inpainting examples never trained on, for evaluation."""
    scenes: int = 256
    """Scenes of the pretraining examples (two each); the last 16 are held out."""
    vae_steps: int = 600
    """Optimizer steps of the VAE, on whole images."""
    base_steps: int = 1500
    """Optimizer steps of the transformer's pretraining."""
    vae_batch_size: int = 8
    """Images per VAE step."""
    base_batch_size: int = 16
    """Examples per pretraining step of the transformer."""
    seed: int = 0
    """Seed of data, weights and pretraining."""
    version: int = 1
    """Bumped when the recipe changes, so old builds are rebuilt."""


def fill_vae(seed: int) -> AutoencoderKL:
    """FLUX's VAE layout (16 latent channels, no quant convs) at FLUX's 8x:
    ``[B, 3, H, W] -> [B, 16, H/8, W/8]``; narrow at full resolution, where a CPU step costs
    most."""
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 64, 64),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=1.0,
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
            # Whole-latent attention buys nothing on flat shapes and costs a CPU step.
            mid_block_add_attention=False,
        )


def fill_transformer(seed: int) -> FluxTransformer2DModel:
    """The Kontext world's transformer (``worlds.kontext_world.world_transformer``) with Fill's
    384 input channels: 64 noisy latent + 64 masked-image latent + 256 mask."""
    config = dict(world_transformer(seed).config)
    with _seeded(seed):
        return FluxTransformer2DModel.from_config({**config, "in_channels": 384})


@torch.no_grad()
def narrow_posterior(vae: AutoencoderKL) -> None:
    """Make the encoder's posterior standard deviation about 1e-3 whatever the image
    (:data:`POSTERIOR_LOG_VARIANCE`), its mean untouched.

    ``worlds.fitting.fit_autoencoder`` decodes the posterior mean only, so the small KL term
    leaves the standard deviation at its optimum, 1: as large as the latents themselves.
    ``FluxFillPipeline`` and the Fill script *sample* the image's and the masked image's latents
    from the posterior, which would then be half noise; a trained VAE's posterior is narrow.
    """
    conv = vae.encoder.conv_out
    # The encoder's output is the posterior's means, then its log-variances, along channels.
    log_variance = slice(conv.out_channels // 2, None)
    conv.weight[log_variance] = 0
    conv.bias[log_variance] = POSTERIOR_LOG_VARIANCE


@dataclass
class FillExamples:
    """Inpainting examples as tensors: ``images [N, 3, R, R]`` in [-1, 1], ``masks
    [N, 1, R, R]`` in {0, 1} (1 = hole) and a prompt per example."""

    images: torch.Tensor
    masks: torch.Tensor
    prompts: list[str]

    def __getitem__(self, index: slice) -> FillExamples:
        return FillExamples(self.images[index], self.masks[index], self.prompts[index])

    def masked_images(self) -> torch.Tensor:
        """``[N, 3, R, R]``: the images with their holes at 0 (grey), as the pipeline masks."""
        return self.images * (1 - self.masks)


def pretraining_examples(settings: FillWorldSettings) -> FillExamples:
    """Two square examples per scene, from a seed the inpainting sets never use, each a hole
    (an ellipse or rectangle of ``data.synthetic.region_mask``) over background only:

    - a plain background, its prompt naming an object that is not there;
    - a background with an object, the prompt naming it, the hole cut around the object.

    The base so learns to keep what surrounds a hole and continue the background into it,
    whatever the prompt says, and never fills a hole with an object.
    """
    rng = np.random.default_rng([settings.seed, 1])
    size = settings.resolution
    images, masks, prompts = [], [], []
    for _ in range(settings.scenes):
        plain = make_kontext_example(rng, size, size)
        scene = make_kontext_example(rng, size, size)
        plain_hole, _ = region_mask(rng, size, size)
        scene_hole, _ = region_mask(rng, size, size)
        drawn = np.asarray(scene.mask) > 127
        for image, hole, prompt in (
            (plain.context, plain_hole, plain.prompt),
            (scene.target, scene_hole & ~drawn, scene.prompt),
        ):
            images.append(np.asarray(image, dtype=np.float32) / 127.5 - 1)
            masks.append(hole.astype(np.float32)[None])
            prompts.append(prompt.removeprefix("insert "))
    return FillExamples(
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(np.stack(masks)),
        prompts,
    )


def train_base(
    pipe: FluxFillPipeline, examples: FillExamples, settings: FillWorldSettings
) -> list[float]:
    """Pretrain ``pipe.transformer`` by flow matching on ``examples``
    (:func:`pretraining_examples`), its inputs built by the Fill script's own
    ``fill_conditioning`` and ``fill_transformer_inputs``.

    Images and masked images are encoded once (posterior means); sigmas are drawn uniformly with
    the pipeline's resolution shift, so every noise level the sampler visits is trained.
    Returns the loss per step.
    """
    # The Fill script's own input builders: the base sees exactly what the LoRA later sees.
    from data.fill_latents import mask_latents_from_pixels
    from train_flux_fill import fill_conditioning, fill_transformer_inputs
    from training.inputs.flow_matching import noisy_latents, resolution_shift, shift_sigmas
    from training.inputs.flux import encode_flux_prompt, pack

    vae = pipe.vae

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return (posterior_means(vae, pixels) - vae.config.shift_factor) * vae.config.scaling_factor

    targets = encode(examples.images)
    conditioning = fill_conditioning(
        pipe, encode(examples.masked_images()), mask_latents_from_pixels(examples.masks)
    )
    with torch.no_grad():
        distinct = sorted(set(examples.prompts))
        embeds, pooled = encode_flux_prompt(pipe, distinct, WORLD_MAX_SEQUENCE_LENGTH)
        prompt_index = torch.tensor([distinct.index(prompt) for prompt in examples.prompts])
    height, width = targets.shape[-2:]
    shift = resolution_shift((height // 2) * (width // 2), pipe.scheduler.config)

    def step_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(targets), (settings.base_batch_size,), generator=generator)
        x0 = targets[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = shift_sigmas(torch.rand(len(index), generator=generator), shift)
        inputs = fill_transformer_inputs(
            pipe,
            noisy_latents(x0, noise, sigmas),
            conditioning[index],
            embeds[prompt_index[index]],
            pooled[prompt_index[index]],
            sigmas,
            FILL_GUIDANCE,
        )
        return F.mse_loss(pipe.transformer(**inputs)[0], pack(pipe, noise - x0))

    return pretrain_by_flow_matching(
        pipe.transformer, step_loss, settings.base_steps, 1e-3, settings.seed
    )


def write_world_data(out: Path, settings: FillWorldSettings) -> None:
    """The world's inpainting examples: ``train/`` (what the LoRA trains on) and ``heldout/``
    (other examples, for evaluation) in ``out``, each a folder of ``metadata.jsonl`` rows
    ``{"image", "mask", "prompt"}``."""
    for folder, n, seed in (
        ("train", settings.n_train, settings.seed),
        ("heldout", settings.n_heldout, settings.seed + 1000),
    ):
        write_inpainting_dataset(out / folder, n=n, resolution=settings.resolution, seed=seed)


def build_fill_world(out: str | Path, settings: FillWorldSettings = FillWorldSettings()) -> dict:
    """Build (or reuse) the world in ``out``: ``model/`` (a ``FluxFillPipeline`` folder),
    ``train/`` and ``heldout/`` (inpainting folders) and ``world.json`` (settings, the VAE's
    held-out reconstruction PSNR, losses, seconds). Returns the ``world.json`` record."""
    out = Path(out)
    if (built := reusable_record(out, settings)) is not None:
        return built
    started = time.perf_counter()
    write_world_data(out, settings)
    torch.manual_seed(settings.seed)
    examples = pretraining_examples(settings)
    trained, heldout = examples[: -2 * HELDOUT_SCENES], examples[-2 * HELDOUT_SCENES :]
    # The VAE encodes the masked image too: its grey holes are part of the domain.
    pixels = torch.cat([trained.images, trained.masked_images()])
    vae = fill_vae(settings.seed)
    vae_losses = train_vae(vae, pixels, settings)
    narrow_posterior(vae)
    fit_latent_scale(vae, pixels)
    psnr = reconstruction_psnr(vae, torch.cat([heldout.images, heldout.masked_images()]))
    vae_seconds = time.perf_counter() - started

    pipe = with_world_models(
        tiny_flux_fill_pipeline(settings.seed),
        vae.requires_grad_(False),
        fill_transformer(settings.seed),
    )
    base_losses = train_base(pipe, trained, settings)
    pipe.save_pretrained(out / "model", safe_serialization=True)
    record = world_record(settings, psnr, vae_losses, base_losses, started, vae_seconds)
    write_record(out, record)
    return record
