"""Tiny random models, built from configs, for offline CPU tests of every family the suite trains.

Each factory returns a complete diffusers pipeline (or, for SD3, a VAE) whose architecture matches
the real checkpoint wherever the training code depends on it: 8x VAE compression, latent channels,
the FLUX Fill 384-channel input, the SD1.5 9-channel UNet, the schedulers' shift settings. Widths
and depths are shrunk so that each saved pipeline takes one or two megabytes and runs a denoising
step in milliseconds on a CPU.
Tokenizers are built in code from a small vocabulary (byte-level BPE, or a Unigram model for T5),
so any prompt tokenizes without a download.

``worlds.tiny_set.write_tiny_models(out_dir)`` saves them (and the FLUX.2 ones of
:mod:`worlds.tiny_flux2`) with ``save_pretrained`` in the layout that
``scripts/make_tiny_models.py`` documents; tests load them back with ``from_pretrained``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    BitImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from models.qwen_processor import Qwen2VLImageOnlyProcessor

# Words with whole-word tokens, so that typical prompts are not all single symbols; any other
# text still tokenizes through the byte alphabet (BPE) or the unknown token (T5).
WORDS = (
    "a an the of in on to with and at by from is this that it image photo picture background "
    "object person cat dog car tree house sky red green blue white black add remove replace "
    "change make insert put turn into behind next left right small large"
).split()

# FLUX conditions on T5 hidden states (`joint_attention_dim`) and the CLIP pooled output
# (`pooled_projection_dim`); SD1.5 cross-attends to the CLIP hidden states; Qwen-Image to the
# Qwen2.5-VL hidden states.
T5_DIM = 32
CLIP_DIM = 32
QWEN_TEXT_DIM = 32

# Byte-level BPE maps every byte to one printable symbol; with all 256 in the vocabulary any
# UTF-8 text has a tokenization even where no merge applies.
BYTE_ALPHABET = sorted(ByteLevel.alphabet())

# The tokens Qwen2-VL's prompt template and processor look up by name, in Qwen's id order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's vision geometry: 14-pixel patches merged 2x2 into one token of 28x28 pixels.
QWEN_VISION_PATCH = 14
QWEN_VISION_MERGE = 2
# Pixel budget of the tiny processors: 1 to 4 merged tokens (28x28 pixels each) per image.
QWEN_VISION_SIZE = {
    "shortest_edge": (QWEN_VISION_PATCH * QWEN_VISION_MERGE) ** 2,
    "longest_edge": 4 * (QWEN_VISION_PATCH * QWEN_VISION_MERGE) ** 2,
}

# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (Kontext and Fill ship the same).
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Qwen/Qwen-Image scheduler/scheduler_config.json (Qwen-Image-Edit ships the same).
QWEN_IMAGE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}

# Four blocks = three 2x downsamples: the 8x spatial compression of every real VAE here.
VAE_BLOCK_OUT_CHANNELS = (8, 8, 16, 16)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for the block, leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _byte_level(text: str) -> str:
    """``text`` in the byte-level alphabet (one symbol per UTF-8 byte, space -> ``Ġ``)."""
    return ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]


def _anchored_merges(
    words: list[list[str]], from_end: bool
) -> tuple[list[str], list[tuple[str, str]]]:
    """BPE merges that turn each word into one token, grown from its anchor symbol.

    ``words``: one list of vocabulary symbols per word, anchored at the end (CLIP's ``x</w>``)
    if ``from_end`` else at the start (Qwen's ``Ġ``). Every merge contains a grown anchor, which a
    pre-tokenized word holds only at that end, so merges of different words never compete for
    the same pair and each listed word always merges completely, whatever the merge ranks.
    Returns the tokens the merges create and the merges, in order and without duplicates.
    """
    tokens: list[str] = []
    merges: list[tuple[str, str]] = []
    for symbols in words:
        grown = symbols[-1] if from_end else symbols[0]
        for symbol in reversed(symbols[:-1]) if from_end else symbols[1:]:
            pair = (symbol, grown) if from_end else (grown, symbol)
            grown = "".join(pair)
            if pair not in merges:
                merges.append(pair)
                tokens.append(grown)
    return tokens, merges


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer with a 77-token context.

    Returns a ``CLIPTokenizer`` laid out like OpenAI's vocabulary: the 256 byte symbols, the same
    with ``</w>``, the word merges, then ``<|startoftext|>`` and ``<|endoftext|>`` (which also
    pads).
    """
    merged, merges = _anchored_merges(
        [[*word[:-1], word[-1] + "</w>"] for word in WORDS], from_end=True
    )
    symbols = [*BYTE_ALPHABET, *(s + "</w>" for s in BYTE_ALPHABET), *merged]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={symbol: i for i, symbol in enumerate(symbols)}, merges=merges, model_max_length=77
    )


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer that pads to 512 tokens (FLUX's default ``max_sequence_length``).

    Returns a ``T5TokenizerFast`` with T5's fixed ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), whole
    words and single printable ASCII characters; anything else becomes ``<unk>``. No sentinel
    (``<extra_id_*>``) tokens: nothing here masks spans.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -3.0) for word in WORDS]
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_qwen2_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer with the Qwen2-VL special tokens.

    Returns a ``Qwen2Tokenizer``: the 256 byte symbols, merges for each word after a space (as
    words appear mid-sentence, ``Ġword``), then ``QWEN_SPECIAL_TOKENS``. As in
    Qwen2.5-VL-Instruct, ``<|im_end|>`` ends a sequence and ``<|endoftext|>`` pads.
    """
    merged, merges = _anchored_merges(
        [list(_byte_level(" " + word)) for word in WORDS], from_end=False
    )
    symbols = [*BYTE_ALPHABET, *merged, *QWEN_SPECIAL_TOKENS]
    return Qwen2Tokenizer(
        vocab={symbol: i for i, symbol in enumerate(symbols)},
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )


def tiny_clip_text_model(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPTextModel:
    """A one-layer ``CLIPTextModel`` (hidden size ``CLIP_DIM``) sized to ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_DIM,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=CLIP_DIM,
        max_position_embeddings=tokenizer.model_max_length,
        # The pooled output is read at the first `eos_token_id`; the default id (2) selects a
        # legacy arg-max rule that only fits OpenAI's vocabulary.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return CLIPTextModel(config).eval()


def tiny_t5_encoder(tokenizer: T5TokenizerFast, seed: int = 0) -> T5EncoderModel:
    """A one-layer gated-GELU ``T5EncoderModel`` (T5 v1.1, as FLUX uses; d_model ``T5_DIM``)
    sized to ``tokenizer``."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def tiny_autoencoder_kl(
    latent_channels: int,
    scaling_factor: float,
    shift_factor: float | None,
    use_quant_convs: bool,
    seed: int = 0,
) -> AutoencoderKL:
    """An ``AutoencoderKL`` with 8x spatial compression: ``[B, 3, H, W] -> [B, C, H/8, W/8]``."""
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
            block_out_channels=VAE_BLOCK_OUT_CHANNELS,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=use_quant_convs,
            use_post_quant_conv=use_quant_convs,
        ).eval()


def tiny_flux_vae(seed: int = 0) -> AutoencoderKL:
    """The FLUX VAE shape: 16 latent channels, 8x, no quant convs, FLUX's scale and shift."""
    return tiny_autoencoder_kl(16, 0.3611, 0.1159, use_quant_convs=False, seed=seed)


def tiny_sd3_vae(seed: int = 0) -> AutoencoderKL:
    """The SD3 VAE shape: 16 latent channels, 8x, no quant convs, SD3's scale and shift."""
    return tiny_autoencoder_kl(16, 1.5305, 0.0609, use_quant_convs=False, seed=seed)


def _tiny_flux_components(in_channels: int, seed: int) -> dict[str, object]:
    """Every ``FluxKontextPipeline`` / ``FluxFillPipeline`` component, as keyword arguments.

    ``in_channels`` is the transformer's packed input width; its output is 64 either way
    (16 latent channels x a 2x2 patch).
    """
    clip_tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer()
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels,
            out_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_DIM,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ).eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        "vae": tiny_flux_vae(seed),
        "text_encoder": tiny_clip_text_model(clip_tokenizer, seed),
        "tokenizer": clip_tokenizer,
        "text_encoder_2": tiny_t5_encoder(t5_tokenizer, seed),
        "tokenizer_2": t5_tokenizer,
        "transformer": transformer,
    }


def tiny_flux_kontext_pipeline(seed: int = 0) -> FluxKontextPipeline:
    """A guidance-distilled ``FluxKontextPipeline``: 64-channel transformer input (16 latent
    channels x 2x2); context tokens are appended to the target tokens along the sequence."""
    return FluxKontextPipeline(**_tiny_flux_components(64, seed))


def tiny_flux_fill_pipeline(seed: int = 0) -> FluxFillPipeline:
    """A ``FluxFillPipeline``: 384-channel transformer input = 64 noisy latent + 64 masked-image
    latent + 256 mask (the 8x8 pixel mask under each latent pixel, x 2x2)."""
    return FluxFillPipeline(**_tiny_flux_components(384, seed))


def tiny_qwen2_vl_image_processor() -> Qwen2VLImageProcessor:
    """A Qwen2-VL image processor that resizes every image to at most 2x2 vision tokens.

    Returns a ``Qwen2VLImageProcessor`` with Qwen2-VL's patch and merge sizes and a pixel budget
    of 1 to 4 tokens: ``QwenImageEditPipeline`` hands it the context image resized to about one
    megapixel, which the real budget would turn into over a thousand tokens.
    """
    return Qwen2VLImageProcessor(
        patch_size=QWEN_VISION_PATCH,
        temporal_patch_size=2,
        merge_size=QWEN_VISION_MERGE,
        size=dict(QWEN_VISION_SIZE),
    )


def tiny_qwen2_vl_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLImageOnlyProcessor:
    """The vision-language processor ``QwenImageEditPipeline`` calls: ``tokenizer`` with the tiny
    image processor. Image-only (``models.qwen_processor``), so it needs no torchvision;
    ``write_tiny_models`` saves it in the layout of a real checkpoint's ``processor/`` folder."""
    return Qwen2VLImageOnlyProcessor(
        image_processor=tiny_qwen2_vl_image_processor(), tokenizer=tokenizer
    )


def tiny_qwen2_5_vl_text_encoder(
    tokenizer: Qwen2Tokenizer, seed: int = 0
) -> Qwen2_5_VLForConditionalGeneration:
    """A one-layer Qwen2.5-VL (text width ``QWEN_TEXT_DIM``, one-block vision tower) sized to
    ``tokenizer``, with its image, video and vision start/end token ids taken from it."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": QWEN_TEXT_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            # Multimodal RoPE splits each head's rotary half (8 of 16 dims) into
            # (time, height, width) sections.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": QWEN_TEXT_DIM,
            "patch_size": QWEN_VISION_PATCH,
            "spatial_merge_size": QWEN_VISION_MERGE,
            "temporal_patch_size": 2,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with _seeded(seed):
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_vae(seed: int = 0) -> AutoencoderKLQwenImage:
    """The Qwen-Image VAE shape: 16 latent channels and 8x spatial compression (three
    downsamples, the last two also temporal), ``[B, 3, T, H, W] -> [B, 16, T', H/8, W/8]``, with
    the real per-channel latent mean and std."""
    with _seeded(seed):
        return AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ).eval()


def tiny_qwen_image_transformer(seed: int = 0) -> QwenImageTransformer2DModel:
    """A one-block ``QwenImageTransformer2DModel``: 64-channel packed input (16 latent channels x
    2x2), 16 output channels per latent pixel, text width ``QWEN_TEXT_DIM``."""
    with _seeded(seed):
        return QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=QWEN_TEXT_DIM,
            axes_dims_rope=(4, 6, 6),
        ).eval()


def _tiny_qwen_edit_components(seed: int) -> dict[str, object]:
    """Every ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline`` component."""
    tokenizer = tiny_qwen2_tokenizer()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        "vae": tiny_qwen_image_vae(seed),
        "text_encoder": tiny_qwen2_5_vl_text_encoder(tokenizer, seed),
        "tokenizer": tokenizer,
        "processor": tiny_qwen2_vl_processor(tokenizer),
        "transformer": tiny_qwen_image_transformer(seed),
    }


def tiny_qwen_image_edit_pipeline(seed: int = 0) -> QwenImageEditPipeline:
    """A ``QwenImageEditPipeline`` whose Qwen2.5-VL text encoder also sees the context image."""
    return QwenImageEditPipeline(**_tiny_qwen_edit_components(seed))


def tiny_qwen_image_edit_plus_pipeline(seed: int = 0) -> QwenImageEditPlusPipeline:
    """A ``QwenImageEditPlusPipeline`` (Edit-2509/2511: the vision-language encoder sees the
    condition at 384x384 area, the VAE at 1024x1024), with the same components."""
    return QwenImageEditPlusPipeline(**_tiny_qwen_edit_components(seed))


def save_qwen_edit_pipeline(pipe, folder: str | Path) -> Path:
    """Save a Qwen-Image-Edit (or Edit Plus) pipeline built here to ``folder`` (safetensors), its
    processor as a real checkpoint's: the standard ``Qwen2VLProcessor`` class in
    ``model_index.json`` and ``processor_config.json``, with a video processor of the image
    processor's geometry, so that transformers loads it as usual where torchvision is installed
    (and ``load_image_only_processor`` reads it anywhere)."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    config_path = folder / "processor" / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "Qwen2VLProcessor"
    image = config["image_processor"]
    config["video_processor"] = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": image["patch_size"],
        "temporal_patch_size": image["temporal_patch_size"],
        "merge_size": image["merge_size"],
        "size": image["size"],
        "image_mean": image["image_mean"],
        "image_std": image["image_std"],
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def tiny_sd15_inpaint_pipeline(seed: int = 0) -> StableDiffusionInpaintPipeline:
    """A ``StableDiffusionInpaintPipeline``: 9-channel UNet input (4 noisy latent + 1 mask + 4
    masked-image latent), a 4-channel 8x VAE with SD1.5's scale, SD1.5's PNDM scheduler and no
    safety checker."""
    tokenizer = tiny_clip_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=9,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=CLIP_DIM,
            attention_head_dim=4,
        ).eval()
    return StableDiffusionInpaintPipeline(
        vae=tiny_autoencoder_kl(4, 0.18215, None, use_quant_convs=True, seed=seed),
        text_encoder=tiny_clip_text_model(tokenizer, seed),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_dinov2(out_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny random DINOv2 image encoder and its image processor to ``out_dir``.

    A stand-in for ``--embedding_encoder`` checkpoints: 28x28 input, 14x14 patches (4 patch
    tokens plus the class token) of width 32, ImageNet mean and std like the real processors.
    """
    out_dir = Path(out_dir)
    with _seeded(seed):
        model = Dinov2Model(
            Dinov2Config(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                patch_size=14,
                image_size=28,
            )
        )
    model.save_pretrained(out_dir)
    BitImageProcessor(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out_dir)
    return out_dir
