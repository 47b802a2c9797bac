"""The tiny models: saved, loaded back with ``from_pretrained`` and run, all offline on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxKontextPipeline,
    PNDMScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    StableDiffusionInpaintPipeline,
)
from PIL import Image
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    Qwen2Tokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.utils import is_torchvision_available

from models.qwen_processor import load_image_only_processor
from worlds.tiny_models import (
    FLUX_DEV_SCHEDULER,
    QWEN_IMAGE_SCHEDULER,
    QWEN_VISION_MERGE,
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_qwen2_5_vl_text_encoder,
    tiny_qwen2_tokenizer,
    tiny_qwen2_vl_image_processor,
    tiny_qwen2_vl_processor,
    tiny_qwen_image_transformer,
    tiny_qwen_image_vae,
    tiny_sd3_vae,
    tiny_sd15_inpaint_pipeline,
)
from worlds.tiny_set import TINY_MODEL_FACTORIES, write_tiny_models

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Replace the cat with a small dog, keep the sofa!"
ODD_PROMPT = 'Put a "naïve" café sign (50% off) on the wall — 東京, ☕ & ß?'


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(height: int, width: int) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _assert_image(images: np.ndarray, height: int, width: int) -> None:
    assert images.shape == (1, height, width, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


def _weights(built) -> dict[str, torch.Tensor]:
    """Every tensor of a model, or of every model in a pipeline or component dict, by name."""
    if isinstance(built, torch.nn.Module):
        return dict(built.state_dict())
    parts = built.components if hasattr(built, "components") else built
    return {
        f"{part}.{key}": tensor
        for part, module in parts.items()
        if isinstance(module, torch.nn.Module)
        for key, tensor in module.state_dict().items()
    }


def _qwen_components(seed: int) -> dict[str, torch.nn.Module]:
    tokenizer = tiny_qwen2_tokenizer()
    return {
        "vae": tiny_qwen_image_vae(seed),
        "text_encoder": tiny_qwen2_5_vl_text_encoder(tokenizer, seed),
        "transformer": tiny_qwen_image_transformer(seed),
    }


# --- pipelines: load with from_pretrained, run two steps ---------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 64), (128, 96)])
def test_flux_kontext_loads_and_edits(tiny_models, height, width):
    pipe = FluxKontextPipeline.from_pretrained(tiny_models["flux-kontext"])
    assert pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.in_channels == 64
    assert pipe.vae_scale_factor == 8
    assert {k: pipe.scheduler.config[k] for k in FLUX_DEV_SCHEDULER} == FLUX_DEV_SCHEDULER
    images = pipe(
        image=_image(64, 96),  # the context keeps its own size: its tokens follow the target's
        prompt=PROMPT,
        height=height,
        width=width,
        max_area=height * width,  # the default (1024**2) would rescale the requested size
        _auto_resize=False,  # the default snaps the context to a ~1 MP Kontext resolution
        num_inference_steps=2,
        generator=_generator(),
        output_type="np",
    ).images
    _assert_image(images, height, width)


def _assert_inpaints(pipe) -> None:
    """Two inpainting steps on a 64x96 image and mask give a finite 64x96 image."""
    images = pipe(
        prompt=PROMPT,
        image=_image(64, 96),
        mask_image=_mask(64, 96),
        height=64,
        width=96,
        num_inference_steps=2,
        generator=_generator(),
        output_type="np",
    ).images
    _assert_image(images, 64, 96)


def test_flux_fill_loads_and_inpaints(tiny_models):
    pipe = FluxFillPipeline.from_pretrained(tiny_models["flux-fill"])
    assert pipe.transformer.config.in_channels == 384
    assert pipe.transformer.config.out_channels == 64
    _assert_inpaints(pipe)


def test_sd15_inpaint_loads_and_inpaints(tiny_models):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_models["sd15-inpaint"])
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (9, 4)
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae_scale_factor == 8
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None
    _assert_inpaints(pipe)


@pytest.mark.parametrize(
    "name,pipeline_cls",
    [
        ("qwen-image-edit", QwenImageEditPipeline),
        ("qwen-image-edit-plus", QwenImageEditPlusPipeline),
    ],
)
def test_qwen_image_edit_loads_and_edits_without_torchvision(tiny_models, name, pipeline_cls):
    folder = tiny_models[name]
    assert pipeline_cls.load_config(folder)["_class_name"] == pipeline_cls.__name__
    assert pipeline_cls.load_config(folder)["processor"] == ["transformers", "Qwen2VLProcessor"]
    processor = load_image_only_processor(str(folder))
    assert processor.get_attributes() == ["image_processor", "tokenizer"]
    pipe = pipeline_cls.from_pretrained(folder, processor=processor)
    assert pipe.vae_scale_factor == 8
    images = pipe(
        image=_image(64, 96),
        prompt=PROMPT,
        height=64,
        width=96,
        num_inference_steps=2,
        true_cfg_scale=1.0,
        generator=_generator(),
        output_type="np",
    ).images
    _assert_image(images, 64, 96)


@pytest.mark.skipif(not is_torchvision_available(), reason="transformers' own processor loading")
def test_qwen_image_edit_loads_as_a_checkpoint_with_torchvision(tiny_models):
    pipe = QwenImageEditPipeline.from_pretrained(tiny_models["qwen-image-edit"])
    assert type(pipe.processor).__name__ == "Qwen2VLProcessor"


def test_image_only_processor_matches_the_image_processor_and_tokenizer():
    """The processor expands the image placeholder to the image's vision tokens, as the full
    Qwen2-VL processor does, and passes the image processor's pixels through."""
    tokenizer = tiny_qwen2_tokenizer()
    image_processor = tiny_qwen2_vl_image_processor()
    processor = tiny_qwen2_vl_processor(tokenizer)
    context = _image(1024, 768)
    text = f"<|vision_start|><|image_pad|><|vision_end|>{PROMPT}"
    inputs = processor(text=[text], images=[context], return_tensors="pt")
    vision = image_processor(images=[context], return_tensors="pt")
    n_image_tokens = int(vision["image_grid_thw"].prod()) // QWEN_VISION_MERGE**2
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n_image_tokens)
    assert inputs["input_ids"].tolist() == tokenizer([expanded]).input_ids
    assert torch.equal(inputs["pixel_values"], vision["pixel_values"])
    assert torch.equal(inputs["image_grid_thw"], vision["image_grid_thw"])


def test_qwen_components_run_the_edit_pipeline():
    """The text encoder reads an image the way the processor lays it out, and the pipeline
    denoises from its hidden states."""
    tokenizer = tiny_qwen2_tokenizer()
    image_processor = tiny_qwen2_vl_image_processor()
    components = _qwen_components(seed=0)
    text_encoder = components["text_encoder"]
    context = _image(1024, 1024)  # the size QwenImageEditPipeline hands its processor

    vision = image_processor(images=[context], return_tensors="pt")
    n_image_tokens = int(vision["image_grid_thw"].prod()) // QWEN_VISION_MERGE**2
    assert 1 <= n_image_tokens <= 4
    text = (
        "<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * n_image_tokens
        + f"<|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = tokenizer(text, return_tensors="pt")
    assert (inputs.input_ids == text_encoder.config.image_token_id).sum() == n_image_tokens
    with torch.no_grad():
        hidden = text_encoder(
            **inputs,
            pixel_values=vision["pixel_values"],
            image_grid_thw=vision["image_grid_thw"],
            output_hidden_states=True,
        ).hidden_states[-1]
    assert hidden.shape == (1, inputs.input_ids.shape[1], 32)
    assert torch.isfinite(hidden).all()

    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=components["vae"],
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=None,
        transformer=components["transformer"],
    )
    assert pipe.vae_scale_factor == 8
    images = pipe(
        image=context,
        prompt_embeds=hidden,
        prompt_embeds_mask=torch.ones(hidden.shape[:2], dtype=torch.long),
        height=64,
        width=96,
        num_inference_steps=2,
        true_cfg_scale=1.0,
        generator=_generator(),
        output_type="np",
    ).images
    _assert_image(images, 64, 96)


# --- VAEs: the real 8x compression and latent channels ------------------------------------------


@pytest.mark.parametrize(
    ("name", "subfolder", "scaling_factor", "shift_factor"),
    [
        ("flux-kontext", "vae", 0.3611, 0.1159),
        ("flux-fill", "vae", 0.3611, 0.1159),
        ("sd3-vae", None, 1.5305, 0.0609),
    ],
)
def test_16_channel_vaes_compress_8x(tiny_models, name, subfolder, scaling_factor, shift_factor):
    vae = AutoencoderKL.from_pretrained(tiny_models[name], subfolder=subfolder)
    config = vae.config
    assert 2 ** (len(config.block_out_channels) - 1) == 8
    assert config.latent_channels == 16
    assert not config.use_quant_conv and not config.use_post_quant_conv
    assert (config.scaling_factor, config.shift_factor) == (scaling_factor, shift_factor)
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mode()
        decoded = vae.decode(latents).sample
    assert latents.shape == (1, 16, 8, 8)
    assert decoded.shape == (1, 3, 64, 64)


def test_sd15_vae_compresses_8x_to_4_channels(tiny_models):
    vae = AutoencoderKL.from_pretrained(tiny_models["sd15-inpaint"], subfolder="vae")
    assert vae.config.scaling_factor == 0.18215
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 64, 96) * 2 - 1).latent_dist.mode()
    assert latents.shape == (1, 4, 8, 12)


def test_qwen_vae_compresses_8x_to_16_channels():
    vae = tiny_qwen_image_vae()
    assert 2 ** len(vae.temperal_downsample) == 8  # what QwenImageEditPipeline reads
    assert vae.config.z_dim == 16 and len(vae.config.latents_mean) == 16
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 1, 64, 96) * 2 - 1).latent_dist.mode()
    assert latents.shape == (1, 16, 1, 8, 12)


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        tiny_flux_kontext_pipeline,
        tiny_flux_fill_pipeline,
        _qwen_components,
        tiny_sd15_inpaint_pipeline,
        tiny_sd3_vae,
    ],
    ids=["flux-kontext", "flux-fill", "qwen-image-edit", "sd15-inpaint", "sd3-vae"],
)
def test_same_seed_same_weights_other_seed_other_weights(build):
    first, again, other = _weights(build(0)), _weights(build(0)), _weights(build(1))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_building_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_sd3_vae(seed=7)
    assert torch.equal(torch.rand(4), expected)


# --- tokenizers ---------------------------------------------------------------------------------


def test_t5_tokenizer_pads_to_512_and_matches_its_encoder(tiny_models):
    folder = tiny_models["flux-kontext"]
    tokenizer = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2")
    encoder = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2")
    assert encoder.config.vocab_size == len(tokenizer)
    ids = tokenizer(PROMPT, padding="max_length", max_length=512, truncation=True).input_ids
    assert len(ids) == 512
    assert tokenizer.convert_ids_to_tokens(tokenizer("the cat").input_ids) == [
        "▁the",
        "▁cat",
        "</s>",
    ]
    odd = tokenizer(ODD_PROMPT).input_ids
    assert tokenizer.unk_token_id in odd  # no byte fallback: unknown characters become <unk>
    assert odd[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["flux-kontext", "sd15-inpaint"])
def test_clip_tokenizer_pads_to_77_and_matches_its_encoder(tiny_models, name):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models[name], subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_models[name], subfolder="text_encoder")
    assert encoder.config.vocab_size == len(tokenizer)
    assert encoder.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == 77
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert tokenizer.convert_ids_to_tokens(tokenizer("the cat").input_ids) == [
        "<|startoftext|>",
        "the</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    odd = tokenizer(ODD_PROMPT).input_ids
    assert odd[0] == tokenizer.bos_token_id and odd[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in odd[1:-1]  # every byte has a symbol: nothing unknown
    assert "".join(tokenizer.decode(odd, skip_special_tokens=True).split()) == "".join(
        ODD_PROMPT.lower().split()
    )


def test_qwen_tokenizer_round_trips_any_text_and_knows_the_vision_tokens(tmp_path):
    tiny_qwen2_tokenizer().save_pretrained(tmp_path)
    tokenizer = Qwen2Tokenizer.from_pretrained(tmp_path)
    encoder = tiny_qwen2_5_vl_text_encoder(tokenizer)
    assert encoder.config.text_config.vocab_size == len(tokenizer)
    ids = tokenizer(ODD_PROMPT).input_ids
    assert tokenizer.decode(ids) == ODD_PROMPT
    assert tokenizer.convert_ids_to_tokens(tokenizer("the cat").input_ids) == [
        "t",
        "h",
        "e",
        "Ġcat",
    ]
    template = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    config = encoder.config
    assert tokenizer(template).input_ids == [
        tokenizer.convert_tokens_to_ids("<|im_start|>"),
        *tokenizer("user\n").input_ids,
        config.vision_start_token_id,
        config.image_token_id,
        config.vision_end_token_id,
        *tokenizer("hi").input_ids,
        tokenizer.eos_token_id,
    ]


# --- the script ---------------------------------------------------------------------------------


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_models.py"), *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_script_writes_every_family(tmp_path):
    result = _script("--out", str(tmp_path), "--seed", "3")
    assert result.returncode == 0, result.stderr
    expected = set(TINY_MODEL_FACTORIES)
    assert {path.name for path in tmp_path.iterdir()} == expected
    for name in expected - {"sd3-vae"}:
        assert (tmp_path / name / "model_index.json").is_file()
    written = _weights(AutoencoderKL.from_pretrained(tmp_path / "sd3-vae"))
    built = _weights(tiny_sd3_vae(seed=3))
    assert written.keys() == built.keys()
    assert all(torch.equal(written[key], built[key]) for key in built)


def test_script_help_documents_its_flags():
    result = _script("--help")
    assert result.returncode == 0, result.stderr
    assert "--out OUT" in result.stdout
    assert "--seed SEED" in result.stdout
