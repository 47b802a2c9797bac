"""Accelerate set-up: devices, mixed precision, accumulation, trackers, logging, seeds."""

from __future__ import annotations

import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from data.images import set_max_image_pixels
from training.checkpointing.checkpoints import resolve_checkpoint
from training.checkpointing.output_dir import (
    OutputDirError,
    RunLock,
    check_output_dir,
    prepare_output_dir,
)
from training.config import TrainConfig, check_fp8_precision
from training.datasets import data_folders
from training.memory.quantization import (
    denoiser_quantization,
    pipeline_quantization,
    quantize_with_torchao,
)

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_accelerator(config: TrainConfig) -> Accelerator:
    """An ``Accelerator`` for ``config``; on a machine without CUDA it runs on the CPU. It also
    locks and checks ``--output_dir`` before any model is loaded
    (``training.checkpointing.output_dir``): a folder another run uses, or one this run must not
    write into, ends the program with exit status 2 and one line saying why.

    ``cpu=True`` matters beyond the device: ``accelerate launch --multi_gpu --num_processes 2``
    on a CPU-only machine then forms one two-rank gloo group. The launcher's ``WORLD_SIZE`` is
    checked against the group, so a run can never quietly become independent single-process runs.
    The LR scheduler is stepped by the loop once per optimizer step, not by accelerate once per
    process, so its state counts optimizer steps whatever the number of processes.
    """
    resolve_mixed_precision(config)
    set_max_image_pixels(config.max_image_pixels)
    try:
        check_output_dir(config.output_dir, data_folders(config))
    except OutputDirError as error:
        refuse(error)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
        mixed_precision=config.mixed_precision,
        log_with=config.trackers or None,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        cpu=not torch.cuda.is_available(),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate formed a group of "
            f"{accelerator.num_processes}; each would train alone. Check the accelerate config."
        )
    _check_engine(accelerator)
    _configure_logging(accelerator)
    try:
        if accelerator.is_main_process:
            # First, so that two runs never both pass the checks below and both write.
            RunLock(config.output_dir).acquire()
        prepare_output_dir(
            config.output_dir,
            resolve_checkpoint(config.output_dir, config.resume_from_checkpoint) is not None,
            config.overwrite_output_dir,
            accelerator.is_main_process,
            cache_in_output_dir=config.cache_latents and config.cache_dir is None,
        )
    except OutputDirError as error:
        refuse(error)
    accelerator.wait_for_everyone()
    set_seed(config.seed, device_specific=False)
    return accelerator


def run_main(main: Callable[[], None]) -> None:
    """A train script's command line: a refusal raised after parsing (bad data, a folder in use,
    settings that do not fit the model: ``ValueError``, the base of ``DataError``) ends the
    program with ``<script>: error: <message>`` and exit status 2; with ``--debug`` the
    traceback is shown instead."""
    try:
        main()
    except ValueError as error:
        if "--debug" in sys.argv:
            raise
        refuse(f"{error} (--debug shows where)")


def refuse(message: object) -> None:
    """End the program as argparse does for a bad flag: ``<script>: error: <message>`` on
    stderr, exit status 2, no traceback."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


# Sharding engines an accelerate config can ask for: the variable `accelerate launch` sets.
_ENGINES = {
    DistributedType.FSDP: "ACCELERATE_USE_FSDP",
    DistributedType.DEEPSPEED: "ACCELERATE_USE_DEEPSPEED",
}


def _check_engine(accelerator: Accelerator) -> None:
    """Refuse a run whose accelerate config asks for FSDP or DeepSpeed that accelerate did not
    apply: accelerate 1.x applies both only to GPU (and other accelerator) groups, and on CPUs
    would quietly train as plain data parallel, with every rank holding the whole model."""
    for engine, variable in _ENGINES.items():
        asked = os.environ.get(variable, "false").lower() in ("true", "1")
        if asked and accelerator.distributed_type != engine:
            raise RuntimeError(
                f"the accelerate config asks for {engine.value} ({variable}=true) but accelerate "
                f"formed a {accelerator.distributed_type.value} run on {accelerator.device}: it "
                f"applies {engine.value} to GPU groups only. Use configs/accelerate/ddp.yaml (or "
                "--multi_gpu) here, or run on GPUs."
            )


def _configure_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    if accelerator.is_main_process:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def load_pipeline(
    pipeline_cls,
    config: TrainConfig,
    accelerator: Accelerator,
    frozen: Sequence[str],
    denoiser: str = "transformer",
    **components,
):
    """:func:`pretrained_pipeline` with every component but the ``denoiser`` (the encoders) on
    the accelerator's device; the denoiser stays on the CPU until
    ``training.memory.offload.place_denoiser`` moves it, once encoding is done, so that the device
    holds the largest phase of a run, never the whole pipeline. (bitsandbytes-quantized
    components load straight onto the GPU.)"""
    pipe = pretrained_pipeline(pipeline_cls, config, frozen, denoiser, **components)
    for name, component in pipe.components.items():
        if name != denoiser and isinstance(component, torch.nn.Module):
            component.to(accelerator.device)
    return pipe


def pretrained_pipeline(
    pipeline_cls,
    config: TrainConfig,
    frozen: Sequence[str],
    denoiser: str = "transformer",
    **components,
):
    """The family's pipeline from --pretrained_model_name_or_path in the --mixed_precision dtype,
    with its ``frozen`` components (encoders) frozen in eval mode; ``components`` replace the
    checkpoint's own (as ``from_pretrained`` takes them).

    With ``--quantize_base`` the ``denoiser`` component's linear weights load quantized, with
    ``--quantize_text_encoders`` those of the frozen ``text_encoder*`` components.
    """
    single_file = config.denoiser_file is not None
    quantization = None
    if hasattr(config, "quantize_base"):
        text_encoders = [name for name in frozen if name.startswith("text_encoder")]
        quantization = pipeline_quantization(
            config, None if single_file else denoiser, text_encoders, weight_dtype(config)
        )
    if single_file:
        components[denoiser] = single_file_denoiser(pipeline_cls, config, denoiser)
    pipe = pipeline_cls.from_pretrained(
        config.pipeline_source,
        dtype=weight_dtype(config),
        quantization_config=quantization,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    for name in frozen:
        getattr(pipe, name).requires_grad_(False).eval()
    return pipe


def single_file_denoiser(pipeline_cls, config: TrainConfig, denoiser: str):
    """The ``denoiser`` component of ``pipeline_cls`` from the single .safetensors file
    --pretrained_model_name_or_path names, through diffusers' ``from_single_file`` (which
    converts the original layouts model sites share), its config from the pipeline folder, in
    the --mixed_precision dtype, quantized by --quantize_base."""
    model_cls = typing.get_type_hints(pipeline_cls.__init__)[denoiser]
    quantization = denoiser_quantization(config, weight_dtype(config))
    torchao = isinstance(quantization, diffusers.TorchAoConfig)
    model = model_cls.from_single_file(
        config.denoiser_file,
        config=config.pipeline_source,
        subfolder=denoiser,
        torch_dtype=weight_dtype(config),
        quantization_config=None if torchao else quantization,
    )
    if torchao:
        quantize_with_torchao(model, quantization)
    return model


def keep_frozen_parameters_local(model: torch.nn.Module) -> None:
    """Tell DDP (when accelerate wraps ``model`` in it) to leave the frozen parameters alone.

    Every rank loads them from the same files, so DDP's broadcast of them from rank 0 at
    wrapping time is a copy of billions of identical values, and one it cannot make of
    quantized weights (torchao and bitsandbytes tensors have no ``view`` for it).
    """
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, frozen
    )


def resolve_mixed_precision(config: TrainConfig) -> str:
    """Settle ``--mixed_precision auto`` for this machine, in ``config``: bf16 on a CUDA GPU that
    computes in it, fp16 on an older one, no (fp32) on a CPU. Returns the value.

    Raises ``ValueError`` when ``--quantize_base fp8`` meets anything but bf16."""
    if config.mixed_precision == "auto":
        if not torch.cuda.is_available():
            config.mixed_precision = "no"
        else:
            config.mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    check_fp8_precision(config)
    return config.mixed_precision


def weight_dtype(config: TrainConfig) -> torch.dtype:
    """Dtype of the frozen weights for ``--mixed_precision`` (auto settled for this machine)."""
    return _DTYPES[resolve_mixed_precision(config)]


def step_generator(seed: int, epoch: int, batch: int, device: torch.device) -> torch.Generator:
    """A generator for the noise and timesteps of one micro-batch.

    A pure function of (seed, epoch, position of the batch in the epoch's global order), so a
    resumed run draws exactly what the uninterrupted run drew, whatever else consumed random
    numbers in between; ranks differ because they hold different positions, and a batch gets the
    same draws on 2 processes as on 1 process accumulating 2.
    """
    state = np.random.SeedSequence([seed, epoch, batch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(state[0]) << 32 | int(state[1]))
    return generator
