"""Tiny random FLUX.2 pipelines, built from configs, for offline CPU tests.

``tiny_flux2_klein_pipeline`` builds a ``Flux2KleinPipeline`` (FLUX.2 [klein]: a Qwen3 text
encoder, no guidance embedding, classifier-free guidance unless distilled);
``tiny_flux2_pipeline`` a ``Flux2Pipeline`` (FLUX.2 [dev]: a Mistral 3 text encoder, a guidance
embedding). Both keep what the pipelines depend on: the 32-channel latent packed 2x2 into
128-channel tokens, 8x VAE compression, the VAE's batch-norm statistics that normalise latents,
the text encoders' depth (the pipelines stack three intermediate hidden states) and the
published scheduler. Widths are shrunk so that each saved pipeline takes about a megabyte and a
64x64 two-step call runs in well under a second on a CPU. Tokenizers are byte-level BPE built in
code, with chat templates that render the real models' prompt formats.

Each pipeline saves with ``save_pretrained`` and loads back with its class's
``from_pretrained``. The [dev] pipeline's ``tokenizer`` is a tokenizer, not the
``PixtralProcessor`` of the real checkpoint: transformers imports that processor only with
torchvision. The pipeline's prompt encoding calls nothing but the chat template, which the
tokenizer has; caption upsampling (``caption_upsample_temperature``) needs the processor.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from worlds.tiny_models import (
    BYTE_ALPHABET,
    WORDS,
    _anchored_merges,
    _byte_level,
    _seeded,
    tiny_qwen2_tokenizer,
)

# black-forest-labs/FLUX.2-dev and FLUX.2-klein-* scheduler/scheduler_config.json: FLUX.1-dev's
# values (diffusers' scripts/convert_flux2_to_diffusers.py builds the FLUX.2 scheduler from
# black-forest-labs/FLUX.1-dev's), with the default exponential time shift. With dynamic shifting
# `shift` is unused, and the FLUX.2 pipelines compute `mu` themselves (a fit of image tokens and
# steps) rather than from `base_shift`/`max_shift`.
FLUX2_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}

# The FLUX.2 VAE's latent: 32 channels at 1/8 of the image, patchified 2x2 into 128 channels.
FLUX2_LATENT_CHANNELS = 32
FLUX2_PACKED_CHANNELS = 4 * FLUX2_LATENT_CHANNELS
# Four blocks = three 2x downsamples.
FLUX2_VAE_BLOCK_OUT_CHANNELS = (8, 16, 16, 16)

# Text widths; the transformer reads three stacked hidden states, so its context is 3x these.
QWEN3_DIM = 16
MISTRAL_DIM = 16
# Klein reads hidden_states[9], [18], [27] and [dev] [10], [20], [30]. One layer more than the
# last index keeps each an intermediate layer's output, not the final-normed one.
QWEN3_LAYERS = 28
MISTRAL_LAYERS = 31

# Qwen3's chat format, with thinking switched off by an empty think block, as the klein pipeline
# asks (`enable_thinking=False`).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# The Mistral (Tekken) control tokens the [dev] prompt format and the vision tower use: first the
# unknown, begin, end and padding tokens, then the rest.
MISTRAL_SPECIAL_TOKENS = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)

# Mistral Small 3's chat format for the messages `Flux2Pipeline` builds: a system message, then
# user messages whose content is a string or a list of text and image blocks.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set system = message['role'] == 'system' %}"
    "{{- '[SYSTEM_PROMPT]' if system else '[INST]' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for block in message['content'] %}"
    "{{- block['text'] if block['type'] == 'text' else '[IMG]' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '[/SYSTEM_PROMPT]' if system else '[/INST]' }}"
    "{%- endfor %}"
)


def tiny_flux2_transformer(
    joint_attention_dim: int, guidance_embeds: bool, seed: int = 0
) -> Flux2Transformer2DModel:
    """A one-double-block, one-single-block ``Flux2Transformer2DModel``.

    Tokens ``[B, N, 128]`` in and out (32 latent channels x 2x2), text context
    ``[B, L, joint_attention_dim]``; heads of 16 dims with 4-axis RoPE (time, height, width,
    sequence) of 4 dims each, as the pipelines' 4-coordinate ids need.
    """
    with _seeded(seed):
        return Flux2Transformer2DModel(
            patch_size=1,
            in_channels=FLUX2_PACKED_CHANNELS,
            out_channels=FLUX2_PACKED_CHANNELS,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=joint_attention_dim,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=guidance_embeds,
        ).eval()


def tiny_flux2_vae(seed: int = 0) -> AutoencoderKLFlux2:
    """An ``AutoencoderKLFlux2`` with 8x compression, ``[B, 3, H, W] -> [B, 32, H/8, W/8]``.

    Its ``bn`` statistics (128 channels, one per patchified latent channel) are drawn away from
    the identity, mean ~ N(0, 0.5) and variance in [0.5, 2], so that the pipelines' latent
    normalisation ``(z - mean) / sqrt(var + eps)`` changes the latents.
    """
    with _seeded(seed):
        vae = AutoencoderKLFlux2(
            block_out_channels=FLUX2_VAE_BLOCK_OUT_CHANNELS,
            layers_per_block=1,
            latent_channels=FLUX2_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
            patch_size=(2, 2),
        )
        vae.bn.running_mean.copy_(0.5 * torch.randn(FLUX2_PACKED_CHANNELS))
        vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(FLUX2_PACKED_CHANNELS))
    return vae.eval()


def tiny_qwen3_tokenizer() -> Qwen2Tokenizer:
    """The Qwen2 byte-level BPE tokenizer of ``worlds.tiny_models`` with Qwen3's chat template
    and its ``<think>``/``</think>`` tokens (one token each, as in Qwen3's vocabulary)."""
    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3_text_encoder(tokenizer: Qwen2Tokenizer, seed: int = 0) -> Qwen3ForCausalLM:
    """A ``Qwen3ForCausalLM`` of ``QWEN3_LAYERS`` layers, width ``QWEN3_DIM``, sized to
    ``tokenizer``."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=QWEN3_DIM,
        intermediate_size=32,
        num_hidden_layers=QWEN3_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return Qwen3ForCausalLM(config).eval()


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> Flux2KleinPipeline:
    """A ``Flux2KleinPipeline``: transformer context 3 x ``QWEN3_DIM`` (hidden states 9, 18 and
    27 stacked), no guidance embedding; ``is_distilled`` turns classifier-free guidance off."""
    tokenizer = tiny_qwen3_tokenizer()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER),
        vae=tiny_flux2_vae(seed),
        text_encoder=tiny_qwen3_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(3 * QWEN3_DIM, guidance_embeds=False, seed=seed),
        is_distilled=is_distilled,
    )


def tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Mistral's control tokens and Mistral Small 3's chat template.

    Returns a ``PreTrainedTokenizerFast``: ``MISTRAL_SPECIAL_TOKENS`` first, then the 256 byte
    symbols and merges for each word after a space (``Ġword``). ``<s>`` begins a prompt (the
    chat template writes it), ``</s>`` ends one and ``<pad>`` pads.
    """
    merged, merges = _anchored_merges(
        [list(_byte_level(" " + word)) for word in WORDS], from_end=False
    )
    symbols = [*MISTRAL_SPECIAL_TOKENS, *BYTE_ALPHABET, *merged]
    backend = Tokenizer(
        models.BPE(vocab={symbol: i for i, symbol in enumerate(symbols)}, merges=merges)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        # Registered as special so that they never split, like the four above.
        extra_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]),
        chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=131072,
    )


def tiny_mistral3_text_encoder(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0
) -> Mistral3ForConditionalGeneration:
    """A ``Mistral3ForConditionalGeneration``: a Mistral text model of ``MISTRAL_LAYERS`` layers,
    width ``MISTRAL_DIM``, sized to ``tokenizer``, and a one-layer Pixtral vision tower (16-pixel
    patches merged 2x2) whose image token is the tokenizer's ``[IMG]``."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in MISTRAL_SPECIAL_TOKENS}
    config = Mistral3Config(
        text_config={
            "model_type": "mistral",
            "vocab_size": len(tokenizer),
            "hidden_size": MISTRAL_DIM,
            "intermediate_size": 32,
            "num_hidden_layers": MISTRAL_LAYERS,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "max_position_embeddings": 1024,
            "sliding_window": None,
            "bos_token_id": ids["<s>"],
            "eos_token_id": ids["</s>"],
            "pad_token_id": ids["<pad>"],
        },
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        image_token_index=ids["[IMG]"],
        spatial_merge_size=2,
    )
    with _seeded(seed):
        return Mistral3ForConditionalGeneration(config).eval()


def tiny_flux2_pipeline(seed: int = 0) -> Flux2Pipeline:
    """A guidance-distilled ``Flux2Pipeline`` (FLUX.2 [dev]): transformer context
    3 x ``MISTRAL_DIM`` (hidden states 10, 20 and 30 stacked) and a guidance embedding.

    Its ``tokenizer`` is ``tiny_mistral_tokenizer()`` itself where the real checkpoint has a
    ``PixtralProcessor`` (which transformers imports only with torchvision): encoding a prompt
    calls just ``apply_chat_template``, which the tokenizer answers the same way; prompt
    upsampling (``caption_upsample_temperature``) needs the processor and is not supported.
    """
    tokenizer = tiny_mistral_tokenizer()
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER),
        vae=tiny_flux2_vae(seed),
        text_encoder=tiny_mistral3_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        transformer=tiny_flux2_transformer(3 * MISTRAL_DIM, guidance_embeds=True, seed=seed),
    )
