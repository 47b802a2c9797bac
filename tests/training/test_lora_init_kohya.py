"""``--init_lora_weights`` from a file in kohya's layout (ComfyUI's and kohya's sd-scripts'), for
every family: the adapter takes each module's rank and alpha from the file and starts at the
file's exact delta.

Each LoRA has random non-zero weights, scale alpha / r = 1.5 and one module of another rank and
alpha (2, 5.0: scale 2.5), is saved as the train scripts save it, and exported to kohya's layout
with the suite's exporter (FLUX.1 and FLUX.2 fuse q, k and v; FLUX.1 the single blocks' q, k, v
and MLP input into one ``linear1``). A reader that lost an alpha, a rank or a fused part would
change a delta.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import (
    Flux2KleinPipeline,
    FluxFillPipeline,
    FluxKontextPipeline,
    QwenImageEditPipeline,
)
from diffusers import StableDiffusionInpaintPipeline as SD15Pipeline
from lora_helpers import ALPHA, RANK, add_random_lora, save_random_lora
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from training.config import TrainConfig
from training.inputs.flux2 import FLUX2_LORA_LAYERS
from training.lora.adapters import LoraFile, LoraFormat, add_lora
from training.lora.export import KOHYA, convert, read_lora, write_conversion
from worlds.tiny_flux2 import QWEN3_DIM, tiny_flux2_transformer
from worlds.tiny_models import (
    tiny_flux_fill_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_qwen_image_transformer,
    tiny_sd15_inpaint_pipeline,
)

# One module of each LoRA at another rank and alpha (peft's patterns, by name suffix).
OTHER_RANK, OTHER_ALPHA = 2, 5.0
# FLUX: the double blocks' image q, k, v (one kohya img_attn_qkv) and text q alone (txt_attn_qkv
# with two zero parts), the single blocks' q, k, v and MLP input (linear1), an MLP, the final
# norm (its halves swapped in kohya's layout) and the input embedding.
FLUX_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "proj_mlp",
    "ff.net.2",
    "norm_out.linear",
    "x_embedder",
]
# FLUX.2: train_flux2_edit_lora.py's layers (q, k, v fused twice, the single blocks' fused
# projection as it is), an MLP and the final norm.
FLUX2_TARGETS = [*FLUX2_LORA_LAYERS, "ff.linear_out", "norm_out.linear"]
QWEN_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "img_mlp.net.2",
    "img_mod.1",
]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]  # proj_in: a 1x1 conv
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_config(**overrides) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path="m", train_data_dir="d", **overrides)


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted module's LoRA delta ``scaling * B @ A`` in float64, ``[out, in]`` (a conv's
    ``[out, in * kh * kw]``), by module name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and "default" in module.lora_A:
            down = module.lora_A["default"].weight.double().flatten(1)
            up = module.lora_B["default"].weight.double().flatten(1)
            found[name] = module.scaling["default"] * up @ down
    return found


def read_deltas(lora_file: LoraFile) -> dict[str, torch.Tensor]:
    """Each module's delta in a file as :meth:`LoraFormat.read` gives it, before any adapter:
    ``(alpha / r) * B @ A`` in float64 with the alpha its config gives the module."""
    config = lora_file.metadata
    found = {}
    for module in lora_file.modules():
        down = lora_file.weights[f"{module}.lora_A.weight"].double()
        up = lora_file.weights[f"{module}.lora_B.weight"].double()
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        found[module] = alpha / down.shape[0] * up @ down
    return found


def random_lora(model: torch.nn.Module, targets, seed: int, other: str) -> None:
    """A rank-4, alpha-6 LoRA on ``targets`` with random weights; ``other`` at rank 2, alpha 5."""
    add_random_lora(
        model,
        targets,
        seed=seed,
        rank_pattern={other: OTHER_RANK},
        alpha_pattern={other: OTHER_ALPHA},
    )


def to_kohya(diffusers_file: Path, family: str, out: Path) -> Path:
    """``diffusers_file`` in kohya's layout, written by the suite's exporter."""
    lora = read_lora(diffusers_file)
    return write_conversion(convert(lora, KOHYA, family), out)


def warm_started(model: torch.nn.Module, kohya: Path, lora_format: LoraFormat, default_layers):
    """``model`` with the adapter ``--init_lora_weights kohya`` gives it."""
    add_lora(model, make_config(init_lora_weights=str(kohya)), default_layers, lora_format)
    return model


def assert_same_deltas(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, delta in expected.items():
        assert delta.abs().max() > 0, name  # a zero module would compare equal to anything
        torch.testing.assert_close(actual[name], delta, msg=name)


FLUX_PIPELINES = {
    "kontext": (tiny_flux_kontext_pipeline, FluxKontextPipeline),
    "fill": (tiny_flux_fill_pipeline, FluxFillPipeline),
}


def flux_lora(name: str, root: Path) -> tuple[dict, Path]:
    """A LoRA on the transformer of the FLUX pipeline ``name`` (``attn.to_v`` at the other rank):
    its deltas and its kohya file."""
    make_pipe, pipeline_cls = FLUX_PIPELINES[name]
    transformer = make_pipe(0).transformer
    random_lora(transformer, FLUX_TARGETS, seed=1, other="attn.to_v")
    save_random_lora(pipeline_cls, {"transformer": transformer}, root)
    return deltas(transformer), to_kohya(root, "flux", root / "kohya.safetensors")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """Kontext's LoRA (see :func:`flux_lora`)."""
    return flux_lora("kontext", tmp_path_factory.mktemp("flux"))


def klein_transformer():
    return tiny_flux2_transformer(3 * QWEN3_DIM, guidance_embeds=False)


@pytest.fixture(scope="module")
def flux2(tmp_path_factory):
    """A FLUX.2 [klein] transformer's LoRA (``attn.to_v`` at the other rank)."""
    root = tmp_path_factory.mktemp("flux2")
    transformer = klein_transformer()
    random_lora(transformer, FLUX2_TARGETS, seed=5, other="attn.to_v")
    save_random_lora(Flux2KleinPipeline, {"transformer": transformer}, root)
    return deltas(transformer), to_kohya(root, "flux2", root / "kohya.safetensors")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A Qwen-Image transformer's LoRA (``img_mlp.net.2`` at the other rank)."""
    root = tmp_path_factory.mktemp("qwen")
    transformer = tiny_qwen_image_transformer(0)
    random_lora(transformer, QWEN_TARGETS, seed=2, other="img_mlp.net.2")
    save_random_lora(QwenImageEditPipeline, {"transformer": transformer}, root)
    return deltas(transformer), to_kohya(root, "qwen-image", root / "kohya.safetensors")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """An SD1.5 LoRA on the UNet (``to_v`` at the other rank) and the text encoder
    (``v_proj``): ``({component: deltas}, kohya file)``."""
    root = tmp_path_factory.mktemp("sd15")
    pipe = tiny_sd15_inpaint_pipeline(0)
    random_lora(pipe.unet, UNET_TARGETS, seed=3, other="to_v")
    random_lora(pipe.text_encoder, CLIP_TARGETS, seed=4, other="v_proj")
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    save_random_lora(SD15Pipeline, models, root)
    expected = {component: deltas(model) for component, model in models.items()}
    return expected, to_kohya(root, "sd15", root / "kohya.safetensors")


class TestWarmStartFromKohya:
    @pytest.mark.parametrize("name", FLUX_PIPELINES)
    def test_flux(self, name, tmp_path):
        expected, kohya = flux_lora(name, tmp_path)
        tensors = load_file(kohya)
        assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * 32, 16)
        assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 3 * ALPHA
        make_pipe, pipeline_cls = FLUX_PIPELINES[name]
        transformer = warm_started(
            make_pipe(0).transformer, kohya, LoraFormat(pipeline_cls), ["proj_out"]
        )
        assert_same_deltas(deltas(transformer), expected)
        adapter = transformer.peft_config["default"]
        assert (adapter.r, adapter.lora_alpha) == (RANK, ALPHA)
        # to_v's part of the fused qkv: its own rank, its scale carried by its up weights (one
        # alpha holds the fused projection), so its delta is the original's.
        assert (
            transformer.get_submodule("transformer_blocks.0.attn.to_v").r["default"] == OTHER_RANK
        )
        trainable = [p for n, p in transformer.named_parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)

    def test_flux2(self, flux2):
        expected, kohya = flux2
        tensors = load_file(kohya)
        assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (9 * 32, 4)
        assert tensors["lora_unet_double_blocks_0_txt_attn_qkv.alpha"].item() == 3 * ALPHA
        lora_format = LoraFormat(Flux2KleinPipeline)
        assert_same_deltas(read_deltas(lora_format.read(kohya)), expected)
        transformer = warm_started(klein_transformer(), kohya, lora_format, ["proj_out"])
        assert_same_deltas(deltas(transformer), expected)
        to_v = transformer.get_submodule("transformer_blocks.0.attn.to_v")
        assert to_v.r["default"] == OTHER_RANK

    def test_qwen_image(self, qwen):
        expected, kohya = qwen
        assert "lora_unet_transformer_blocks_0_img_mod_1.alpha" in load_file(kohya)
        transformer = warm_started(
            tiny_qwen_image_transformer(0), kohya, LoraFormat(QwenImageEditPipeline), ["proj_out"]
        )
        assert_same_deltas(deltas(transformer), expected)
        mlp = transformer.get_submodule("transformer_blocks.0.img_mlp.net.2")
        assert (mlp.r["default"], mlp.lora_alpha["default"]) == (OTHER_RANK, OTHER_ALPHA)

    def test_sd15_unet_and_text_encoder(self, sd15):
        expected, kohya = sd15
        tensors = load_file(kohya)
        assert any(name.startswith("lora_te_") for name in tensors)
        pipe = tiny_sd15_inpaint_pipeline(0)
        unet = warm_started(pipe.unet, kohya, LoraFormat(SD15Pipeline, "unet"), ["to_q"])
        text_encoder = warm_started(
            pipe.text_encoder, kohya, LoraFormat(SD15Pipeline, "text_encoder"), ["q_proj"]
        )
        assert_same_deltas(deltas(unet), expected["unet"])
        assert_same_deltas(deltas(text_encoder), expected["text_encoder"])
        # A UNet-only file: the text encoder starts fresh (train_sd15_inpaint.py asks so).
        unet_only = kohya.with_name("unet_only.safetensors")
        save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, unet_only)
        with pytest.raises(ValueError, match=rf"{re.escape(str(unet_only))} holds no text_enc"):
            LoraFormat(SD15Pipeline, "text_encoder").read(unet_only)

    def test_a_flag_that_disagrees_with_the_file_is_refused(self, flux):
        _, kohya = flux
        config = make_config(init_lora_weights=str(kohya), rank=8)
        transformer = tiny_flux_kontext_pipeline(0).transformer
        with pytest.raises(ValueError, match=re.escape(f"{kohya}: --rank 8 but the file has 4")):
            add_lora(transformer, config, ["proj_out"], LoraFormat(FluxKontextPipeline))


class TestRefusals:
    @pytest.mark.parametrize(
        "source,lora_format,theirs,ours",
        [
            ("sd15", LoraFormat(FluxKontextPipeline), "sd15", "flux"),
            ("qwen", LoraFormat(FluxFillPipeline), "qwen-image", "flux"),
            ("flux", LoraFormat(QwenImageEditPipeline), "flux", "qwen-image"),
            ("flux", LoraFormat(SD15Pipeline, "unet"), "flux", "sd15"),
            ("flux", LoraFormat(Flux2KleinPipeline), "flux", "flux2"),
            ("flux2", LoraFormat(FluxKontextPipeline), "flux2", "flux"),
        ],
    )
    def test_a_kohya_file_of_another_family(self, request, source, lora_format, theirs, ours):
        kohya = request.getfixturevalue(source)[1]
        with pytest.raises(ValueError) as error:
            lora_format.read(kohya)
        message = str(error.value)
        assert "\n" not in message
        assert str(kohya) in message
        assert f"is a {theirs} LoRA in kohya's layout" in message
        assert f"{lora_format.pipeline_cls.__name__} is a {ours} pipeline" in message

    def test_a_kohya_module_the_family_has_no_name_for(self, flux, tmp_path):
        _, kohya = flux
        tensors = load_file(kohya)
        tensors["lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight"] = torch.ones(2, 32)
        tensors["lora_unet_double_blocks_0_img_attn_bogus.lora_up.weight"] = torch.ones(32, 2)
        path = tmp_path / "bogus.safetensors"
        save_file(tensors, path)
        with pytest.raises(ValueError) as error:
            LoraFormat(FluxKontextPipeline).read(path)
        message = str(error.value)
        assert "\n" not in message and str(path) in message
        assert "lora_unet_double_blocks_0_img_attn_bogus is no FLUX module" in message
