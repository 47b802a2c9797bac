"""The tiny FLUX.2 pipelines: their prompt formats, the shapes and ids the transformer receives,
and a save / ``from_pretrained`` round trip that gives the same images, all offline on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from PIL import Image

from worlds.tiny_flux2 import (
    FLUX2_SCHEDULER,
    MISTRAL_DIM,
    QWEN3_DIM,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_flux2_vae,
)

PROMPT = "a red chair"
# 64x64 pixels -> an 8x8 latent -> 4x4 tokens of 2x2 patches.
TOKENS_64 = 16


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _references(count: int) -> list[Image.Image] | None:
    return [_image(seed) for seed in range(count)] or None


def _generate(pipe, images, guidance_scale: float = 4.0) -> np.ndarray:
    """``pipe``'s 64x64 two-step image for ``PROMPT``, ``[1, 64, 64, 3]`` in [0, 1]."""
    return pipe(
        image=images,
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


class _TransformerCalls:
    """The keyword arguments of each call of ``pipe.transformer``, recorded by a pre-hook."""

    def __init__(self, pipe):
        self.calls: list[dict] = []
        self._handle = pipe.transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append(kwargs)

    def __enter__(self) -> _TransformerCalls:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def _normalised_reference_tokens(vae: AutoencoderKLFlux2, image: Image.Image) -> torch.Tensor:
    """The tokens the pipelines should give the transformer for a 64x64 reference image:
    the VAE latent's mode, patchified 2x2, normalised by ``vae.bn`` and flattened,
    ``[16, 128]``."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latent = vae.encode(pixels).latent_dist.mode()  # [1, 32, 8, 8]
    channels, height, width = latent.shape[1:]
    patches = latent.reshape(channels, height // 2, 2, width // 2, 2)
    patches = patches.permute(0, 2, 4, 1, 3).reshape(4 * channels, height // 2, width // 2)
    mean = vae.bn.running_mean[:, None, None]
    std = torch.sqrt(vae.bn.running_var[:, None, None] + vae.config.batch_norm_eps)
    return ((patches - mean) / std).flatten(1).T


def _assert_target_and_reference_ids(img_ids: torch.Tensor, references: int) -> None:
    """Target tokens at time 0, then 16 tokens per reference at times 10, 20, ...; each on its
    own 4x4 grid."""
    assert img_ids.shape == (1, TOKENS_64 * (1 + references), 4)
    grid = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    for index in range(1 + references):
        block = img_ids[0, index * TOKENS_64 : (index + 1) * TOKENS_64]
        assert (block[:, 0] == 10 * index).all()
        assert torch.equal(block[:, 1:3], grid)
        assert (block[:, 3] == 0).all()


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory) -> tuple[Flux2KleinPipeline, ...]:
    """The klein pipeline, its folder, and the pipeline loaded back from that folder."""
    pipe = tiny_flux2_klein_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("flux2-klein")
    pipe.save_pretrained(folder)
    loaded = Flux2KleinPipeline.from_pretrained(folder)
    for each in (pipe, loaded):
        each.set_progress_bar_config(disable=True)
    return pipe, folder, loaded


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> tuple[Flux2Pipeline, ...]:
    """The [dev] pipeline, its folder, and the pipeline loaded back from that folder."""
    pipe = tiny_flux2_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("flux2-dev")
    pipe.save_pretrained(folder)
    loaded = Flux2Pipeline.from_pretrained(folder)
    for each in (pipe, loaded):
        each.set_progress_bar_config(disable=True)
    return pipe, folder, loaded


def test_klein_chat_template_renders_qwen3_without_thinking(klein):
    pipe, _, loaded = klein
    messages = [{"role": "user", "content": PROMPT}]
    for tokenizer in (pipe.tokenizer, loaded.tokenizer):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert text == (
            "<|im_start|>user\na red chair<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        )
        # Thinking left on (Qwen3's default) opens the assistant turn without a think block.
        assert tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        ).endswith("<|im_start|>assistant\n")
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        assert tokens[0] == "<|im_start|>"
        assert tokens[-6:] == ["<think>", "Ċ", "Ċ", "</think>", "Ċ", "Ċ"]


def test_klein_components(klein):
    pipe, folder, loaded = klein
    encoder = pipe.text_encoder
    assert encoder.config.num_hidden_layers >= 28
    assert encoder.config.vocab_size == len(pipe.tokenizer)
    assert encoder.config.pad_token_id == pipe.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert encoder.config.eos_token_id == pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = pipe.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**ids, output_hidden_states=True).hidden_states
    # The embeddings, then one state per layer: index 27 is still an intermediate layer.
    assert len(hidden) == encoder.config.num_hidden_layers + 1 > 28
    assert hidden[27].shape[-1] == QWEN3_DIM

    config = pipe.transformer.config
    assert (config.in_channels, pipe.transformer.out_channels) == (128, 128)
    assert config.joint_attention_dim == 3 * QWEN3_DIM
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert not config.guidance_embeds
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 32
    for key, value in FLUX2_SCHEDULER.items():
        assert loaded.scheduler.config[key] == value
    assert not loaded.config.is_distilled
    assert _folder_size(folder) < 3 * 2**20


def test_klein_transformer_gets_target_then_reference_tokens(klein):
    pipe, _, _ = klein
    references = _references(2)
    with _TransformerCalls(pipe) as recorded:
        _generate(pipe, references, guidance_scale=1.0)
    first = recorded.calls[0]
    hidden = first["hidden_states"]
    assert hidden.shape == (1, TOKENS_64 * 3, 128)
    assert first["encoder_hidden_states"].shape == (1, 512, 3 * QWEN3_DIM)
    assert first["guidance"] is None
    _assert_target_and_reference_ids(first["img_ids"], references=2)
    # The reference tokens are the VAE latents normalised by its batch-norm statistics.
    for index, image in enumerate(references, start=1):
        expected = _normalised_reference_tokens(pipe.vae, image)
        tokens = hidden[0, index * TOKENS_64 : (index + 1) * TOKENS_64]
        torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("references", "guidance_scale"), [(0, 1.0), (1, 4.0), (2, 4.0)])
def test_klein_loaded_pipeline_gives_the_same_images(klein, references, guidance_scale):
    pipe, _, loaded = klein
    images = _references(references)
    with _TransformerCalls(pipe) as recorded:
        expected = _generate(pipe, images, guidance_scale)
    assert expected.shape == (1, 64, 64, 3)
    assert np.isfinite(expected).all() and expected.min() >= 0 and expected.max() <= 1
    # Classifier-free guidance (scale > 1, not distilled): a conditional and an unconditional
    # call per step.
    assert len(recorded.calls) == 2 * (2 if guidance_scale > 1 else 1)
    assert np.array_equal(_generate(loaded, images, guidance_scale), expected)


def test_klein_guidance_changes_the_image_unless_distilled(klein, tmp_path: Path):
    pipe, _, _ = klein
    references = _references(1)
    assert not np.array_equal(_generate(pipe, references, 1.0), _generate(pipe, references, 4.0))
    tiny_flux2_klein_pipeline(seed=0, is_distilled=True).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["is_distilled"] is True
    distilled = Flux2KleinPipeline.from_pretrained(tmp_path)
    distilled.set_progress_bar_config(disable=True)
    assert distilled.config.is_distilled
    with _TransformerCalls(distilled) as recorded:
        guided = _generate(distilled, references, 4.0)
    assert len(recorded.calls) == 2
    assert np.array_equal(guided, _generate(distilled, references, 1.0))


def test_vae_batch_norm_statistics_are_not_the_identity_and_survive_save(tmp_path: Path):
    vae = tiny_flux2_vae(seed=0)
    mean, var = vae.bn.running_mean, vae.bn.running_var
    assert mean.shape == var.shape == (128,)
    assert mean.abs().min() > 0 and mean.std() > 0.2
    assert var.min() >= 0.5 and var.max() <= 2.0 and (var - 1).abs().max() > 0.3
    vae.save_pretrained(tmp_path)
    loaded = AutoencoderKLFlux2.from_pretrained(tmp_path)
    assert torch.equal(loaded.bn.running_mean, mean)
    assert torch.equal(loaded.bn.running_var, var)
    # Seeded: the same seed builds the same statistics, another seed others.
    assert torch.equal(tiny_flux2_vae(seed=0).bn.running_mean, mean)
    assert not torch.equal(tiny_flux2_vae(seed=1).bn.running_mean, mean)


def test_dev_chat_template_renders_mistral_small_prompt(dev):
    pipe, _, loaded = dev
    system = pipe.system_message
    for tokenizer in (pipe.tokenizer, loaded.tokenizer):
        assert tokenizer.apply_chat_template(format_input([PROMPT], system), tokenize=False) == [
            f"<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]a red chair[/INST]"
        ]
        with_image = format_input([PROMPT], system, images=[[_image(0)]])
        assert tokenizer.apply_chat_template(with_image, tokenize=False) == [
            f"<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST][IMG][/INST][INST]a red chair[/INST]"
        ]
        # Called as the pipeline calls it: the prompt fits, then padding to 512.
        inputs = tokenizer.apply_chat_template(
            format_input([PROMPT], system),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=512,
        )
        assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (1, 512)
        length = int(inputs["attention_mask"].sum())
        tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
        assert tokens[:2] == ["<s>", "[SYSTEM_PROMPT]"]
        assert tokens[length - 1] == "[/INST]"
        assert set(tokens[length:]) == {"<pad>"}


def test_dev_components(dev):
    pipe, folder, loaded = dev
    encoder = pipe.text_encoder
    text = encoder.config.text_config
    assert text.num_hidden_layers >= 31
    assert text.vocab_size == len(pipe.tokenizer)
    assert encoder.config.image_token_index == pipe.tokenizer.convert_tokens_to_ids("[IMG]")
    config = pipe.transformer.config
    assert (config.in_channels, pipe.transformer.out_channels) == (128, 128)
    assert config.joint_attention_dim == 3 * MISTRAL_DIM
    assert config.guidance_embeds
    for key, value in FLUX2_SCHEDULER.items():
        assert loaded.scheduler.config[key] == value
    assert _folder_size(folder) < 3 * 2**20


def test_dev_text_encoder_vision_tower_reads_images(dev):
    """A 64x64 image is 2x2 tokens after the 2x2 patch merge; they replace the ``[IMG]``s."""
    pipe, _, _ = dev
    tokenizer = pipe.tokenizer
    text = "<s>[INST][IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END]a red chair[/INST]"
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    states = []
    for seed in (0, 1):
        pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            output = pipe.text_encoder(
                **ids,
                pixel_values=pixels,
                image_sizes=torch.tensor([[64, 64]]),
                output_hidden_states=True,
            )
        states.append(output.hidden_states[30])
    assert len(output.hidden_states) == pipe.text_encoder.config.text_config.num_hidden_layers + 1
    assert not torch.equal(states[0], states[1])


def test_dev_transformer_gets_guidance_and_reference_tokens(dev):
    pipe, _, _ = dev
    references = _references(2)
    with _TransformerCalls(pipe) as recorded:
        _generate(pipe, references, guidance_scale=4.0)
    # Guidance-distilled: the scale is an input, one call per step.
    assert len(recorded.calls) == 2
    first = recorded.calls[0]
    assert torch.equal(first["guidance"], torch.tensor([4.0]))
    assert first["hidden_states"].shape == (1, TOKENS_64 * 3, 128)
    assert first["encoder_hidden_states"].shape == (1, 512, 3 * MISTRAL_DIM)
    _assert_target_and_reference_ids(first["img_ids"], references=2)
    expected = _normalised_reference_tokens(pipe.vae, references[1])
    tokens = first["hidden_states"][0, 2 * TOKENS_64 :]
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("references", [0, 1, 2])
def test_dev_loaded_pipeline_gives_the_same_images(dev, references):
    pipe, _, loaded = dev
    images = _references(references)
    expected = _generate(pipe, images)
    assert expected.shape == (1, 64, 64, 3)
    assert np.isfinite(expected).all() and expected.min() >= 0 and expected.max() <= 1
    assert np.array_equal(_generate(loaded, images), expected)
