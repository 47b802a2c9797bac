"""Command-line and YAML configuration shared by every train script.

A script declares one keyword-only dataclass that inherits the mixins it needs (``TrainConfig``
always; ``FlowMatchingConfig``, ``FluxConfig``, ``RegionLossConfig``, ``EditPairDataConfig`` and
``InpaintingDataConfig`` where they apply) and adds its own fields. :func:`parse_config` turns it
into ``--flag`` options whose help comes from the field docstrings (a nested dataclass, such as
``mask_loss``, gives dotted flags: ``--mask_loss.weight``), plus ``--config
FILE.yaml`` holding any of them (nested blocks as in the shipped configs); flags given on the
command line win over the file wherever they appear.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import textwrap
import typing
from argparse import RawDescriptionHelpFormatter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

import yaml
from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    set_parsing_settings,
)

set_parsing_settings(docstring_parse_attribute_docstrings=True)

ConfigT = TypeVar("ConfigT")

OptimizerName = Literal[
    "adamw", "adamw8bit", "paged_adamw8bit", "adafactor", "prodigy", "schedulefree_adamw"
]
BaseQuantization = Literal["none", "int8", "fp8", "nf4"]
EncoderQuantization = Literal["none", "int8", "nf4"]
# The package each optimizer and quantization mode comes from, when it is not a core dependency.
_OPTIMIZER_PACKAGES = {
    "adamw8bit": "bitsandbytes",
    "paged_adamw8bit": "bitsandbytes",
    "prodigy": "prodigyopt",
    "schedulefree_adamw": "schedulefree",
}
_QUANTIZATION_PACKAGES = {"int8": "torchao", "fp8": "torchao", "nf4": "bitsandbytes"}
# Where the optional packages of the low-memory modes come from.
LOWMEM_EXTRA = "pip install '.[lowmem]'"
# One training size in pixels, or several (`--resolution 512,768,1024`): each item is then
# trained once at each size, in that size's aspect-ratio buckets.
Resolution = int | list[int]


def bounded(
    default,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
):
    """A dataclass field whose value must lie in a range (``None``, where the field allows it,
    always passes), checked when a config is made: a nonsense value stops the run at parse,
    naming the flag, instead of training on it or failing inside a library later."""
    return field(default=default, metadata={"range": (low, high, low_open, high_open)})


def require_package(package: str, what: str) -> None:
    """Raise ``ValueError`` in one line naming the extra when ``package`` is not installed."""
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"{what} needs {package}, which is not installed: {LOWMEM_EXTRA}")


def check_optimizer(config) -> None:
    """Refuse, before anything loads, an optimizer whose package is missing, or a schedule the
    schedule-free optimizer replaces."""
    if config.optimizer in _OPTIMIZER_PACKAGES:
        require_package(_OPTIMIZER_PACKAGES[config.optimizer], f"--optimizer {config.optimizer}")
    if config.optimizer == "schedulefree_adamw" and config.lr_scheduler != "constant":
        raise ValueError(
            f"--optimizer schedulefree_adamw replaces the schedule: use --lr_scheduler constant "
            f"(got {config.lr_scheduler}); --lr_warmup_steps becomes its own warm-up"
        )


def check_quantization(config) -> None:
    """Refuse, before anything loads, a mode whose library is missing or whose compute dtype
    the run does not use. (Whether a GPU is there is checked at load: a plan is made anywhere.)"""
    for flag in ("quantize_base", "quantize_text_encoders"):
        mode = getattr(config, flag)
        if mode != "none":
            require_package(_QUANTIZATION_PACKAGES[mode], f"--{flag} {mode}")
    if config.mixed_precision != "auto":  # auto is settled, and checked, on the training machine
        check_fp8_precision(config)


def check_fp8_precision(config) -> None:
    """Refuse ``--quantize_base fp8`` with a ``--mixed_precision`` other than bf16."""
    if getattr(config, "quantize_base", "none") == "fp8" and config.mixed_precision != "bf16":
        raise ValueError(
            "--quantize_base fp8 computes in bf16: add --mixed_precision bf16 "
            f"(got {config.mixed_precision})"
        )


def _describe_range(low, high, low_open, high_open) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_bounds(config, prefix: str = "") -> None:
    """Raise ``ValueError`` naming the first field of ``config`` (nested dataclasses dotted)
    outside its :func:`bounded` range."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value, f"{prefix}{item.name}.")
            continue
        bounds = item.metadata.get("range")
        if bounds is None or value is None or isinstance(value, str):
            continue
        low, high, low_open, high_open = bounds
        for each in value if isinstance(value, list) else [value]:
            inside = (low is None or (each > low if low_open else each >= low)) and (
                high is None or (each < high if high_open else each <= high)
            )
            if not inside:
                raise ValueError(
                    f"--{prefix}{item.name} must be {_describe_range(*bounds)}, got {each}"
                )


@dataclass(kw_only=True)
class TrainConfig:
    """Flags every train script accepts, named as in diffusers' training examples."""

    # The Hub id of the family's pipeline, which completes a single-file denoiser (a script sets
    # it; None: the script takes no single files).
    base_model_id: ClassVar[str | None] = None

    pretrained_model_name_or_path: str
    """Local folder (or cached Hub id) of the base diffusers pipeline, or a single .safetensors
    file of its denoiser (the format model sites share; see --base_model_folder)."""
    base_model_folder: str | None = None
    """With a single-file --pretrained_model_name_or_path: the pipeline folder (or Hub id) that
    gives the other components and the denoiser's config; default: the family's Hub id."""
    train_data_dir: str | None = None
    """Folder with the training data in the script's folder format."""
    dataset_name: str | None = None
    """Hugging Face dataset: a folder written by `save_to_disk`, or a name in the local cache."""
    max_image_pixels: int = bounded(100_000_000, low=1)
    """Refuse, before anything is decoded, an image whose header declares more pixels (times
    bands) than this: a small file can declare a huge image (a decompression bomb)."""
    allow_paths_outside_data: bool = False
    """Let metadata.jsonl name files outside --train_data_dir (absolute or ../ paths); by
    default such a row is refused, so a data set never trains on files it does not hold."""
    output_dir: str = "output"
    """Where the LoRA, checkpoints, metrics.jsonl and validation images are written."""
    resolution: int | list[int] = bounded(512, low=16)
    """Target side length in pixels; buckets keep about resolution**2 pixels. Multiple of 16.
    Several (512,768,1024) train each item once at each size."""
    train_batch_size: int = 1
    """Batch size per device."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_train_steps: int | None = bounded(None, low=1)
    """Optimizer steps to run; overrides num_train_epochs when set."""
    num_train_epochs: int = 1
    """Epochs to run when max_train_steps is not set. An epoch is rounded up to whole optimizer
    steps on every rank by repeating batches from its start (the log says how many)."""
    learning_rate: float = bounded(1e-4, low=0, low_open=True)
    """Peak learning rate."""
    lr_scheduler: Literal[
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
    ] = "constant"
    """Learning-rate schedule (diffusers.optimization.get_scheduler)."""
    lr_warmup_steps: int = bounded(0, low=0)
    """Warm-up optimizer steps."""
    optimizer: OptimizerName = "adamw"
    """adamw (fp32 moments, 8 bytes per trainable parameter); adamw8bit or paged_adamw8bit
    (bitsandbytes, about 2 bytes; paged spills to the CPU under CUDA memory pressure); adafactor
    (factored second moments); prodigy (estimates its step size: --learning_rate 1.0);
    schedulefree_adamw (no schedule: --lr_scheduler constant; its averaged weights are saved).
    All but adamw and adafactor need the lowmem extra: pip install '.[lowmem]'."""
    adam_beta1: float = bounded(0.9, low=0, high=1, high_open=True)
    """AdamW beta1."""
    adam_beta2: float = bounded(0.999, low=0, high=1, high_open=True)
    """AdamW beta2."""
    adam_weight_decay: float = bounded(1e-4, low=0)
    """AdamW weight decay."""
    adam_epsilon: float = bounded(1e-8, low=0, low_open=True)
    """AdamW epsilon."""
    max_grad_norm: float = bounded(1.0, low=0)
    """Gradient clipping norm."""
    max_nonfinite_steps: int = 5
    """Optimizer steps with a NaN/inf loss or gradient are skipped (and counted in metrics as
    nonfinite_skipped); after this many in a row the run saves a checkpoint and stops."""
    rank: int | None = None
    """LoRA rank; 16, or the rank stored in --init_lora_weights."""
    lora_alpha: float | None = bounded(None, low=0, low_open=True)
    """LoRA alpha; the rank (scale 1), or the alpha stored in --init_lora_weights."""
    lora_dropout: float = bounded(0.0, low=0, high=1, high_open=True)
    """Dropout on the LoRA branch."""
    lora_layers: str | None = None
    """Comma-separated module names to adapt (e.g. attn.to_q,attn.to_k); the script's default,
    or the modules stored in --init_lora_weights."""
    init_lora_weights: str | None = None
    """A LoRA .safetensors file (or a run's --output_dir), in diffusers' layout or kohya's and
    ComfyUI's, to start from instead of a fresh adapter; its rank, alpha and modules (each
    module's own, for a kohya file) are read from the file (a flag that disagrees is an error)."""
    seed: int = bounded(0, low=0)
    """Seed for weights, data order, noise and timesteps."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """Precision of the frozen weights and autocast; LoRA weights stay fp32. auto: bf16 on a GPU
    that computes in it, fp16 on an older GPU, no (fp32) on a CPU."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass to save memory (about a third more compute);
    false where memory is plentiful."""
    compile: bool = False
    """torch.compile each repeated transformer/UNet block in place (regional compilation):
    faster steps on a GPU after a first slow one per block class and sequence length; the model
    and its LoRA file keep their parameter names."""
    checkpointing_steps: int = 500
    """Save a resumable checkpoint-<step>/ every this many optimizer steps."""
    checkpoints_total_limit: int | None = None
    """Keep at most this many checkpoints (>= 1), deleting the oldest; never the one just saved."""
    resume_from_checkpoint: str | None = None
    """'latest' (the newest complete checkpoint in output_dir) or a checkpoint folder. Another
    process count works when processes x accumulation x batch size stays the same."""
    save_on_signal: bool = True
    """On SIGTERM or Ctrl+C (a scheduler's preemption), save a checkpoint at the end of the
    current step and stop cleanly; resume with --resume_from_checkpoint latest."""
    overwrite_output_dir: bool = False
    """Delete what an earlier run of the suite wrote in output_dir (checkpoints, LoRA, metrics,
    model card, validation images; not the latent cache, and nothing else) and start afresh;
    without it, a fresh run refuses a folder holding another run's checkpoints or finished
    LoRA."""
    validation_steps: int | None = bounded(None, low=1)
    """Run the pipeline on validation examples every this many steps (and at the end)."""
    validation_prompt: str | None = None
    """One prompt for every validation image; by default each validation example's own prompt."""
    validation_prompts: list[str] | None = None
    """A prompt per validation image (--validation_images, else the first training examples),
    in order; takes the place of --validation_prompt."""
    validation_images: list[str] | None = None
    """Image files to validate on instead of the first training examples: the image to edit
    (edit models) or to fill (inpainting models, with --validation_masks)."""
    validation_masks: list[str] | None = None
    """A mask file per --validation_images entry (white = the region): the region to fill for
    inpainting models; for edit models it is only drawn over the prediction."""
    validation_at_start: bool = True
    """With --validation_steps: validate before the first step too (step 0, the model as it
    starts), so that later images have something to be compared with."""
    num_validation_images: int = bounded(2, low=1)
    """How many training examples to validate on."""
    validation_inference_steps: int = bounded(28, low=1)
    """Denoising steps of the validation pipeline."""
    report_to: str | None = None
    """Comma-separated trackers for accelerate (tensorboard, wandb)."""
    cache_latents: bool = True
    """Encode latents and prompts once and keep them in a safetensors cache (see cache_dir), so
    that training steps run the denoiser alone; false encodes every step."""
    cache_dir: str | None = None
    """Folder of the latent/prompt cache; defaults to <output_dir>/cache."""
    offload_encoders: bool = False
    """With --cache_latents: once the cache is full, keep the text encoders and the VAE on the
    CPU (on the GPU only while validating), so the GPU holds the denoiser alone."""
    dataloader_num_workers: int = bounded(0, low=0)
    """DataLoader worker processes."""
    push_to_hub: bool = False
    """At the end, upload output_dir (LoRA, model card README.md, metrics.jsonl, validation
    images; not checkpoints or the cache) to the Hub repository --hub_model_id."""
    hub_model_id: str | None = None
    """Hub repository (user/name) that --push_to_hub uploads to; created when missing."""
    hub_token: str | None = None
    """Token for --push_to_hub; default: the one `hf auth login` stored, or HF_TOKEN."""
    hub_private: bool = False
    """Create the --hub_model_id repository as private."""
    debug: bool = False
    """Show the traceback of a refusal after parsing (bad data, a folder in use, settings the
    model does not fit) instead of one error line."""

    def __post_init__(self) -> None:
        for size in self.resolutions:
            if size % 16:
                raise ValueError(f"--resolution must be a multiple of 16, got {size}")
        check_bounds(self)
        sources = self.data_sources()
        if sum(getattr(self, name) is not None for name in sources) != 1:
            listed = ", ".join(f"--{name}" for name in sources)
            raise ValueError(f"give exactly one of {listed}")
        for name in ("train_batch_size", "gradient_accumulation_steps", "rank", "num_train_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"--max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.checkpointing_steps < 1:
            raise ValueError(f"--checkpointing_steps must be >= 1, got {self.checkpointing_steps}")
        if self.offload_encoders and not self.cache_latents:
            raise ValueError("--offload_encoders needs --cache_latents: training would encode")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (user/name)")
        if self.hub_token and self.report_to:
            # Trackers receive the run's settings, and with them the token.
            raise ValueError(
                "--hub_token with --report_to would send the token to the trackers; log in "
                "with `hf auth login` (or set HF_TOKEN) instead"
            )
        self.check_validation_inputs()
        self.check_single_file()
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(
                f"--checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}"
            )
        check_optimizer(self)
        for tracker in self.trackers:  # accelerate's trackers are named as their packages
            if importlib.util.find_spec(tracker) is None:
                raise ValueError(
                    f"--report_to {tracker} needs the {tracker} package, which is not installed: "
                    "pip install '.[tracking]' (or drop it from --report_to)"
                )

    @property
    def resolutions(self) -> list[int]:
        """Every --resolution, largest first, each once: the sizes an item is trained at."""
        sizes = self.resolution if isinstance(self.resolution, list) else [self.resolution]
        return sorted(set(sizes), reverse=True)

    @property
    def largest_resolution(self) -> int:
        """The largest --resolution: what validation images are fitted to and memory is planned
        for."""
        return self.resolutions[0]

    @classmethod
    def data_sources(cls) -> tuple[str, ...]:
        """The flags that each name the whole training data; a run gives exactly one."""
        return ("train_data_dir", "dataset_name")

    @property
    def denoiser_file(self) -> str | None:
        """The single-file denoiser --pretrained_model_name_or_path names, if it names one."""
        path = self.pretrained_model_name_or_path
        return path if path.endswith(".safetensors") else None

    @property
    def pipeline_source(self) -> str:
        """The pipeline folder or Hub id every component (but a single-file denoiser) and every
        component's config come from."""
        if self.denoiser_file is None:
            return self.pretrained_model_name_or_path
        return self.base_model_folder or self.base_model_id

    def check_single_file(self) -> None:
        """Refuse, before anything loads, a single file that is missing, pickled, or given to a
        script that takes none, and --base_model_folder without a single file."""
        path = self.pretrained_model_name_or_path
        if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
            raise ValueError(
                f"--pretrained_model_name_or_path {path}: only .safetensors single files are "
                "read (a pickled checkpoint can run code when loaded)"
            )
        if self.denoiser_file is None:
            if self.base_model_folder is not None:
                raise ValueError(
                    "--base_model_folder completes a single .safetensors file given as "
                    "--pretrained_model_name_or_path"
                )
            return
        if self.base_model_id is None:
            raise ValueError(
                f"--pretrained_model_name_or_path {path}: this script loads a pipeline folder, "
                "not a single file"
            )
        if not Path(path).is_file():
            raise ValueError(f"--pretrained_model_name_or_path {path}: no such file")

    def check_validation_inputs(self) -> None:
        """Refuse, before anything loads, validation files that are missing and lists whose
        lengths do not pair up."""
        images, masks, prompts = (
            self.validation_images,
            self.validation_masks,
            self.validation_prompts,
        )
        missing = [name for name in (*(images or ()), *(masks or ())) if not Path(name).is_file()]
        if missing:
            raise ValueError(f"validation file(s) not found: {', '.join(missing)}")
        if masks and len(masks) != len(images or ()):
            raise ValueError(
                f"--validation_masks needs one mask per --validation_images entry: got "
                f"{len(masks)} mask(s) for {len(images or ())} image(s)"
            )
        if prompts:
            count = len(images) if images else self.num_validation_images
            if len(prompts) != count:
                what = "--validation_images" if images else "--num_validation_images"
                raise ValueError(
                    f"--validation_prompts needs one prompt per validation image: got "
                    f"{len(prompts)} for {count} ({what})"
                )

    @property
    def trackers(self) -> list[str]:
        """``report_to`` as a list."""
        return [name.strip() for name in (self.report_to or "").split(",") if name.strip()]


@dataclass(kw_only=True)
class LoraFileConfig:
    """How the final LoRA file is written (the scripts that train a LoRA)."""

    save_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the final LoRA file: bf16 or fp16 halve it, as most shared LoRAs are.
    Checkpoints keep fp32, so a resume stays exact."""


@dataclass(kw_only=True)
class LowMemoryConfig:
    """What fits a large frozen base on a smaller GPU (the denoiser scripts). Put it before
    ``TrainConfig`` among a script config's bases: its checks run after TrainConfig's."""

    quantize_base: BaseQuantization = "none"
    """Quantize the frozen denoiser's linear weights as it loads: int8 (torchao, 1 byte per
    weight), fp8 (torchao, 1 byte, needs --mixed_precision bf16) or nf4 (bitsandbytes, about
    half a byte; CUDA only). The LoRA trains in fp32 on top and loads into the unquantized
    pipeline. Needs the lowmem extra: pip install '.[lowmem]'."""
    quantize_text_encoders: EncoderQuantization = "none"
    """Quantize the text encoders (int8, or nf4 on CUDA), which only run to encode prompts."""
    offload_blocks: int | Literal["all"] = 0
    """Keep the frozen weights of the last N transformer blocks (or all) on the CPU and bring
    each block's to the GPU only while it runs: less GPU memory, more host-to-GPU copying.
    Needs --gradient_checkpointing (without it the backward pass would hold every block's)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_quantization(self)
        if self.offload_blocks != "all" and self.offload_blocks < 0:
            raise ValueError(f"--offload_blocks must be >= 0 or all, got {self.offload_blocks}")
        if self.offload_blocks and not self.gradient_checkpointing:
            raise ValueError(
                "--offload_blocks needs --gradient_checkpointing: without it the backward pass "
                "keeps every block's weights on the device"
            )
        if self.offload_blocks and self.compile:
            raise ValueError("--offload_blocks and --compile cannot be combined")


@dataclass(kw_only=True)
class FlowMatchingConfig:
    """Timestep sampling and loss weighting of rectified-flow models (FLUX, Qwen-Image)."""

    weighting_scheme: Literal["none", "uniform", "logit_normal", "mode", "cosmap", "sigma_sqrt"] = (
        "none"
    )
    """Timestep density and loss weighting as in diffusers' SD3/FLUX examples."""
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    logit_std: float = bounded(1.0, low=0, low_open=True)
    """Standard deviation of the logit-normal timestep density."""
    mode_scale: float = 1.29
    """Scale of the 'mode' timestep density."""
    timestep_shift: float | Literal["auto"] = bounded(1.0, low=0, low_open=True)
    """Shift s of sigma -> s*sigma/(1+(s-1)*sigma); 'auto' uses the scheduler's resolution-based
    shift exp(mu), as the pipeline does at inference; 1.0 is no shift."""


@dataclass(kw_only=True)
class FluxConfig:
    """Prompt and guidance settings of the FLUX.1 pipelines (Kontext, Fill)."""

    guidance_scale: float
    """Guidance embedding value; the family's pipeline default, so that the LoRA is trained in
    the regime it is sampled in."""
    max_sequence_length: int = bounded(512, low=1)
    """T5 prompt length, as the pipeline's max_sequence_length."""


@dataclass(kw_only=True)
class GeometryLossConfig:
    """Flow matching on the target tokens plus the geometry terms on x0_hat against an edit's
    mask (FLUX.1 Kontext, FLUX.2), each weight a flag (0 switches a term off at no cost)."""

    flow_matching_weight: float = bounded(1.0, low=0)
    """Weight of the flow-matching MSE on the target tokens."""
    geometry_mse_weight: float = bounded(1.0, low=0)
    """Geometry: boundary-band weighted MSE of x0_hat vs the target latents. Since
    x0_hat - x0 = -sigma * (v - v_target), it is a sigma**2-weighted, band-weighted velocity MSE."""
    background_weight: float = bounded(0.6, low=0)
    """Geometry: MSE of x0_hat vs the context outside the dilated mask: the target's own change
    there plus a sigma**2-weighted velocity error."""
    dice_weight: float = bounded(0.9, low=0)
    """Geometry: Dice of the soft change mask vs the mask."""
    area_weight: float = bounded(0.2, low=0)
    """Geometry: squared log area ratio of the change vs the mask."""
    boundary_weight: float = bounded(0.4, low=0)
    """Geometry: boundary loss on the mask's signed distance map."""
    band_r: int = bounded(1, low=0)
    """Boundary band radius in cells of the latent grid the mask is taken to."""
    w_in: float = bounded(1.0, low=0)
    """Weight inside the mask in the band-weighted MSE."""
    w_band: float = bounded(6.0, low=0)
    """Weight on the boundary band in the band-weighted MSE."""
    w_out: float = bounded(0.2, low=0)
    """Weight outside the mask in the band-weighted MSE."""
    k_sigma: float = 2.0
    """Change-mask threshold in background standard deviations."""

    def geometry_options(self) -> dict:
        """``losses.geometry_starter_loss``'s keyword arguments from these flags."""
        from losses import GeometryLossWeights  # torch: not imported for --help

        weights = GeometryLossWeights(
            mse=self.geometry_mse_weight,
            bg=self.background_weight,
            dice=self.dice_weight,
            area=self.area_weight,
            bnd=self.boundary_weight,
        )
        return {
            "weights": weights,
            "band_r": self.band_r,
            "w_in": self.w_in,
            "w_band": self.w_band,
            "w_out": self.w_out,
            "k_sigma": self.k_sigma,
        }


@dataclass
class MaskLossSettings:
    """The region-weighted loss: (1 - weight) * plain + weight * region-weighted."""

    enabled: bool = False
    """Mix in the region-weighted loss; off: the plain loss, bit for bit."""
    weight: float = bounded(0.3, low=0, high=1)
    """alpha, the share of the region-weighted loss."""
    text_region_weight: float = bounded(2.0, low=0)
    """Weight of tokens inside the mask (the text region of a text edit)."""
    background_weight: float = bounded(1.0, low=0)
    """Weight of tokens outside the mask."""


@dataclass(kw_only=True)
class RegionLossConfig:
    """The mask-region weighting of the denoising loss (a nested mask_loss block)."""

    mask_loss: MaskLossSettings = field(default_factory=MaskLossSettings)
    """Region weighting of the loss: enabled, weight (alpha), text_region_weight,
    background_weight."""

    def region_loss_weights(self) -> dict[str, float]:
        """Keyword arguments of ``losses.masked_flow_matching_loss`` for the mask."""
        return {
            "alpha": self.mask_loss.weight,
            "fg_weight": self.mask_loss.text_region_weight,
            "bg_weight": self.mask_loss.background_weight,
        }


@dataclass
class TextMaskSettings:
    """Where an edit's masks come from (a nested data block): the text region of a text edit, the
    edited region of an edit."""

    use_text_mask: bool = False
    """Load masks: a row's 'mask', else <dataset>/<mask_dir_name>/<target stem>.png|jpg."""
    mask_dir_name: str = "text_masks"
    """Folder of the dataset holding masks named after their targets."""


@dataclass(kw_only=True)
class PromptConfig:
    """What every prompt of the data gets (the scripts whose data has prompts)."""

    trigger_word: str | None = None
    """A word put in every training prompt: in place of each [trigger] in a prompt, or before
    the prompt when it has none; then in yours at inference."""
    caption_dropout: float = bounded(0.0, low=0, high=1)
    """Share of examples trained with the empty prompt instead of theirs, drawn anew at every
    step (a resume draws the same): the LoRA then also works without words, and in the
    unconditional pass of classifier-free guidance. 0.05-0.1 is common; 0: off."""


@dataclass(kw_only=True)
class ImagePairDataConfig(PromptConfig):
    """Edit data in any of the layouts of ``data.edit_sources``, or a Hugging Face dataset of
    (context, target, mask, prompt) rows."""

    train_data_file: str | None = None
    """A musubi-tuner style JSON Lines file (instead of --train_data_dir): image_path,
    control_path or control_path_0..N, caption, optional mask_path; paths relative to its folder."""
    dataset_config: str | None = None
    """A YAML list of data sets to train on together (instead of --train_data_dir), each a
    mapping of this script's data flags (train_data_dir or train_data_file, control_dirs,
    caption, caption_extension, its mask folder flag) and repeats: how many times an epoch draws
    each of its examples (default 1)."""
    control_dirs: list[str] | None = None
    """Folders of reference images, each named as its target in --train_data_dir (which then
    holds the target images, with captions in <name>.txt beside them)."""
    caption: str | None = None
    """With --control_dirs: one caption for every example instead of the .txt files."""
    caption_extension: str = ".txt"
    """With --control_dirs: the suffix of the caption file beside each target."""
    context_column: str = "context"
    """Column with the context (source) image, or a list of them (several references)."""
    target_column: str = "target"
    """Column with the target (edited) image."""
    mask_column: str = "mask"
    """Column with the edit mask (white = edited region)."""
    prompt_column: str = "prompt"
    """Column with the edit instruction."""
    dataset_split: str = "train"
    """Split of the Hugging Face dataset."""

    @classmethod
    def data_sources(cls) -> tuple[str, ...]:
        return (*super().data_sources(), "train_data_file", "dataset_config")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.control_dirs and self.train_data_dir is None:
            raise ValueError("--control_dirs needs --train_data_dir, the folder of target images")


@dataclass(kw_only=True)
class EditPairDataConfig(ImagePairDataConfig):
    """Column names of an edit-pair Hugging Face dataset (--dataset_name)."""

    overlay_column: str | None = "overlay"
    """Optional column with an overlay negative; composited from source and target when absent."""
    mask_dir: str | None = None
    """With --control_dirs: the folder of edit masks, each named as its target."""


@dataclass(kw_only=True)
class TextEditDataConfig(ImagePairDataConfig):
    """Instruction-edit data with optional masks of the region an edit is about."""

    data: TextMaskSettings = field(default_factory=TextMaskSettings)
    """Masks: use_text_mask, mask_dir_name (YAML: nested, init_args allowed)."""
    strict_masks: bool = False
    """With data.use_text_mask, refuse rows without a mask instead of training them plainly."""
    text_mask_dir: str | None = None
    """With --control_dirs: the folder of masks, each named as its target (reads masks without
    data.use_text_mask)."""


def _bool_fields(cls: type, prefix: str = "") -> set[str]:
    """Names of the boolean flags of dataclass ``cls``, nested ones dotted."""
    hints = typing.get_type_hints(cls)
    names = set()
    for item in dataclasses.fields(cls):
        if hints[item.name] is bool:
            names.add(prefix + item.name)
        elif dataclasses.is_dataclass(hints[item.name]):
            names |= _bool_fields(hints[item.name], f"{prefix}{item.name}.")
    return names


def _list_fields(cls: type) -> set[str]:
    """Names of the top-level flags of dataclass ``cls`` that take a list of strings."""
    hints = typing.get_type_hints(cls)
    return {
        item.name
        for item in dataclasses.fields(cls)
        if list[str] in (hints[item.name], *typing.get_args(hints[item.name]))
    }


def _size_list_fields(cls: type) -> set[str]:
    """Names of the top-level flags of dataclass ``cls`` that take one size or several
    (:data:`Resolution`)."""
    hints = typing.get_type_hints(cls)
    return {item.name for item in dataclasses.fields(cls) if hints[item.name] == Resolution}


def _normalise_argv(
    argv: Sequence[str],
    bool_flags: set[str],
    list_flags: set[str] = frozenset(),
    size_flags: set[str] = frozenset(),
) -> list[str]:
    """Let ``--flag`` alone mean ``--flag true``, ``--list_flag a b`` mean the list ``[a, b]``,
    ``--size_flag 512,768`` (or ``512 768``) the list ``[512, 768]``, and move ``--config FILE``
    first, so that every flag on the command line overrides the file."""
    args = list(argv)
    out: list[str] = []
    configs: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--config="):
            configs += ["--config", _without_init_args(token.split("=", 1)[1])]
            i += 1
            continue
        if token == "--config" and i + 1 < len(args):
            configs += ["--config", _without_init_args(args[i + 1])]
            i += 2
            continue
        name, equals, value = token.partition("=")
        if equals and name[2:] in list_flags | size_flags:
            args[i : i + 1] = [name, value]  # --flag=value as --flag value
            continue
        if token.startswith("--") and token[2:] in list_flags | size_flags:
            values = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                values.append(args[i + 1])
                i += 1
            if len(values) == 1 and values[0].lstrip().startswith("["):
                out += [token, values[0]]  # already a list, as YAML or JSON
            elif token[2:] in size_flags:
                sizes = [size for value in values for size in value.split(",") if size.strip()]
                out += [token, *sizes] if len(sizes) < 2 else [token, f"[{','.join(sizes)}]"]
            else:
                out += [token, json.dumps(values)]
            i += 1
            continue
        out.append(token)
        if token.startswith("--") and token[2:] in bool_flags:
            following = args[i + 1] if i + 1 < len(args) else None
            if following is None or following.startswith("--"):
                out.append("true")
        i += 1
    return configs + out


def _without_init_args(path: str) -> str:
    """``path``, or, when the YAML file nests a block's settings under ``init_args`` (seed 000
    writes ``data: {init_args: {use_text_mask: ...}}``, a LightningCLI habit), the file's content
    with those settings lifted into the block, as a YAML string ``--config`` also accepts."""
    file = Path(path)
    if not file.is_file():
        return path
    content = yaml.safe_load(file.read_text())
    if not isinstance(content, dict) or not any(
        isinstance(value, dict) and "init_args" in value for value in content.values()
    ):
        return path
    lifted = {
        key: value["init_args"] if isinstance(value, dict) and "init_args" in value else value
        for key, value in content.items()
    }
    return yaml.safe_dump(lifted)


# --help lists the flags under these headings, in this order (see _help_topic).
HELP_TOPICS = {
    "model": "model and LoRA",
    "data": "data",
    "loss": "loss",
    "grpo": "reward fine-tuning (--objective grpo)",
    "optimization": "optimization",
    "memory": "memory and speed",
    "outputs": "outputs and checkpoints",
    "validation": "validation",
    "logging": "logging and the Hub",
}
# The topic of each flag every script shares, and of the groups of flags some scripts share.
_FLAG_TOPICS = {
    **dict.fromkeys(
        (
            "pretrained_model_name_or_path",
            "base_model_folder",
            "rank",
            "lora_alpha",
            "lora_dropout",
            "lora_layers",
            "init_lora_weights",
            "mixed_precision",
        ),
        "model",
    ),
    **dict.fromkeys(
        (
            "train_data_dir",
            "dataset_name",
            "max_image_pixels",
            "allow_paths_outside_data",
            "resolution",
            "dataloader_num_workers",
        ),
        "data",
    ),
    **dict.fromkeys(
        (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "num_train_epochs",
            "learning_rate",
            "lr_scheduler",
            "lr_warmup_steps",
            "optimizer",
            "adam_beta1",
            "adam_beta2",
            "adam_weight_decay",
            "adam_epsilon",
            "max_grad_norm",
            "max_nonfinite_steps",
            "seed",
        ),
        "optimization",
    ),
    **dict.fromkeys(
        ("gradient_checkpointing", "compile", "cache_latents", "cache_dir", "offload_encoders"),
        "memory",
    ),
    **dict.fromkeys(
        (
            "output_dir",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "resume_from_checkpoint",
            "save_on_signal",
            "overwrite_output_dir",
            "save_dtype",
        ),
        "outputs",
    ),
    **dict.fromkeys(
        ("report_to", "push_to_hub", "hub_model_id", "hub_token", "hub_private", "debug"),
        "logging",
    ),
    **dict.fromkeys(("holdout_images", "false_colour_bands"), "validation"),
    **dict.fromkeys(("noise_level", "eta"), "grpo"),
    **dict.fromkeys(("bands", "norm_low_percentile", "norm_high_percentile"), "data"),
}


def _help_topic(owner: type, name: str) -> str:
    """The :data:`HELP_TOPICS` key of flag ``name`` declared by config class ``owner``."""
    top = name.split(".")[0]
    if top in _FLAG_TOPICS:
        return _FLAG_TOPICS[top]
    data_groups = (PromptConfig, ImagePairDataConfig, EditPairDataConfig, TextEditDataConfig)
    if owner in (*data_groups, InpaintingDataConfig) or top == "data":
        return "data"
    if owner.__name__ == "GRPOConfig":
        return "grpo"
    if owner is LowMemoryConfig:
        return "memory"
    if "validation" in name:
        return "validation"
    if (
        owner in (FlowMatchingConfig, RegionLossConfig)
        or name.startswith("w_")
        or any(
            word in name
            for word in (
                "weight",
                "loss",
                "margin",
                "band_r",
                "w_in",
                "w_out",
                "k_sigma",
                "snr_gamma",
                "embedding_encoder",
            )
        )
    ):
        return "loss"
    return "model"


def _flag_owners(cls: type) -> dict[str, type]:
    """Each top-level field of dataclass ``cls`` -> the class in its MRO that declares it."""
    owners = {}
    for klass in reversed(cls.__mro__):
        for name in getattr(klass, "__annotations__", {}):
            owners[name] = klass
    return owners


def _group_flags(parser: ArgumentParser, cls: type) -> None:
    """Move the flags of ``parser`` (built from ``cls``) under the :data:`HELP_TOPICS` headings;
    headings no flag falls under are left out."""
    owners = _flag_owners(cls)
    groups = {key: parser.add_argument_group(title) for key, title in HELP_TOPICS.items()}
    for action in list(parser._actions):
        top = action.dest.split(".")[0]
        if top not in owners:
            continue
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        groups[_help_topic(owners[top], action.dest)]._group_actions.append(action)
    for group in groups.values():
        if not group._group_actions:
            parser._action_groups.remove(group)


# The YAML files shipped for real runs: configs/<prefix>*.yaml, named in a script's --help.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs_text(prefix: str) -> str:
    """The shipped configs of a script (``configs/<prefix>*.yaml``), each with the first line of
    its opening comment, which says what the file is for."""
    lines = ["shipped configs (--config FILE; flags after it override it):"]
    for path in sorted(CONFIGS_DIR.glob(f"{prefix}*.yaml")):
        title = path.read_text().splitlines()[0].lstrip("# ").rstrip(".:")
        lines += textwrap.wrap(
            title,
            width=100,
            initial_indent=f"  configs/{path.name:<26} ",
            subsequent_indent=" " * 37,
        )
    return "\n".join(lines)


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description and the list of configs kept as written."""


def build_parser(cls: type, prog: str | None = None, description: str | None = None):
    """The jsonargparse parser for config dataclass ``cls`` (flat flags + ``--config``), its
    --help grouped by topic and, when ``cls.shipped_configs`` names a prefix, ending with the
    shipped configs."""
    prefix = getattr(cls, "shipped_configs", None)
    parser = ArgumentParser(
        prog=prog,
        usage="%(prog)s [--config FILE.yaml] [--flag VALUE ...]",
        description=description or cls.__doc__,
        epilog=shipped_configs_text(prefix) if prefix else None,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of any of the flags.")
    parser.add_class_arguments(cls, nested_key=None, as_group=False)
    _group_flags(parser, cls)
    return parser


def exit_after_help(module: str, cls: type, description: str | None = None) -> None:
    """When ``module`` is the program being run and ``-h``/``--help`` is among its arguments,
    print the help of ``cls`` and exit. A script calls it before importing torch and the models'
    stack, so that --help answers at once."""
    if module == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
        build_parser(cls, prog=sys.argv[0], description=description).print_help()
        raise SystemExit(0)


def parse_config(
    cls: type[ConfigT], argv: Sequence[str] | None = None, description: str | None = None
) -> ConfigT:
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``cls``.

    Invalid values, including those rejected by the dataclass's ``__post_init__``, end the program
    with the usual argparse error message (exit status 2).
    """
    parser = build_parser(cls, prog=sys.argv[0], description=description)
    namespace = parser.parse_args(
        _normalise_argv(
            sys.argv[1:] if argv is None else argv,
            _bool_fields(cls),
            _list_fields(cls),
            _size_list_fields(cls),
        )
    )
    values = parser.instantiate(namespace).as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    try:
        return cls(**values)
    except ValueError as error:
        parser.error(str(error))  # prints the usage and the message, exits with status 2


@dataclass(kw_only=True)
class InpaintingDataConfig(PromptConfig):
    """Inpainting data: columns of a Hugging Face dataset (--dataset_name), random masks."""

    image_column: str = "image"
    """Column with the image."""
    mask_column: str = "mask"
    """Column with the mask (white = region to fill)."""
    prompt_column: str = "prompt"
    """Column with the prompt."""
    dataset_split: str = "train"
    """Split of the Hugging Face dataset."""

    random_masks: bool = False
    """Draw strokes and boxes (5-50% coverage) for rows without a mask, fixed per item by --seed
    and the item's index, so they repeat on resume and in the latent cache."""
    dataset_config: str | None = None
    """A YAML list of data sets to train on together (instead of --train_data_dir), each a
    mapping with train_data_dir (a folder with a metadata.jsonl, relative to the file's folder)
    and repeats: how many times an epoch draws each of its examples (default 1)."""

    @classmethod
    def data_sources(cls) -> tuple[str, ...]:
        return (*super().data_sources(), "dataset_config")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.validation_images and not self.validation_masks:
            raise ValueError(
                "--validation_images of an inpainting model need --validation_masks: the "
                "region each one fills"
            )
