"""``training.memory.quantization``: which modes a run may ask for, and what ``from_pretrained``
gets."""

import importlib.util
from dataclasses import dataclass

import diffusers
import pytest
import torch
import transformers

from training.config import LowMemoryConfig, TrainConfig
from training.memory.quantization import pipeline_quantization
from training.runtime import resolve_mixed_precision


@dataclass(kw_only=True)
class Flags(LowMemoryConfig, TrainConfig):
    pass


def flags(**values) -> Flags:
    return Flags(pretrained_model_name_or_path="m", train_data_dir="d", **values)


class TestChecks:
    def test_fp8_computes_in_bf16(self):
        with pytest.raises(ValueError, match="--mixed_precision bf16"):
            flags(quantize_base="fp8", mixed_precision="no")
        assert flags(quantize_base="fp8", mixed_precision="bf16").quantize_base == "fp8"
        # auto is settled on the machine that trains: fp32 on this CPU, which fp8 refuses.
        auto = flags(quantize_base="fp8")
        with pytest.raises(ValueError, match="--mixed_precision bf16"):
            resolve_mixed_precision(auto)

    @pytest.mark.parametrize(
        "flag,mode,package",
        [
            ("quantize_base", "int8", "torchao"),
            ("quantize_base", "nf4", "bitsandbytes"),
            ("quantize_text_encoders", "int8", "torchao"),
        ],
    )
    def test_a_missing_library_is_one_line_naming_the_extra(self, monkeypatch, flag, mode, package):
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda n, *a: None if n == package else find_spec(n, *a)
        )
        with pytest.raises(ValueError) as error:
            flags(**{flag: mode})
        message = str(error.value)
        assert "\n" not in message and f"--{flag} {mode}" in message
        assert package in message and "'.[lowmem]'" in message


class TestPipelineQuantization:
    def test_nothing_asked_nothing_given(self):
        assert (
            pipeline_quantization(flags(), "transformer", ["text_encoder"], torch.float32) is None
        )

    def test_denoiser_by_diffusers_encoders_by_transformers(self):
        config = flags(quantize_base="int8", quantize_text_encoders="int8")
        mapping = pipeline_quantization(
            config, "unet", ["text_encoder", "text_encoder_2"], torch.bfloat16
        ).quant_mapping
        assert mapping.keys() == {"unet", "text_encoder", "text_encoder_2"}
        assert isinstance(mapping["unet"], diffusers.TorchAoConfig)
        assert isinstance(mapping["text_encoder_2"], transformers.TorchAoConfig)
        assert type(mapping["unet"].quant_type).__name__ == "Int8WeightOnlyConfig"

    def test_fp8_is_torchao_float8_weight_only(self):
        config = flags(quantize_base="fp8", mixed_precision="bf16")
        (denoiser,) = pipeline_quantization(
            config, "transformer", [], torch.bfloat16
        ).quant_mapping.values()
        assert type(denoiser.quant_type).__name__ == "Float8WeightOnlyConfig"

    @pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without")
    @pytest.mark.parametrize("flag", ["quantize_base", "quantize_text_encoders"])
    def test_nf4_without_cuda_is_refused_saying_what_runs(self, flag):
        with pytest.raises(RuntimeError, match=f"--{flag} nf4 needs a CUDA GPU.*int8 and fp8"):
            pipeline_quantization(flags(**{flag: "nf4"}), "transformer", ["text_encoder"], None)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' loaders need CUDA")
    def test_nf4_is_bitsandbytes_4bit_normal_float(self):
        config = flags(quantize_base="nf4", quantize_text_encoders="nf4")
        mapping = pipeline_quantization(
            config, "transformer", ["text_encoder"], torch.bfloat16
        ).quant_mapping
        assert mapping["transformer"].bnb_4bit_quant_type == "nf4"
        assert isinstance(mapping["text_encoder"], transformers.BitsAndBytesConfig)
