"""A tiny *pretrained* Qwen-Image-Edit world, for measuring seed 000's text-region loss.

Qwen-Image-Edit's pipelines resize every condition image to about 1024x1024 before the VAE
(``calculate_dimensions(1024 * 1024, ratio)``; Edit Plus the same for the VAE's copy), and the
training script feeds the transformer exactly that. A world whose images were small would
therefore train and sample its transformer on conditions upsampled 16x, token grids of another
scale than the targets'. So the world's examples are 1024x1024 squares, and its VAE compresses
32x (five downsamples; the pipelines read ``2 ** len(temperal_downsample)``), so that target and
condition are 16x16 tokens each. ``build_qwen_world``

1. writes the synthetic text edits (``data.synthetic.make_text_edit``: a word written on an
   empty sign, its box as the text mask), a training and a held-out set;
2. trains an ``AutoencoderKLQwenImage`` on crops of the domain's images, most of them around
   the text (per-pixel RMS norms and a tiny mid-block attention: crops carry over to whole
   images), and sets its per-channel ``latents_mean`` / ``latents_std`` to the latents' own,
   as Qwen-Image's VAE config does for real images;
3. pretrains a small ``QwenImageTransformer2DModel`` by flow matching on the identity edit
   (empty and written signs alike) and on recolouring a written word to the colour the prompt
   names, through the script's own input builder, so the base copies its context and reads
   colours from prompts but has never written on an empty sign: the LoRA's task;
4. saves a complete ``QwenImageEditPipeline`` (safetensors) with the tiny random Qwen2.5-VL
   text encoder of ``worlds.tiny_models``.

The build is deterministic for its settings and reused when ``world.json`` records them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKLQwenImage,
    QwenImageEditPipeline,
    QwenImageTransformer2DModel,
)
from PIL import Image

from data.synthetic import TEXT_COLOURS, make_text_edit, write_text_edit_dataset
from worlds.fitting import (
    fit_autoencoder,
    mean_psnr,
    posterior_means,
    pretrain_by_flow_matching,
    reconstructions,
    reusable_record,
    with_world_models,
    world_record,
    write_record,
)
from worlds.tiny_models import (
    QWEN_TEXT_DIM,
    _seeded,
    save_qwen_edit_pipeline,
    tiny_qwen_image_edit_pipeline,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QwenWorldSettings:
    """What a Qwen world depends on; a folder built with other settings is rebuilt."""

    n_train: int = 32
    """Text edits the LoRA trains on."""
    n_heldout: int = 8
    """Text edits never trained on, for evaluation."""
    scenes: int = 48
    """Scenes of the pretraining pairs (three pairs each)."""
    heldout_scenes: int = 4
    """The last this many scenes are held out of both stages; the VAE is measured on their
    written signs."""
    vae_steps: int = 1500
    """Optimizer steps of the VAE, on crops."""
    vae_crop: int = 128
    """Side of the VAE's training crops, a multiple of 32."""
    vae_batch_size: int = 8
    """Crops per VAE step."""
    base_steps: int = 1000
    """Optimizer steps of the transformer's pretraining."""
    base_batch_size: int = 8
    """Pairs per pretraining step of the transformer."""
    seed: int = 0
    """Seed of data, weights and pretraining."""
    version: int = 1
    """Bumped when the recipe changes, so old caches are rebuilt."""


# The pipelines' condition size: examples this size are encoded as they are.
WORLD_RESOLUTION = 1024


def qwen_world_vae(seed: int) -> AutoencoderKLQwenImage:
    """Qwen-Image's VAE layout (16 latent channels, causal 3D convolutions) at 32x:
    ``[B, 3, 1, H, W] -> [B, 16, 1, H/32, W/32]``, 0.8 M parameters, narrow at full resolution,
    where a 1024x1024 image costs most."""
    with _seeded(seed):
        return AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 2, 4, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, False, False, False, True],
        )


def qwen_world_transformer(seed: int) -> QwenImageTransformer2DModel:
    """A Qwen-Image transformer with 3 blocks of width 64 (2 heads of 32)."""
    with _seeded(seed):
        return QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=3,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=QWEN_TEXT_DIM,
            axes_dims_rope=(8, 12, 12),
        )


@dataclass
class TextPretraining:
    """The base's pretraining edits over distinct ``images`` (PIL, square): pair ``i`` turns
    ``images[contexts[i]]`` into ``images[targets[i]]`` under ``prompts[i]``; ``text_boxes``
    ``[N, R, R]`` bool, the word's box of each image (where a word is or would be written)."""

    images: list[Image.Image]
    text_boxes: np.ndarray
    contexts: list[int]
    targets: list[int]
    prompts: list[str]


def text_pretraining(settings: QwenWorldSettings) -> TextPretraining:
    """Three pairs per scene, from a seed the text-edit sets never use: identity on the empty
    sign and on the written sign (the prompt names the word either way: where nothing is to
    change, the base learns to copy), and the written word recoloured to the colour the prompt
    names. No pair writes on an empty sign: that is the LoRA's task."""
    rng = np.random.default_rng([settings.seed, 2])
    size = WORLD_RESOLUTION
    images, boxes, contexts, targets, prompts = [], [], [], [], []

    def add_image(image: Image.Image, box: Image.Image) -> int:
        images.append(image)
        boxes.append(np.asarray(box) > 127)
        return len(images) - 1

    def add_pair(context: int, target: int, prompt: str) -> None:
        contexts.append(context)
        targets.append(target)
        prompts.append(prompt)

    for _ in range(settings.scenes):
        scene = int(rng.integers(2**32))
        before, after = rng.choice(list(TEXT_COLOURS), size=2, replace=False)
        source = make_text_edit(np.random.default_rng(scene), size, size, colour=before)
        recoloured = make_text_edit(np.random.default_rng(scene), size, size, colour=after)
        empty = add_image(source["context"], source["mask"])
        written = add_image(source["target"], source["mask"])
        rewritten = add_image(recoloured["target"], recoloured["mask"])
        add_pair(empty, empty, source["prompt"])
        add_pair(written, written, source["prompt"])
        add_pair(written, rewritten, recoloured["prompt"])
    return TextPretraining(images, np.stack(boxes), contexts, targets, prompts)


def vae_crops(
    pixels: torch.Tensor, text_boxes: np.ndarray, settings: QwenWorldSettings
) -> Callable[[torch.Generator], torch.Tensor]:
    """``draw(generator) -> [B, 3, 1, C, C]`` crops of ``pixels: [N, 3, R, R]`` (uint8): three in
    four centred near the image's text box (letters are the hard part), the rest anywhere."""
    size, crop = pixels.shape[-1], settings.vae_crop
    centres = torch.tensor(
        [[rows.mean(), cols.mean()] for rows, cols in (np.nonzero(box) for box in text_boxes)]
    )

    def draw(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(pixels), (settings.vae_batch_size,), generator=generator)
        anywhere = torch.randint(size - crop + 1, (len(index), 2), generator=generator)
        jitter = torch.randint(-crop // 2, crop // 2 + 1, (len(index), 2), generator=generator)
        near_text = (centres[index] - crop / 2 + jitter).round().long().clamp(0, size - crop)
        use_text = torch.rand(len(index), generator=generator) < 0.75
        corners = torch.where(use_text[:, None], near_text, anywhere)
        crops = [
            pixels[i, :, top : top + crop, left : left + crop]
            for i, (top, left) in zip(index.tolist(), corners.tolist(), strict=True)
        ]
        return torch.stack(crops).float().div(127.5).sub(1)[:, :, None]

    return draw


def _uint8_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> ``[N, 3, H, W]`` uint8."""
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)


@torch.no_grad()
def fit_latent_statistics(vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> None:
    """Set the per-channel ``latents_mean`` / ``latents_std`` (the pipeline normalises with them)
    to those of ``latents: [N, 16, 1, h, w]``, the raw posterior means of the domain."""
    channels = latents.transpose(0, 1).flatten(1)
    vae.register_to_config(
        latents_mean=channels.mean(1).tolist(), latents_std=channels.std(1).tolist()
    )


def latent_statistics(vae: AutoencoderKLQwenImage) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel ``(latents_mean, latents_std)``, each ``[1, 16, 1, 1, 1]``: the
    pipeline normalises ``(z - mean) / std`` and decodes ``z * std + mean``."""
    config = vae.config
    return (
        torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1),
        torch.tensor(config.latents_std).view(1, -1, 1, 1, 1),
    )


def train_qwen_base(
    pipe: QwenImageEditPipeline,
    pretraining: TextPretraining,
    latents: torch.Tensor,
    settings: QwenWorldSettings,
) -> list[float]:
    """Pretrain ``pipe.transformer`` by flow matching on ``pretraining``'s pairs; ``latents``
    ``[N, 16, h, w]`` are its images' normalised latents (the pipeline's condition encoding).
    Prompts are embedded once each with their context image, as the pipeline embeds them;
    sigmas uniform with the pipeline's resolution shift. Returns the loss per step."""
    # The Qwen script's own input builders: the base sees exactly what the LoRA later sees.
    from train_qwen_edit_mask import (
        condition_images,
        pad_prompts,
        qwen_transformer_inputs,
        reference_tokens,
    )
    from training.inputs.flow_matching import noisy_latents, resolution_shift, shift_sigmas
    from training.inputs.flux import pack

    embeds = []
    with torch.no_grad():
        for context, prompt in zip(pretraining.contexts, pretraining.prompts, strict=True):
            vl_images, _ = condition_images(pipe, [pretraining.images[context]])
            prompt_embeds, _ = pipe.encode_prompt(prompt=[prompt], image=vl_images[0])
            embeds.append(prompt_embeds[0])
    contexts = torch.tensor(pretraining.contexts)
    targets = torch.tensor(pretraining.targets)
    height, width = latents.shape[-2:]
    tokens = (height // 2) * (width // 2)
    shift = resolution_shift(tokens, pipe.scheduler.config)

    def step_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(targets), (settings.base_batch_size,), generator=generator)
        x0 = latents[targets[index]]
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = shift_sigmas(torch.rand(len(index), generator=generator), shift)
        prompt_embeds, prompt_mask = pad_prompts([embeds[i] for i in index.tolist()])
        inputs = qwen_transformer_inputs(
            noisy_latents(x0, noise, sigmas),
            *reference_tokens(pipe, [latents[contexts[index]]]),
            prompt_embeds,
            prompt_mask,
            sigmas,
            pipe,
        )
        velocity = pipe.transformer(**inputs)[0][:, :tokens]
        return F.mse_loss(velocity, pack(pipe, noise - x0))

    return pretrain_by_flow_matching(
        pipe.transformer, step_loss, settings.base_steps, 1e-3, settings.seed
    )


def build_qwen_world(out: str | Path, settings: QwenWorldSettings = QwenWorldSettings()) -> dict:
    """Build (or reuse) the world in ``out``: ``model/`` (a ``QwenImageEditPipeline`` folder),
    ``train/`` and ``heldout/`` (text-edit folders with ``text_masks/``) and ``world.json``
    (settings, the VAE's reconstruction PSNR overall and inside the text boxes, losses, times).
    Returns the ``world.json`` record."""
    from train_qwen_edit_mask import condition_images

    out = Path(out)
    if (built := reusable_record(out, settings)) is not None:
        return built
    started = time.perf_counter()
    for folder, n, seed in (
        ("train", settings.n_train, settings.seed),
        ("heldout", settings.n_heldout, settings.seed + 1000),
    ):
        write_text_edit_dataset(
            out / folder, n=n, resolution=WORLD_RESOLUTION, seed=seed, square=True
        )
    pretraining = text_pretraining(settings)
    pixels = _uint8_pixels(pretraining.images)
    split = len(pixels) - 3 * settings.heldout_scenes
    vae = qwen_world_vae(settings.seed)
    vae_losses = fit_autoencoder(
        vae,
        vae_crops(pixels[:split], pretraining.text_boxes[:split], settings),
        settings.vae_steps,
        5e-4,
        settings.seed,
        max_grad_norm=1.0,
    )
    vae.requires_grad_(False)
    # Images of a scene: empty sign, written sign, rewritten sign.
    written = torch.arange(split + 1, len(pixels), 3)
    heldout = pixels[written].float().div(127.5).sub(1)[:, :, None]
    decoded = reconstructions(vae, heldout, chunk=4)
    psnr = mean_psnr(decoded, heldout)
    text_psnr = mean_psnr(
        decoded, heldout, torch.from_numpy(pretraining.text_boxes[written.numpy()])
    )
    vae_seconds = time.perf_counter() - started

    pipe = with_world_models(
        tiny_qwen_image_edit_pipeline(settings.seed), vae, qwen_world_transformer(settings.seed)
    )
    # The pipeline's own condition pixels (for these squares, the image itself).
    vae_pixels = torch.cat([condition_images(pipe, [image])[1][0] for image in pretraining.images])
    raw = posterior_means(vae, vae_pixels, chunk=4)
    fit_latent_statistics(vae, raw[:split])
    mean, std = latent_statistics(vae)
    base_losses = train_qwen_base(pipe, pretraining, ((raw - mean) / std)[:, :, 0], settings)
    save_qwen_edit_pipeline(pipe, out / "model")
    record = world_record(
        settings,
        psnr,
        vae_losses,
        base_losses,
        started,
        vae_seconds,
        vae_text_box_psnr_db=round(text_psnr, 2),
    )
    write_record(out, record)
    return record
