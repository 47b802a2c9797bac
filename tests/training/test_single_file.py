"""A single-file denoiser (``--pretrained_model_name_or_path model.safetensors``): the
transformer from the file through diffusers' ``from_single_file``, every other component and
config from ``--base_model_folder``; a short run trains on it."""

import pytest
import torch
from diffusers import (
    FluxKontextPipeline,
    FluxTransformer2DModel,
    StableDiffusionInpaintPipeline,
    TorchAoConfig,
)
from safetensors.torch import load_file, save_file
from script_runs import TrainScript, pipeline_as_trained, reset_accelerate
from torchao.quantization import Int8WeightOnlyConfig

import train_kontext_lora as kontext
import train_multispectral_vae as multispectral
import train_sd15_inpaint as sd15
from data.synthetic import write_kontext_dataset
from training.inputs.flux import FLUX_ENCODERS
from training.lora.export import LORA_WEIGHTS_NAME
from training.runtime import pretrained_pipeline
from worlds.tiny_models import tiny_flux_kontext_pipeline, tiny_sd15_inpaint_pipeline

RESOLUTION = 32


def file_of(model: torch.nn.Module, path, scale: float) -> dict[str, torch.Tensor]:
    """Save ``model``'s weights, each times ``scale``, as one safetensors file (diffusers' key
    names); returns them."""
    weights = {name: (value * scale).contiguous() for name, value in model.state_dict().items()}
    save_file(weights, path)
    return weights


def quantized_folder_transformer(assets, weights: dict) -> FluxTransformer2DModel:
    """The file's weights saved as a diffusers folder and loaded from it in int8, as
    ``from_pretrained`` quantizes while loading."""
    model = FluxTransformer2DModel.from_pretrained(assets / "model", subfolder="transformer")
    model.load_state_dict(weights)
    model.save_pretrained(assets / "file-as-folder")
    return FluxTransformer2DModel.from_pretrained(
        assets / "file-as-folder",
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        torch_dtype=torch.float32,  # as a run without mixed precision loads it
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file")
    pipe = tiny_flux_kontext_pipeline(seed=0)
    pipe.save_pretrained(root / "model")
    # Other weights than the folder's, so that where the transformer came from shows.
    file_of(pipe.transformer, root / "kontext.safetensors", 1.5)
    write_kontext_dataset(root / "data", n=2, resolution=RESOLUTION, seed=0)
    return root


def config(assets, **flags):
    return kontext.KontextConfig(
        pretrained_model_name_or_path=str(assets / "kontext.safetensors"),
        base_model_folder=str(assets / "model"),
        train_data_dir=str(assets / "data"),
        resolution=RESOLUTION,
        **flags,
    )


@pytest.mark.parametrize("quantized", ["none", "int8"])
def test_the_transformer_comes_from_the_file_and_the_rest_from_the_folder(assets, quantized):
    settings = config(assets, quantize_base=quantized)
    assert settings.pipeline_source == str(assets / "model")
    pipe = pipeline_as_trained(FluxKontextPipeline, settings, FLUX_ENCODERS)
    folder = FluxKontextPipeline.from_pretrained(assets / "model")
    weights = load_file(assets / "kontext.safetensors")
    if quantized == "none":
        for name, value in pipe.transformer.state_dict().items():
            assert torch.equal(value, weights[name]), name
    else:
        # Quantized as a folder of the same weights is while it loads, layer for layer.
        reference = quantized_folder_transformer(assets, weights)
        for name, module in pipe.transformer.named_modules():
            if isinstance(module, torch.nn.Linear):
                ours, theirs = module.weight, reference.get_submodule(name).weight
                assert type(ours).__name__ == type(theirs).__name__, name
                assert torch.equal(ours.dequantize(), theirs.dequantize()), name
    for name, value in folder.vae.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[name], value)


def test_sd15_takes_its_unet_from_a_file(tmp_path):
    pipe = tiny_sd15_inpaint_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "model")
    weights = file_of(pipe.unet, tmp_path / "unet.safetensors", 0.5)
    settings = sd15.SD15InpaintConfig(
        pretrained_model_name_or_path=str(tmp_path / "unet.safetensors"),
        base_model_folder=str(tmp_path / "model"),
        train_data_dir=str(tmp_path),
    )
    loaded = pretrained_pipeline(
        StableDiffusionInpaintPipeline, settings, ("vae", "text_encoder"), denoiser="unet"
    )
    for name, value in loaded.unet.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_a_run_trains_on_the_file_and_its_lora_loads_beside_it(assets, tmp_path):
    script = TrainScript(kontext, kontext.KontextConfig, RESOLUTION, seed=1, max_train_steps=2)
    reset_accelerate()
    out = script.run(
        assets,
        tmp_path / "out",
        pretrained_model_name_or_path=assets / "kontext.safetensors",
        base_model_folder=assets / "model",
    )
    reset_accelerate()
    lora = load_file(out / LORA_WEIGHTS_NAME)
    assert lora and all(torch.isfinite(value).all() for value in lora.values())
    pipe = pipeline_as_trained(FluxKontextPipeline, config(assets), FLUX_ENCODERS)
    pipe.load_lora_weights(out)


def test_what_a_single_file_cannot_be(assets, tmp_path):
    with pytest.raises(ValueError, match=r"only \.safetensors single files are read"):
        config(assets).__class__(
            pretrained_model_name_or_path=str(tmp_path / "model.ckpt"),
            train_data_dir=str(assets / "data"),
        )
    with pytest.raises(ValueError, match="no such file"):
        kontext.KontextConfig(
            pretrained_model_name_or_path=str(tmp_path / "missing.safetensors"),
            train_data_dir=str(assets / "data"),
        )
    with pytest.raises(ValueError, match="--base_model_folder completes a single"):
        kontext.KontextConfig(
            pretrained_model_name_or_path=str(assets / "model"),
            base_model_folder=str(assets / "model"),
            train_data_dir=str(assets / "data"),
        )
    with pytest.raises(ValueError, match="loads a pipeline folder, not a single file"):
        multispectral.MultispectralConfig(
            pretrained_model_name_or_path=str(assets / "kontext.safetensors"),
            train_data_dir=str(assets / "data"),
        )
    # Without --base_model_folder, the family's own pipeline completes the file.
    plain = kontext.KontextConfig(
        pretrained_model_name_or_path=str(assets / "kontext.safetensors"),
        train_data_dir=str(assets / "data"),
    )
    assert plain.pipeline_source == "black-forest-labs/FLUX.1-Kontext-dev"
