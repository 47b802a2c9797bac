"""A tiny *pretrained* FLUX.1 Kontext world: small enough to build on a CPU in minutes, trained
enough that what it decodes means something.

Random tiny models (``worlds.tiny_models``) exercise code paths, but their VAE cannot reconstruct an
image, so no metric on their samples measures anything. ``build_tiny_world`` therefore

1. writes the synthetic placeholder-insertion data (``data.synthetic``, contexts mark the object
   region with a grey silhouette): a training set and a held-out set of other pairs;
2. trains an ``AutoencoderKL`` (FLUX's 16 latent channels, but 4x instead of 8x: see
   :func:`world_vae`) to reconstruct that domain and sets its ``shift_factor`` /
   ``scaling_factor`` to the latents' mean and spread, as FLUX's own VAE config does for real
   images;
3. pretrains a small ``FluxTransformer2DModel`` by flow matching on the identity edit
   (target = context, for backgrounds, placeholders and finished objects alike) and on
   recolouring objects to the colour the prompt names, so the base copies its context, reads
   colours from prompts and draws objects, but has never turned a placeholder into an object:
   the LoRA's task (:func:`pretraining_pairs`);
4. saves a complete ``FluxKontextPipeline`` with ``save_pretrained`` (safetensors).

The build is deterministic for its settings and is reused when ``world.json`` in the folder
records the same settings. The repository ships the world of the default settings in
:data:`SHIPPED_WORLD` (:func:`ship_world`: the same files, the VAE's and transformer's weights
stored in float16), so the demo trains without a build; ``tests/worlds/test_shipped_world.py``
fails when the build would now give another world.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from data.synthetic import (
    OBJECT_COLOURS,
    OBJECT_OF_SHAPE,
    make_kontext_example,
    write_kontext_dataset,
)
from worlds.fitting import (
    WORLD_FILE,
    fit_autoencoder,
    posterior_means,
    pretrain_by_flow_matching,
    reconstruction_psnr,
    reusable_record,
    with_world_models,
    world_record,
    write_record,
)
from worlds.tiny_models import CLIP_DIM, T5_DIM, _seeded, tiny_flux_kontext_pipeline

logger = logging.getLogger(__name__)
# Holds "insert a <colour>" in the tiny T5's letter-by-letter tokens; the shape is in the
# placeholder, and every text token costs attention on a CPU.
WORLD_MAX_SEQUENCE_LENGTH = 16
# The world of the default settings as the repository ships it (see :func:`ship_world`).
SHIPPED_WORLD = Path(__file__).resolve().parent / "kontext_world_data"
# Components whose weights the shipped world stores in float16: they load as float32, and the
# demo's numbers do not move. The text encoders are a few hundred kB and stay as built.
SHIPPED_HALF_COMPONENTS = ("vae", "transformer")
# The last scenes of the pretraining pairs (four pairs each), held out of both stages: the VAE's
# reconstruction PSNR in ``world.json`` is measured on them.
HELDOUT_SCENES = 16


@dataclass(frozen=True)
class WorldSettings:
    """What a world depends on; a folder built with other settings is rebuilt."""

    resolution: int = 64
    """Side of the square examples (others are 1.25x longer on one side); a multiple of 16."""
    n_train: int = 96
    """Insertion pairs the LoRA trains on."""
    n_heldout: int = 24
    """Insertion pairs never trained on, for evaluation."""
    scenes: int = 256
    """Scenes of the pretraining pairs (four pairs each); the last 16 are held out."""
    vae_steps: int = 400
    """Optimizer steps of the VAE, on whole images."""
    base_steps: int = 2000
    """Optimizer steps of the transformer's pretraining."""
    vae_batch_size: int = 8
    """Images per VAE step."""
    base_batch_size: int = 16
    """Pairs per pretraining step of the transformer."""
    seed: int = 0
    """Seed of data, weights and pretraining."""
    version: int = 4
    """Bumped when the recipe changes, so old caches are rebuilt."""


def world_vae(seed: int) -> AutoencoderKL:
    """FLUX's VAE layout (16 latent channels, no quant convs) at 4x instead of 8x:
    ``[B, 3, H, W] -> [B, 16, H/4, W/4]``.

    At 8x a 64 px image is an 8x8 latent, and a VAE trained for minutes on a CPU learned the
    mean colour and the placeholder and lost the objects (held-out PSNR 22-24 dB against about
    21 dB for a flat grey image; versions 1-3 of this recipe). At 4x the same budget reaches
    about 30 dB with every object colour intact. The pipelines and the script read the factor
    from the config (``vae_scale_factor``), so a 64 px pair is 8x8 tokens per image.
    """
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(32, 64, 64),
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


def world_transformer(seed: int) -> FluxTransformer2DModel:
    """A FLUX transformer with 2 double- and 2 single-stream blocks of width 64 (2 heads of 32):
    big enough to learn the copy of its context, small enough for a CPU."""
    with _seeded(seed):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            out_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_DIM,
            guidance_embeds=True,
            axes_dims_rope=(8, 12, 12),
        )


@dataclass
class PretrainingPairs:
    """The base transformer's pretraining edits: ``contexts`` and ``targets`` ``[N, 3, R, R]``
    in [-1, 1] and a prompt per pair."""

    contexts: torch.Tensor
    targets: torch.Tensor
    prompts: list[str]

    def __getitem__(self, index: slice) -> PretrainingPairs:
        return PretrainingPairs(self.contexts[index], self.targets[index], self.prompts[index])


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 127.5 - 1


def pretraining_pairs(settings: WorldSettings) -> PretrainingPairs:
    """Four square pairs per scene, from a seed the insertion sets never use:

    - identity on a plain background, on a placeholder and on a finished object (the prompt
      names an object either way: where nothing is to change, the base learns to copy);
    - recolouring: a finished object turned into the same object in the colour the prompt
      names ("insert a blue ball" over a red ball gives a blue ball).

    Like a real base model, the transformer so learns to read colours from the prompt and to
    draw objects, but no pair turns a placeholder into an object: that is the LoRA's task.
    """
    rng = np.random.default_rng([settings.seed, 1])
    size = settings.resolution
    contexts, targets, prompts = [], [], []

    def add(context, target, prompt: str) -> None:
        contexts.append(_pixels(context))
        targets.append(_pixels(target))
        prompts.append(prompt)

    for _ in range(settings.scenes):
        plain = make_kontext_example(rng, size, size)
        marked = make_kontext_example(rng, size, size, placeholder=True)
        add(plain.context, plain.context, plain.prompt)
        add(marked.context, marked.context, marked.prompt)
        add(marked.target, marked.target, marked.prompt)
        scene = int(rng.integers(2**32))
        before, after = rng.choice(list(OBJECT_COLOURS), size=2, replace=False)
        source = make_kontext_example(np.random.default_rng(scene), size, size, colour=before)
        recoloured = make_kontext_example(np.random.default_rng(scene), size, size, colour=after)
        add(source.target, recoloured.target, recoloured.prompt)

    def stack(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()

    return PretrainingPairs(stack(contexts), stack(targets), prompts)


def split_pretraining_pairs(pairs: PretrainingPairs) -> tuple[PretrainingPairs, PretrainingPairs]:
    """``(trained on, held out)``: the last :data:`HELDOUT_SCENES` scenes' pairs are held out of
    both stages, to measure the VAE on."""
    return pairs[: -4 * HELDOUT_SCENES], pairs[-4 * HELDOUT_SCENES :]


def heldout_reconstruction_psnr(vae: AutoencoderKL, heldout: PretrainingPairs) -> float:
    """The VAE's mean reconstruction PSNR (dB) on the held-out pairs' contexts and targets: the
    ``vae_reconstruction_psnr_db`` of ``world.json``."""
    return reconstruction_psnr(vae, torch.cat([heldout.contexts, heldout.targets]))


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, settings: WorldSettings) -> list[float]:
    """Fit ``vae`` to ``pixels: [N, 3, H, W]`` (:func:`worlds.fitting.fit_autoencoder`).
    Returns the loss per step."""

    def whole_images(generator: torch.Generator) -> torch.Tensor:
        # Whole images, never crops: GroupNorm statistics and the mid-block attention span the
        # whole latent, so a VAE fitted on 16x16 crops reconstructs crops (24.9 dB) but not the
        # 64x64 images it is used on (18.5 dB; versions 1 and 2 of this recipe).
        index = torch.randint(len(pixels), (settings.vae_batch_size,), generator=generator)
        return pixels[index]

    return fit_autoencoder(vae, whole_images, settings.vae_steps, 2e-3, settings.seed)


@torch.no_grad()
def fit_latent_scale(vae: AutoencoderKL, pixels: torch.Tensor) -> None:
    """Set ``shift_factor`` and ``scaling_factor`` so the pipelines' latents have mean 0 and
    standard deviation 1 on ``pixels: [N, 3, H, W]``."""
    latents = posterior_means(vae, pixels)
    vae.register_to_config(
        shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std())
    )


def train_base(
    pipe: FluxKontextPipeline, pairs: PretrainingPairs, settings: WorldSettings
) -> list[float]:
    """Pretrain ``pipe.transformer`` by flow matching on ``pairs`` (:func:`pretraining_pairs`).

    Contexts and targets are encoded once; sigmas are drawn uniformly with the pipeline's
    resolution shift, so every noise level the sampler visits is trained. Returns the loss per
    step.
    """
    # The Kontext script's own input builder: the base sees exactly what the LoRA later sees.
    from train_kontext_lora import kontext_transformer_inputs
    from training.inputs.flow_matching import noisy_latents, resolution_shift, shift_sigmas
    from training.inputs.flux import encode_flux_prompt, pack

    vae = pipe.vae

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return (posterior_means(vae, pixels) - vae.config.shift_factor) * vae.config.scaling_factor

    contexts, targets = encode(pairs.contexts), encode(pairs.targets)
    with torch.no_grad():
        distinct = sorted(set(pairs.prompts))
        embeds, pooled = encode_flux_prompt(pipe, distinct, WORLD_MAX_SEQUENCE_LENGTH)
        prompt_index = torch.tensor([distinct.index(prompt) for prompt in pairs.prompts])
    height, width = targets.shape[-2:]
    shift = resolution_shift((height // 2) * (width // 2), pipe.scheduler.config)
    tokens = (height // 2) * (width // 2)

    def step_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(targets), (settings.base_batch_size,), generator=generator)
        x0 = targets[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = shift_sigmas(torch.rand(len(index), generator=generator), shift)
        inputs = kontext_transformer_inputs(
            pipe,
            noisy_latents(x0, noise, sigmas),
            contexts[index],
            embeds[prompt_index[index]],
            pooled[prompt_index[index]],
            sigmas,
            3.5,
        )
        velocity = pipe.transformer(**inputs)[0][:, :tokens]
        return F.mse_loss(velocity, pack(pipe, noise - x0))

    return pretrain_by_flow_matching(
        pipe.transformer, step_loss, settings.base_steps, 1e-3, settings.seed
    )


def write_world_data(out: Path, settings: WorldSettings) -> None:
    """The world's placeholder-insertion edit pairs: ``train/`` (what the LoRA trains on) and
    ``heldout/`` (other pairs, for evaluation) in ``out``."""
    for folder, n, seed in (
        ("train", settings.n_train, settings.seed),
        ("heldout", settings.n_heldout, settings.seed + 1000),
    ):
        write_kontext_dataset(
            out / folder, n=n, resolution=settings.resolution, seed=seed, placeholder=True
        )


def build_tiny_world(out: str | Path, settings: WorldSettings = WorldSettings()) -> dict:
    """Build (or reuse) the world in ``out``: ``model/`` (a ``FluxKontextPipeline`` folder),
    ``train/`` and ``heldout/`` (edit-pair folders) and ``world.json`` (settings and the
    measured reconstruction PSNR and losses). Returns the ``world.json`` record."""
    out = Path(out)
    if (built := reusable_record(out, settings)) is not None:
        return built
    started = time.perf_counter()
    write_world_data(out, settings)
    torch.manual_seed(settings.seed)
    train_pairs, heldout = split_pretraining_pairs(pretraining_pairs(settings))
    pixels = torch.cat([train_pairs.contexts, train_pairs.targets])
    vae = world_vae(settings.seed)
    vae_losses = train_vae(vae, pixels, settings)
    fit_latent_scale(vae, pixels)
    psnr = heldout_reconstruction_psnr(vae, heldout)
    vae_seconds = time.perf_counter() - started

    pipe = with_world_models(
        tiny_flux_kontext_pipeline(settings.seed),
        vae.requires_grad_(False),
        world_transformer(settings.seed),
    )
    base_losses = train_base(pipe, train_pairs, settings)
    pipe.save_pretrained(out / "model", safe_serialization=True)
    record = world_record(
        settings,
        psnr,
        vae_losses,
        base_losses,
        started,
        vae_seconds,
        prompts=sorted(
            f"insert {'an' if c[0] in 'aeiou' else 'a'} {c} {o}"
            for c in OBJECT_COLOURS
            for o in OBJECT_OF_SHAPE.values()
        ),
    )
    write_record(out, record)
    return record


def ship_world(built: str | Path, out: str | Path = SHIPPED_WORLD) -> dict:
    """Copy the world in ``built`` to ``out`` (replaced as a whole), as the repository ships it:
    the same data, configs and tokenizers, the weights of :data:`SHIPPED_HALF_COMPONENTS` stored
    in float16 (``from_pretrained`` loads them as float32). Its ``world.json`` is the build's
    record plus ``stored_dtypes``. Returns that record."""
    built, out = Path(built), Path(out)
    record = json.loads((built / WORLD_FILE).read_text(encoding="utf-8"))
    if out.resolve() == built.resolve():
        raise ValueError(f"ship the world in '{built}' to another folder, not to itself")
    if out.exists() and any(out.iterdir()) and not (out / WORLD_FILE).exists():
        raise FileExistsError(f"'{out}' holds something other than a world; choose another folder")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(built, out, ignore=shutil.ignore_patterns(WORLD_FILE))
    stored = {}
    for name in SHIPPED_HALF_COMPONENTS:
        for weights in sorted((out / "model" / name).glob("*.safetensors")):
            tensors = load_file(weights)
            half = {key: value.to(torch.float16) for key, value in tensors.items()}
            save_file(half, weights, metadata={"format": "pt"})
        stored[name] = "float16"
    record = {**record, "stored_dtypes": stored}
    write_record(out, record)
    return record
