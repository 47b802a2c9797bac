"""A quantized frozen base: ``--quantize_base`` and ``--quantize_text_encoders``.

The weights of the frozen denoiser's (and text encoders') linear layers are quantized as the
pipeline loads, by diffusers' and transformers' own quantizers:

- ``int8``: torchao int8 weight-only (``Int8WeightOnlyConfig``), 1 byte per weight plus one scale
  per output row; runs on CPUs and GPUs;
- ``fp8``: torchao float8 weight-only (``Float8WeightOnlyConfig``), 1 byte per weight plus one
  scale per row; computes in bf16 (``--mixed_precision bf16``); runs on CPUs and GPUs;
- ``nf4``: bitsandbytes 4-bit NormalFloat, half a byte per weight plus one fp32 scale per block
  of 64; diffusers' bitsandbytes loader needs a CUDA GPU.

LoRA layers are added on top by peft and train in fp32 as on an unquantized base, so the saved
LoRA has the same keys and shapes and loads into the unquantized pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# bitsandbytes' 4-bit block: one fp32 absmax per this many weights.
NF4_BLOCK = 64


def _require_cuda(flag: str, mode: str) -> None:
    if mode == "nf4" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--{flag} nf4 needs a CUDA GPU (diffusers' and transformers' bitsandbytes loaders "
            "refuse without one); int8 and fp8 run anywhere"
        )


def _torchao_config(mode: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()


def _denoiser_config(mode: str, compute_dtype: torch.dtype):
    import diffusers

    if mode == "nf4":
        return diffusers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    return diffusers.TorchAoConfig(_torchao_config(mode))


def _text_encoder_config(mode: str, compute_dtype: torch.dtype):
    import transformers

    if mode == "nf4":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    return transformers.TorchAoConfig(_torchao_config(mode))


def denoiser_quantization(config, compute_dtype: torch.dtype):
    """The diffusers quantization config of the denoiser by --quantize_base; None without it
    (or for a script without the flag)."""
    mode = getattr(config, "quantize_base", "none")
    if mode == "none":
        return None
    _require_cuda("quantize_base", mode)
    return _denoiser_config(mode, compute_dtype)


def quantize_with_torchao(model: torch.nn.Module, quantization) -> None:
    """Quantize ``model`` in place by ``quantization`` (a diffusers ``TorchAoConfig``) as
    diffusers does while loading a folder: every ``nn.Linear`` but ``modules_to_not_convert``.
    For a denoiser from a single file: ``from_single_file`` applies bitsandbytes itself but
    leaves torchao's quantization undone, without a word."""
    from torchao.quantization import quantize_

    skip = quantization.modules_to_not_convert or []
    quantize_(
        model,
        quantization.quant_type,
        filter_fn=lambda module, name: (
            isinstance(module, torch.nn.Linear) and not any(part in name for part in skip)
        ),
    )


def pipeline_quantization(
    config, denoiser: str | None, text_encoders: Sequence[str], compute_dtype: torch.dtype
):
    """The ``quantization_config`` for ``from_pretrained``: ``denoiser`` (a diffusers model;
    None: it loads apart) by --quantize_base, ``text_encoders`` (transformers models) by
    --quantize_text_encoders; None when neither asks for it.

    Raises:
        RuntimeError: nf4 without a CUDA GPU.
    """
    from diffusers import PipelineQuantizationConfig

    mapping = {}
    if denoiser is not None and config.quantize_base != "none":
        mapping[denoiser] = denoiser_quantization(config, compute_dtype)
    if config.quantize_text_encoders != "none":
        _require_cuda("quantize_text_encoders", config.quantize_text_encoders)
        for name in text_encoders:
            mapping[name] = _text_encoder_config(config.quantize_text_encoders, compute_dtype)
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None
